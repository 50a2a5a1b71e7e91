"""Layout of one distillation checkpoint directory (safetensors + JSON only; nothing is ever pickled).

    {run}/checkpoint-000400/
        state.safetensors   rank 0: student, EMA target, discriminator heads, optimiser (and LoRA) tensors,
                            flat ``group/name`` keys from ``Distiller.checkpoint_tensors()``
        meta.json           rank 0: ``Distiller.checkpoint_meta()`` (format, step, config, optimiser groups,
                            grad-scaler state, RNG, trainable names) + "job": data position, attempt, counters
        rank-00000.json     every rank: its data position (epoch, rows of its shard consumed in that epoch)
        rank-00001.json     ...

Every rank writes its own files into a local temporary directory and reports it; Ray Train merges the
ranks' directories into one checkpoint directory on the run's storage. The step, config and RNG live in
meta.json; the training noise of step s on rank r is a pure function of (seed, r, s)
(``musiccm.distill.distiller.step_generator``), so no per-rank generator state is needed.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from musiccm import storage

STATE = "state.safetensors"
META = "meta.json"
JOB_FORMAT = 1


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def dir_name(step: int) -> str:
    """Checkpoint directory name of a step (zero-padded to six digits; longer past 999,999 steps)."""
    return f"checkpoint-{step:06d}"


_DIR_NAME = re.compile(r"checkpoint-(\d{6,})")


def list_checkpoints(run: str) -> list[str]:
    """Checkpoint directories of a run in storage (those with a meta.json), oldest step first."""
    found = []
    for meta in storage.list_files(run, suffix="/" + META):
        directory = meta.rsplit("/", 1)[0]
        match = _DIR_NAME.fullmatch(directory.rsplit("/", 1)[-1])
        if match:
            found.append((int(match.group(1)), directory))
    return [directory for _, directory in sorted(found)]


@dataclass(frozen=True)
class WorkerPosition:
    """Where one rank stands in its data shard: epoch, rows of the shard consumed in that epoch."""

    rank: int
    world_size: int
    step: int
    epoch: int
    rows: int
    node_id: str = ""  # the Ray node this rank ran on (evidence of multi-node placement)


@dataclass(frozen=True)
class JobState:
    """Run-level counters saved by rank 0 beside the distiller's meta."""

    step: int
    epoch: int
    attempt: int  # 0 for the first start of the run, +1 for every restart or rerun from a checkpoint
    samples: int  # training clips used so far, all ranks
    skipped_rows: int  # manifest rows skipped as unreadable so far, all ranks
    world_size: int
    format: int = JOB_FORMAT


def save(
    directory: str,
    position: WorkerPosition,
    tensors: dict[str, torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    job: JobState | None = None,
) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (rank 0 passes tensors, meta and job)."""
    os.makedirs(directory, exist_ok=True)
    if tensors is not None:
        save_file(tensors, os.path.join(directory, STATE), metadata={"step": str(position.step)})
    if meta is not None:
        payload = {**meta, "job": asdict(job) if job is not None else None}
        _write_json(os.path.join(directory, META), payload)
    _write_json(os.path.join(directory, rank_file(position.rank)), asdict(position))


def load(directory: str, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any], JobState, WorkerPosition | None]:
    """(tensors, distiller meta, job state, this rank's position or None) from a checkpoint directory."""
    for name in (STATE, META):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"checkpoint {directory} lacks {name}; expected the layout of musiccm.jobs.checkpoints")
    tensors = load_file(os.path.join(directory, STATE))
    with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    job_dict = meta.pop("job", None) or {}
    job = JobState(**{k: job_dict[k] for k in JobState.__dataclass_fields__ if k in job_dict}) if job_dict else \
        JobState(step=int(meta["step"]), epoch=0, attempt=0, samples=0, skipped_rows=0, world_size=0)
    path = os.path.join(directory, rank_file(rank))
    position = None
    if os.path.isfile(path):
        with open(path) as f:
            position = WorkerPosition(**json.load(f))
    return tensors, meta, job, position


def _write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
