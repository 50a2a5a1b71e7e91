"""The speed benchmarks' own options, run as a user would on tiny models (CPU): tables come out, flags take effect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_generate_latency_times_a_saved_student_or_teacher(tiny_student_dir, tiny_teacher_dir):
    out = run("benchmarks/generate_latency.py", "--model", tiny_student_dir, "--device", "cpu", "--durations", "0.5",
              "--student-steps", "1", "2", "--repeats", "1")
    assert re.search(rf"^### Generation latency, .* \({re.escape(tiny_student_dir)}\)$", out, re.M)
    table = out[out.index("### "):]  # rows are also printed as they finish; the section repeats them
    rows = re.findall(r"^\| consistency student \| (\d) \| 0.5 \| [\d.]+ \|", table, re.M)
    assert rows == ["1", "2"] and "teacher, DDIM" not in out
    out = run("benchmarks/generate_latency.py", "--model", tiny_teacher_dir, "--device", "cpu", "--durations", "0.5",
              "--teacher-steps", "3", "--repeats", "1")
    assert re.findall(r"^\| teacher, DDIM\+CFG \| 3 \| 0.5 \|", out, re.M) and "consistency student" not in out


def test_distill_throughput_records_the_precision_it_ran():
    out = run("benchmarks/distill_throughput.py", "--device", "cpu", "--sizes", "tiny", "--adv", "without",
              "--steps", "1", "--warmup", "0", "--threads", "1", "--mixed-precision", "bf16")
    # autocast is GPU-only in the distiller, so a CPU row must say it ran in full precision
    assert re.search(r"^\| tiny \| without \| cpu \| no \| 1 \| 4 \|", out, re.M), out


def test_longform_null_ranks_the_marks_against_shifted_instants(tiny_student_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from longform_null import null_rank

    # flux spikes at the marks only: no shift of them reaches the observed ratio but the zero shift itself
    mel = torch.zeros(400, 8)
    marks = [100, 200, 300]
    for m in marks:
        mel[m:] += 5.0
    mel += 0.01 * torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    observed, rank = null_rank(mel, marks, period=100, stride=2)
    assert observed > 50 and rank == 1 / 50
    # no spikes: the marks are one shift among many, somewhere in the middle of the null
    _, rank = null_rank(mel[:99].repeat(4, 1), [99, 198, 297], period=99, stride=1)
    assert 0.02 < rank < 0.98

    from musiccm import synthetic

    prompts = synthetic.write_prompts(tmp_path / "prompts.parquet", count=2, seed=3)
    # the committed demo student (the tiny random one makes silence, which has no flux to rank)
    out = run("benchmarks/longform_null.py", "--prompts", str(prompts), "--count", "2", "--seeds", "0", "1",
              "--duration", "8", "--segment-s", "3", "--steps", "1")
    lines = re.findall(r"^draw (\d) prompt (\d): flux ratio at the marks [\d.]+, rank in the null ([\d.]+)$", out, re.M)
    assert [(d, p) for d, p, _ in lines] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all(0 < float(r) <= 1 for _, _, r in lines)
    assert re.search(r"^4 clips: mean flux ratio at the marks", out, re.M)
    r = subprocess.run([sys.executable, "benchmarks/longform_null.py", "--segment-s", "60"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--segment-s must be in (0, --duration)" in r.stderr
    r = subprocess.run([sys.executable, "benchmarks/longform_null.py", "--model", tiny_student_dir, "--prompts",
                        str(prompts), "--count", "1", "--seeds", "0", "--duration", "3", "--segment-s", "1",
                        "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "silent or constant clip), left out" in r.stdout, r.stdout + r.stderr
    assert "all 1 clips were silent or constant" in r.stderr


@pytest.mark.slow
def test_throughput_runs_the_job_beside_a_bare_loop(tmp_path):
    out = run("benchmarks/throughput.py", "--model", "tiny", "--clips", "6", "--batch-size", "2", "--duration", "1.28",
              "--calls", "2", "--json", str(tmp_path / "t.json"))
    import json

    result = json.loads((tmp_path / "t.json").read_text())
    job = result["jobs"][0]
    assert job["calls_per_actor"] == 2 and job["ray"]["calls_per_actor"] == 2
    assert job["steady_state"]["clips"] == 4 and job["steady_state"]["clips_per_s"] > 0  # 3 batches, the first out
    assert all(job["stage_seconds"][k] > 0 for k in ("generation", "encode"))
    assert result["tflop_per_clip"] > 0 and len(result["loop"]) == 2
    assert re.search(r"^\| job, --calls-per-actor 2 \(steady state, 4 clips", out, re.M), out
