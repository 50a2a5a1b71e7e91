"""Which vocoder for the demo model: the small HiFi-GAN trained by the recipe, or Griffin-Lim?

For held-out clips: MusicLDM log-mel → vocoder → log-mel again; the mean |difference| (nats) says how much
of the spectrogram (pitch, harmonics, onsets) survives. Also through the VAE (mel → latents → mel → vocoder),
which is what generation does. Seconds per clip are wall time on this machine.

    python benchmarks/vocoder_probe.py --write
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import soundfile as sf
import torch
from report import header, publish


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="outputs/demo/parts", help="the recipe's parts directory (default %(default)s)")
    p.add_argument("--clips", default="outputs/demo/data/heldout/manifest.parquet", help="held-out manifest")
    p.add_argument("--count", type=int, default=32, help="clips (default %(default)s)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan

    from musiccm.distill.data import normalize_wav
    from musiccm.mel import fit_frames, log_mel
    from musiccm.vocoders import GriffinLimVocoder

    vae = AutoencoderKL.from_pretrained(Path(args.parts) / "vae").eval()
    vocoders = {"Griffin-Lim (32 it.)": GriffinLimVocoder()}
    if (Path(args.parts) / "vocoder").is_dir():
        vocoders["HiFi-GAN (recipe, STFT+mel loss)"] = SpeechT5HifiGan.from_pretrained(Path(args.parts) / "vocoder")
    rows = pq.read_table(args.clips).slice(0, args.count).to_pylist()
    mels = []
    for r in rows:
        x, _ = sf.read(r["uri"], dtype="float32")
        wav = normalize_wav(torch.from_numpy(x))
        mels.append(fit_frames(log_mel(wav[None]), (len(wav) // 160))[0])
    mel = torch.stack(mels)  # (N, T, 64)
    with torch.no_grad():
        via_vae = vae.decode(vae.encode(mel.unsqueeze(1)).latent_dist.mode()).sample[:, 0]
        lines = ["| vocoder | mel L1, mel → audio | mel L1, mel → VAE → audio | s per 2.56 s clip |",
                 "|---|---|---|---|"]
        lines.append(f"| (VAE alone: mel → latents → mel) | – | {float((via_vae - mel).abs().mean()):.3f} | – |")
        for name, voc in vocoders.items():
            t0 = time.perf_counter()
            direct = voc(mel)[:, : mel.shape[1] * 160]
            seconds = (time.perf_counter() - t0) / len(mel)
            through = voc(via_vae)[:, : mel.shape[1] * 160]
            err = [float((fit_frames(log_mel(y), mel.shape[1]) - mel).abs().mean()) for y in (direct, through)]
            lines.append(f"| {name} | {err[0]:.3f} | {err[1]:.3f} | {seconds:.3f} |")
    text = (header(f"Demo vocoder probe ({len(rows)} held-out clips)", "vocoder_probe.py", argv) + "\n"
            + "\n".join(lines) + "\n")
    publish(text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
