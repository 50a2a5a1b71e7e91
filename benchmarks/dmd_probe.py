"""Distribution matching for the 1-step target: DMD2's generator loss on a consistency student (a probe).

The probe that preceded the job's own ``ray_jobs/distill.py --dmd-weight`` (which made musiccm-demo-v5 and v6, with
L_distil as its regulariser instead of the frozen-student one below); kept for comparing the two.

A consistency student's one jump is a regression onto its teacher's trajectory and settles on its smooth mean; a
longer distillation and self-distillation no longer improve it (benchmarks/RESULTS.md). Distribution Matching
Distillation (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", and DMD2, "Improved
Distribution Matching Distillation for Fast Image Synthesis") trains a one-step generator so that its outputs'
*distribution* matches the teacher's instead: noise a generated x0 to a random t, ask the teacher (the real score,
with classifier-free guidance) and a "fake" score model that tracks the generator's own outputs where each would
denoise it, and move x0 from the fake prediction towards the real one:

    grad = (x0_fake(x_t) − x0_real(x_t)) / mean|x0 − x0_real(x_t)|,     L_G = ½‖x0 − sg(x0 − grad)‖²

The fake score starts as a copy of the teacher and is trained on the generator's detached outputs with the
teacher's own ε-objective, ``--fake-updates`` times per generator step (DMD2's two-time-scale rule). The
generator is the student's jump from pure noise at its first timestep, the same call as its 1-step sampling; a
regulariser (λ_reg) keeps its later-timestep outputs (2- to 6-step grids) near the frozen student's, so
multi-step sampling still works. Checkpoints are model directories for ``benchmarks/teacher_probe.py``:

    python benchmarks/dmd_probe.py --student outputs/demo-hour/student-noadv --teacher outputs/demo-hour/teacher \\
        --out outputs/dmd
    python benchmarks/teacher_probe.py outputs/dmd/step-200 ... --steps 1 --max-timestep 699
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="consistency student (model directory) to fine-tune")
    p.add_argument("--teacher", required=True, help="its teacher (model directory): the real score")
    p.add_argument("--out", required=True, help="directory for the log and the step-N model directories")
    p.add_argument("--captions", type=int, default=6000,
                   help="training captions: clips 0..N-1 of the demo's training set (seed 0) (default 6000)")
    p.add_argument("--steps", type=int, default=400, help="generator steps (default 400)")
    p.add_argument("--lr", type=float, default=1e-5, help="generator AdamW learning rate (default 1e-5)")
    p.add_argument("--fake-lr", type=float, default=1e-4, help="fake score AdamW learning rate (default 1e-4)")
    p.add_argument("--fake-updates", type=int, default=4,
                   help="fake score updates per generator step (default 4)")
    p.add_argument("--guidance-scale", type=float, default=7.0,
                   help="the real score's classifier-free guidance scale (default 7, the student's distilled w + 1)")
    p.add_argument("--max-timestep", type=int, default=None,
                   help="the student's first sampling timestep, where the generator jumps from; saved into the "
                        "checkpoints (default: the student's own, e.g. 699 for the shipped model)")
    p.add_argument("--min-t", type=int, default=20, help="lowest timestep of the matching noise (default 20)")
    p.add_argument("--max-t", type=int, default=980, help="highest timestep of the matching noise (default 980)")
    p.add_argument("--batch-size", type=int, default=16, help="generator rows per step (default 16)")
    p.add_argument("--reg-weight", type=float, default=1.0, help="λ_reg, 0 = off (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="save a model directory every N steps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and noise (default 0)")
    args = p.parse_args(argv)
    if not 0 <= args.min_t <= args.max_t <= 999:
        p.error(f"need 0 <= --min-t <= --max-t <= 999, got --min-t {args.min_t} --max-t {args.max_t}")
    for name in ("captions", "steps", "fake_updates", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def conditions(c, captions: list[str], batch: int = 256) -> torch.Tensor:
    """The model's CLAP text embeddings of ``captions`` (N, 512)."""
    from musiccm import external

    with torch.no_grad():
        return torch.cat([external.encode_text(c, captions[i : i + batch])[0]
                          for i in range(0, len(captions), batch)]).float()


def main(argv: list[str] | None = None) -> int:
    from musiccm import external, model, synthetic
    from musiccm.pipeline import consistency_timesteps
    from musiccm.schedule import alpha_bar, consistency_output, renoise

    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s, t = model.load(args.student), model.load(args.teacher)
    if not s.is_consistency or s.has_guidance_embedding:
        raise SystemExit(f"{args.student}: needs a consistency student without a guidance embedding")
    if t.is_consistency:
        raise SystemExit(f"{args.teacher}: needs a diffusion teacher, got a consistency student")
    if t.scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"{args.teacher}: the fake score's objective here is ε-prediction, the teacher predicts "
                         f"{t.scheduler.config.prediction_type!r}")
    if args.max_timestep is not None:
        s.extra["max_timestep"] = args.max_timestep
    s.unet.float()
    t.unet.float().eval().requires_grad_(False)
    captions = [synthetic.clip(i, 0)[1] for i in range(args.captions)]
    cond_s, cond_t = conditions(s, captions), conditions(t, captions)
    uncond = conditions(t, [""])[0]
    grids = {k: consistency_timesteps(s, k, s.extra.get("max_timestep")) for k in range(1, 7)}
    first = grids[1][0]
    later = torch.tensor(sorted({x for k in range(2, 7) for x in grids[k][1:]}))
    frozen = copy.deepcopy(s.unet).eval().requires_grad_(False)
    fake = copy.deepcopy(t.unet).train().requires_grad_(True)
    s.unet.train().requires_grad_(True)
    student = external.make_denoiser(s, None, 1.0)
    frozen_student = external.make_denoiser(_with_unet(s, frozen), None, 1.0)
    real = external.make_denoiser(t, uncond, args.guidance_scale)
    fake_x0 = external.make_denoiser(_with_unet(t, fake), None, 1.0)
    opt = torch.optim.AdamW(s.unet.parameters(), lr=args.lr, weight_decay=0.0)
    fake_opt = torch.optim.AdamW(fake.parameters(), lr=args.fake_lr, weight_decay=0.0)
    ac = t.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(args.seed)
    b, n = args.batch_size, len(captions)
    shape = s.geometry.latent_shape(b, s.geometry.native_duration)

    def noised(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tt = torch.randint(args.min_t, args.max_t + 1, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        return renoise(x0, eps, alpha_bar(ac, tt, 1.0)), tt, eps

    start, log = time.perf_counter(), (out / "log.jsonl").open("w")
    for step in range(1, args.steps + 1):
        i = torch.randint(0, n, (b,), generator=g)
        x_T = torch.randn(shape, generator=g)
        t1 = torch.full((b,), first)
        x0 = consistency_output(x_T, student(x_T, t1, cond_s[i]), t1)
        # the generator: DMD's distribution-matching gradient
        x_t, tt, _ = noised(x0.detach())
        with torch.no_grad():
            x0_real, x0_fake = real(x_t, tt, cond_t[i]), fake_x0(x_t, tt, cond_t[i])
            scale = (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
            grad = torch.nan_to_num((x0_fake - x0_real) / scale)
        l_dmd = 0.5 * torch.nn.functional.mse_loss(x0, (x0 - grad).detach())
        loss = l_dmd
        l_reg = torch.zeros(())
        if args.reg_weight > 0:  # the later steps of multi-step sampling stay the frozen student's
            tr = later[torch.randint(0, len(later), (b,), generator=g)]
            x_r = renoise(x0.detach(), torch.randn(shape, generator=g), alpha_bar(ac, tr, 1.0))
            with torch.no_grad():
                target = consistency_output(x_r, frozen_student(x_r, tr, cond_s[i]), tr)
            l_reg = torch.nn.functional.mse_loss(consistency_output(x_r, student(x_r, tr, cond_s[i]), tr), target)
            loss = loss + args.reg_weight * l_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.unet.parameters(), 1.0)
        opt.step()
        # the fake score: the teacher's ε-objective on the generator's current outputs
        l_fake = 0.0
        for _ in range(args.fake_updates):
            x_f, tf, eps = noised(x0.detach())
            pred = fake(x_f, tf, encoder_hidden_states=None, class_labels=cond_t[i]).sample
            lf = torch.nn.functional.mse_loss(pred, eps)
            fake_opt.zero_grad(set_to_none=True)
            lf.backward()
            torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
            fake_opt.step()
            l_fake += lf.item() / args.fake_updates
        row = {"step": step, "dmd_loss": l_dmd.item(), "reg_loss": l_reg.item(), "fake_loss": round(l_fake, 5),
               "x0_std": x0.std().item(), "elapsed_s": round(time.perf_counter() - start, 1)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        if step % 10 == 0:
            print(json.dumps(row), flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            s.unet.eval()
            model.save(s, out / f"step-{step}", extra={"dmd_probe": {**vars(args), "step": step}})
            s.unet.train()
    log.close()
    return 0


def _with_unet(c, unet):
    import dataclasses

    return dataclasses.replace(c, unet=unet)


if __name__ == "__main__":
    sys.exit(main())
