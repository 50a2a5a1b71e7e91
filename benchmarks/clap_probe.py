"""How well does a demo model's CLAP read its captions? A probe of the text condition the teacher learns from.

For each model directory (MusicLDM layout), embeds the held-out captions with the CLAP text tower and the
held-out reference clips with the audio tower, then reports, per attribute, how often the nearest class
centroid gives the right label:

- text → text: centroids of the first half's caption embeddings, judged on the second half (do captions with
  different instruments, tempi, ... land apart?);
- audio → audio: the same with the clips' audio embeddings;
- text → audio: each caption against the centroids of the clips' audio embeddings (does a caption land near
  the clips it describes? MusicLDM's teacher is trained partly on audio embeddings and sampled on text ones).

    python benchmarks/clap_probe.py musiccm/assets/default outputs/demo-hour/teacher \\
        --reference outputs/demo-hour/data/heldout/manifest.parquet
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

DEFAULT_REFERENCE = "outputs/demo/data/heldout/manifest.parquet"
ATTRIBUTES = ("instrument", "tempo", "drums", "mode")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories (MusicLDM layout, with a CLAP text_encoder)")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help=f"held-out clips: manifest with caption, uri and label columns (default {DEFAULT_REFERENCE})")
    p.add_argument("--batch-size", type=int, default=64, help="captions per CLAP text call (default 64)")
    return p.parse_args(argv)


def centroid_accuracy(train: torch.Tensor, train_labels: np.ndarray, test: torch.Tensor,
                      test_labels: np.ndarray) -> float:
    """Share of ``test`` rows whose most similar normalised class centroid of ``train`` has their label."""
    classes = sorted(set(train_labels))
    centroids = torch.stack([train[torch.from_numpy(train_labels == c)].mean(0) for c in classes])
    centroids = torch.nn.functional.normalize(centroids, dim=-1)
    predicted = np.asarray(classes)[(test @ centroids.T).argmax(1).numpy()]
    return float(np.mean(predicted == test_labels))


def probe(model_dir: str, rows: list[dict], clips: list[tuple[np.ndarray, int]], batch: int) -> dict:
    from musiccm import external, model

    c = model.load(model_dir)
    if c.text_encoder is None or c.feature_extractor is None:
        raise ValueError(f"{model_dir}: no CLAP (text_encoder and feature_extractor) to probe")
    text = torch.cat([external.encode_text(c, [r["caption"] for r in rows[i : i + batch]])[0].cpu()
                      for i in range(0, len(rows), batch)])
    audio = torch.cat([external.encode_audio(c, [wave], rate).cpu() for wave, rate in clips])
    half = len(rows) // 2
    out: dict = {"model": model_dir, "clips": len(rows)}
    for name in ATTRIBUTES:
        labels = np.asarray([str(r[name]) for r in rows])
        out[name] = {
            "text_text": centroid_accuracy(text[:half], labels[:half], text[half:], labels[half:]),
            "audio_audio": centroid_accuracy(audio[:half], labels[:half], audio[half:], labels[half:]),
            "text_audio": centroid_accuracy(audio, labels, text, labels),
        }
    out["paired_cosine"] = float((text * audio).sum(-1).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    from musiccm.evaluation.features import decode

    args = parse(argv)
    rows = pq.read_table(args.reference).to_pylist()
    missing = [k for k in ("caption", "uri", *ATTRIBUTES) if rows and k not in rows[0]]
    if not rows or missing:
        raise SystemExit(f"{args.reference}: need rows with columns caption, uri, {', '.join(ATTRIBUTES)}; "
                         f"missing {missing or 'all rows'}")
    clips = [(wave.mean(0).numpy(), rate) for wave, rate in (decode(Path(r["uri"]).read_bytes()) for r in rows)]
    print("| model | attribute | text → text | audio → audio | text → audio |")
    print("|---|---|---|---|---|")
    results = []
    for m in args.models:
        r = probe(m, rows, clips, args.batch_size)
        results.append(r)
        for name in ATTRIBUTES:
            a = r[name]
            print(f"| {m} | {name} | {a['text_text']:.2f} | {a['audio_audio']:.2f} | {a['text_audio']:.2f} |",
                  flush=True)
    print(json.dumps(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
