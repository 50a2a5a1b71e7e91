"""`--dry-run`: every row checked, the plan reported, nothing generated and nothing written to the output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_batch_job import SCRIPT


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dry_run_reports_the_plan_and_writes_nothing(tmp_path: Path, untrained_student_dir: str) -> None:
    rows = [{"id": f"c{i}", "prompt": f"calm piano {i}", "duration_s": 1.28} for i in range(5)]
    rows += [{"id": "dup", "prompt": "a", "duration_s": 1.28}, {"id": "dup", "prompt": "b", "duration_s": 1.28},
             {"id": "bad id", "prompt": "c", "duration_s": 1.28}, {"id": "long", "prompt": "d", "duration_s": 9999.0}]
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    out = tmp_path / "out"
    base = ["--manifest", manifest, "--output", str(out), "--model", untrained_student_dir, "--max-duration", "60",
            "--no-clap-score", "--batch-size", "5"]
    done = run([*base, "--dry-run"])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "dry run: 9 rows: 5 would be generated (6.4 s of audio at least), 0 already done, 4 rejected" in done.stdout
    assert "rejected 'bad id': id 'bad id' is invalid" in done.stdout and "above the limit of 60.0 s" in done.stdout
    assert not out.exists()  # no probe, no lease, no _RUN.json, no errors shard
    assert run([*base, "--dry-run", "--strict"]).returncode == 1
    # After a real run of two of the rows, the dry run sees them as done.
    half = str(tmp_path / "half.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:2]), half)
    first = run(["--manifest", half, *base[2:]])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    again = run([*base, "--dry-run"])
    assert "3 would be generated" in again.stdout and "2 already done" in again.stdout
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # still nothing written
    # A dry run with other generation settings is refused like the run itself would be.
    conflict = run([*base, "--dry-run", "--default-steps", "2"])
    assert conflict.returncode == 2 and "other generation settings" in conflict.stderr
