"""How well does a demo model follow its prompts? A quick in-process probe, for choosing training recipes.

Generates the first ``--limit`` held-out prompts with the model (DDIM + CFG for a teacher, consistency steps
for a student) and reports the label classifier's attribute accuracy against the prompts' labels. Much
cheaper than ``benchmarks/quality.py`` (no Ray jobs, no FD), and meant only to rank recipes against each other:

    python benchmarks/teacher_probe.py outputs/demo/teacher outputs/demo-hour/teacher --limit 64 --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

DEFAULT_PROMPTS = "outputs/demo/data/heldout/prompts.parquet"
DEFAULT_CLASSIFIER = "outputs/demo/classifier"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories (MusicLDM layout)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"held-out prompts with labels (default {DEFAULT_PROMPTS})")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                   help=f"label classifier (default {DEFAULT_CLASSIFIER})")
    p.add_argument("--limit", type=int, default=64, help="first N prompts (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per generate call (default 16)")
    return p.parse_args(argv)


def probe(model_dir: str, rows: list[dict], judge, steps: int | None, guidance: float | None, batch: int) -> dict:
    """Attribute accuracy (per head and mean) of one model's clips for ``rows``."""
    from musiccm import model
    from musiccm.pipeline import GenerationConfig, MusicCM

    gen = MusicCM(model.load(model_dir), GenerationConfig(steps=steps, guidance_scale=guidance))
    duration = gen.c.geometry.native_duration
    hits = {k: 0 for k in judge.net.classes}
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        out = gen.generate([r["prompt"] for r in part], duration, list(range(i, i + len(part))))
        for r, wave in zip(part, out.waveforms, strict=True):
            _, _, predicted = judge(torch.from_numpy(wave)[None], out.sample_rate)  # as ray_jobs/evaluate.py
            for k, v in predicted.items():
                hits[k] += int(v == r[k])
    acc = {k: round(100 * v / len(rows), 1) for k, v in hits.items()}
    acc["mean"] = round(sum(acc.values()) / len(hits), 1)
    return {"model": model_dir, "steps": gen.config.steps, "guidance": gen.config.guidance_scale, "clips": len(rows),
            "seconds": round(time.perf_counter() - start, 1), "accuracy": acc}


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from musiccm.evaluation.features import Classifier

    args = parse(argv)
    if args.limit < 1:
        raise SystemExit("--limit must be ≥ 1")
    rows = pq.read_table(args.prompts).to_pylist()[: args.limit]
    judge = Classifier(args.classifier)
    for m in args.models:
        print(json.dumps(probe(m, rows, judge, args.steps, args.guidance, args.batch_size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
