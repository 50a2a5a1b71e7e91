"""How well does a demo model follow its prompts? A quick in-process probe, for choosing training recipes.

Generates the first ``--limit`` held-out prompts with the model (DDIM + CFG for a teacher, consistency steps
for a student) and reports the label classifier's attribute accuracy against the prompts' labels and, with the
held-out reference clips, FD_cls (Fréchet distance of the classifier's embeddings, as ``ray_jobs/evaluate.py``
computes it). Much cheaper than ``benchmarks/quality.py`` (no Ray jobs), and meant only to compare settings
against each other within one probe (its noise seeds differ from the batch job's):

    python benchmarks/teacher_probe.py outputs/demo/teacher outputs/demo-hour/teacher --limit 64 --steps 20
    python benchmarks/teacher_probe.py outputs/demo/teacher --limit 256 --steps 50 --spacing trailing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_PROMPTS = "outputs/demo/data/heldout/prompts.parquet"
DEFAULT_CLASSIFIER = "outputs/demo/classifier"
DEFAULT_REFERENCE = "outputs/demo/data/heldout/manifest.parquet"
SPACINGS = ("leading", "trailing", "linspace")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories (MusicLDM layout)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"held-out prompts with labels (default {DEFAULT_PROMPTS})")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                   help=f"label classifier (default {DEFAULT_CLASSIFIER})")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help=f"held-out reference clips (manifest with id, uri) for FD_cls; '' = accuracy only "
                        f"(default {DEFAULT_REFERENCE})")
    p.add_argument("--limit", type=int, default=64, help="first N prompts (default 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    p.add_argument("--max-timestep", type=int, default=None,
                   help="students only: first sampling timestep (default: the model's own, else 999)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="teachers only: DDIM timestep_spacing (default: the model's scheduler config; diffusers' "
                        "'leading' starts 50 steps at t = 981 and 4 at 751, 'trailing' starts both at 999)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per generate call (default 16)")
    return p.parse_args(argv)


def reference_embeddings(manifest: str, ids: list[str], judge) -> np.ndarray:
    """The classifier's embeddings of the reference clips with these ids, in that order."""
    import pyarrow.parquet as pq

    from musiccm.evaluation.features import decode

    uris = {r["id"]: r["uri"] for r in pq.read_table(manifest, columns=["id", "uri"]).to_pylist()}
    missing = [i for i in ids if i not in uris]
    if missing:
        raise SystemExit(f"--reference {manifest} lacks {len(missing)} of the prompts' ids, e.g. {missing[:3]}")
    return np.stack([judge(*decode(Path(uris[i]).read_bytes()))[0] for i in ids])


def probe(model_dir: str, rows: list[dict], judge, steps: int | None, guidance: float | None, batch: int,
          spacing: str | None = None, ref: np.ndarray | None = None, max_timestep: int | None = None) -> dict:
    """Attribute accuracy (per head and mean), and FD_cls against ``ref``, of one model's clips for ``rows``."""
    from musiccm import model
    from musiccm.evaluation.metrics import frechet_distance
    from musiccm.pipeline import GenerationConfig, MusicCM

    components = model.load(model_dir)
    if spacing is not None:
        if components.is_consistency:
            raise SystemExit(f"--spacing applies to DDIM teachers; {model_dir} is a consistency student")
        components.scheduler = type(components.scheduler).from_config(components.scheduler.config,
                                                                      timestep_spacing=spacing)
    if max_timestep is not None and not components.is_consistency:
        raise SystemExit(f"--max-timestep applies to consistency students; {model_dir} samples with DDIM")
    gen = MusicCM(components, GenerationConfig(steps=steps, guidance_scale=guidance, max_timestep=max_timestep))
    duration = gen.c.geometry.native_duration
    hits = {k: 0 for k in judge.net.classes}
    embeddings = []
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        out = gen.generate([r["prompt"] for r in part], duration, list(range(i, i + len(part))))
        for r, wave in zip(part, out.waveforms, strict=True):
            emb, _, predicted = judge(torch.from_numpy(wave)[None], out.sample_rate)  # as ray_jobs/evaluate.py
            embeddings.append(emb)
            for k, v in predicted.items():
                hits[k] += int(v == r[k])
    acc = {k: round(100 * v / len(rows), 1) for k, v in hits.items()}
    acc["mean"] = round(sum(acc.values()) / len(hits), 1)
    result = {"model": model_dir, "steps": gen.config.steps, "guidance": gen.config.guidance_scale,
              "max_timestep": gen.config.max_timestep,
              "spacing": components.scheduler.config.get("timestep_spacing") if not components.is_consistency else None,
              "clips": len(rows), "seconds": round(time.perf_counter() - start, 1), "accuracy": acc}
    if ref is not None:
        result["fd_cls"] = round(frechet_distance(np.stack(embeddings), ref), 2)
    return result


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from musiccm.evaluation.features import Classifier

    args = parse(argv)
    if args.limit < 1:
        raise SystemExit("--limit must be ≥ 1")
    for flag, path in (("--prompts", args.prompts), ("--reference", args.reference)):
        if path and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file (run recipes/demo/train.py, or pass {flag})")
    rows = pq.read_table(args.prompts).to_pylist()[: args.limit]
    judge = Classifier(args.classifier)
    ref = reference_embeddings(args.reference, [r["id"] for r in rows], judge) if args.reference else None
    for m in args.models:
        print(json.dumps(probe(m, rows, judge, args.steps, args.guidance, args.batch_size, args.spacing, ref,
                               args.max_timestep)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
