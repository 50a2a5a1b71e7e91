"""What the demo recipe's CLAP audio embeddings of the training clips cost, three ways.

The teacher stage conditions on the trained CLAP's audio embeddings of every training clip. This times, on the
first ``--clips`` training clips of a demo work directory (its ``parts/`` CLAP) and with the same code paths:

- ``per clip``: :func:`musiccm.external.encode_audio` with ``batch_size=1``, one feature extraction and one audio
  tower forward per clip (what the teacher stage did before 2026-12-01);
- ``batched``: the same function at ``batch_size=64`` (what the teacher stage does when nothing was saved);
- ``from the CLAP stage's features``: `musiccm.demo.train_clap.embed_audio` on the features the CLAP stage has
  already extracted for its training (the parts stage now saves these embeddings; the teacher stage loads them).
  The feature extraction itself (``audio_features``) is timed too: the CLAP stage pays it once either way.

and checks that all three give the same embeddings.

    python benchmarks/clap_embedding_time.py outputs/demo-hour-e2e --clips 512
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", help="demo work directory with data/train/ and parts/ (recipes/demo/train.py --work)")
    p.add_argument("--clips", type=int, default=512, help="training clips to embed (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from musiccm import external
    from musiccm.demo import recipe
    from musiccm.demo.train_clap import audio_features, embed_audio

    args = parse(argv)
    if args.clips < 1:
        raise SystemExit(f"--clips must be at least 1, got {args.clips}")
    torch.set_num_threads(args.threads)
    cfg = recipe.RecipeConfig(work=args.work)
    data = recipe.train_data(cfg)
    data = data.subset(torch.arange(min(args.clips, len(data))))
    c = recipe.frozen_parts(cfg)
    waves = [w.numpy() for w in data.waves]
    rate = c.feature_extractor.sampling_rate
    per_clip, t_per_clip = timed(lambda: external.encode_audio(c, waves, rate, batch_size=1))
    batched, t_batched = timed(lambda: external.encode_audio(c, waves, rate, batch_size=64))
    (feats, longer), t_features = timed(lambda: audio_features(c.feature_extractor, data.waves))
    from_features, t_embed = timed(lambda: embed_audio(c.text_encoder, feats, longer))
    n = len(data)
    result = {
        "work": args.work, "clips": n, "threads": args.threads, "machine": f"{platform.machine()}, CPU",
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "seconds": {"per_clip": round(t_per_clip, 2), "batched": round(t_batched, 2),
                    "features_only": round(t_features, 2), "embed_from_features": round(t_embed, 2)},
        "seconds_per_1000_clips": {k: round(v * 1000 / n, 1) for k, v in
                                   {"per_clip": t_per_clip, "batched": t_batched, "features_only": t_features,
                                    "embed_from_features": t_embed}.items()},
        "max_abs_diff_vs_per_clip": {"batched": float((batched - per_clip).abs().max()),
                                     "from_features": float((from_features - per_clip).abs().max())},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
