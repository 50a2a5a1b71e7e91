"""The batch job against a hostile but fair world: a real S3 outage, two jobs on one output, reserved column
names, credentials in URIs and out-of-range flags.

The outage is real: the SeaweedFS server is stopped part-way through a run writing to it and started again
15 s later on the same port and data; the race is real: two job processes started at the same instant.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_batch_job import SCRIPT, audio_names, kill_tree, log_tail, raw_metric_ids, run_main, start

from musiccm import storage
from musiccm.batch import ownership
from musiccm.batch.manifest import RESERVED, ManifestError, check_schema
from musiccm.results import read_metrics, results_main
from musiccm.testing.seaweed import SeaweedFS, free_ports

ROWS = [{"id": f"c{i:02d}", "prompt": f"calm piano number {i}"} for i in range(24)]


def write_manifest(uri: str, rows: list[dict], **extra: list) -> str:
    table = pa.Table.from_pylist(rows)
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values))
    if storage.is_s3(uri):
        fs, path = storage.pyarrow_fs(uri)
        pq.write_table(table, path, filesystem=fs)
    else:
        pq.write_table(table, uri)
    return uri


def job(manifest_uri: str, output: str, model: str, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, "--manifest", manifest_uri, "--output", output, "--model", model,
            "--batch-size", "1", "--metrics-rows-per-shard", "1", "--no-clap-score", "--progress-s", "2", *extra]


def local_env() -> dict[str, str]:
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- 1. a storage outage mid-run


@pytest.mark.slow
def test_a_15_s_outage_of_s3_is_ridden_out(restartable_s3: SeaweedFS, untrained_student_dir: str,
                                            tmp_path: Path) -> None:
    manifest_uri = write_manifest("s3://data/outage/prompts.parquet", ROWS)
    output = "s3://gen/outage"
    log = tmp_path / "outage.log"
    proc = start(job(manifest_uri, output, untrained_student_dir), local_env(), log)
    try:
        deadline = time.monotonic() + 240
        while len(audio_names(output)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(log)
            time.sleep(0.2)
        restartable_s3.stop()  # the endpoint is gone: connections refused
        down_at = time.monotonic()
        time.sleep(15)
        assert proc.poll() is None, "the job ended during the outage:\n" + log_tail(log)
        restartable_s3.start()
        up_at = time.monotonic()
        assert proc.wait(timeout=300) == 0, log_tail(log)
    finally:
        kill_tree(proc.pid)
    assert up_at - down_at >= 15
    text = log_tail(log, 400_000)
    assert "[storage] waiting on s3://gen/outage" in text and "[storage] reachable again" in text, text[-4000:]
    assert Counter(raw_metric_ids(output)) == Counter(r["id"] for r in ROWS)  # every id once, none lost
    assert sorted(audio_names(output)) == sorted(f"{r['id']}.flac" for r in ROWS)
    assert json.loads(storage.read_bytes(storage.join(output, "_SUMMARY.json")))["status"] == "ok"


def test_an_outage_longer_than_the_budget_fails_the_clip_not_silently(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permanent and over-budget failures still end the run, with the real cause (no credentials)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    manifest_uri = write_manifest(str(tmp_path / "m.parquet"), ROWS[:1])
    started = time.monotonic()
    code, err = run_main(["--manifest", manifest_uri, "--output", "s3://gen/x", "--storage-retry-s", "2"], capsys)
    assert code == 2 and "still failing after the 2 s retry budget" in err and err.count("\n") <= 3, err
    assert time.monotonic() - started < 30


# ---------------------------------------------------------------- 2. reserved column names


@pytest.mark.parametrize("name", sorted(RESERVED - {"id", "prompt", "duration_s", "seed", "steps",
                                                     "guidance_scale", "format"}))
def test_every_reserved_column_name_is_refused(name: str) -> None:
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), (name, pa.string())])
    with pytest.raises(ManifestError, match=f"column\\(s\\) {name} clash with columns the job writes") as info:
        check_schema(schema, "m.parquet")
    for reserved in ("error", "reason", "finished_at", "audio_uri"):
        assert reserved in str(info.value)  # the message lists what is reserved


def test_a_column_named_error_stops_the_job_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import ray

    manifest_uri = write_manifest(str(tmp_path / "m.parquet"), ROWS[:2], error=["x", "y"])
    code, err = run_main(["--manifest", manifest_uri, "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "column(s) error clash with columns the job writes" in err and err.count("\n") == 1
    assert not ray.is_initialized() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_columns_named_like_the_readers_bookkeeping_are_carried_through(
        tmp_path: Path, untrained_student_dir: str, capsys: pytest.CaptureFixture) -> None:
    manifest_uri = write_manifest(str(tmp_path / "m.parquet"), ROWS[:3], _order=[7, 8, 9], _rank=["a", "b", "c"],
                                  order=[1, 2, 3], rank=[4, 5, 6], time=[0.1, 0.2, 0.3])
    out = str(tmp_path / "out")
    result = subprocess.run(job(manifest_uri, out, untrained_student_dir), env=local_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {r["id"]: r for r in read_metrics(out).to_pylist()}
    assert [(rows[f"c{i:02d}"]["_order"], rows[f"c{i:02d}"]["_rank"], rows[f"c{i:02d}"]["rank"]) for i in range(3)] \
        == [(7, "a", 4), (8, "b", 5), (9, "c", 6)]
    assert results_main([out]) == 0 and "3 clips" in capsys.readouterr().out


# ---------------------------------------------------------------- 3. one live job per output


@pytest.mark.slow
def test_two_jobs_started_together_on_one_output_do_the_work_once(tmp_path: Path, untrained_student_dir: str) -> None:
    manifest_uri = write_manifest(str(tmp_path / "m.parquet"), ROWS[:8])
    out = str(tmp_path / "out")
    procs = [subprocess.Popen(job(manifest_uri, out, untrained_student_dir), env=local_env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(timeout=400), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "is in use by run" in loser[2] and "since" in loser[2] and "--takeover" in loser[2], loser[2]
    assert "Started a local Ray instance" not in loser[1] + loser[2]  # refused before Ray
    assert Counter(raw_metric_ids(out)) == Counter(r["id"] for r in ROWS[:8])  # generated once, not twice
    run = json.loads(Path(out, "_RUN.json").read_text())
    assert len(run["attempts"]) == 1 and not Path(out, ownership.LEASE_NAME).exists()  # released at the end


def _plant_owner(out: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / ownership.LEASE_NAME
    path.write_text(json.dumps({"token": "other", "run_name": "other-run", "attempt": "A1", "host": host,
                                "pid": pid, "pid_started": None, "since": "2026-12-07T00:00:00+00:00"}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_live_stale_and_taken_over_leases(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # A live owner on another host: refused, naming it.
    _plant_owner(out, "some-other-host", 4242)
    with pytest.raises(ownership.OutputBusy, match=r"in use by run 'other-run' \(attempt A1, host some-other-host"):
        ownership.acquire(str(out), "me", "A2", lease_s=120)
    # --takeover replaces it; the lease is then ours and renewals keep it.
    lease = ownership.acquire(str(out), "me", "A2", lease_s=120, takeover=True)
    assert "took the output over from attempt A1: --takeover" in lease.notes[0]
    lease.release()
    # An expired lease (no renewal for longer than lease_s) is taken over without asking.
    _plant_owner(out, "some-other-host", 4242, age_s=300)
    lease = ownership.acquire(str(out), "me", "A3", lease_s=120)
    assert "its lease expired" in lease.notes[0]
    lease.release()
    # A dead driver on this host: taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _plant_owner(out, socket.gethostname(), dead.pid)
    lease = ownership.acquire(str(out), "me", "A4", lease_s=120)
    assert f"its driver (pid {dead.pid} on this host) is no longer running" in lease.notes[0]
    # The owner notices at its next renewal when someone else takes over, and stops.
    lease.lease_s = 0.2
    lease.keep_renewed()
    other = ownership.acquire(str(out), "them", "A5", lease_s=120, takeover=True)
    deadline = time.monotonic() + 5
    while not lease.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ownership.OwnershipLost, match="another job took this output over"):
        lease.check()
    lease.release()  # must not delete the new owner's lease
    assert json.loads((out / ownership.LEASE_NAME).read_text())["attempt"] == "A5"
    other.release()


def test_two_owners_race_on_s3(restartable_s3: SeaweedFS) -> None:
    """On S3 the lease is an If-None-Match create: of many simultaneous takers exactly one wins."""
    from concurrent.futures import ThreadPoolExecutor

    def take(i: int) -> str:
        try:
            lease = ownership.acquire("s3://gen/race", f"job{i}", f"A{i}", lease_s=120)
        except ownership.OutputBusy:
            return "busy"
        assert lease.notes == []  # SeaweedFS honours conditional writes
        return "won"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(take, range(8)))
    assert outcomes.count("won") == 1 and outcomes.count("busy") == 7


# ---------------------------------------------------------------- 4-5. credentials in URIs, bounded flags


def test_credentials_in_uris_are_refused_masked_and_not_retried(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    manifest_uri = write_manifest(str(tmp_path / "m.parquet"), ROWS[:1])
    secret = "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI-K7MDENG-bPxRfiCY@bucket/run"
    for flags in (["--output", secret], ["--output", str(tmp_path / "o"), "--model", secret],
                  ["--output", str(tmp_path / "o"), "--manifest", secret]):
        started = time.monotonic()
        code, err = run_main(["--manifest", manifest_uri, *flags], capsys)
        assert code == 2 and "credentials in a URI are not accepted" in err and "s3://***@bucket/run" in err, err
        assert "wJalrXUtnFEMI" not in err and "AKIAIOSFODNN7EXAMPLE" not in err
        assert time.monotonic() - started < 5  # a validation error is not retried


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--run-name", "../escaped-run", "run_name='../escaped-run' is invalid"),
    ("--hop-frames", "1000", "--hop-frames 1000 is invalid for model"),
    ("--taper", "1000", "--taper 1000 is invalid for model"),
    ("--max-duration", "1e9", "max_duration=1000000000.0 is invalid"),
    ("--batch-size", "1000000000", "batch_size=1000000000 is invalid"),
    ("--long-batch-size", "1000000000", "long_batch_size=1000000000 is invalid"),
    ("--crop-batch-size", "1000000000", "crop_batch_size=1000000000 is invalid"),
    ("--num-actors", "1000000000", "num_actors=1000000000 is invalid"),
    ("--cpus-per-actor", "0", "cpus_per_actor=0.0 is invalid"),
    ("--torch-threads", "100000", "torch_threads=100000 is invalid"),
    ("--metrics-rows-per-shard", "1000000000", "metrics_rows_per_shard=1000000000 is invalid"),
    ("--storage-retry-s", "-1", "storage_retry_s=-1.0 is invalid"),
    ("--lease-s", "1", "lease_s=1.0 is invalid"),
    ("--progress-s", "inf", "progress_s=inf is invalid"),
])
def test_out_of_range_flags_exit_2_before_any_work(flag: str, value: str, needle: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    import ray

    manifest_uri = write_manifest(str(tmp_path / "m.parquet"), ROWS[:1])
    code, err = run_main(["--manifest", manifest_uri, "--output", str(tmp_path / "out"), flag, value], capsys)
    assert code == 2 and needle in err and "allowed" in err and err.count("\n") == 1, err
    assert not ray.is_initialized() and not (tmp_path / "out").exists()
    assert not Path("outputs", "escaped-run").exists()
