"""FLOPs per clip, per stage, and the roofline they imply (issue 33, point 1).

Usage: python benchmarks/flops.py [--model full|tiny|DIR ...] [--duration 10.24] [--steps 1 2 4 8]
       [--teacher-steps 50] [--peak-tflops 989] [--utilisation 0.4] [--fused-sdpa] [--json PATH] [--write]

Each stage is counted by ``torch.utils.flop_counter.FlopCounterMode`` on the CPU at batch 1 through the project's own
calls (``external.encode_text``, ``external.make_denoiser``, ``vae.decode`` and the vocoder as ``external.decode``
calls them, ``external.encode_audio``). FlopCounterMode counts matmuls and convolutions (2 FLOPs per multiply-add)
and nothing else (norms, activations, FFTs, the CLAP feature extractor's numpy STFT). It does not count PyTorch's fused
CPU attention kernel either, so attention runs on the math backend here (``--fused-sdpa``: the under-count).
Long clips are counted as the pipeline runs them: per step one UNet forward per crop-fusion window (hop 3/4 of the
window, ``GenerationConfig``'s default), one VAE and one vocoder forward per ``chunked_apply`` chunk, one CLAP audio
forward per 10 s chunk. The weightless Griffin-Lim vocoder is mostly FFTs: its row adds an estimate, labelled so.
A clip = text tower + steps × UNet (two forwards per step for a teacher with CFG) + VAE + vocoder; the CLAP score, on
by default in the batch job, is shown apart; a teacher's empty-prompt embedding is cached per process, not counted.
Roofline: clips/s = peak × utilisation / FLOPs per clip; × real time = clips/s × duration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torchaudio.functional as AF
from diffusers import DDIMScheduler
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from musiccm import external
from musiccm import model as musiccm_model
from musiccm.build import build_components
from musiccm.defaults import DEFAULT_MODEL
from musiccm.longform import window_starts
from musiccm.model import MusicLDMComponents
from musiccm.student import as_student

PROMPT = "an upbeat jazz tune with piano"  # 8 tokens with <s> and </s>, for the bundled BPE and RoBERTa's alike
TITLE = "FLOPs per clip and the roofline"


@dataclasses.dataclass
class Stage:
    """One stage of a clip: forwards per clip, FLOPs counted per forward, and FLOPs only estimated per forward."""

    name: str
    calls: int
    counted: float
    estimated: float = 0.0

    @property
    def per_clip(self) -> float:
        """FLOPs of this stage for one clip (counted + estimated)."""
        return self.calls * (self.counted + self.estimated)


@dataclasses.dataclass
class Count:
    """The stages of one model at one duration."""

    model: str
    duration: float
    text: Stage
    unet: Stage  # one sampling step of a student (one forward per window)
    unet_cfg: Stage  # one sampling step of a teacher with classifier-free guidance (cond + uncond)
    vae: Stage
    vocoder: Stage
    score: Stage | None  # CLAP audio tower; None without a feature extractor

    def clip(self, steps: int, cfg: bool = False, score: bool = False) -> float:
        """FLOPs of one clip sampled in ``steps`` steps (``cfg``: teacher with guidance; ``score``: + CLAP score)."""
        unet = self.unet_cfg if cfg else self.unet
        extra = self.score.per_clip if score and self.score else 0.0
        return self.text.per_clip + steps * unet.per_clip + self.vae.per_clip + self.vocoder.per_clip + extra


def counted(fn: Callable[[], object], fused_sdpa: bool = False) -> float:
    """FLOPs FlopCounterMode sees while ``fn`` runs (no autograd). Attention runs on PyTorch's math backend, whose
    matmuls are counted; ``fused_sdpa`` keeps the default CPU kernel, which FlopCounterMode does not count at all."""
    backend = contextlib.nullcontext() if fused_sdpa else sdpa_kernel(SDPBackend.MATH)
    with torch.no_grad(), backend, FlopCounterMode(display=False) as mode:
        fn()
    return float(mode.get_total_flops())


def chunks(length: int, chunk: int, hop: int) -> tuple[int, int]:
    """(forwards, frames per forward) for ``length`` frames cut as crop fusion / ``chunked_apply`` cut them."""
    if length <= chunk:
        return 1, length
    return len(window_starts(length, chunk, hop)), chunk


def griffin_lim_fft(config: object, frames: int) -> float:
    """Estimated FFT FLOPs of one Griffin-Lim call on ``frames`` mel frames: (2·n_iter + 1) real transforms
    (an ISTFT and an STFT per iteration, a final ISTFT) of frames + 1 columns at 2.5·N·log2 N each."""
    n_fft, n_iter = int(config.n_fft), int(config.n_iter)
    return (2 * n_iter + 1) * (frames + 1) * 2.5 * n_fft * math.log2(n_fft)


def load(spec: str, seed: int = 0) -> MusicLDMComponents:
    """``full`` / ``tiny``: a random-weight build (seeded); anything else: a MusicLDM-layout directory."""
    return build_components(spec, seed=seed) if spec in ("full", "tiny") else musiccm_model.load(spec)


def count_model(c: MusicLDMComponents, name: str, duration: float, prompt: str = PROMPT,
                fused_sdpa: bool = False) -> Count:
    """Count every stage of one clip of ``duration`` seconds at batch 1 (``fused_sdpa``: see :func:`counted`)."""
    g, count = c.geometry, functools.partial(counted, fused_sdpa=fused_sdpa)
    student = c if c.is_consistency else as_student(c)
    teacher = dataclasses.replace(c, scheduler=DDIMScheduler.from_config(c.scheduler.config)) if c.is_consistency else c
    tokens = len(c.tokenizer([prompt])["input_ids"][0])
    text = Stage(f"CLAP text tower (1 prompt, {tokens} tokens)", 1, count(lambda: external.encode_text(c, [prompt])))
    cond, uncond = external.encode_text(c, [prompt])[0], external.encode_text(c, [""])[0]
    calls, frames = chunks(g.latent_frames(duration), g.window_frames, max(1, g.window_frames * 3 // 4))
    x, t = torch.randn(1, g.latent_channels, frames, g.latent_bins), torch.tensor([999])
    step = external.make_denoiser(student, None, 1.0)
    cfg = external.make_denoiser(teacher, uncond, 2.0)
    where = f"{calls} window{'s' if calls > 1 else ''} of {frames} latent frames"
    unet = Stage(f"UNet, one student step ({where})", calls, count(lambda: step(x, t, cond)))
    unet_cfg = Stage(f"UNet, one teacher step with CFG ({where}, cond + uncond)", calls,
                     count(lambda: cfg(x, t, cond)))
    calls, frames = chunks(g.latent_frames(duration), g.window_frames, g.window_frames - max(g.window_frames // 8, 1))
    z = torch.randn(1, g.latent_channels, frames, g.latent_bins)
    vae = Stage(f"VAE decoder (latents → mel, {calls} × {frames} latent frames)", calls,
                count(lambda: c.vae.decode(z).sample))
    mel_chunk = getattr(c.vocoder, "chunk_frames", None) or g.window_frames * g.vae_factor
    needed = -(-g.num_samples(duration) // g.hop_length)
    calls, frames = chunks(needed, mel_chunk, mel_chunk - max(mel_chunk // 16, 1))
    mel = torch.randn(1, frames, g.n_mels) - 5.0
    kind = type(c.vocoder).__name__
    estimate = griffin_lim_fft(c.vocoder.config, frames) if kind == "GriffinLimVocoder" else 0.0
    label = "Griffin-Lim: NNLS counted + FFTs estimated" if estimate else kind
    vocoder = Stage(f"vocoder ({label}; mel → {g.sample_rate // 1000} kHz, {calls} × {frames} mel frames)", calls,
                    count(lambda: c.vocoder(mel)), estimate)
    score, fe = None, c.feature_extractor
    if fe is not None:  # one padded 10 s chunk per forward at the extractor's rate, + the resampling encode_audio does
        n = max(1, math.ceil(math.ceil(g.num_samples(duration) * fe.sampling_rate / g.sample_rate) / fe.nb_max_samples))
        one, wav = np.zeros(fe.nb_max_samples, dtype=np.float32), torch.zeros(g.num_samples(duration))
        rate = fe.sampling_rate
        resample = count(lambda: AF.resample(wav, g.sample_rate, rate)) if rate != g.sample_rate else 0.0
        score = Stage(f"CLAP audio tower (the per-clip score, {n} × {fe.nb_max_samples / rate:g} s)", n,
                      count(lambda: external.encode_audio(c, [one], rate)) + resample / n)
    return Count(name, duration, text, unet, unet_cfg, vae, vocoder, score)


def roofline(count: Count, steps: list[int], teacher_steps: int, peak_tflops: float, util: float) -> list[dict]:
    """One row per sampler: FLOPs per clip, clips/s and × real time at the peak and at ``util`` of it."""
    runs = [("student", s, False) for s in steps] + ([("teacher, CFG", teacher_steps, True)] if teacher_steps else [])
    rows = []
    for sampler, s, cfg in runs:
        flops = count.clip(s, cfg)
        peak = peak_tflops * 1e12 / flops
        rows.append(dict(sampler=sampler, steps=s, unet_forwards=s * (2 if cfg else 1), tflop=flops / 1e12,
                         tflop_with_score=count.clip(s, cfg, score=True) / 1e12, clips_per_s_peak=peak,
                         realtime_peak=peak * count.duration, clips_per_s_util=peak * util,
                         realtime_util=peak * util * count.duration))
    return rows


def _gflop(flops: float) -> str:
    return f"{flops / 1e9:,.1f}" if flops >= 1e10 else f"{flops / 1e9:.3g}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f} %" if part < 0.01 * whole else f"{100 * part / whole:.1f} %"


def tables(count: Count, rows: list[dict], peak_tflops: float, util: float) -> str:
    """Markdown: the stage table (share of a 4-step student clip) and the roofline table of one model."""
    four = count.clip(4)
    lines = [f"\n#### {count.model}, {count.duration:g} s clip\n",
             "| stage | GFLOP per clip | share of a 4-step clip |", "|---|---|---|"]
    notes = {id(count.unet): f" per step ({_pct(4 * count.unet.per_clip, four)} for 4 steps)",
             id(count.unet_cfg): " (a teacher's step; not in a student clip)"}
    for stage in (count.text, count.unet, count.unet_cfg, count.vae, count.vocoder):
        gflop = _gflop(stage.per_clip) + (" (estimated)" if stage.estimated else "")
        lines.append(f"| {stage.name} | {gflop} | {_pct(stage.per_clip, four)}{notes.get(id(stage), '')} |")
    if count.vocoder.estimated:
        v = count.vocoder
        lines.append(f"| of which counted (NNLS matmuls) / estimated (FFTs) | {_gflop(v.calls * v.counted)} / "
                     f"{_gflop(v.calls * v.estimated)} | |")
    decode = count.vae.per_clip + count.vocoder.per_clip
    lines.append(f"| decoding (VAE + vocoder) | {_gflop(decode)} | {_pct(decode, four)} |")
    lines.append(f"| **4-step student clip** | **{_gflop(four)}** | 100 % |")
    if count.score:
        lines.append(f"| {count.score.name}, not in the clip totals | {_gflop(count.score.per_clip)} | "
                     f"{_pct(count.score.per_clip, four)} |")
    u = f"{100 * util:g} %"
    lines += ["", f"| sampler | steps | UNet forwards | TFLOP per clip | TFLOP with the CLAP score | clips/s at "
                  f"{peak_tflops:g} TFLOP/s | × real time at peak | clips/s at {u} | × real time at {u} |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['unet_forwards']} | {r['tflop']:#.3g} | "
                     f"{r['tflop_with_score']:#.3g} | {r['clips_per_s_peak']:,.1f} | {r['realtime_peak']:,.0f} | "
                     f"{r['clips_per_s_util']:,.1f} | {r['realtime_util']:,.0f} |")
    return "\n".join(lines) + "\n"


def header(argv: list[str]) -> str:
    """Section title, command, machine, date (UTC), commit and torch version."""
    info = open("/proc/cpuinfo").read().splitlines() if os.path.exists("/proc/cpuinfo") else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"\n### {TITLE}\n\nCommand: `python benchmarks/flops.py {' '.join(argv)}`  \n"
            f"Machine: {platform.machine()}, {cpu}, {os.cpu_count()} cores, CPU (FLOPs are counted, not timed); "
            f"torch {torch.__version__}; date {date}; commit {git.stdout.strip() or 'unknown'}  \n")


def main(argv: list[str] | None = None) -> int:
    """Parse flags, count each model, print (and optionally append/save) the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", action="extend", help="full, tiny or a MusicLDM-layout directory "
                   "(repeatable; default: full and the bundled default model)")
    p.add_argument("--duration", type=float, default=10.24, help="clip length in seconds (default 10.24)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="student steps (default 1 2 4 8)")
    p.add_argument("--teacher-steps", type=int, default=50, help="teacher DDIM+CFG steps row (0: none; default 50)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOP/s (default 989: H100 SXM dense bf16)")
    p.add_argument("--utilisation", type=float, default=0.4, help="fraction of peak reached (default 0.4)")
    p.add_argument("--prompt", default=PROMPT, help="prompt for the text tower (its cost grows with its tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weight builds")
    p.add_argument("--fused-sdpa", action="store_true", help="keep PyTorch's fused CPU attention kernel, whose FLOPs "
                   "FlopCounterMode does not count (an under-count; default: attention on the math backend, counted)")
    p.add_argument("--json", help="also save the numbers to this JSON file")
    p.add_argument("--write", action="store_true", help="append the section to benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if not (args.duration > 0 and args.peak_tflops > 0 and 0 < args.utilisation <= 1 and min(args.steps) >= 1
            and args.teacher_steps >= 0):
        p.error("need --duration > 0, --peak-tflops > 0, 0 < --utilisation ≤ 1, --steps ≥ 1, --teacher-steps ≥ 0")
    text, saved, t0, cpu0 = header(argv), [], time.perf_counter(), time.process_time()
    for spec in args.model or ["full", DEFAULT_MODEL]:
        c = load(spec, args.seed)
        name = f"{spec} (random weights, seed {args.seed})" if spec in ("full", "tiny") else spec
        name = "the bundled default model (musiccm/assets/default)" if spec == DEFAULT_MODEL else name
        name += f", {c.extra['name']}" if "name" in c.extra else ""
        count = count_model(c, name, args.duration, args.prompt, args.fused_sdpa)
        rows = roofline(count, args.steps, args.teacher_steps, args.peak_tflops, args.utilisation)
        text += tables(count, rows, args.peak_tflops, args.utilisation)
        saved.append(dict(dataclasses.asdict(count), clip_4_steps=count.clip(4), roofline=rows))
    text += (f"\nCounting took {time.perf_counter() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU on this "
             "machine (model builds and loads included).\n")
    print(text)
    if args.write:
        from report import RESULTS

        with open(RESULTS, "a") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(peak_tflops=args.peak_tflops, utilisation=args.utilisation, models=saved), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
