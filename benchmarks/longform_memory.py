"""Peak memory of long-form generation on the full-size (random-weight) MusicLDM student, one process per clip.

Usage: python benchmarks/longform_memory.py --duration 600 [--steps 1] [--device cpu|cuda] [--write]
Reports the process's peak RSS (CPU) or peak CUDA allocation, and the same figure right after the model was
built, so the growth due to the clip itself is visible. Crop fusion keeps the canvas plus one batch of windows;
the VAE and vocoder decode in cross-faded chunks, so growth should be roughly the output waveform itself.
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


def peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, required=True, help="clip length in seconds")
    p.add_argument("--steps", type=int, default=1, help="consistency steps (default 1)")
    p.add_argument("--crop-batch-size", type=int, default=8, help="windows per UNet call (default 8)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--write", action="store_true", help="append a row to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    c = as_student(build_components("full", seed=0)).to(args.device)
    gen = MusicCM(c, GenerationConfig(steps=args.steps, crop_batch_size=args.crop_batch_size, max_duration=3600))
    gen.generate(["warm-up"], 1.0, [0])
    base = peak_mib(args.device)
    t0 = time.perf_counter()
    out = gen.generate(["an ambient drone that slowly evolves"], args.duration, [1])
    seconds = time.perf_counter() - t0
    peak = peak_mib(args.device)
    assert out.waveforms.shape[1] == round(args.duration * 16000)
    row = (f"| {args.duration:g} | {args.steps} | {args.crop_batch_size} | {seconds:.1f} | {base:.0f} | {peak:.0f} | "
           f"{peak - base:.0f} |")
    text = (header("Long-form memory, full-size MusicLDM student (random weights)", "longform_memory.py", argv)
            + "\n| clip s | steps | crop batch | seconds | peak MiB after load+warm-up | peak MiB | growth MiB |\n"
            f"|---|---|---|---|---|---|---|\n{row}\n")
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
