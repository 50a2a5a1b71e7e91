"""Latency and peak memory of generation on the full-size (random-weight) MusicLDM architecture, or on a saved model.

Usage: python benchmarks/generate_latency.py --device cuda --dtype float16 [--durations 10.24 60 600] [--write]
       python benchmarks/generate_latency.py --model musiccm/assets/default --device cuda --durations 2.56 10.24 60
Rows: teacher DDIM (50 steps, CFG) and the consistency student at 1/2/4 steps; long clips by crop fusion.
Without --model the weights are random, so the figures are about speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch
from report import header, publish

from musiccm.build import build_components
from musiccm.pipeline import GenerationConfig, MusicCM
from musiccm.student import as_student


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_one(gen: MusicCM, duration: float, steps: int, device: str, repeats: int) -> tuple[float, float]:
    cfg = GenerationConfig(steps=steps, crop_batch_size=gen.config.crop_batch_size, max_duration=3600)
    gen.generate(["warm-up"], min(duration, 10.24), [0], cfg)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for r in range(repeats):
        t0 = time.perf_counter()
        gen.generate(["an upbeat jazz tune with piano"], duration, [r], cfg)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, peak_mb(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="UNet dtype")
    p.add_argument("--durations", type=float, nargs="+", default=[10.24, 60.0], help="clip lengths in seconds")
    p.add_argument("--student-steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher DDIM steps (0 = skip the teacher)")
    p.add_argument("--crop-batch-size", type=int, default=8, help="windows per UNet call")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (best is reported)")
    p.add_argument("--model", default=None, help="a saved MusicLDM-layout model (directory or hub id) to time "
                   "instead of the random full-size architecture; a consistency student is timed at --student-steps, "
                   "a teacher at --teacher-steps")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.model:
        from musiccm import model

        loaded = model.load(args.model, device=args.device, dtype=dtype)
        teacher, student = (None, loaded) if loaded.is_consistency else (loaded, None)
        title = f"Generation latency, {loaded.extra.get('name') or args.model} ({args.model})"
    else:
        teacher = build_components("full", seed=0)
        teacher.unet.to(dtype)
        teacher.to(args.device)
        student = as_student(teacher)
        title = "Generation latency, full-size MusicLDM architecture (random weights)"
    rows = []
    for duration in args.durations:
        runs = [("teacher, DDIM+CFG", teacher, args.teacher_steps)] if teacher and args.teacher_steps else []
        runs += [("consistency student", student, s) for s in args.student_steps] if student else []
        for label, comps, steps in runs:
            gen = MusicCM(comps, GenerationConfig(crop_batch_size=args.crop_batch_size, max_duration=3600))
            sec, mem = time_one(gen, duration, steps, args.device, args.repeats if duration <= 60 else 1)
            rows.append(f"| {label} | {steps} | {duration:g} | {sec:.3f} | {duration / sec:.1f}x | {mem:.0f} |")
            print(rows[-1], flush=True)
    text = (header(title, "generate_latency.py", argv)
            + f"dtype {args.dtype}, crop_batch_size {args.crop_batch_size}\n\n"
            "| model | steps | clip s | seconds per clip | x real time | peak MB |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
