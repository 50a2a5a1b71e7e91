"""Clips per second through the real batch job, against a bare in-process loop on the same device.

Usage: python benchmarks/throughput.py [--clips 64] [--duration 10.24] [--batch-size 8] [--calls 1 2] [--write]

1. A bare loop: `MusicCM.generate` over the same prompts, seeds and batch size in this process, with the torch
   threads the job gives its actor on this machine (`plan_resources`); the rate after a warm-up batch.
2. The job, `ray_jobs/batch_generate.py` in a subprocess (its own local Ray, local output, CLAP score on as by
   default), once per `--calls` value (`--calls-per-actor`: 1 = generate then write, 2 = the next batch generates
   while this one is encoded and written). Its steady state comes from its `_SUMMARY.json` (first to last batch
   an actor finished, so Ray start-up and model loading are out), with the per-stage seconds and the actors'
   busy fraction it records.
3. The share of the FLOP roofline: the model's FLOPs per clip with its CLAP score (`benchmarks/flops.py`, counted on
   the CPU) x clips/s over `--peak-tflops` (default 989, an H100 SXM's dense bf16; give this machine's own peak
   for a CPU run to mean anything).
Loop, then each job, then the loop again: the mean of the two loop runs is the reference (the machine may drift).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from musiccm import model  # noqa: E402
from musiccm.batch.config import BatchConfig, plan_resources  # noqa: E402
from musiccm.defaults import DEFAULT_MODEL  # noqa: E402
from musiccm.pipeline import GenerationConfig, MusicCM  # noqa: E402

PROMPTS = ["an upbeat jazz tune with piano", "calm ambient pads", "a rock riff with drums", "folk guitar, slow"]


def rows(n: int, duration: float) -> list[dict]:
    return [{"id": f"clip-{i:04d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "duration_s": duration}
            for i in range(n)]


def bare_loop(gen: MusicCM, items: list[dict], batch_size: int, steps: int) -> dict:
    """Generate every clip in batches; the rate over the batches after the first (warm-up)."""
    cfg = GenerationConfig(steps=steps, max_duration=3600)
    times = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        start = time.perf_counter()
        gen.generate([r["prompt"] for r in chunk], chunk[0]["duration_s"], [r["seed"] for r in chunk], cfg)
        times.append((len(chunk), time.perf_counter() - start))
    clips, seconds = sum(n for n, _ in times[1:]), sum(t for _, t in times[1:])
    return {"clips": clips, "seconds": round(seconds, 3), "clips_per_s": clips / seconds}


RANDOM = ("full", "full-teacher", "tiny", "tiny-teacher")


def random_model(kind: str, directory: str) -> str:
    """`full` / `full-teacher` (`tiny` / `tiny-teacher` for smoke runs): the MusicLDM architecture with random
    weights, saved as a student (LCM) or as the DDIM teacher, for the job to load like any model."""
    from musiccm.build import build_components
    from musiccm.student import as_student

    teacher = build_components(kind.removesuffix("-teacher"), seed=0)
    components = teacher if kind.endswith("-teacher") else as_student(teacher)
    info = {"name": f"random-{kind}", "trained": False, "note": "random weights: a speed measurement only"}
    return str(model.save(components, Path(directory) / kind, extra=info))


def run_job(manifest: str, out: str, model_uri: str, batch_size: int, steps: int, calls: int, device: str,
            dtype: str) -> dict:
    """The batch job in a subprocess; its summary's throughput section and wall time."""
    cmd = [sys.executable, str(REPO / "ray_jobs" / "batch_generate.py"), "--manifest", manifest, "--output", out,
           "--model", model_uri, "--batch-size", str(batch_size), "--default-steps", str(steps),
           "--calls-per-actor", str(calls), "--device", device, "--dtype", dtype, "--progress-s", "30"]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads(Path(out, "_SUMMARY.json").read_text())
    return {"calls_per_actor": calls, "wall_s": round(wall, 1), **summary["throughput"], "ray": summary["ray"]}


def flop_per_clip(components, name: str, duration: float, steps: int, cfg: bool) -> float:
    """TFLOP of one clip with its CLAP score (what the job computes by default), counted by benchmarks/flops.py."""
    import flops

    return flops.count_model(components, name, duration).clip(steps, cfg=cfg, score=True) / 1e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model directory, or full / full-teacher: the full-size "
                   "architecture with random weights, as a student or as the DDIM teacher (give --steps 50); tiny / "
                   "tiny-teacher for smoke runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="the job's --dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, nargs="+", default=[1, 2], help="--calls-per-actor values to run the job with")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's peak (H100 SXM dense bf16: 989)")
    p.add_argument("--write", action="store_true", help="append the result to benchmarks/RESULTS.md")
    p.add_argument("--json", default=None, help="also save the numbers here")
    args = p.parse_args(argv)
    items = rows(args.clips, args.duration)
    work = tempfile.mkdtemp(prefix="throughput-")
    manifest = os.path.join(work, "prompts.parquet")
    pq.write_table(pa.Table.from_pylist(items), manifest)
    cpus = float(os.cpu_count() or 1)
    res = plan_resources(BatchConfig(manifest="m", output="o", device=args.device), {"CPU": cpus, "GPU": float(
        torch.cuda.device_count())})
    if res.torch_threads:
        torch.set_num_threads(res.torch_threads)
    model_uri = random_model(args.model, work) if args.model in RANDOM else args.model
    gen = MusicCM(model.load(model_uri, device=args.device, dtype=getattr(torch, args.dtype)))
    loops = [bare_loop(gen, items, args.batch_size, args.steps)]
    jobs = [run_job(manifest, os.path.join(work, f"out-{c}"), model_uri, args.batch_size, args.steps, c,
                    args.device, args.dtype) for c in args.calls]
    loops.append(bare_loop(gen, items, args.batch_size, args.steps))
    loop_rate = sum(r["clips_per_s"] for r in loops) / len(loops)
    tflop = flop_per_clip(model.load(model_uri), args.model, args.duration, args.steps, cfg=not gen.c.is_consistency)
    result = {"clips": args.clips, "duration_s": args.duration, "batch_size": args.batch_size, "steps": args.steps,
              "model": gen.c.extra.get("name") or args.model, "device": args.device, "dtype": args.dtype,
              "torch_threads": res.torch_threads, "loop": loops, "loop_clips_per_s": loop_rate, "jobs": jobs,
              "tflop_per_clip": tflop}
    print(json.dumps(result, indent=1))
    table = render(result, args.peak_tflops)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.write:
        write(table, argv if argv is not None else sys.argv[1:])
    return 0


def render(result: dict, peak_tflops: float) -> str:
    """A Markdown table: the loop and each job run, rates, ratio, busy fraction, stages, roofline share."""
    d = result["duration_s"]
    lines = ["| run | clips/s | x real time | ratio to loop | actors busy | generate / CLAP / encode / write s | "
             "share of roofline |", "|---|---|---|---|---|---|---|"]

    def roof(rate: float) -> str:
        tflop = result["tflop_per_clip"]
        return f"{100 * rate * tflop / peak_tflops:.4f} %" if tflop else "n/a"

    rate = result["loop_clips_per_s"]
    runs = ", ".join(f"{r['clips_per_s']:.3f}" for r in result["loop"])
    lines.append(f"| bare loop (mean of {runs}) | {rate:.3f} | {rate * d:.2f} | 1.00 | | | {roof(rate)} |")
    for job in result["jobs"]:
        steady = job["steady_state"] or {}
        jr = steady.get("clips_per_s") or 0.0
        busy = steady.get("actor_busy_fraction")
        shown = f"{100 * busy:.0f} %" if busy is not None else "n/a"
        stages = " / ".join(f"{v:.1f}" for v in job["stage_seconds"].values())
        lines.append(f"| job, --calls-per-actor {job['calls_per_actor']} (steady state, {steady.get('clips')} clips; "
                     f"{job['wall_s']} s end to end) | {jr:.3f} | {jr * d:.2f} | {jr / rate:.2f} | {shown} | "
                     f"{stages} | {roof(jr)} |")
    return "\n".join(lines)


def write(table: str, argv: list[str]) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cpu}, {os.cpu_count()} cores"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = (f"\n### Batch job throughput against a bare loop ({now})\n\n"
               f"Command: `python benchmarks/throughput.py {' '.join(argv)}`  \nMachine: {device}; torch "
               f"{torch.__version__}; load average {os.getloadavg()[0]:.1f} at the end; commit {commit.strip()}\n\n"
               f"{table}\n")
    with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
        f.write(section)


if __name__ == "__main__":
    sys.exit(main())
