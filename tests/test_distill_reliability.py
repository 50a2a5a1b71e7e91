"""The distillation job against storage trouble and hostile flags.

The outage is real: the SeaweedFS server holding the manifest, the training audio and the run (checkpoints,
metrics) is stopped after the first checkpoint and started again 15 s later on the same port and data; the
job must finish with every step once. Flags and URIs are refused before Ray starts, never echoing a secret.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_distill_job import API_SERVER_ENV, SCRIPT, distill, training_rows, write_manifest

from musiccm import storage
from musiccm.testing.seaweed import SeaweedFS


def expect_refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    import ray

    started = time.monotonic()
    assert distill.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    assert not ray.is_initialized() and time.monotonic() - started < 10  # before Ray, no retries
    return err


def test_flags_are_bounded_before_ray_starts(tmp_path: Path, tiny_teacher_dir: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    manifest = str(tmp_path / "train.parquet")
    base = ["--teacher", tiny_teacher_dir, "--train-manifest", manifest, "--storage", str(tmp_path / "runs")]
    expect_refused([*base, "--crop-seconds", "1e9"], capsys, "crop_seconds=1000000000.0 is invalid",
                   "seconds in (0, 120]")
    expect_refused([*base, "--cpus-per-worker", "0"], capsys, "--cpus-per-worker 0 is invalid", "(0, 1024]")
    expect_refused([*base, "--batch-size", "100000000"], capsys, "batch_size=100000000 is invalid")
    expect_refused([*base, "--latent-cache-mb", str(1 << 40)], capsys, "latent_cache_mb")
    expect_refused([*base, "--storage-retry-s", "-5"], capsys, "storage_retry_s=-5.0 is invalid")
    expect_refused([*base, "--name", "../escaped-run"], capsys, "DistillConfig.name='../escaped-run' is invalid")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escaped-run").exists()


@pytest.mark.parametrize("flag", ["--storage", "--train-manifest", "--teacher", "--output"])
def test_credentials_in_a_uri_are_refused_masked(flag: str, tmp_path: Path, tiny_teacher_dir: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = {"--teacher": tiny_teacher_dir, "--train-manifest": str(tmp_path / "t.parquet"),
            "--storage": str(tmp_path / "runs")}
    argv[flag] = "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI-K7MDENG@bucket/prefix"
    err = expect_refused([a for kv in argv.items() for a in kv], capsys, "credentials in a URI are not accepted",
                         "s3://***@bucket/prefix")
    assert "wJalrXUtnFEMI" not in err and "AKIAIOSFODNN7EXAMPLE" not in err


def checkpoints(run: str) -> list[str]:
    return sorted({u.split("/checkpoint-")[1].split("/")[0] for u in storage.list_files(run) if "/checkpoint-" in u})


@pytest.mark.slow
def test_a_15_s_outage_of_s3_during_training_is_ridden_out(restartable_s3: SeaweedFS, tiny_teacher_dir: str,
                                                           tmp_path: Path) -> None:
    write_manifest("s3://data/train.parquet", training_rows())  # bytes rows and S3-uri rows
    run = "s3://runs/outage/o1"
    argv = [sys.executable, str(SCRIPT), "--teacher", tiny_teacher_dir, "--train-manifest", "s3://data/train.parquet",
            "--storage", "s3://runs/outage", "--name", "o1", "--num-workers", "1", "--cpus-per-worker", "1",
            "--max-steps", "8", "--batch-size", "2", "--checkpoint-every", "1", "--validate-every", "0",
            "--adv-weight", "0", "--warmup-steps", "0", "--report-every-s", "0"]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1", API_SERVER_ENV: "http://127.0.0.1:9"}
    log = tmp_path / "distill.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not checkpoints(run):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.5)
        restartable_s3.stop()
        time.sleep(15)
        assert proc.poll() is None, "the job ended during the outage:\n" + log.read_text()[-4000:]
        restartable_s3.start()
        assert proc.wait(timeout=600) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    text = log.read_text()
    assert "[storage] waiting on" in text and "[storage] reachable again" in text, text[-4000:]
    summary = json.loads(storage.read_bytes(f"{run}/summary.json"))
    assert summary["status"] == "ok" and summary["step"] == 8, summary
    steps = []
    for uri in storage.list_files(f"{run}/metrics", suffix=".parquet"):
        steps += pq.read_table(io.BytesIO(storage.read_bytes(uri))).column("step").to_pylist()
    assert sorted(steps) == list(range(1, 9))  # no step lost or doubled
