"""Long-form check: minute-long clips by crop fusion (MusicCM §3.3) vs independent native windows concatenated.

For each held-out prompt the student generates one 60 s clip with crop fusion, and the same minute as
ceil(60 / segment) independently sampled segments laid end to end (``--segment-s``: 10 s by default, each itself
made by crop fusion when longer than the native window; 0 = native windows). At every segment boundary of the
concatenation (the same instants for the fused clip) we measure:
- spectral flux: mean |Δ log-mel| between the frames either side of the instant, over the clip's median
  frame-to-frame flux (a click or a sudden change of texture gives a large ratio; music's own onsets put
  the typical value somewhat above 1);
- edge flux: the same ratio at the fused canvas's window edges (every frame where a crop-fusion window starts or
  ends; with ``--taper 0`` the fusion weights jump there), for both methods (the concatenation has no windows there:
  its value is what those instants measure without a seam);
- embedding jump: distance between the label classifier's embeddings of the 1.28 s before and after the
  instant, over the same distance for pairs of 1.28 s halves inside windows;
- consistency: the fraction of 2.56 s segments whose predicted instrument / drum pattern equals the clip's
  majority, and the fraction equal to the prompt's label.

    python benchmarks/longform_continuity.py --write
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import torch
from report import header, publish


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="musiccm/assets/default",
                   help="student model (default %(default)s: the embedded default, the shipped demo student)")
    p.add_argument("--classifier", default="outputs/demo/classifier", help="label classifier (default %(default)s)")
    p.add_argument("--prompts", default="outputs/demo/data/heldout/prompts.parquet",
                   help="prompts with label columns (default %(default)s)")
    p.add_argument("--count", type=int, default=8, help="prompts to use (default %(default)s)")
    p.add_argument("--duration", type=float, default=60.0, help="clip length in seconds (default %(default)s)")
    p.add_argument("--steps", type=int, default=4, help="consistency steps (default %(default)s)")
    p.add_argument("--segment-s", type=float, default=10.0,
                   help="length of the independently generated segments, s; 0 = the native window (default 10)")
    p.add_argument("--max-timestep", type=int, default=None,
                   help="first sampling timestep (default: the model's own setting, else 999)")
    p.add_argument("--taper", type=int, default=None,
                   help="crop-fusion cross-fade in latent frames (default: the pipeline's, the windows' overlap; "
                   "0 = the plain average)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    return p.parse_args(argv)


def frame_flux(mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame-to-frame flux, mean |Δ log-mel| (flux[t] is between frames t and t+1), and its median."""
    flux = (mel[1:] - mel[:-1]).abs().mean(1)
    return flux, flux.median()


def ratio_at(flux: torch.Tensor, median: torch.Tensor, frames: list[int]) -> float:
    """Mean flux across the given frame boundaries over the median (from `frame_flux`)."""
    at = torch.stack([flux[f - 1] for f in frames if 0 < f < len(flux)])
    return float(at.mean() / median)


def embedding_jump(net, wave: torch.Tensor, sr: int, instants: list[int], half: int, window: int) -> float:
    """Embedding distance across the instants over the distance between the two halves of each window."""

    def emb(a: int, b: int) -> torch.Tensor:
        return net.wave_features(wave[a:b], sr)[0]

    across = [float((emb(s - half, s) - emb(s, s + half)).norm()) for s in instants if s - half >= 0
              and s + half <= len(wave)]
    inside = [float((emb(w, w + half) - emb(w + half, w + window)).norm()) for w in range(0, len(wave) - window + 1,
                                                                                             window)]
    return statistics.mean(across) / statistics.mean(inside)


def consistency(net, wave: torch.Tensor, sr: int, window: int, labels: dict[str, str]) -> dict[str, float]:
    """Per attribute: share of windows agreeing with the clip's majority and with the prompt's label."""
    preds: dict[str, list[str]] = {h: [] for h in ("instrument", "drums")}
    for a in range(0, len(wave) - window + 1, window):
        _, logits = net.wave_features(wave[a : a + window], sr)
        for h in preds:
            preds[h].append(net.classes[h][int(logits[h].argmax())])
    out = {}
    for h, p in preds.items():
        majority = Counter(p).most_common(1)[0][1]
        out[f"{h}_majority"] = majority / len(p)
        out[f"{h}_label"] = sum(x == labels[h] for x in p) / len(p)
    return out


def measure(net, wave: np.ndarray, sr: int, window: int, segment: int, labels: dict[str, str],
            edges: list[int]) -> dict[str, float]:
    from musiccm.mel import MelConfig, log_mel

    x = torch.from_numpy(wave).float()
    hop = MelConfig().hop_length
    instants = list(range(segment, len(x), segment))
    flux, median = frame_flux(log_mel(x[None], MelConfig(sample_rate=sr))[0])
    return {"flux_ratio": ratio_at(flux, median, [s // hop for s in instants]),
            "edge_flux_ratio": ratio_at(flux, median, [s // hop for s in edges]),
            "embedding_jump": embedding_jump(net, x, sr, instants, window // 2, window),
            **consistency(net, x, sr, window, labels)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from musiccm import model
    from musiccm.evaluation import classifier
    from musiccm.longform import window_starts
    from musiccm.pipeline import GenerationConfig, MusicCM

    gen = MusicCM(model.load(args.model), GenerationConfig(steps=args.steps, max_timestep=args.max_timestep,
                                                           taper=args.taper))
    net = classifier.load(args.classifier)
    g = gen.c.geometry
    sr, native = g.sample_rate, g.native_duration
    window = g.num_samples(native)
    seg_s = args.segment_s or native
    segment = g.num_samples(seg_s)
    starts = window_starts(g.latent_frames(args.duration), g.window_frames, gen.config.hop_frames)
    edges = sorted(set(starts[1:]) | {s + g.window_frames for s in starts[:-1]})
    edges = [e * g.vae_factor * g.hop_length for e in edges]  # latent frame → sample
    rows = pq.read_table(args.prompts).slice(0, args.count).to_pylist()
    n = math.ceil(args.duration / seg_s)
    concatenated = f"{n} independent {seg_s:g} s segments"
    results: dict[str, list[dict]] = {"crop fusion": [], concatenated: []}
    fused_s = []
    for i, row in enumerate(rows):
        labels = {h: row[h] for h in ("instrument", "drums")}
        t0 = time.perf_counter()
        fused = gen.generate([row["prompt"]], args.duration, [i]).waveforms[0]
        fused_s.append(time.perf_counter() - t0)
        parts = gen.generate([row["prompt"]] * n, seg_s, [1000 * i + k for k in range(n)]).waveforms
        concat = np.concatenate(list(parts))[: g.num_samples(args.duration)]
        results["crop fusion"].append(measure(net, fused, sr, window, segment, labels, edges))
        results[concatenated].append(measure(net, concat, sr, window, segment, labels, edges))
        print(f"{i + 1}/{len(rows)} {row['prompt'][:60]!r}: fused {results['crop fusion'][-1]}, "
              f"concatenated {results[concatenated][-1]}", flush=True)
    keys = list(results["crop fusion"][0])
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, rs in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(r[k] for r in rs):.3f}" for k in keys) + " |")
    text = (header(f"Long-form continuity: {args.duration:g} s by crop fusion vs independent {seg_s:g} s segments",
                   "longform_continuity.py", argv)
            + f"Model {args.model}, {args.steps} steps from t = {gen.config.max_timestep or 999}, native window "
            f"{native:g} s, crop fusion hop {gen.config.hop_frames} and taper {gen.config.taper} latent frames, "
            f"{len(rows)} prompts; means over prompts. A {args.duration:g} s "
            f"clip took {statistics.median(fused_s):.1f} s (median) with crop fusion.\n\n" + "\n".join(lines) + "\n")
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
