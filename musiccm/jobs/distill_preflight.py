"""Checks of a distillation job before any Ray worker starts: each failure is one line, no traceback.

Order: the config itself, the teacher (a MusicLDM layout whose configs and safetensors headers say it loads), the
--student-init model if any (the teacher's UNet architecture, UNet weights that load), the manifest (a readable
Parquet schema with `uri`/`audio` and at least one row), the storage (a probe write under the run
directory and the export location), the teacher's CLAP when some row has no caption (it must embed a silent
training-length clip: such rows are conditioned on their own audio), then, once Ray is up, the cluster (GPUs for
--use-gpu, CPU headroom for Ray Data).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from musiccm import model, storage
from musiccm.distill.config import DistillConfig
from musiccm.distill.data import ManifestError, check_manifest_schema
from musiccm.jobs.distill_args import LOCAL_STORAGE


class PreflightError(ValueError):
    """A job that cannot start: one line naming the flag, what is wrong and what is allowed."""


@dataclass(frozen=True)
class ManifestInfo:
    """What the preflight learned about the training manifest."""

    path: str  # pyarrow path (for S3: bucket/key without the scheme)
    rows: int
    files: int
    columns: tuple[str, ...]


def _absolute(uri: str) -> str:
    """Local paths made absolute (Ray workers do not share the driver's working directory); s3:// unchanged."""
    return uri if storage.is_s3(uri) else os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def _model_location(path_or_id: str) -> str:
    """An existing local model path made absolute; an s3:// prefix or a hub id unchanged."""
    local = not storage.is_s3(path_or_id) and os.path.exists(os.path.expanduser(path_or_id))
    return _absolute(path_or_id) if local else path_or_id


def resolve_locations(config: DistillConfig) -> DistillConfig:
    """Absolute local paths; storage default ./outputs/runs; export default {storage}/{name}/export."""
    root = _absolute(config.storage or LOCAL_STORAGE)
    output = _absolute(config.output or storage.join(root, config.name, "export"))
    teacher, init = _model_location(config.teacher), config.student_init and _model_location(config.student_init)
    audiomae = _absolute(config.audiomae_path) if config.audiomae_path else None
    manifest = _absolute(config.train_manifest) if config.train_manifest else ""
    return config.replace(storage=root, output=output, teacher=teacher, student_init=init, audiomae_path=audiomae,
                          train_manifest=manifest)


def run_uri(config: DistillConfig) -> str:
    """The run directory: {storage}/{name} (Ray Train's own checkpoints live here too)."""
    if config.storage is None:
        raise ValueError("run_uri needs a resolved config (call resolve_locations first)")
    return storage.join(config.storage, config.name)


def check_model(path_or_id: str, flag: str, components: Iterable[str] = model.REQUIRED) -> str:
    """The model's local directory; PreflightError (naming ``flag``) unless it is a MusicLDM layout with UNet
    weights whose ``components`` would load (:func:`musiccm.model.check_loadable`: configs and safetensors headers,
    no weights)."""
    try:
        directory = model.resolve(path_or_id)
    except (model.ModelError, storage.StorageError, ValueError) as exc:
        raise PreflightError(f"{flag}: {exc}") from None
    unet = os.path.join(directory, "unet")
    has_weights = any(n.endswith(".safetensors") for n in os.listdir(unet))
    if not os.path.isfile(os.path.join(unet, "config.json")) or not has_weights:
        raise PreflightError(f"{flag} {path_or_id!r}: unet/ has no config.json or no .safetensors weights; "
                             "need a MusicLDM-layout model with UNet weights in safetensors")
    require_loadable(directory, path_or_id, flag, components)
    return directory


def require_loadable(directory: str, path_or_id: str, flag: str, components: Iterable[str]) -> None:
    """PreflightError (naming ``flag``) unless :func:`musiccm.model.check_loadable` passes."""
    try:
        model.check_loadable(directory, path_or_id, components)
    except model.ModelError as exc:
        raise PreflightError(f"{flag}: {exc}") from None


def check_student_init(config: DistillConfig, teacher_dir: str) -> None:
    """--student-init: a MusicLDM layout whose UNet config has the architecture of the teacher in ``teacher_dir``
    (as :func:`check_model` returned it) and whose UNet weights would load (only its UNet is used)."""
    if not config.student_init:
        return
    init_dir = check_model(config.student_init, "--student-init", components=())
    theirs, ours = (json.loads(Path(d, "unet", "config.json").read_text()) for d in (init_dir, teacher_dir))
    differ = model.unet_differences(theirs, ours)
    if differ:
        raise PreflightError(f"--student-init {config.student_init!r}: its UNet differs from the teacher's "
                             f"({differ}); need a UNet of the teacher's architecture")
    require_loadable(init_dir, config.student_init, "--student-init", ("unet",))


def check_manifest(uri: str) -> ManifestInfo:
    """Schema and row count from the Parquet footers only; PreflightError for missing, unreadable or empty."""
    if not uri:
        raise PreflightError("--train-manifest is required: a Parquet file or directory (local or s3://)")
    fs, path = storage.pyarrow_fs(uri)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)
        schema = dataset.schema
        rows = dataset.count_rows()
        files = len(dataset.files)
    except FileNotFoundError:
        raise PreflightError(f"--train-manifest {uri}: no such file or directory") from None
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PreflightError(f"--train-manifest {uri}: not a readable Parquet manifest ({first})") from None
    if files == 0:
        raise PreflightError(f"--train-manifest {uri}: no Parquet files there")
    try:
        check_manifest_schema(schema)
    except ManifestError as exc:
        raise PreflightError(f"--train-manifest {uri}: {exc}") from None
    if rows == 0:
        raise PreflightError(f"--train-manifest {uri}: the manifest has 0 rows; need at least one training clip")
    return ManifestInfo(path=path, rows=rows, files=files, columns=tuple(schema.names))


def has_uncaptioned_rows(uri: str, info: ManifestInfo) -> bool:
    """Whether a row has no caption (no `caption` column, or a null or blank one): such rows are conditioned on
    their own CLAP audio embedding. Reads only the caption column, up to the first such row."""
    if "caption" not in info.columns:
        return True
    fs, _ = storage.pyarrow_fs(uri)
    try:
        for batch in pads.dataset(info.path, filesystem=fs, format="parquet").to_batches(columns=["caption"]):
            captions = batch.column(0)
            if captions.null_count or (len(captions) and pa.types.is_null(captions.type)):
                return True
            if len(captions) and pc.any(pc.equal(pc.utf8_trim_whitespace(captions), "")).as_py():
                return True
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PreflightError(f"--train-manifest {uri}: cannot read its captions ({first})") from None
    return False


def check_teacher_clap(config: DistillConfig, teacher_dir: str) -> None:
    """The teacher's CLAP must embed a training clip (a silent one of the crop length): a row without a caption is
    conditioned on its own CLAP audio embedding. Loads only CLAP and its feature extractor, on the CPU."""
    import numpy as np
    import torch
    from transformers import ClapFeatureExtractor, ClapModel

    from musiccm import external
    from musiccm.distill.data import crop_samples
    from musiccm.geometry import AudioGeometry
    from musiccm.logs import quiet_libraries

    if not os.path.isdir(os.path.join(teacher_dir, "feature_extractor")):
        return  # no CLAP audio front end: such rows get the unconditional embedding instead
    geometry = AudioGeometry.from_configs(*(json.loads(Path(teacher_dir, c, "config.json").read_text())
                                            for c in ("unet", "vae", "vocoder")))
    n = crop_samples(geometry, config.crop_seconds)
    quiet_libraries()  # no loading progress bars in the job's output
    try:
        clap = model.MusicLDMComponents(
            unet=None, vae=None, tokenizer=None, vocoder=None, scheduler=None,
            text_encoder=ClapModel.from_pretrained(teacher_dir, subfolder="text_encoder", use_safetensors=True).eval(),
            feature_extractor=ClapFeatureExtractor.from_pretrained(teacher_dir, subfolder="feature_extractor"))
        embedding = external.encode_audio(clap, [np.zeros(n, np.float32)], geometry.sample_rate)
        if embedding is not None and not bool(torch.isfinite(embedding).all()):
            raise ValueError("the embedding has non-finite values")
    except Exception as exc:  # whatever the tower raises is the reason
        cause = " ".join(str(exc).split()) or "no message"
        raise PreflightError(f"--teacher {config.teacher}: its CLAP audio tower cannot embed a training clip of "
                             f"{n / geometry.sample_rate:g} s ({type(exc).__name__}: {cause}); caption every row or "
                             "use a teacher whose CLAP takes that length") from None


def check_storage(config: DistillConfig) -> None:
    """Probe writes under the run directory and, when it is elsewhere, the export location."""
    targets = [("--storage", run_uri(config))]
    assert config.output is not None
    if not config.output.startswith(run_uri(config) + "/"):
        targets.append(("--output", config.output))
    for flag, uri in targets:
        try:
            storage.check_writable(uri)
        except (storage.StorageError, ValueError) as exc:
            raise PreflightError(f"{flag}: {exc}") from None


def check_cluster(config: DistillConfig, cpus_per_worker: float, resources: dict[str, Any]) -> None:
    """GPUs for --use-gpu, and CPUs for the workers plus one for Ray Data's read tasks."""
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 0))
    if config.use_gpu and gpus < 1:
        raise PreflightError("--use-gpu: the Ray cluster has no GPUs (ray.cluster_resources() reports 0); "
                             "drop --use-gpu to train on CPU, or connect to a cluster with GPU nodes")
    if config.use_gpu and gpus < config.num_workers:
        raise PreflightError(f"--num-workers {config.num_workers} with --use-gpu needs {config.num_workers} GPUs; "
                             f"the cluster has {gpus:g}")
    need = config.num_workers * cpus_per_worker
    if cpus_per_worker <= 0 or need + 1 > cpus:
        raise PreflightError(f"--num-workers {config.num_workers} x --cpus-per-worker {cpus_per_worker:g} = "
                             f"{need:g} CPUs, but the cluster has {cpus:g} and Ray Data needs at least 1 free for "
                             "reading the manifest; lower --cpus-per-worker (> 0) or --num-workers")


def preflight(config: DistillConfig) -> tuple[DistillConfig, ManifestInfo]:
    """All checks that need no Ray: returns the config with resolved locations and the manifest facts."""
    config = resolve_locations(config)
    teacher_dir = check_model(config.teacher, "--teacher")
    check_student_init(config, teacher_dir)
    if config.audiomae_path and not os.path.isfile(config.audiomae_path):
        raise PreflightError(f"--audiomae-path {config.audiomae_path}: no such file; need a local .safetensors file")
    info = check_manifest(config.train_manifest)
    if info.rows < config.num_workers:
        raise PreflightError(f"--train-manifest has {info.rows} rows but --num-workers is {config.num_workers}: "
                             "every worker needs at least one row per epoch")
    check_storage(config)
    if has_uncaptioned_rows(config.train_manifest, info):  # the slowest check (loads CLAP): last
        check_teacher_clap(config, teacher_dir)
    return config, info
