"""Distillation throughput per worker and peak memory, single process (no Ray), random-weight MusicLDM.

Usage: python benchmarks/distill_throughput.py --device cpu --sizes tiny full --steps 3 [--write]
Rows: each size x {with, without} the adversarial term (MusicCM eq. 9; adv_weight 0 = "w/o L_adv").
One step = data preparation of synthetic clips (decode, crop, log-mel, VAE encode, CLAP) + ``train_step``
(teacher CFG solver, student, EMA target, discriminator G and D steps). Every configuration runs in a
fresh subprocess so its peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU) is its own.
"tiny" uses the tiny ViT feature network, "full" the AudioMAE ViT-B (random init). Samples/s per worker
is what one DDP rank sustains; a cluster's rate is about that times the workers (minus all-reduce cost).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = ("tiny", "full")


def synthetic_rows(batch: int, seconds: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Manifest-like rows: FLAC bytes of sine chords + noise, captions (one left empty: audio-conditioned)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio, captions = [], []
    for i in range(batch):
        x = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, 3)) + 0.05 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        sf.write(buf, x.astype(np.float32), 16000, format="FLAC")
        audio.append(buf.getvalue())
        captions.append("" if i == batch - 1 and batch > 1 else "upbeat electronic music with drums")
    return {"audio": np.array(audio, dtype=object), "caption": np.array(captions, dtype=object)}


def measure(size: str, adv: bool, device: str, batch: int, steps: int, warmup: int, threads: int | None,
            precision: str = "no") -> dict:
    """One configuration in this process: build, warm up, time ``steps`` steps; returns a result row."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from musiccm.build import build_components
    from musiccm.distill.config import DistillConfig
    from musiccm.distill.distiller import Distiller

    t0 = time.perf_counter()
    teacher = build_components(size, seed=0)
    config = DistillConfig(train_manifest="synthetic", batch_size=batch, adv_weight=1.0 if adv else 0.0,
                           tiny_feature_network=size == "tiny", validate_every=0, warmup_steps=0,
                           mixed_precision=precision)
    distiller = Distiller(teacher, config, device)
    build_s = time.perf_counter() - t0
    rows = synthetic_rows(batch, 1.5 * teacher.geometry.native_duration)
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        distiller.train_step(distiller.prepare_batch(rows, gen))
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    prep_s = train_s = 0.0
    for _ in range(steps):
        a = time.perf_counter()
        prepared = distiller.prepare_batch(rows, gen)
        sync()
        b = time.perf_counter()
        metrics = distiller.train_step(prepared)
        sync()
        prep_s, train_s = prep_s + b - a, train_s + time.perf_counter() - b
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainable = sum(p.numel() for p in distiller.student_module.parameters() if p.requires_grad)
    ran_in = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(distiller.amp_dtype, "no")  # the distiller's choice
    return {"size": size, "adv": adv, "device": device, "precision": ran_in, "batch": batch, "steps": steps,
            "build_s": build_s,
            "trainable_m": trainable / 1e6, "prep_s": prep_s / steps, "train_s": train_s / steps,
            "samples_per_s": batch * steps / (prep_s + train_s), "train_samples_per_s": batch * steps / train_s,
            "peak_mb": peak, "distill_loss": metrics["distill_loss"], "threads": torch.get_num_threads()}


def table(rows: list[dict]) -> str:
    head = ("| size | L_adv | device | precision | threads | batch | trainable params | data s/step | train s/step "
            "| samples/s per worker | train-only samples/s | peak memory |\n" + "|---" * 12 + "|\n")
    mem = "RSS" if rows and rows[0]["device"] == "cpu" else "CUDA alloc"
    return head + "".join(
        f"| {r['size']} | {'with' if r['adv'] else 'without'} | {r['device']} | {r['precision']} "
        f"| {r['threads']} | {r['batch']} "
        f"| {r['trainable_m']:.1f} M | {r['prep_s']:.3f} | {r['train_s']:.3f} | {r['samples_per_s']:.3f} "
        f"| {r['train_samples_per_s']:.3f} "
        f"| {r['peak_mb']:.0f} MiB {mem} |\n" for r in rows)


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = f", 1-min load average {os.getloadavg()[0]:.1f} when written" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} cores{load} (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=["tiny"], help="model sizes (default: tiny)")
    p.add_argument("--adv", nargs="+", choices=["with", "without"], default=["with", "without"],
                   help="adversarial term on/off (default: both)")
    p.add_argument("--batch-size", type=int, default=None, help="clips per step (default: tiny 4, full 1)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast precision of the student and teacher passes (GPU only; default no = fp32)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's; "
                   "use 1 on a shared machine, where oversubscribed OpenMP threads can be 10x slower)")
    p.add_argument("--write", action="store_true", help="append the table, command, machine and date to "
                   "benchmarks/RESULTS.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(measure(**spec)), flush=True)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for size in args.sizes:
        for adv in args.adv:
            spec = {"size": size, "adv": adv == "with", "device": device, "steps": args.steps, "warmup": args.warmup,
                    "threads": args.threads, "batch": args.batch_size or (4 if size == "tiny" else 1),
                    "precision": args.mixed_precision}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{size}/{adv}: failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"{size} {adv} L_adv: {rows[-1]['samples_per_s']:.3f} samples/s, peak {rows[-1]['peak_mb']:.0f} MiB",
                  file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.write:
        command = "python benchmarks/distill_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"\n## Distillation throughput ({device})\n\n`{command}`  \nMachine: {machine(device)}  \n"
                  f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Random weights; "
                  f"{args.steps} timed steps after {args.warmup} warm-up; one process = one worker.\n\n")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
