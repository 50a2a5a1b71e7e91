"""The Ray Train worker loop of the distillation job (the only Ray-specific training code).

Each worker (DDP rank): load the teacher, build the :class:`Distiller` with ``prepare_model`` (DDP),
restore the latest checkpoint if Ray Train hands one over, then loop until ``max_steps``:

1. (test hook) raise once at a chosen (rank, step) when the driver passed ``fail_at``;
2. pull rows from this rank's Ray Data shard until a batch has a usable clip (bad rows are counted and
   skipped); when any rank's shard runs dry, every rank starts the next epoch together (Ray Data's
   epoch start is a barrier across the shards, so ranks must agree on when to take it);
3. one ``train_step`` (DDP all-reduce inside), then an all-reduce of the batch and skip counts;
4. ``ray.train.report`` of the step's metrics (rank 0's are kept) at least ``report_every_s`` seconds apart, as
   rank 0's clock decides (Train V2 holds a report until its controller's next poll of the workers, every 2 s
   by default, so a report every step would cap a fast job at one step per poll; every step's metrics go to the
   step history below anyway), at validation steps, and every ``checkpoint_every`` steps and at the
   last step with a checkpoint (see :mod:`musiccm.jobs.checkpoints`), preceded on rank 0 by the step history
   shard ``{run}/metrics/steps-FIRST-LAST.parquet`` (a deterministic key: redone steps overwrite it) and by
   validation when due.

After the last step rank 0 exports the EMA student to ``config.output``. The step counter comes from the
checkpoint, so after a restart or a rerun the first step is the checkpoint's step + 1, never a repeat.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from musiccm import model, retry, storage
from musiccm.distill.config import DistillConfig
from musiccm.distill.data import PreparedBatch
from musiccm.distill.distiller import Distiller, step_generator
from musiccm.jobs import checkpoints
from musiccm.jobs.distill_args import FAIL_HOOK_ENV
from musiccm.jobs.distill_validation import validate
from musiccm.jobs.export import export_student

DATA_STREAM = 1  # step_generator stream of the data crops (stream 0 is the training noise)
MAX_EPOCH_RESTARTS = 3  # consecutive epoch starts without a usable batch before giving up


@dataclass(frozen=True)
class JobSpec:
    """What the loop needs besides the DistillConfig (passed through ``train_loop_config``)."""

    run: str  # {storage}/{name}
    shard_rows: int = 0  # rows per shard and epoch (Ray Data's equal split: manifest rows // workers); 0 = unknown
    fail_at: tuple[int, int] | None = None  # test hook (rank, step); None in real runs


# ---------------------------------------------------------------- collectives


def _all_reduce(values: list[float], op: Any, device: torch.device) -> list[float]:
    """All-reduce a few numbers across ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(t, op=op)
    return [float(x) for x in t.cpu()]


def _gather_reasons(reasons: list[str], limit: int = 20) -> list[str]:
    """Skip reasons of every rank (called by all ranks together, only when some rank skipped rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reasons[:limit]
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, reasons[:limit])
    return [f"rank {r}: {x}" for r, rs in enumerate(everyone) for x in (rs or [])][:limit]


# ---------------------------------------------------------------- data


class ShardStream:
    """Row batches of one rank's dataset shard, epoch after epoch, resumable at (epoch, rows consumed).

    Ray Data's streaming split does not fix which rows a shard gets, so a resumed epoch skips the same
    *number* of rows this rank had consumed (not the same rows): each epoch still visits ~every row once.
    """

    def __init__(self, shard: Any, batch_size: int, seed: int, rank: int, epoch: int = 0, skip_rows: int = 0):
        self.shard, self.batch_size, self.seed, self.rank = shard, batch_size, seed, rank
        self.epoch, self.rows, self._skip = epoch, 0, skip_rows
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _open(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.shard.iter_batches(
            batch_size=self.batch_size, batch_format="numpy", local_shuffle_buffer_size=max(4 * self.batch_size, 16),
            local_shuffle_seed=(self.seed * 100_003 + self.epoch) * 1009 + self.rank,
        ))

    def next_rows(self) -> dict[str, np.ndarray] | None:
        """The next rows of this epoch (at most batch_size), or None when the epoch's shard is exhausted."""
        if self._it is None:
            self._it = self._open()
        for rows in self._it:
            n = len(next(iter(rows.values()))) if rows else 0
            if self._skip:
                drop = min(self._skip, n)
                self._skip -= drop
                self.rows += drop
                rows, n = {k: v[drop:] for k, v in rows.items()}, n - drop
            if n:
                self.rows += n
                return rows
        return None

    def new_epoch(self) -> None:
        """Drop the rest of this epoch; the next ``next_rows`` starts the next one (a barrier in Ray Data)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it, self.epoch, self.rows, self._skip = None, self.epoch + 1, 0, 0


@dataclass
class StepData:
    batch: PreparedBatch
    skipped: int  # rows skipped on this rank while assembling this step's batch
    reasons: list[str]


def next_batch(
    stream: ShardStream,
    prepare: Callable[[dict[str, np.ndarray]], PreparedBatch],
    any_rank: Callable[[bool], bool],
) -> StepData:
    """A batch with ≥ 1 usable clip on every rank; all ranks move to the next epoch together when any runs dry."""
    skipped, reasons = 0, []
    for _ in range(MAX_EPOCH_RESTARTS + 1):
        batch = None
        while batch is None and (rows := stream.next_rows()) is not None:
            prepared = prepare(rows)
            skipped += prepared.skipped
            reasons += prepared.reasons
            batch = prepared if prepared.size > 0 else None
        if not any_rank(batch is None):
            assert batch is not None
            return StepData(batch, skipped, reasons)
        stream.new_epoch()  # the same decision on every rank: it came from the all-reduce
    raise RuntimeError(f"no usable training rows on some rank after {MAX_EPOCH_RESTARTS} epoch starts "
                       f"(rank {stream.rank} skipped {skipped}: {reasons[:3]}); check the manifest's audio")


# ---------------------------------------------------------------- history, hook, export


class History:
    """Rank 0's per-step metrics, written as one Parquet shard per checkpoint interval."""

    def __init__(self, run: str, first_step: int):
        self.run, self.first, self.rows = run, first_step, []

    def add(self, metrics: dict[str, Any]) -> None:
        self.rows.append({k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)})

    def flush(self, last_step: int) -> None:
        if self.rows:
            columns = list(dict.fromkeys(k for row in self.rows for k in row))  # validation steps add columns
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in self.rows]), buf)
            key = f"steps-{self.first:06d}-{last_step:06d}.parquet"
            storage.write_bytes(storage.join(self.run, "metrics", key), buf.getvalue())
        self.first, self.rows = last_step + 1, []


def maybe_fail(spec: JobSpec, rank: int, step: int) -> None:
    """TEST HOOK (off unless the driver saw ``MUSICCM_DISTILL_FAIL_AT=RANK:STEP``): raise once at that point.

    "Once" is remembered by a marker object under ``{run}/test-hooks/`` so the restarted worker passes.
    All ranks first meet at a barrier, so every rank has handed its previous report to Ray Train before the
    failure: otherwise a fast rank can fail while rank 0 is still uploading the last checkpoint, the controller
    sees the error before rank 0's report, and the restart begins from an older checkpoint than the test expects.
    """
    if spec.fail_at is None or step != spec.fail_at[1]:
        return
    if dist.is_initialized():
        dist.barrier()
    if rank != spec.fail_at[0]:
        return
    marker = storage.join(spec.run, "test-hooks", f"failed-rank{rank}-step{step}")
    if storage.exists(marker):
        return
    storage.write_bytes(marker, f"{time.time()}\n".encode())
    raise RuntimeError(f"injected worker failure (test hook {FAIL_HOOK_ENV}) on rank {rank} at step {step}")


# ---------------------------------------------------------------- the loop


def report_checkpoint(distiller: Distiller, metrics: dict[str, Any], position: checkpoints.WorkerPosition,
                      state: checkpoints.JobState, history: History | None) -> None:
    """Every rank: write its part of the checkpoint and report it (rank 0 first flushes the step history)."""
    with tempfile.TemporaryDirectory() as tmp:
        if position.rank == 0:
            if history is not None:
                history.flush(position.step)
            checkpoints.save(tmp, position, distiller.checkpoint_tensors(), distiller.checkpoint_meta(), state)
        else:
            checkpoints.save(tmp, position)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoints.dir_name(position.step))


def _restore(distiller: Distiller, rank: int, world: int, shard_rows: int) -> tuple[checkpoints.JobState, int, int]:
    """Load Ray Train's latest checkpoint, if any → (job state, this rank's epoch, rows to skip in it)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return checkpoints.JobState(0, 0, -1, 0, 0, world), 0, 0
    with ckpt.as_directory() as directory:
        tensors, meta, job, position = checkpoints.load(directory, rank)
    saved = meta.get("config", {})
    distiller.restore(tensors, meta)
    if rank == 0:
        changed = {k: (saved.get(k), v) for k, v in distiller.config.to_dict().items() if saved.get(k) != v}
        print(f"[distill] resuming at step {distiller.step} (epoch {job.epoch}, attempt {job.attempt + 1}); "
              f"config changes since the checkpoint: {changed or 'none'}", file=sys.stderr, flush=True)
    if position is None or job.world_size != world or position.epoch != job.epoch:
        return job, job.epoch, 0  # another world size: other shards, so restart the epoch's count
    if shard_rows and position.rows >= shard_rows:
        return job, job.epoch + 1, 0  # the epoch was used up: start the next one without re-reading it
    return job, job.epoch, position.rows


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point: everything arrives through ``loop_config`` ({"config": ..., "job": ...})."""
    config = DistillConfig.from_dict(loop_config["config"])
    retry.set_budget(config.storage_retry_s)  # checkpoint, metric and data reads ride out storage outages
    job_cfg = loop_config["job"]
    fail_at = tuple(job_cfg["fail_at"]) if job_cfg.get("fail_at") else None
    spec = JobSpec(job_cfg["run"], job_cfg.get("shard_rows", 0), fail_at)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    teacher = model.load(config.teacher, device=device)
    init = model.load_unet(config.student_init, device=device) if config.student_init else None
    distiller = Distiller(teacher, config, device, wrap=ray.train.torch.prepare_model, rank=rank, student_init=init)
    del init
    job, epoch, skip = _restore(distiller, rank, world, spec.shard_rows)
    attempt, resumed_from = job.attempt + 1, distiller.step
    samples, skipped_total = job.samples, job.skipped_rows
    stream = ShardStream(ray.train.get_dataset_shard("train"), config.batch_size, config.seed, rank, epoch, skip)
    history = History(spec.run, distiller.step + 1) if rank == 0 else None
    any_rank = lambda flag: _all_reduce([float(flag)], dist.ReduceOp.MAX, device)[0] > 0
    last_report = time.monotonic()

    while distiller.step < config.max_steps:
        step = distiller.step + 1
        maybe_fail(spec, rank, step)
        start = time.perf_counter()
        gen = step_generator(config.seed, rank, step, DATA_STREAM)
        data = next_batch(stream, lambda rows, g=gen: distiller.prepare_batch(rows, g), any_rank)
        data_s = time.perf_counter() - start
        out = distiller.train_step(data.batch)  # noise from step_generator(seed, rank, step - 1): resumable
        # rank 0's clock decides when to report, so every rank reports at the same steps
        due = rank == 0 and time.monotonic() - last_report >= config.report_every_s
        rows, skipped, cached, due = _all_reduce([data.batch.size, data.skipped, data.batch.cached, float(due)],
                                                 dist.ReduceOp.SUM, device)
        reasons = _gather_reasons(data.reasons) if skipped else []
        elapsed = time.perf_counter() - start
        samples, skipped_total = samples + int(rows), skipped_total + int(skipped)
        metrics: dict[str, Any] = {
            "step": step, "epoch": stream.epoch, "attempt": attempt, "resumed_from": resumed_from,
            **{k: out[k] for k in ("distill_loss", "adv_g_loss", "adv_d_loss", "r1", "dmd_loss", "fake_loss",
                                   "gan_g_loss", "gan_cls_loss", "lr", "disc_lr", "grad_norm", "grad_scale",
                                   "disc_skipped", "fake_skipped", "loss")
               if k in out},
            "samples_per_s": rows / elapsed, "samples_per_s_per_worker": rows / elapsed / world,
            "rows": int(rows), "samples": samples, "skipped_rows": skipped_total, "skipped_rows_step": int(skipped),
            "step_time_s": elapsed, "data_time_s": data_s, "cached_rows": int(cached),
        }
        if reasons and rank == 0:
            print(f"[distill] step {step}: skipped {int(skipped)} row(s): {reasons}", file=sys.stderr, flush=True)
        last = step == config.max_steps
        validating = bool(config.validate_every) and (step % config.validate_every == 0 or last)
        if rank == 0 and validating:
            metrics.update(validate(distiller.student_components(use_ema=True), config, step, spec.run))
        if history is not None:
            history.add(metrics)
        if step % config.checkpoint_every == 0 or last:
            position = checkpoints.WorkerPosition(rank, world, step, stream.epoch, stream.rows,
                                                  ray.get_runtime_context().get_node_id())
            state = checkpoints.JobState(step, stream.epoch, attempt, samples, skipped_total, world)
            report_checkpoint(distiller, metrics, position, state, history)
            last_report = time.monotonic()
        elif due or validating:
            ray.train.report(metrics)
            last_report = time.monotonic()
    if rank == 0:
        export_student(distiller, config.output or storage.join(spec.run, "export"))
