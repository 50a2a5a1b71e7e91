"""Batch generation end to end: a real S3 server (SeaweedFS), local Ray, the bundled tiny model.

The job runs as it does for users, `python ray_jobs/batch_generate.py ...` in a subprocess (its own
local Ray instance), or through `ray start --head` + `ray job submit`. Faults are real: an actor
process and the driver are SIGKILLed part-way, and the reruns must leave every valid id exactly
once in `metrics/` and `audio/`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from musiccm import storage
from musiccm.batch import metrics
from musiccm.batch.config import MAX_TEACHER_STEPS, BatchConfig
from musiccm.batch.generator_stage import GeneratorStage
from musiccm.batch.manifest import check_batch
from musiccm.defaults import DEFAULT_MODEL
from musiccm.jobs.batch_preflight import claim_output, inspect_model
from musiccm.results import read_errors, read_metrics, read_summary, results_main
from musiccm.testing.seaweed import SeaweedFS, free_ports, worker_port_ranges

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "ray_jobs" / "batch_generate.py")
SR = 16_000
NATIVE_S = 1.28  # the tiny test model's native window


def default_native_s() -> float:
    """Native window of the bundled default model, from its configs."""
    from musiccm import model

    return model.load(DEFAULT_MODEL).geometry.native_duration
MODEL_URI = "s3://data/models/tiny"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def s3(untrained_student_dir: str) -> Iterator[SeaweedFS]:
    """SeaweedFS with buckets `data` (manifests, the model) and `gen` (outputs); AWS env set for the module.

    The model on S3 is a tiny untrained student (fast, and it must make the job warn that it is untrained).
    """
    with SeaweedFS() as server:
        server.make_bucket("data")
        server.make_bucket("gen")
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            storage.upload_dir(untrained_student_dir, MODEL_URI)
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def job_env(s3: SeaweedFS) -> dict[str, str]:
    """Environment of a job subprocess: S3 settings, and a fresh local Ray instance (never someone else's)."""
    return {**os.environ, **s3.env, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}


def put_manifest(uri: str, rows: list[dict]) -> None:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("duration_s", pa.float64()),
                        ("seed", pa.int64()), ("steps", pa.int64()), ("format", pa.string()),
                        ("genre", pa.string()), ("n", pa.int32())])
    storage.write_bytes(uri, metrics.table_bytes(pa.Table.from_pylist(rows, schema=schema)))


def short_rows(n: int, prefix: str, duration: float | None = 2.0) -> list[dict]:
    return [{"id": f"{prefix}{i:02d}", "prompt": f"calm piano number {i}", "duration_s": duration, "n": i}
            for i in range(n)]


def audio_names(output: str) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in storage.list_files(storage.join(output, "audio"))]


def raw_metric_ids(output: str) -> list[str]:
    """Ids over every metric shard, without the reader's dedupe."""
    ids: list[str] = []
    for uri in storage.list_files(storage.join(output, "metrics"), suffix=".parquet"):
        ids += pq.read_table(pa.BufferReader(storage.read_bytes(uri))).column("id").to_pylist()
    return ids


def heads(s3: SeaweedFS, output: str) -> dict[str, tuple[str, object]]:
    """Key → (ETag, LastModified) of every object under an s3:// output."""
    bucket, _, prefix = output[len("s3://"):].partition("/")
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = (obj["ETag"], obj["LastModified"])
    return out


def job_args(manifest_uri: str, output: str, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, "--manifest", manifest_uri, "--output", output, "--model", MODEL_URI,
            "--progress-s", "2", *extra]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_audio(output: str, proc: subprocess.Popen, at_least: int, timeout_s: float = 240) -> int:
    """Poll until `at_least` audio objects exist; fail if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = len(audio_names(output))
        if n >= at_least:
            return n
        assert proc.poll() is None, f"job ended (rc {proc.returncode}) before {at_least} clips existed"
        time.sleep(0.2)
    raise AssertionError(f"no {at_least} audio objects after {timeout_s} s")


def kill_tree(root_pid: int) -> None:
    """SIGKILL a process and every descendant (ids taken before the first kill)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=20)


def map_workers(root_pid: int) -> list[psutil.Process]:
    """Ray Data actor processes of our job: descendants of its driver titled `ray::MapWorker(...)`."""
    found = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "MapWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def log_tail(log: Path, n: int = 6000) -> str:
    return log.read_bytes()[-n:].decode(errors="replace")


# ---------------------------------------------------------------- the main flow


GOOD = [
    *short_rows(6, "native-", None),  # the model's native window (1.28 s)
    *[{**r, "format": "wav", "genre": "jazz"} for r in short_rows(4, "wav-", 2.5)],
    *[{**r, "steps": 1 + i % 2, "seed": 100 + i} for i, r in enumerate(short_rows(4, "few-", 2.0))],
    {"id": "long-25", "prompt": "a long cinematic build", "duration_s": 25.0, "n": 100},
    {"id": "long-30", "prompt": "a long piano piece", "duration_s": 30.0, "n": 101, "format": "wav"},
]
BAD = [
    {"id": "bad id", "prompt": "space in id"},
    {"id": ".hidden", "prompt": "leading dot"},
    {"id": "dup", "prompt": "first copy"},
    {"id": "dup", "prompt": "second copy"},
    {"id": "empty-prompt", "prompt": "   "},
    {"id": "zero-length", "prompt": "p", "duration_s": 0.0},
    {"id": "too-long", "prompt": "p", "duration_s": 41.0},
    {"id": "nine-steps", "prompt": "p", "steps": 9},
    {"id": "mp3", "prompt": "p", "format": "mp3"},
]


def expected_files() -> dict[str, int]:
    """Audio file name → expected sample count for every valid row."""
    return {f"{r['id']}.{r.get('format') or 'flac'}": round((r.get("duration_s") or NATIVE_S) * SR) for r in GOOD}


@pytest.mark.slow
def test_batch_job_on_s3_strict_actor_kill_and_rerun(s3: SeaweedFS, tmp_path: Path) -> None:
    manifest_uri, output = "s3://data/main/prompts.parquet", "s3://gen/main"
    put_manifest(manifest_uri, GOOD[:8] + BAD[:5] + GOOD[8:] + BAD[5:])
    env = job_env(s3)
    common = ["--max-duration", "40", "--batch-size", "3", "--metrics-rows-per-shard", "4"]

    # 1. --strict: rejected rows fail the run before any clip is generated.
    strict = subprocess.run(job_args(manifest_uri, output, *common, "--strict"), env=env, capture_output=True,
                            text=True, timeout=300)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "--strict and 9 rejected row(s); nothing generated" in strict.stdout
    assert audio_names(output) == []
    assert sorted(read_errors(output).column("id").to_pylist()) == sorted(r["id"] for r in BAD)

    # 2. The run, with its actor SIGKILLed after the first clips exist.
    log = tmp_path / "run.log"
    proc = start(job_args(manifest_uri, output, *common), env, log)
    try:
        at_kill = wait_for_audio(output, proc, at_least=1)
        workers = map_workers(proc.pid)
        assert workers, "no MapWorker process found under the job's driver"
        for w in workers:
            w.send_signal(signal.SIGKILL)
        psutil.wait_procs(workers, timeout=20)
        killed_pids = {w.pid for w in workers}
        assert proc.wait(timeout=400) == 0, log_tail(log)
    finally:
        kill_tree(proc.pid)
    assert at_kill < len(GOOD), "the actor was killed only after all the work was done"
    assert not any(psutil.pid_exists(p) for p in killed_pids)
    text = log_tail(log, 200_000)
    assert "died or was killed" in text or "will be retried" in text, text[-4000:]  # Ray saw the death, retried

    # Exactly the valid ids, once each, with the right lengths and formats.
    files = expected_files()
    assert sorted(audio_names(output)) == sorted(files)
    raw = raw_metric_ids(output)
    assert Counter(raw) == Counter(r["id"] for r in GOOD), "duplicated or missing metric rows after an actor death"
    assert len(storage.list_files(storage.join(output, "metrics"))) >= 2  # shards of 4 rows (+ time flushes)
    table = read_metrics(output)
    by_id = {r["id"]: r for r in table.to_pylist()}
    for r in GOOD:
        row = by_id[r["id"]]
        name = f"{r['id']}.{r.get('format') or 'flac'}"
        data = storage.read_bytes(storage.join(output, "audio", name))
        wav, sr = sf.read(io.BytesIO(data), dtype="float32")
        info = sf.info(io.BytesIO(data))
        assert (sr, len(wav), info.format) == (SR, files[name], (r.get("format") or "flac").upper())
        assert row["num_samples"] == files[name] and row["sample_rate"] == SR
        assert row["bytes"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
        assert row["audio_uri"] == storage.join(output, "audio", name)
        assert row["n"] == r["n"] and row["genre"] == r.get("genre")  # carried-through columns
        assert row["steps"] == (r.get("steps") or 4) and row["model"] == "musiccm-untrained-tiny"
        assert row["clap_score"] is not None and -1 <= row["clap_score"] <= 1
        assert row["generation_s"] > 0 and row["rtf"] == pytest.approx(row["generation_s"] / row["duration_s"])
    assert by_id["few-00"]["seed"] == 100
    assert by_id["long-30"]["batch_clips"] == 1  # long clips go through --long-batch-size (1)
    errors = read_errors(output)
    assert Counter(errors.column("id").to_pylist()) == Counter(r["id"] for r in BAD)
    reasons = dict(zip(errors.column("id").to_pylist(), errors.column("reason").to_pylist(), strict=False))
    assert "above the limit of 40.0 s" in reasons["too-long"] and "duplicate id" in reasons["dup"]
    summary = read_summary(output)
    assert summary["status"] == "ok"
    assert {k: summary["counts"][k] for k in ("requested", "rejected", "generated", "failed", "skipped_done")} == {
        "requested": len(GOOD) + len(BAD), "rejected": len(BAD), "generated": len(GOOD), "failed": 0,
        "skipped_done": 0}
    assert "UNTRAINED" in summary["warning"] and summary["config"]["batch_size"] == 3
    assert summary["audio_seconds"] == pytest.approx(sum(files.values()) / SR, rel=1e-6)

    # 3. Rerun: nothing is regenerated; no object is rewritten.
    before = heads(s3, output)
    rerun = subprocess.run(job_args(manifest_uri, output, *common), env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    summary = read_summary(output)
    assert summary["counts"]["generated"] == 0 and summary["counts"]["skipped_done"] == len(GOOD)
    after = heads(s3, output)
    for key, tag in before.items():
        if "/audio/" in key or "/metrics/" in key:
            assert after[key] == tag, f"{key} was rewritten by the rerun"
    assert sorted(k for k in after if "/metrics/" in k) == sorted(k for k in before if "/metrics/" in k)
    assert results_main([output]) == 0


@pytest.mark.slow
def test_driver_killed_part_way_then_rerun_finishes_each_id_once(s3: SeaweedFS, tmp_path: Path) -> None:
    manifest_uri, output = "s3://data/kill/prompts.parquet", "s3://gen/driver-kill"
    rows = short_rows(8, "k", None)  # the native window: 1.28 s clips
    put_manifest(manifest_uri, rows)
    env = job_env(s3)
    args = job_args(manifest_uri, output, "--batch-size", "1", "--metrics-rows-per-shard", "1", "--no-clap-score")
    log = tmp_path / "killed.log"
    proc = start(args, env, log)
    try:
        wait_for_audio(output, proc, at_least=2)
        while not storage.list_files(storage.join(output, "metrics")):  # some rows recorded, some not
            assert proc.poll() is None, log_tail(log)
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)  # the driver and the local Ray it started: like losing the machine
    interrupted = set(raw_metric_ids(output))
    assert 0 < len(interrupted) < len(rows) and len(audio_names(output)) < len(rows), "not killed part-way"
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert Counter(raw_metric_ids(output)) == Counter(r["id"] for r in rows)
    assert sorted(audio_names(output)) == sorted(f"{r['id']}.flac" for r in rows)
    counts = read_summary(output)["counts"]
    assert counts["skipped_done"] == len(interrupted) and counts["generated"] == len(rows) - len(interrupted)


# ---------------------------------------------------------------- ray job submit against a head node


def _start_ray_head(temp_dir: str, env: dict[str, str]) -> tuple[subprocess.Popen, str, str]:
    """One `ray start --head --block` on fresh free ports; returns (process, job API address, failure or "")."""
    ports = free_ports(9)
    (workers,) = worker_port_ranges(1, width=200)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
           "--disable-usage-stats", f"--temp-dir={temp_dir}", f"--port={ports[0]}", f"--dashboard-port={ports[1]}",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={ports[2]}",
           f"--node-manager-port={ports[3]}", f"--object-manager-port={ports[4]}",
           f"--metrics-export-port={ports[5]}", f"--dashboard-agent-listen-port={ports[6]}",
           f"--dashboard-agent-grpc-port={ports[7]}", f"--runtime-env-agent-port={ports[8]}",
           f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[1]}",
           "--object-store-memory=300000000", "--node-ip-address=127.0.0.1"]
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "ab") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports[1]}"
    deadline = time.monotonic() + 180
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            return head, address, ""
        except OSError:
            if head.poll() is not None:
                return head, address, f"ray head exited ({head.returncode}):\n{log_path.read_text()[-4000:]}"
            if time.monotonic() > deadline:
                return head, address, f"ray head's job API did not answer in 180 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)


def _stop_ray_head(head: subprocess.Popen, temp_dir: str) -> None:
    kill_tree(head.pid)
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):  # stragglers that left the process group
        if temp_dir in " ".join(p.info["cmdline"] or []):
            kill_tree(p.pid)


@pytest.fixture
def ray_head(s3: SeaweedFS) -> Iterator[str]:
    """`ray start --head --block` on free ports in its own temp dir; yields the dashboard (job API) address.

    A second attempt on fresh ports covers a port taken between choosing it and Ray binding it; a head that
    fails twice fails the test with its log.
    """
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    failures = []
    try:
        for _ in range(2):
            head, address, failure = _start_ray_head(temp_dir, env)
            if not failure:
                break
            failures.append(failure)
            _stop_ray_head(head, temp_dir)
        else:
            pytest.fail("\n---\n".join(failures))
        try:
            yield address
        finally:
            _stop_ray_head(head, temp_dir)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_to_a_head_node_writes_to_s3(s3: SeaweedFS, ray_head: str) -> None:
    manifest_uri, output = "s3://data/submit/prompts.parquet", "s3://gen/submitted"
    rows = short_rows(3, "s", 2.0) + [{"id": "s-long", "prompt": "long", "duration_s": 25.0, "n": 9}]
    put_manifest(manifest_uri, rows)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    runtime_env = {"env_vars": {**s3.env, "HF_HUB_OFFLINE": "1"}}
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           sys.executable, "ray_jobs/batch_generate.py", "--manifest", manifest_uri, "--output", output,
           "--model", MODEL_URI, "--num-actors", "1", "--no-clap-score"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500, cwd=REPO)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-6000:] + done.stderr[-3000:]
    assert sorted(audio_names(output)) == sorted(f"{r['id']}.flac" for r in rows)
    summary = read_summary(output)
    assert summary["counts"]["generated"] == 4 and summary["status"] == "ok"
    assert summary["ray"]["actors"] == 1


# ---------------------------------------------------------------- fail fast, before any actor


@functools.cache
def script_main():
    """`main` of ray_jobs/batch_generate.py, imported by path (ray_jobs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("batch_generate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the entry script in process; (exit code, stderr)."""
    code = script_main()(argv)
    return code, capsys.readouterr().err


def _write(path: Path, table: pa.Table) -> str:
    pq.write_table(table, path)
    return str(path)


def test_schema_errors_fail_fast_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import ray

    out = tmp_path / "out"
    not_parquet = tmp_path / "prompts.parquet"
    not_parquet.write_text("id,prompt\na,jazz\n")
    cases = {
        str(not_parquet): "not a readable Parquet file",
        _write(tmp_path / "nop.parquet", pa.table({"id": ["a"]})): "missing required column(s) prompt",
        _write(tmp_path / "typ.parquet", pa.table({"id": ["a"], "prompt": ["p"], "duration_s": ["ten"]})):
            "column 'duration_s' has type string; expected an integer or floating-point type",
        _write(tmp_path / "seed.parquet", pa.table({"id": ["a"], "prompt": ["p"], "seed": [1.5]})):
            "column 'seed' has type double; expected an integer type",
        str(tmp_path / "missing.parquet"): "no such file, and no files under that prefix",
    }
    for manifest_uri, needle in cases.items():
        started = time.monotonic()
        code, err = run_main(["--manifest", manifest_uri, "--output", str(out)], capsys)
        assert code == 2, err
        assert needle in err and err.count("\n") == 1, err  # one line, naming the problem
        assert time.monotonic() - started < 20
    assert not ray.is_initialized()
    assert not out.exists()  # nothing written: no actor, no claim on the output


def test_storage_errors_fail_fast(s3: SeaweedFS, tmp_path: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    manifest_uri = "s3://data/fast/prompts.parquet"
    put_manifest(manifest_uri, short_rows(2, "f"))
    code, err = run_main(["--manifest", manifest_uri, "--output", "s3://no-such-bucket/run"], capsys)
    assert code == 2 and "s3://no-such-bucket/run: not writable: bucket 'no-such-bucket' does not exist" in err
    code, err = run_main(["--manifest", "s3://no-such-bucket/m.parquet", "--output", str(tmp_path)], capsys)
    assert code == 2 and "bucket 'no-such-bucket' does not exist" in err
    code, err = run_main(["--manifest", manifest_uri, "--output", "s3://gen/x", "--model", "s3://data/no-model"],
                         capsys)
    assert code == 2 and "model s3://data/no-model: cannot read model_index.json" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    started = time.monotonic()
    code, err = run_main(["--manifest", manifest_uri, "--output", "s3://gen/y"], capsys)
    assert code == 2 and ("invalid credentials" in err or "access denied" in err) and "wrong" not in err
    assert time.monotonic() - started < 30  # no stack of retries
    assert not ray.is_initialized()


def test_rerun_with_other_generation_settings_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest_uri = _write(tmp_path / "m.parquet", pa.table({"id": ["a"], "prompt": ["p"]}))
    out = str(tmp_path / "out")
    config = BatchConfig(manifest=manifest_uri, output=out, default_steps=2)
    claim_output(config, inspect_model(DEFAULT_MODEL), "attempt-1")
    code, err = run_main(["--manifest", manifest_uri, "--output", out, "--default-steps", "4"], capsys)
    assert code == 2 and "other generation settings (default_steps: 2 → 4)" in err


def test_default_steps_above_a_students_limit_fail_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import ray

    manifest_uri = _write(tmp_path / "m.parquet", pa.table({"id": ["a"], "prompt": ["p"]}))
    out = tmp_path / "out"
    code, err = run_main(["--manifest", manifest_uri, "--output", str(out), "--default-steps", "20"], capsys)
    assert code == 2, err
    name = inspect_model(DEFAULT_MODEL)["name"]
    assert (f"model {name}: --default-steps 20 is invalid for a distilled consistency student; "
            "allowed: 1..8 (default 4)") in err and err.count("\n") == 1, err
    assert not ray.is_initialized() and not (out / "_RUN.json").exists()  # no actor, no claim on the output


def test_bad_flags_exit_2(capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(["--manifest", "m.parquet", "--output", "o", "--num-actors", "0"], capsys)
    assert code == 2 and "num_actors=0 is invalid; allowed: an integer in 1..100000" in err


def test_damaged_model_weights_fail_before_ray(s3: SeaweedFS, broken_models: dict[str, str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """A model whose weights cannot load (a UNet tensor of another shape, a truncated VAE file), local or on S3, is
    refused with one line naming the component, before Ray starts (the actors would otherwise fail after it)."""
    import ray

    manifest_uri = _write(tmp_path / "m.parquet", pa.table({"id": ["a"], "prompt": ["p"]}))
    storage.upload_dir(broken_models["vae_truncated"], "s3://data/models/vae-truncated")
    cases = {
        broken_models["unet_shape"]: ("unet", "conv_in.weight"),
        broken_models["vae_truncated"]: ("vae", "truncated"),
        "s3://data/models/vae-truncated": ("vae", "truncated"),
    }
    for i, (model_uri, needles) in enumerate(cases.items()):
        started = time.monotonic()
        code, err = run_main(["--manifest", manifest_uri, "--output", str(tmp_path / f"out{i}"), "--model",
                              model_uri], capsys)
        assert code == 2, err
        assert err.startswith("batch_generate: error: ") and err.count("\n") == 1, err
        assert all(n in err for n in needles) and "Traceback" not in err, err
        assert time.monotonic() - started < 20
    assert not ray.is_initialized()


@pytest.mark.slow
def test_hub_model_missing_from_the_local_cache_exits_2(tmp_path: Path) -> None:
    """A hub id the actors cannot find in their cache (--local-files-only) fails inside the actor, after Ray
    started: the driver still exits 2 (unusable model) with one line naming the model, not 1 with a traceback."""
    manifest_uri = _write(tmp_path / "m.parquet", pa.table({"id": ["a"], "prompt": ["p"]}))
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # an empty hub cache
    args = [sys.executable, SCRIPT, "--manifest", manifest_uri, "--output", str(tmp_path / "out"), "--model",
            "acme/not-cached", "--local-files-only", "--progress-s", "2"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-4000:]
    assert last.startswith("batch_generate: error: model acme/not-cached: "), last
    assert "local hub cache" in last and "generation stopped" not in last, last


# ---------------------------------------------------------------- the stage, in process (no Ray)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The stage sets torch's thread count for its process (an actor's); restore it for the other tests."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_generator_stage_writes_clips_and_metric_rows(s3: SeaweedFS, tmp_path: Path, one_thread: None) -> None:
    out = str(tmp_path / "out")
    config = BatchConfig(manifest="unused", output=out, batch_size=4)
    stage = GeneratorStage(config, device="cpu", torch_threads=1)
    long_prompt = " ".join(["jazz piano"] * 100)  # far over the tiny tokenizer's 77 tokens
    rows = check_batch(
        pa.table({"id": ["a", "b", "c", "tiny"], "prompt": ["jazz piano", long_prompt, "drums", "x"],
                  "duration_s": [2.0, 2.0, None, 1e-6], "seed": [1, 2, 1, 3], "format": ["flac", "flac", "wav", None],
                  "genre": ["g1", "g2", "g3", "g4"]}),
        max_duration=600,
    ).drop_columns(["reason"])
    out_rows = {r["id"]: r for r in stage(rows).to_pylist()}
    assert out_rows["tiny"]["error"].startswith("generation failed: ValueError: duration must be > 0 s")
    native = default_native_s()
    for clip_id, fmt, n in (("a", "flac", 32000), ("b", "flac", 32000), ("c", "wav", round(native * SR))):
        row = out_rows[clip_id]
        data = Path(out, "audio", f"{clip_id}.{fmt}").read_bytes()
        assert row["error"] is None and row["num_samples"] == n and len(sf.read(io.BytesIO(data))[0]) == n
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["bytes"] == len(data)
        assert row["clap_score"] is not None and row["model_hash"] == inspect_model(DEFAULT_MODEL)["hash"]
    assert [out_rows[i]["prompt_truncated"] for i in "abc"] == [False, True, False]
    assert out_rows["a"]["batch_clips"] == 2 and out_rows["c"]["batch_clips"] == 1
    assert out_rows["c"]["duration_s"] == pytest.approx(native) and out_rows["b"]["genre"] == "g2"
    assert not Path(out, "audio", "tiny.flac").exists()
    # Same rows, same seeds: a retried batch rewrites identical bytes at the same keys.
    again = {r["id"]: r for r in stage(rows.slice(0, 2)).to_pylist()}
    assert [again[i]["sha256"] for i in "ab"] == [out_rows[i]["sha256"] for i in "ab"]
    wav_a = sf.read(Path(out, "audio", "a.flac"))[0]
    assert np.isfinite(wav_a).all()
    # Null steps (a hub id's run: the model picks) record the steps used; a student refuses more than 8 even
    # when the driver could not tell its kind, failing only those clips.
    hub_like = check_batch(pa.table({"id": ["d", "many"], "prompt": ["d", "m"], "duration_s": [1.0, 1.0],
                                     "steps": pa.array([None, 20], pa.int64())}),
                           max_duration=600, default_steps=None, max_steps=MAX_TEACHER_STEPS).drop_columns(["reason"])
    hub_rows = {r["id"]: r for r in stage(hub_like).to_pylist()}
    assert hub_rows["d"]["error"] is None and hub_rows["d"]["steps"] == 4
    assert hub_rows["many"]["error"] == ("generation failed: ValueError: steps must be in 1..8 for a distilled "
                                         "student, got 20")
    # A permanent storage error is not a per-clip failure: it stops the task (and the job) with its message.
    stage.config = dataclasses.replace(config, output="s3://no-such-bucket/out")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        stage(rows.slice(0, 1))


# ---------------------------------------------------------------- a DDIM teacher


@pytest.mark.slow
def test_batch_job_with_a_ddim_teacher(tiny_teacher_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest_uri = str(tmp_path / "teacher.parquet")
    put_manifest(manifest_uri, [{"id": "t0", "prompt": "calm piano", "duration_s": 1.0, "steps": 10},
                                {"id": "t1", "prompt": "fast drums", "duration_s": 1.0}])
    out = str(tmp_path / "out")
    args = ["--manifest", manifest_uri, "--output", out, "--model", tiny_teacher_dir, "--default-steps", "10",
            "--no-clap-score", "--progress-s", "2"]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert sorted(audio_names(out)) == ["t0.flac", "t1.flac"]
    rows = read_metrics(out).to_pylist()
    assert [(r["id"], r["steps"], r["guidance_scale"], r["num_samples"]) for r in sorted(rows, key=lambda r: r["id"])] \
        == [("t0", 10, 2.0, SR), ("t1", 10, 2.0, SR)]  # DDIM steps as asked, with the teacher's CFG scale
    assert rows[0]["batch_clips"] == 2  # same duration, steps and guidance: one generate() call
    run_record = json.loads(Path(out, "_RUN.json").read_text())
    assert run_record["fingerprint"]["default_steps"] == 10
    # Without --default-steps a teacher's default is 50: another setting for this output, refused before Ray.
    code, err = run_main(args[:6], capsys)
    assert code == 2 and "other generation settings (default_steps: 10 → 50)" in err, err


def test_generator_stage_samples_below_the_configured_max_timestep(tmp_path: Path, one_thread: None) -> None:
    """--max-timestep reaches the sampler; without it the model's own setting (the demo student's 699) applies."""
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    rows = check_batch(pa.table({"id": ["a"], "prompt": ["a fast trumpet melody with a rock drum beat"], "seed": [5],
                                 "steps": [2], "format": ["wav"]}), max_duration=600).drop_columns(["reason"])
    written = {}
    for max_t in (None, 999):
        out = tmp_path / f"out-{max_t}"
        config = BatchConfig(manifest="unused", output=str(out), max_timestep=max_t, clap_score=False)
        (row,) = GeneratorStage(config, device="cpu", torch_threads=1)(rows).to_pylist()
        assert row["error"] is None
        written[max_t] = sf.read(out / "audio" / "a.wav", dtype="float32")[0]
    c = model.load(DEFAULT_MODEL)
    assert c.extra["max_timestep"] == 699
    expected = MusicCM(c, GenerationConfig(steps=2, max_timestep=699)).generate(
        ["a fast trumpet melody with a rock drum beat"], c.geometry.native_duration, [5]).waveforms[0]
    assert np.abs(expected).max() > 0.05  # real audio, so 16-bit rounding cannot hide a difference
    assert np.abs(written[None] - expected).max() <= 1.5 / 32768  # 16-bit PCM rounding
    assert np.abs(written[999] - written[None]).max() > 0.01
