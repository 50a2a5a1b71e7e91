"""benchmarks/targets.py: the issue's targets judged with paired bootstrap intervals over the prompts.

Real Fréchet distances (audioldm_eval's) on Gaussian features written as evaluate.py's features.parquet, so the
verdicts are what the benchmark would print for rows whose distributions are known.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
N, DIM = 200, 6
HEADS = ["instrument", "tempo"]


@pytest.fixture
def targets(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import targets

    return targets


def write_prompts(path: Path) -> Path:
    pq.write_table(pa.table({"id": [f"p{i:03d}" for i in range(N)], "instrument": ["piano"] * N,
                             "tempo": ["slow"] * N}), path)
    return path


def write_eval(out: Path, seed: int, shift: float, hit_rate: float) -> Path:
    """An evaluate.py --out with N reference clips (standard normal) and N generated clips (mean ``shift``), whose
    predictions match the labels with probability ``hit_rate``."""
    ref_rng, rng = np.random.default_rng(0), np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(N)]
    reference = ref_rng.normal(size=(N, DIM))
    generated = rng.normal(size=(N, DIM)) + shift
    hits = rng.random((N, len(HEADS))) < hit_rate
    pred = [json.dumps({"instrument": "piano" if h[0] else "violin", "tempo": "slow" if h[1] else "fast"})
            for h in hits]
    out.mkdir(parents=True)
    pq.write_table(pa.table({
        "set": ["reference"] * N + ["generated"] * N, "id": ids + ids,
        "cls_embedding": [list(x) for x in reference] + [list(x) for x in generated],
        "cls_pred": [json.dumps({"instrument": "piano", "tempo": "slow"})] * N + pred}), out / "features.parquet")
    return out


def draws(tmp_path: Path, label: str, n: int, shift: float, hit_rate: float, seed: int) -> list[Path]:
    return [write_eval(tmp_path / label / str(d), seed + d, shift, hit_rate) for d in range(n)]


def by_row(results: list[dict]) -> dict[str, dict]:
    return {r["row"]: r for r in results}


def test_a_student_far_closer_to_the_reference_meets_the_1_step_target(tmp_path, targets):
    dirs = {"student-1": draws(tmp_path, "s", 2, 0.0, 0.8, 10), "teacher-ddim4": draws(tmp_path, "t", 2, 1.0, 0.8, 20)}
    [r] = targets.judge(dirs, write_prompts(tmp_path / "p.parquet"), HEADS, resamples=200)
    assert r["target"].startswith("1 step") and r["draws"] == [2, 2] and r["prompts"] == N
    assert r["estimate"] < r["high"] < 1 and r["verdict"] == "met"
    # the estimate is FD of all draws' clips pooled, one FD per row
    assert r["estimate"] == pytest.approx(targets.pooled_fd(*_row(targets, dirs, "student-1"))
                                          / targets.pooled_fd(*_row(targets, dirs, "teacher-ddim4")))


def _row(targets, dirs, label):
    ids = [f"p{i:03d}" for i in range(N)]
    labels = {i: {"instrument": "piano", "tempo": "slow"} for i in ids}
    rows, ref = targets.load_rows({label: dirs[label]}, labels, HEADS)
    return rows[label], ref, np.arange(N)


def test_the_reverse_misses_and_two_alike_rows_are_not_resolved(tmp_path, targets):
    prompts = write_prompts(tmp_path / "p.parquet")
    worse = {"student-1": draws(tmp_path, "s", 1, 1.0, 0.8, 10),
             "teacher-ddim4": draws(tmp_path, "t", 1, 0.0, 0.8, 20)}
    assert targets.judge(worse, prompts, HEADS, resamples=200)[0]["verdict"] == "missed"
    alike = {"student-1": draws(tmp_path, "s2", 1, 0.3, 0.8, 30),
             "teacher-ddim4": draws(tmp_path, "t2", 1, 0.3, 0.8, 40)}
    r = targets.judge(alike, prompts, HEADS, resamples=200)[0]
    assert r["low"] < 1 < r["high"] and r["verdict"] == "not resolved"


def test_the_4_step_targets_fd_within_10_percent_and_accuracy_within_3_points(tmp_path, targets):
    dirs = {"student-4": draws(tmp_path, "s", 1, 0.2, 0.95, 10),
            "teacher-ddim50": draws(tmp_path, "t", 1, 1.0, 0.6, 20),
            "student-1": draws(tmp_path, "s1", 1, 0.2, 0.95, 30)}  # no teacher-ddim4 row: no 1-step target
    results = targets.judge(dirs, write_prompts(tmp_path / "p.parquet"), HEADS, resamples=200)
    assert [r["statistic"] for r in results] == ["fd_ratio", "acc_diff"]
    fd, acc = results
    assert fd["verdict"] == "met" and fd["high"] < 1.10
    assert acc["estimate"] == pytest.approx(0.35, abs=0.08) and acc["low"] >= -0.03 and acc["verdict"] == "met"
    # the accuracy target is missed when the student's clips follow their labels far less often
    low = {"student-4": draws(tmp_path, "s3", 1, 0.2, 0.5, 50), "teacher-ddim50": dirs["teacher-ddim50"]}
    assert targets.judge(low, write_prompts(tmp_path / "p.parquet"), HEADS, resamples=200)[1]["verdict"] == "missed"
    assert "| 4 steps: FD_cls within 10 % of the 50-step teacher's | student-4 (1) vs teacher-ddim50 (1) |" \
        in targets.table(results)


def test_a_target_that_cannot_be_computed_is_reported_not_dropped(tmp_path, targets):
    dirs = {"student-4": draws(tmp_path, "s", 1, 0.0, 0.9, 10), "teacher-ddim50": draws(tmp_path, "t", 1, 0.0, 0.9, 20)}
    unlabelled = tmp_path / "unlabelled.parquet"
    pq.write_table(pa.table({"id": [f"p{i:03d}" for i in range(N)]}), unlabelled)
    fd, acc = targets.judge(dirs, unlabelled, HEADS, resamples=20)
    assert fd["verdict"] in ("met", "not resolved")
    assert acc["verdict"] == "not computable" and "label columns" in acc["error"] and acc["estimate"] is None
    assert "not computable: the prompts carry none" in targets.table([fd, acc])


def test_verdicts_from_intervals(targets):
    below = targets.Target("x", "a", "b", "fd_ratio", 1.0, True)
    assert [targets.verdict(below, lo, hi) for lo, hi in [(0.8, 0.95), (0.9, 1.1), (1.0, 1.2)]] == \
        ["met", "not resolved", "missed"]
    above = targets.Target("y", "a", "b", "acc_diff", -0.03, False)
    assert [targets.verdict(above, lo, hi) for lo, hi in [(-0.03, 0.1), (-0.05, 0.0), (-0.2, -0.04)]] == \
        ["met", "not resolved", "missed"]


def test_the_command_line_judges_a_stored_benchmark(tmp_path):
    out = tmp_path / "quality"
    write_eval(out / "eval" / "student-1", 10, 0.0, 0.8)
    write_eval(out / "eval" / "student-1-draw1", 11, 0.0, 0.8)
    write_eval(out / "eval" / "teacher-ddim4", 20, 1.0, 0.8)
    write_prompts(out / "prompts.parquet")
    cmd = [sys.executable, "benchmarks/targets.py", "--out", str(out), "--bootstrap", "50", "--halves", "10"]
    r = subprocess.run([*cmd, "--rows", "student-1:2", "teacher-ddim4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| student-1 (2) vs teacher-ddim4 (1) |" in r.stdout and "| met |" in r.stdout
    assert "from 10 random halves" in r.stdout
    r = subprocess.run([*cmd, "--rows", "student-1:3", "teacher-ddim4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "student-1-draw2 (run benchmarks/quality.py first)" in r.stderr
    r = subprocess.run([*cmd, "--rows", "student-1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no target has both its rows among ['student-1']" in r.stderr


def test_the_command_line_compares_two_rows(tmp_path):
    out = tmp_path / "quality"
    write_eval(out / "eval" / "student-4", 10, 0.0, 0.9)
    write_eval(out / "eval" / "noadv-4", 20, 1.0, 0.5)
    write_prompts(out / "prompts.parquet")
    cmd = [sys.executable, "benchmarks/targets.py", "--out", str(out), "--bootstrap", "50", "--rows", "student-4",
           "noadv-4", "--compare"]
    r = subprocess.run([*cmd, "noadv-4/student-4", "student-4/noadv-4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = {line.split(" | ")[0].lstrip("| "): line for line in r.stdout.splitlines()}
    # noadv-4 is shifted away from the reference and less accurate: worse on both, whichever way round.
    assert lines["noadv-4 vs student-4: FD_cls"].endswith("| missed |")
    assert lines["noadv-4 vs student-4: mean accuracy"].endswith("| missed |")
    assert lines["student-4 vs noadv-4: FD_cls"].endswith("| met |")
    assert lines["student-4 vs noadv-4: mean accuracy"].endswith("| met |")
    r = subprocess.run([*cmd, "noadv-4/student-6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--compare 'noadv-4/student-6': expected A/B, two labels of --rows" in r.stderr
