"""Batch generation on Ray Data: manifest → checked rows → GPU/CPU actors → audio + metric shards.

Output layout (local directory or s3:// prefix):

    _OWNER.json                   the live job's lease (musiccm.batch.ownership): one job per output at a time
    _RUN.json                     config + fingerprint of the run that owns this output (checked on rerun)
    _SUMMARY.json                 counts, throughput, model, config, versions of the latest attempt
    audio/{id}.{flac|wav}         written by the actors, atomically, at deterministic keys
    metrics/{attempt}-{n}.parquet one row per clip (written by the driver after the clip's audio exists)
    errors/{attempt}-{n}.parquet  (id, reason) for rejected rows and failed clips of the latest attempt

Steps: (1) before Ray (`musiccm.jobs.batch_preflight`): the manifest's schema, the model, the output's
writability, then the output's lease and its fingerprint; (2) read and validate rows with Ray Data tasks;
(3) on the driver: duplicate ids, rejected rows, ids already done (`resume`); (4) short then long clips
through an actor pool, each batch one homogeneous block; (5) metric rows stream back to the driver, which
writes shards and prints progress; (6) summary, with where the time went.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from musiccm import retry, storage
from musiccm.batch import manifest, ownership, resume
from musiccm.batch.config import (
    BatchConfig,
    Resources,
    default_run_name,
    plan_resources,
    steps_limit,
)
from musiccm.batch.generator_stage import GeneratorStage
from musiccm.batch.manifest import ManifestError
from musiccm.batch.metrics import Sink, write_errors
from musiccm.jobs.batch_preflight import RunConflict, check_claim, claim_output, inspect_model, preflight
from musiccm.model import ModelError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------- Ray parts


def read_checked(files: list[str], carried: pa.Schema, config: BatchConfig, max_steps: int) -> pa.Table:
    """Read the manifest with Ray Data and validate rows in Ray tasks; the checked table comes to the driver."""
    import ray

    # Local manifests are read by absolute path: on a multi-node cluster they must be on shared storage
    # (or inside `ray job submit --working-dir`, which every node gets).
    fs, _ = storage.pyarrow_fs(files[0])
    ds = ray.data.read_parquet([storage.pyarrow_fs(f)[1] for f in files], filesystem=fs)
    checked = ds.map_batches(
        manifest.check_batch,
        batch_format="pyarrow",
        fn_kwargs={"max_duration": config.max_duration, "default_steps": config.default_steps,
                   "max_steps": max_steps, "default_format": config.default_format},
    )
    tables = [t for t in ray.get(checked.to_arrow_refs()) if t.num_rows]
    if not tables:
        return manifest.checked_schema(carried).empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


def generate(todo: pa.Table, config: BatchConfig, res: Resources, sink: Sink, lease: ownership.Lease) -> None:
    """Short clips, then long ones, through a fixed actor pool; every stage row goes to `sink` while we own the
    output."""
    import ray

    is_long = pc.fill_null(pc.greater(todo.column("duration_s"), config.long_threshold_s), False)
    phases = [(todo.filter(pc.invert(is_long)), config.batch_size), (todo.filter(is_long), config.long_batch_size)]
    for rows, batch_size in phases:
        blocks = manifest.plan_batches(rows, batch_size)
        if not blocks:
            continue
        out = ray.data.from_arrow(blocks).map_batches(
            GeneratorStage,
            fn_constructor_kwargs={"config": config, "device": res.device, "torch_threads": res.torch_threads,
                                   "io_threads": res.io_threads},
            batch_size=batch_size,
            batch_format="pyarrow",
            # Ray Data's actor pools restart dead actors and retry their tasks without limit by default
            # (max_restarts=-1, max_task_retries=-1): a SIGKILLed actor's batch is redone at the same keys.
            # Threaded actors: calls_per_actor batches at once, generation serialised by the stage's own lock, so
            # encoding and writing one batch overlaps generating the next (1: strictly one call at a time). Batches
            # queued on an actor: Ray's default (2 per concurrent call), but never more than the actor's fair share
            # of the job, so the first actor ready cannot take a small job's every batch while the others load.
            compute=ray.data.ActorPoolStrategy(
                size=min(res.actors, len(blocks)), max_concurrent_calls_per_actor=config.calls_per_actor,
                max_tasks_in_flight_per_actor=max(1, min(2 * config.calls_per_actor,
                                                         math.ceil(len(blocks) / min(res.actors, len(blocks))))),
                enable_true_multi_threading=config.calls_per_actor > 1),
            num_gpus=res.num_gpus or None,
            num_cpus=res.num_cpus,
        )
        for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            lease.check()
            sink.add(batch)


# ---------------------------------------------------------------- the run


def new_attempt() -> str:
    """Sortable attempt tag: UTC start time plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def versions() -> dict:
    import diffusers
    import ray
    import torch
    import transformers

    try:
        own = importlib.metadata.version("musiccm")
    except importlib.metadata.PackageNotFoundError:
        own = None
    return {"musiccm": own, "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__, "pyarrow": pa.__version__}


@dataclass
class Work:
    """What a run found in its manifest and output before generating."""

    checked: pa.Table  # every manifest row, checked
    errors: pa.Table  # (id, reason) of rejected rows
    todo: pa.Table  # valid rows not done yet
    state: resume.ResumeState
    counts: dict


def find_work(files: list[str], carried: pa.Schema, config: BatchConfig, attempt: str, max_steps: int) -> Work:
    """Read and check rows (Ray tasks), reject bad and duplicate ids, drop ids already done; write errors (not in a
    dry run)."""
    checked = read_checked(files, carried, config, max_steps)
    valid, errors = manifest.split(checked)
    state = resume.resume_state(config.output, verify=config.verify_audio)
    done = pc.is_in(valid.column("id"), value_set=pa.array(sorted(state.done), pa.string()))
    todo = valid.filter(pc.invert(done))
    if not config.dry_run:
        write_errors(config.output, attempt, errors.to_pylist())
    counts = {"requested": checked.num_rows, "valid": valid.num_rows, "rejected": errors.num_rows,
              "skipped_done": valid.num_rows - todo.num_rows, "to_generate": todo.num_rows}
    return Work(checked, errors, todo, state, counts)


@contextlib.contextmanager
def ray_session(config: BatchConfig) -> Iterator[None]:
    """`ray.init()` unless connected already (joins the cluster under `ray job submit`, else starts a local one)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init()
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_no_progress_timeout_s = config.stall_timeout_s  # long clips keep an actor busy for minutes
        ctx.enable_progress_bars = sys.stderr.isatty()  # our own progress lines go to logs
        yield
    finally:
        if started:
            ray.shutdown()


def run(config: BatchConfig) -> dict:
    """Run (or resume) a batch; return the summary (also written to `_SUMMARY.json`)."""
    started, t0, attempt = datetime.now(UTC), time.monotonic(), new_attempt()
    retry.set_budget(config.storage_retry_s)
    config, files, carried, model_info = preflight(config)  # 1. fail fast, no Ray yet
    if config.dry_run:
        check_claim(config, model_info)
        return dry_run(config, attempt, started, t0, files, carried, model_info)
    lease = ownership.acquire(config.output, config.run_name, attempt, config.lease_s, config.takeover)
    try:
        for note in lease.notes:
            print(f"[batch] note: {note}", flush=True)
        claim_output(config, model_info, attempt)
        lease.keep_renewed()
        return _run_owned(config, attempt, started, t0, files, carried, model_info, lease)
    finally:
        lease.release()


def dry_run(config: BatchConfig, attempt: str, started: datetime, t0: float, files: list[str], carried: pa.Schema,
            model_info: dict) -> dict:
    """Steps 2-3 only: every row checked, duplicates and finished ids found; the counts and the first rejected rows
    printed; nothing generated or written (no lease, `_RUN.json`, errors or summary)."""
    with ray_session(config):
        work = find_work(files, carried, config, attempt, steps_limit(model_info["consistency"]))
    c = work.counts
    print(f"[batch] dry run: {c['requested']} rows: {c['to_generate']} would be generated "
          f"({sum(work.todo.column('duration_s').fill_null(0.0).to_pylist()):.1f} s of audio at least), "
          f"{c['skipped_done']} already done, {c['rejected']} rejected", flush=True)
    for row in work.errors.slice(0, 10).to_pylist():
        print(f"[batch]   rejected {row['id']!r}: {row['reason']}", flush=True)
    status = "dry run" if not (config.strict and c["rejected"]) else f"dry run: --strict and {c['rejected']} rejected"
    return {"run_name": config.run_name, "output": config.output, "manifest": config.manifest, "attempt": attempt,
            "status": status, "started_at": started.isoformat(), "wall_seconds": time.monotonic() - t0, "counts": c,
            "model": model_info, "config": config.to_dict()}


def _run_owned(config: BatchConfig, attempt: str, started: datetime, t0: float, files: list[str],
               carried: pa.Schema, model_info: dict, lease: ownership.Lease) -> dict:
    """Steps 2-6 of a run whose output lease is held."""
    import ray

    print(f"[batch] run {config.run_name!r}: {len(files)} manifest file(s) → {config.output}", flush=True)
    with ray_session(config):
        max_steps = steps_limit(model_info["consistency"])
        work = find_work(files, carried, config, attempt, max_steps)  # 2-3. check rows, resume
        c = work.counts
        print(f"[batch] {c['requested']} rows: {c['rejected']} rejected, {c['skipped_done']} already done, "
              f"{c['to_generate']} to generate", flush=True)
        live = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        nodes = len(live)
        if nodes > 1 and not storage.is_s3(config.output):
            raise ValueError(f"--output {config.output} is a local path but the Ray cluster has {nodes} nodes: "
                             "actors on other nodes would write to their own disks; use an s3:// output")
        res = plan_resources(config, ray.cluster_resources(), live)
        for note in res.notes:
            print(f"[batch] note: {note}", flush=True)
        sink = Sink(config, attempt, work.todo.num_rows)
        strict_stop = config.strict and work.errors.num_rows > 0
        if work.todo.num_rows and not strict_stop:
            try:
                generate(work.todo, config, res, sink, lease)  # 4-5. actors write audio; metric rows stream back
            finally:
                sink.close()
                lease.check()  # a job that took the output over owns errors/ and the summary now
                if sink.failures:
                    failures = [{"id": i, "reason": r} for i, r in sink.failures.items()]
                    write_errors(config.output, attempt, work.errors.to_pylist() + failures)
    status = "ok"
    if strict_stop:
        status = f"stopped: --strict and {work.errors.num_rows} rejected row(s); nothing generated"
    elif sink.failures:
        status = f"failed: {len(sink.failures)} clip(s) could not be generated (see errors/)"
    summary = make_summary(config, attempt, started, time.monotonic() - t0, status, work, sink, res, model_info)
    lease.check()
    storage.write_bytes(storage.join(config.output, "_SUMMARY.json"), json.dumps(summary, indent=2).encode())
    return summary


def make_summary(
    config: BatchConfig, attempt: str, started: datetime, wall: float, status: str, work: Work, sink: Sink,
    res: Resources, model_info: dict,
) -> dict:
    """The `_SUMMARY.json` of an attempt."""
    audio = sum(sink.generated.values())
    counts = {**work.counts, "generated": len(sink.generated), "failed": len(sink.failures),
              "in_metrics": len(work.state.done) + len(sink.generated)}
    model_info = {**model_info, "hash": model_info["hash"] or sink.model_hash}
    summary = {
        "run_name": config.run_name, "output": config.output, "manifest": config.manifest, "attempt": attempt,
        "status": status, "started_at": started.isoformat(), "finished_at": datetime.now(UTC).isoformat(),
        "counts": counts, "audio_seconds": audio, "wall_seconds": wall,
        "audio_seconds_per_second": audio / wall if wall > 0 else 0.0,
        "throughput": sink.throughput(res.actors),
        "resume": {"recorded": work.state.recorded, "missing_audio": work.state.missing_audio,
                   "mismatched": work.state.mismatched},
        "model": model_info,
        "ray": {"actors": res.actors, "num_gpus": res.num_gpus, "num_cpus": res.num_cpus, "device": res.device,
                "torch_threads": res.torch_threads, "calls_per_actor": config.calls_per_actor,
                "io_threads": res.io_threads},
        "config": config.to_dict(), "versions": versions(),
    }
    if model_info.get("trained") is False:
        summary["warning"] = (f"model {model_info['name']!r} is UNTRAINED ({model_info.get('note') or 'no note'}): "
                              "the clips are noise, useful only to exercise the pipeline")
    return summary


def summary_table(summary: dict) -> str:
    """A short human-readable table of a summary."""
    c, m = summary["counts"], summary["model"]
    lines = [
        f"run          {summary['run_name']}  →  {summary['output']}",
        f"model        {m['name']} (hash {m.get('hash')})",
        f"rows         {c['requested']} requested, {c['rejected']} rejected, {c['skipped_done']} already done",
        f"generated    {c['generated']} clips ({c['failed']} failed), {summary['audio_seconds']:.1f} audio-s in "
        f"{summary['wall_seconds']:.1f} s = {summary['audio_seconds_per_second']:.2f} audio-s/s",
        f"status       {summary['status']}",
    ]
    steady = summary.get("throughput", {}).get("steady_state")
    if steady and steady["clips_per_s"] is not None:
        lines.insert(-1, f"steady state {steady['clips_per_s']:.3f} clips/s = {steady['x_real_time']:.1f}x real time "
                         f"over {steady['clips']} clips; actors busy {100 * steady['actor_busy_fraction']:.0f} %")
    if summary.get("warning"):
        lines.append(f"WARNING      {summary['warning']}")
    return "\n".join(lines)


_ERROR_LINE = re.compile(r"\s*(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)")


def root_cause(exc: BaseException) -> str:
    """The innermost `SomeError: message` line of an exception (Ray puts the actor's traceback in the text)."""
    text = str(exc)
    for line in reversed(text.splitlines()):
        match = _ERROR_LINE.match(line)
        if match and match.group(1) not in ("UserCodeException", "RayTaskError"):
            return f"{match.group(1)}: {match.group(2)}"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def actor_model_error(exc: BaseException) -> str | None:
    """The message of the ModelError that killed an actor in its constructor (`GeneratorStage.__init__` loads the
    model), or None for any other failure.

    Ray Data re-raises the actor's death as an `ActorDiedError` (`actor_init_failed`) whose text holds the
    constructor's traceback, ending in `musiccm.model.ModelError: ...` (see `root_cause`).
    """
    text, cause = str(exc), root_cause(exc)
    died_in_init = getattr(exc, "actor_init_failed", False) or "raised in its creation task" in text
    if died_in_init and cause.startswith("ModelError: ") and "musiccm.model.ModelError: " in text:
        return cause.removeprefix("ModelError: ")
    return None


def run_job(config: BatchConfig) -> int:
    """Run and print; exit code 0 ok, 1 failed clips or --strict rejections, 2 unusable input/output/model."""
    try:
        summary = run(config)
    except (ManifestError, ModelError, RunConflict, storage.StorageError, ValueError) as exc:
        print(f"batch_generate: error: {storage.redact(str(exc))}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except ownership.OwnershipLost as exc:
        print(f"batch_generate: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as exc:  # a task failed for good (e.g. a permanent storage error inside an actor)
        unusable = actor_model_error(exc)
        if unusable is not None:  # e.g. a hub id missing from the actors' cache with --local-files-only
            print(f"batch_generate: error: model {config.model}: the actors could not load it: "
                  f"{storage.redact(unusable)}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        print(f"batch_generate: error: generation stopped: {storage.redact(root_cause(exc))}. Clips written so "
              "far are kept; rerun the same command to resume.", file=sys.stderr, flush=True)
        return EXIT_FAILED
    if summary["status"].startswith("dry run"):
        return EXIT_OK if summary["status"] == "dry run" else EXIT_FAILED
    print(summary_table(summary), flush=True)
    return EXIT_OK if summary["status"] == "ok" else EXIT_FAILED


def resolve_names(manifest_uri: str, model_uri: str, run_name: str | None, output: str | None) -> tuple[str, str]:
    """(run name, output): defaults `<manifest stem>-<model name>` and `./outputs/<run name>` (made absolute)."""
    if not run_name:
        try:
            name = inspect_model(model_uri)["name"]
        except ModelError:
            name = model_uri
        run_name = default_run_name(manifest_uri, name)
    output = output or os.path.join("outputs", run_name)
    # Absolute: actors may run in another working directory than the driver (e.g. a cluster's).
    return run_name, output if storage.is_s3(output) else os.path.abspath(os.path.expanduser(output))
