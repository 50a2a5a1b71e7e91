"""benchmarks/quality.py end to end on a tiny subset: the real batch and evaluation jobs, tiny models."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from musiccm import synthetic
from musiccm.evaluation import classifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quality_benchmark_runs_end_to_end(tmp_path, tiny_teacher_dir, tiny_student_dir):
    net = classifier.LabelClassifier({k: list(v) for k, v in synthetic.CLASSES.items()}, logits_head="instrument")
    classifier.save(net, tmp_path / "classifier")
    prompts = synthetic.write_prompts(tmp_path / "prompts.parquet", count=4, seed=3)
    reference = synthetic.write_dataset(tmp_path / "ref", count=4, seed=3, seconds=1.28)
    out = tmp_path / "quality"
    cmd = [sys.executable, "benchmarks/quality.py", "--teacher", tiny_teacher_dir, "--student", tiny_student_dir,
           "--student-noadv", str(tmp_path / "missing"), "--prompts", prompts, "--reference", reference,
           "--classifier", str(tmp_path / "classifier"), "--out", str(out), "--configs", "teacher-ddim4",
           "student-1", "noadv-1", "--limit", "3", "--latency-runs", "1", "--batch-size", "3",
           "--teacher-guidance", "4.5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "skipping noadv-1" in r.stdout  # a missing ablation model is reported, not fatal
    rows = json.loads((out / "rows.json").read_text())
    assert list(rows) == ["teacher-ddim4", "student-1"]
    for label, row in rows.items():
        assert row["counts"]["generated"] == 3, label
        assert math.isfinite(row["metrics"]["frechet_distance_cls"])
        assert set(row["attribute_accuracy"]) == set(synthetic.LABELS)
        assert row["latency_s"] > 0
    assert "| Teacher (DDIM + CFG) | 4 |" in r.stdout and "| Student (MusicCM) | 1 |" in r.stdout
    # the generations really used the requested samplers
    generated = pq.read_table(out / "gen" / "teacher-ddim4" / "metrics")
    assert generated.column("steps").to_pylist() == [4, 4, 4]
    assert generated.column("guidance_scale").to_pylist() == [4.5, 4.5, 4.5]
    assert "teacher rows' guidance scale 4.5" in r.stdout
    # the 1-step target is judged from the two rows' stored evaluations, with its bootstrap interval
    [target] = json.loads((out / "targets.json").read_text())
    assert (target["row"], target["baseline"], target["prompts"], target["resamples"]) == \
        ("student-1", "teacher-ddim4", 3, 1000)
    assert target["verdict"] in ("met", "missed", "not resolved", "not computable")
    assert "| 1 step: FD_cls below the teacher's 4-step DDIM | student-1 (1) vs teacher-ddim4 (1) |" in r.stdout

    # a rerun with --reuse keeps rows made from the same model, settings and prompts
    again = subprocess.run([*cmd[:cmd.index("--configs")], "--configs", "student-1", "--limit", "3", "--latency-runs",
                            "1", "--batch-size", "3", "--reuse", "--student-name", "Student after DMD"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "reusing student-1" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert "| Student after DMD | 1 |" in again.stdout  # --student-name names the row, the rows' data unchanged
    assert json.loads((out / "rows.json").read_text())["student-1"]["metrics"] == rows["student-1"]["metrics"]
    # --draws: draw 0 is the row above (reused), draw 1 is generated with other seeds; the row reports their mean
    drawn = subprocess.run([*again.args, "--draws", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert drawn.returncode == 0, drawn.stdout[-3000:] + drawn.stderr[-3000:]
    assert "reusing student-1:" in drawn.stdout and "student-1-draw1" in drawn.stdout
    row = json.loads((out / "rows.json").read_text())["student-1"]
    second = json.loads((out / "eval" / "student-1-draw1" / "metrics.json").read_text())
    first_fd = rows["student-1"]["metrics"]["frechet_distance_cls"]
    second_fd = second["metrics"]["frechet_distance_cls"]
    assert row["draws"] == 2 and row["fd_cls_draws"] == [first_fd, second_fd]
    assert math.isclose(row["metrics"]["frechet_distance_cls"], (first_fd + second_fd) / 2)
    seeds = [pq.read_table(out / "gen" / d / "metrics").column("seed").to_pylist()
             for d in ("student-1", "student-1-draw1")]
    assert not set(seeds[0]) & set(seeds[1])
    assert "FD_cls ↓ of each draw" in drawn.stdout and " ± " in drawn.stdout
    # ... and redoes, from scratch, a row whose settings changed (the batch job would refuse to mix the two runs)
    changed = subprocess.run([*again.args, "--max-timestep", "599"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "replacing student-1" in changed.stdout and "reusing student-1" not in changed.stdout
    assert json.loads((out / "eval" / "student-1" / "row-key.json").read_text())["max_timestep"] == 599


def test_quality_benchmark_rejects_a_guidance_below_one():
    r = subprocess.run([sys.executable, "benchmarks/quality.py", "--teacher-guidance", "0.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--teacher-guidance must be a finite number >= 1" in r.stderr


def test_quality_benchmark_rejects_zero_draws():
    r = subprocess.run([sys.executable, "benchmarks/quality.py", "--draws", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--draws must be an integer >= 1" in r.stderr


def test_quality_benchmark_rejects_a_negative_bootstrap():
    r = subprocess.run([sys.executable, "benchmarks/quality.py", "--bootstrap", "-1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--bootstrap must be an integer >= 0" in r.stderr


def test_draw_manifest_seeds(tmp_path, monkeypatch):
    """Draw 0 keeps the prompts as they are (the job derives seeds from ids); draw d sets seeds from id and d."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # quality.py imports its sibling report.py
    import quality

    prompts = Path(synthetic.write_prompts(tmp_path / "prompts.parquet", count=4, seed=3))
    assert quality.draw_manifest(prompts, tmp_path, "student-1", None, 0) == prompts
    one = pq.read_table(quality.draw_manifest(prompts, tmp_path, "student-1-draw1", None, 1))
    two = pq.read_table(quality.draw_manifest(prompts, tmp_path, "student-1-draw2", 7.0, 2))
    assert one["id"].to_pylist() == two["id"].to_pylist() == pq.read_table(prompts)["id"].to_pylist()
    assert len(set(one["seed"].to_pylist()) | set(two["seed"].to_pylist())) == 8
    assert two["guidance_scale"].to_pylist() == [7.0] * 4 and "guidance_scale" not in one.column_names
    again = pq.read_table(quality.draw_manifest(prompts, tmp_path, "x", None, 1))
    assert again["seed"].to_pylist() == one["seed"].to_pylist()
