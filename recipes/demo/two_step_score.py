"""A score model of the student's own 2-step samples, as the real score of a DMD fine-tune (a recipe stage).

The demo student's 2 steps measure far closer to the data than its 1 step (FD_cls 10.50 against 15.07 on the
benchmark) and than anything its teacher samples, while DMD pulls its 1 step towards the teacher's score, whose own
many-step distribution is further away still (50-step DDIM: 17.88). This script fits the teacher's UNet to the
student's 2-step samples, with the teacher's own diffusion objective (`musiccm.demo.train_teacher`), and saves it
with the teacher's parts as a MusicLDM-layout model directory, so that ``ray_jobs/distill.py --teacher <it> --w 0``
distils, and distribution-matches, the student's 1 step towards its 2 steps:

    python recipes/demo/two_step_score.py --student outputs/demo-hour/student-dmd --max-timestep 699 \\
        --teacher outputs/demo-hour/teacher --out outputs/demo-hour/two-step-score
    python benchmarks/teacher_probe.py outputs/demo-hour/two-step-score ... --steps 50 --guidance 1   # its samples

`recipes/demo/distill.sh`'s ``score`` run (part of ``hour.sh``) runs it on the DMD student and then fine-tunes that
student for 200 more DMD steps with the fitted model as ``--teacher`` and ``--w 0``.

The samples are the student's real 2-step sampling (fresh noise at the second step, from ``--max-timestep``), on
the demo's training captions (``musiccm.synthetic.clip(i, 0)``), ``--draws`` per caption; no audio or real clip is
used. Conditioning is the captions' CLAP text embeddings only (the samples have no audio of their own to embed),
with the teacher's 10 % unconditional dropout.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="consistency student whose 2-step samples are fitted")
    p.add_argument("--teacher", required=True, help="teacher model directory: the UNet to start from and the parts")
    p.add_argument("--out", required=True, help="model directory to write (the samples are cached next to it)")
    p.add_argument("--max-timestep", type=int, default=None,
                   help="the student's first sampling timestep (default: its own setting in model_index.json, else "
                        "999; an export straight from a checkpoint has none: pass the one it is sampled with)")
    p.add_argument("--captions", type=int, default=6000,
                   help="training captions: clips 0..N-1 of the demo's training set (seed 0) (default %(default)s)")
    p.add_argument("--draws", type=int, default=2, help="2-step samples per caption (default %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="fine-tuning steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="fine-tuning batch (default %(default)s)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-γ weighting (default %(default)s)")
    p.add_argument("--ema-rate", type=float, default=0.998, help="EMA rate of the saved UNet (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' noise and the batches (default 0)")
    args = p.parse_args(argv)
    for name in ("captions", "draws", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    return args


@torch.no_grad()
def two_step_latents(c, captions: list[str], draws: int, seed: int, max_timestep: int | None,
                     batch: int = 64) -> tuple[torch.Tensor, ...]:
    """(latents (N·draws, C, T, F) of the student's 2-step samples, their captions' text embeddings)."""
    from musiccm import external
    from musiccm.pipeline import consistency_timesteps
    from musiccm.sampling import randn, sample_consistency

    denoise = external.make_denoiser(c, None, 1.0)
    ts = consistency_timesteps(c, 2, max_timestep if max_timestep is not None else c.extra.get("max_timestep"))
    conds = {i: external.encode_text(c, captions[i : i + batch])[0] for i in range(0, len(captions), batch)}
    latents = []
    for d in range(draws):
        for i, cond in conds.items():
            gens = [torch.Generator().manual_seed(seed * 10**7 + d * 10**6 + i + j) for j in range(len(cond))]
            x_T = randn(c.geometry.latent_shape(len(cond), c.geometry.native_duration), gens)
            latents.append(sample_consistency(denoise, x_T, cond, ts, c.scheduler.alphas_cumprod, gens))
    return torch.cat(latents), torch.cat(list(conds.values()) * draws)


def main(argv: list[str] | None = None) -> int:
    from musiccm import external, model, synthetic
    from musiccm.demo.train_teacher import train_teacher

    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the fine-tune's progress lines
    out = Path(args.out)
    student = model.load(args.student)
    if not student.is_consistency or student.unet.config.get("time_cond_proj_dim") is not None:
        raise SystemExit(f"{args.student}: needs a consistency student without a guidance embedding")
    cache = out.with_name(out.name + "-samples.pt")  # this script's own file (tensors and a dict only)
    made_by = {"student": model.content_hash(student.path), "captions": args.captions, "draws": args.draws,
               "seed": args.seed, "max_timestep": args.max_timestep}
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        if data.get("made_by") != made_by:
            raise SystemExit(f"{cache} was made for {data.get('made_by')}, not {made_by}: remove it")
    else:
        start = time.perf_counter()
        latents, text = two_step_latents(student, [synthetic.clip(i, 0)[1] for i in range(args.captions)],
                                         args.draws, args.seed, args.max_timestep)
        data = {"latents": latents, "text": text, "made_by": made_by}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
        print(f"{len(latents)} 2-step samples in {time.perf_counter() - start:.0f} s", flush=True)
    teacher = model.load(args.teacher)
    uncond = external.encode_text(teacher, [""])[0][0]
    teacher.unet = train_teacher(data["latents"], data["text"], None, uncond, teacher.scheduler.alphas_cumprod,
                                 args.steps, batch=args.batch_size, lr=args.lr, seed=args.seed,
                                 init=teacher.unet, snr_gamma=args.snr_gamma, ema_rate=args.ema_rate)
    model.save(teacher, out, extra={"name": "two-step-score", "two_step_score": {**vars(args),
                                                                                 "samples": len(data["latents"])}})
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
