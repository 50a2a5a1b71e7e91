"""Export a student from a distillation checkpoint (``musiccm export``), or from a live ``Distiller``.

The distillation job exports its EMA student once, at the end of the run. To listen to, benchmark or ship an
earlier checkpoint (the one that validated best, or the last one of a run that stopped early), rebuild the
run's ``Distiller`` from the checkpoint's own config, restore the checkpoint into it and export that. Only
safetensors and JSON are read; the teacher is loaded from the path the run recorded, or from ``teacher``
when it has moved since.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

from musiccm import storage
from musiccm.jobs import checkpoints

if TYPE_CHECKING:
    from musiccm.distill.distiller import Distiller


def find_checkpoint(uri: str) -> str:
    """``uri`` when it is a checkpoint directory, else the latest ``checkpoint-NNNNNN`` under it (a run)."""
    if storage.exists(storage.join(uri, checkpoints.META)):
        return uri
    found = checkpoints.list_checkpoints(uri)
    if not found:
        raise ValueError(f"{uri} is neither a distillation checkpoint (no {checkpoints.META}) nor a run directory "
                         "holding checkpoint-NNNNNN/ directories")
    return found[-1]


def export_student(distiller: Distiller, output: str, use_ema: bool = True) -> str:
    """Save the student (EMA weights by default) at ``output``: a local directory, or a temporary one uploaded
    to an s3:// prefix."""
    if not storage.is_s3(output):
        return distiller.export(output, use_ema=use_ema)
    with tempfile.TemporaryDirectory() as tmp:
        storage.upload_dir(distiller.export(os.path.join(tmp, "student"), use_ema=use_ema), output)
    return output


def export_checkpoint(checkpoint: str, output: str, teacher: str | None = None, use_ema: bool = True,
                      device: str = "cpu", local_files_only: bool = False) -> dict[str, Any]:
    """Export the student of ``checkpoint`` (a checkpoint or run directory, local or s3://) to ``output``.

    Returns what was exported: the checkpoint, its step, the teacher used and the output.
    """
    from musiccm import model
    from musiccm.distill.config import DistillConfig
    from musiccm.distill.distiller import Distiller

    checkpoint = find_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(checkpoint, tmp) if storage.is_s3(checkpoint) else checkpoint
        tensors, meta, _, _ = checkpoints.load(local, rank=0)
    if teacher is not None:  # the run's structure check compares teacher paths: record the new one in both
        meta["config"]["teacher"] = teacher
    config = DistillConfig.from_dict(meta["config"])
    components = model.load(config.teacher, device=device, local_files_only=local_files_only)
    distiller = Distiller(components, config, device)
    distiller.restore(tensors, meta)
    export_student(distiller, output, use_ema=use_ema)
    return {"checkpoint": checkpoint, "step": distiller.step, "teacher": config.teacher, "use_ema": use_ema,
            "output": output}
