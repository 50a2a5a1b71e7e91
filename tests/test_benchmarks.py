"""The speed benchmarks' own options, run as a user would on tiny models (CPU): tables come out, flags take effect."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
