"""How far bf16 (or fp16) is from float32, stage by stage and on the final waveform (issue: a batched fast path).

Usage: python benchmarks/precision.py [--model PATH|full|tiny] [--dtype bfloat16] [--duration 10.24] [--write]

The same inputs go through a float32 copy of the model and a copy cast to `--dtype` (UNet, VAE, vocoder and CLAP;
a weightless Griffin-Lim vocoder stays float32):
1. UNet: one x0 prediction at t = 499 from the same noise and condition (relative L2 error; at t = 999 the x0
   conversion divides by sqrt(alpha_bar) ≈ 0.07 and magnifies any difference of the network's output 14-fold);
2. VAE decoder: the float32 pipeline's final latents to a mel (relative L2 error, max abs error in log-mel units);
3. vocoder: that float32 mel to a waveform (SNR in dB);
4. end to end: `MusicCM.generate` with the same seeds in both precisions (waveform SNR; log-mel L1 distance in
   dB; cosine of the two clips' CLAP audio embeddings). Sampling amplifies small differences, so the waveform SNR
   is low even where the music is the same; the mel and CLAP distances say how different it sounds.
Runs on any device; on the CPU bf16 matmuls are slow but exact to what the GPU computes up to accumulation order.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from musiccm import external, model
from musiccm.build import build_components
from musiccm.defaults import DEFAULT_MODEL
from musiccm.mel import MelConfig, log_mel
from musiccm.pipeline import GenerationConfig, MusicCM
from musiccm.sampling import randn
from musiccm.student import as_student

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["an upbeat jazz tune with piano", "calm ambient pads"]


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return float((ref - out).norm() / ref.norm().clamp_min(1e-12))


def snr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    noise = float(((ref - out) ** 2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float((ref**2).sum()) / noise)


def cast(c: model.MusicLDMComponents, dtype: torch.dtype) -> model.MusicLDMComponents:
    """A copy of `c` with every module that has weights in `dtype`."""
    low = copy.deepcopy(c)
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        module = getattr(low, name)
        if any(True for _ in module.parameters()):
            module.to(dtype)
    return low


def measure(c32: model.MusicLDMComponents, dtype: torch.dtype, duration: float) -> dict:
    """The four comparisons of the module docstring, on `c32` and its `dtype` copy."""
    low = cast(c32, dtype)
    g = c32.geometry
    cond, _ = external.encode_text(c32, PROMPTS)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    x = randn(g.latent_shape(len(PROMPTS), min(duration, g.native_duration)), gens, c32.device)
    t = torch.full((len(PROMPTS),), 499)
    out = {}
    with torch.no_grad():
        x0 = external.make_denoiser(c32, None, 1.0)(x, t, cond)
        x0_low = external.make_denoiser(low, None, 1.0)(x.to(dtype), t, cond.to(dtype))
        out["unet_rel_err"] = rel_err(x0, x0_low)
        gen32, genlow = MusicCM(c32), MusicCM(low)
        cfg = GenerationConfig(steps=4, max_duration=3600)
        seeds = list(range(len(PROMPTS)))
        start = time.perf_counter()
        ref = gen32.generate(PROMPTS, duration, seeds, cfg)
        out["float32_s"] = time.perf_counter() - start
        z = _final_latents(gen32, duration, seeds, cfg)
        mel32 = c32.vae.decode(z / c32.vae.config.scaling_factor).sample
        mel_low = low.vae.decode((z / c32.vae.config.scaling_factor).to(low.vae.dtype)).sample
        out["vae_rel_err"] = rel_err(mel32, mel_low)
        out["vae_max_abs"] = float((mel32 - mel_low.float()).abs().max())
        mel = mel32.squeeze(1)
        wav32 = c32.vocoder(mel)
        wav_low = low.vocoder(mel.to(low.vocoder.dtype))
        out["vocoder_snr_db"] = snr_db(wav32, wav_low)
        start = time.perf_counter()
        lowgen = genlow.generate(PROMPTS, duration, seeds, cfg)
        out["low_s"] = time.perf_counter() - start
        a, b = torch.from_numpy(ref.waveforms), torch.from_numpy(lowgen.waveforms)
        out["waveform_snr_db"] = snr_db(a, b)
        mcfg = MelConfig.from_components(c32)
        out["logmel_l1_db"] = float((log_mel(a, mcfg) - log_mel(b, mcfg)).abs().mean()) * 20 / math.log(10)
        ea = external.encode_audio(c32, list(ref.waveforms), ref.sample_rate)
        eb = external.encode_audio(c32, list(lowgen.waveforms), lowgen.sample_rate)
        out["clap_cosine"] = None if ea is None else float((ea * eb).sum(-1).mean())
    return out


def _final_latents(gen: MusicCM, duration: float, seeds: list[int], cfg: GenerationConfig) -> torch.Tensor:
    """The latents `generate` decodes, captured by running it with the decoder replaced."""
    captured = {}
    real = external.decode

    def capture(c, latents, num_samples, *args, **kwargs):
        captured["z"] = latents
        return real(c, latents, num_samples, *args, **kwargs)

    external.decode = capture
    try:
        gen.generate(PROMPTS, duration, seeds, cfg)
    finally:
        external.decode = real
    return captured["z"]


def load(spec: str) -> model.MusicLDMComponents:
    if spec in ("full", "tiny"):
        return as_student(build_components(spec, seed=0))
    return model.load(spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], help="model directories, or full / tiny (random)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--duration", type=float, default=10.24)
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    lines = [f"| model | UNet x0 rel. error | VAE mel rel. error (max abs) | vocoder SNR dB | end-to-end waveform "
             f"SNR dB | log-mel L1 dB | CLAP cosine | float32 / {args.dtype} s |", "|---|---|---|---|---|---|---|---|"]
    for spec in args.model:
        c = load(spec)
        r = measure(c, dtype, args.duration)
        name = c.extra.get("name") or spec
        clap = "n/a" if r["clap_cosine"] is None else f"{r['clap_cosine']:.4f}"
        lines.append(f"| {name} | {r['unet_rel_err']:.2e} | {r['vae_rel_err']:.2e} ({r['vae_max_abs']:.3f}) | "
                     f"{r['vocoder_snr_db']:.1f} | {r['waveform_snr_db']:.1f} | {r['logmel_l1_db']:.3f} | {clap} | "
                     f"{r['float32_s']:.1f} / {r['low_s']:.1f} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write:
        cpu = platform.processor() or platform.machine()
        device = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n### {args.dtype} against float32, per stage and end to end ({now})\n\nCommand: `python "
                    f"benchmarks/precision.py {' '.join(argv if argv is not None else sys.argv[1:])}`  \n"
                    f"Machine: {device}; {len(PROMPTS)} prompts, {args.duration} s, 4 steps\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
