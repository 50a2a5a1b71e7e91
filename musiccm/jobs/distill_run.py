"""Driver side of the distillation job: the Ray Data stream, the Ray Train V2 ``TorchTrainer``, the summary.

    {storage}/{name}/                     the run (Ray Train's storage_path/name)
        checkpoint_manager_snapshot.json  Ray Train's list of checkpoints (a rerun resumes from its latest)
        checkpoint-000400/                see musiccm.jobs.checkpoints
        metrics/steps-000001-000400.parquet  per-step metrics of rank 0, one shard per checkpoint interval
        validation/step-000400/...        see musiccm.jobs.distill_validation
        export/                           the EMA student (default --output)
        summary.json                      what the driver printed at the end
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from typing import Any

import ray
import ray.data
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from musiccm import storage
from musiccm.distill.config import DistillConfig
from musiccm.jobs import checkpoints
from musiccm.jobs.distill_loop import train_loop_per_worker
from musiccm.jobs.distill_preflight import ManifestInfo, run_uri
from musiccm.model import ModelError

SUMMARY_METRICS = ("step", "epoch", "attempt", "resumed_from", "distill_loss", "adv_g_loss", "adv_d_loss", "r1", "lr",
                   "samples", "skipped_rows", "samples_per_s", "samples_per_s_per_worker")


def train_dataset(config: DistillConfig, manifest: ManifestInfo) -> ray.data.Dataset:
    """The manifest as a Ray Data stream, cut into blocks small enough that every worker gets some."""
    fs, _ = storage.pyarrow_fs(config.train_manifest)
    ds = ray.data.read_parquet(manifest.path, filesystem=fs)
    per_block = max(1, min(4 * config.batch_size, math.ceil(manifest.rows / (2 * config.num_workers))))
    return ds.repartition(target_num_rows_per_block=per_block)


def build_trainer(
    config: DistillConfig, manifest: ManifestInfo, cpus_per_worker: float = 1.0,
    fail_at: tuple[int, int] | None = None,
) -> TorchTrainer:
    """TorchTrainer over ``train_loop_per_worker``: DDP (gloo on CPU, NCCL on GPU), checkpoints on the storage."""
    assert config.storage is not None
    fs, path = storage.pyarrow_fs(config.storage)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "job": {
            "run": run_uri(config), "shard_rows": manifest.rows // config.num_workers, "fail_at": fail_at}},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=config.name,
            storage_path=path,
            storage_filesystem=fs if storage.is_s3(config.storage) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": train_dataset(config, manifest)},
    )


def describe_error(error: BaseException, limit: int = 600) -> str:
    """One line for the summary: the exception's first line and the error lines of the ranks' snippets."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    causes = [ln for ln in lines[1:] if re.match(r"^[\w.]*(Error|Exception)\b|^A worker .* failed", ln)]
    text = " | ".join([f"{type(error).__name__}: {lines[0] if lines else ''}", *dict.fromkeys(causes)])
    return text[:limit]


def model_failure(error: BaseException | None) -> str | None:
    """The message (one line) of a ModelError a worker raised loading the teacher or --student-init, or None for any
    other failure. Ray Train hands each rank's exception over in ``WorkerGroupError.worker_failures``."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        if isinstance(failures[rank], ModelError):
            return " ".join(str(failures[rank]).split())
    return None


def worker_node_ids(checkpoint: str) -> list[str]:
    """Ray node id of every rank, as recorded in a checkpoint's rank files (rank order)."""
    ids = []
    for uri in storage.list_files(checkpoint, suffix=".json"):
        if uri.rsplit("/", 1)[-1].startswith("rank-"):
            ids.append(json.loads(storage.read_bytes(uri)).get("node_id", ""))
    return ids


def summarize(
    config: DistillConfig, manifest: ManifestInfo, result: Any, failure: BaseException | None, elapsed_s: float
) -> dict[str, Any]:
    """The run's summary: status, where the export and checkpoints are, final metrics, config, versions."""
    run = run_uri(config)
    assert config.output is not None
    metrics = dict(result.metrics or {}) if result is not None else {}
    error = failure if failure is not None else (result.error if result is not None else None)
    kept = checkpoints.list_checkpoints(run)
    export_ok = storage.exists(storage.join(config.output, "model_index.json"))
    return {
        "status": "ok" if error is None and export_ok else "failed",
        "error": None if error is None else describe_error(error),
        "name": config.name,
        "run": run,
        "export": config.output if export_ok else None,
        "step": metrics.get("step"),
        "final_metrics": {k: metrics[k] for k in SUMMARY_METRICS if k in metrics},
        "checkpoint": kept[-1] if kept else None,
        "checkpoints": kept,
        "worker_node_ids": worker_node_ids(kept[-1]) if kept else [],
        "metrics_history": storage.join(run, "metrics"),
        "validation": storage.join(run, "validation") if config.validate_every else None,
        "manifest": {"uri": config.train_manifest, "rows": manifest.rows, "files": manifest.files},
        "elapsed_s": round(elapsed_s, 3),
        "config": config.to_dict(),
        "versions": {"ray": ray.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_summary(config: DistillConfig, summary: dict[str, Any]) -> str:
    """{run}/summary.json (atomic); returns its URI."""
    uri = storage.join(run_uri(config), "summary.json")
    storage.write_bytes(uri, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return uri
