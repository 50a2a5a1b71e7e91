"""Can a consistency student's one jump learn its own 2-step sample? A probe for the 1-step target (not shipped).

Progressive distillation (Salimans & Ho 2022) halves a sampler's steps by regressing one step onto two. Here the
two are the student's own consistency steps: x0₁ = f(x_T, t₁), then f(√ᾱ·x0₁ + √(1−ᾱ)·z, t₂). Consistency
sampling draws z fresh, which makes the 2-step sample a random function of x_T that one jump could only learn
the mean of; so z is taken from x_T itself, its channels rolled by one (``z = roll(x_T, 1, dim=1)``), Gaussian
and nearly independent of x0₁ but a deterministic function of x_T. The student then fine-tunes on

    L = ‖f(x_T, t₁) − sample₂(x_T)‖² + λ_reg · ‖f(x_t, t) − f_frozen(x_t, t)‖²,

the second term keeping the later steps (t below t₁ on the 2- to 6-step grids, x_t a re-noised 2-step sample) as
they were. Targets are computed once from the frozen student on the demo's training captions
(``musiccm.synthetic.clip(i, 0)``); no audio, teacher or real clip is needed. Checkpoints are saved as model
directories, to probe with ``benchmarks/teacher_probe.py``:

    python benchmarks/self_distill_probe.py --out outputs/self-distill
    python benchmarks/teacher_probe.py outputs/self-distill/step-200 ... --steps 1 --max-timestep 699
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODEL = "musiccm/assets/default"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"consistency student to start from (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="directory for the targets, the log and step-N model directories")
    p.add_argument("--captions", type=int, default=6000,
                   help="training captions: clips 0..N-1 of the demo's training set (seed 0) (default 6000)")
    p.add_argument("--steps", type=int, default=600, help="fine-tuning steps (default 600)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    p.add_argument("--batch-size", type=int, default=12, help="jump rows and regulariser rows per step (default 12)")
    p.add_argument("--reg-weight", type=float, default=1.0, help="λ_reg (default 1)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="save a model directory every N steps (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches and re-noising (default 0)")
    return p.parse_args(argv)


def grid(c, steps: int) -> list[int]:
    """The student's consistency sampling timesteps for ``steps`` steps, from its own first timestep."""
    from musiccm.pipeline import consistency_timesteps

    return consistency_timesteps(c, steps, c.extra.get("max_timestep"))


def jump(denoise, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The student's consistency output f(x_t, t)."""
    from musiccm.schedule import consistency_output

    return consistency_output(x, denoise(x, t, cond), t)


@torch.no_grad()
def targets(c, captions: list[str], first: int, second: int, later: list[int], seed: int, batch: int = 64) -> dict:
    """x_T, its deterministic 2-step sample, and (x_t, t, f_frozen(x_t, t)) rows for the regulariser."""
    from musiccm import external
    from musiccm.sampling import randn
    from musiccm.schedule import alpha_bar, renoise

    denoise = external.make_denoiser(c, None, 1.0)  # a student without a guidance embedding: one forward
    ac, g = c.scheduler.alphas_cumprod, torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("cond", "x_T", "sample", "x_t", "t", "frozen")}
    for i in range(0, len(captions), batch):
        cond = external.encode_text(c, captions[i : i + batch])[0]
        gens = [torch.Generator().manual_seed(10**6 + i + j) for j in range(len(cond))]
        x_T = randn(c.geometry.latent_shape(len(cond), c.geometry.native_duration), gens)  # (B, C, T, F)
        t1, t2 = (torch.full((len(cond),), t) for t in (first, second))
        x_mid = renoise(jump(denoise, x_T, t1, cond), x_T.roll(1, dims=1), alpha_bar(ac, t2, 1.0))
        sample = jump(denoise, x_mid, t2, cond)
        t = torch.tensor(later)[torch.randint(0, len(later), (len(cond),), generator=g)]
        x_t = renoise(sample, torch.randn(sample.shape, generator=g), alpha_bar(ac, t, 1.0))
        for k, v in zip(rows, (cond, x_T, sample, x_t, t, jump(denoise, x_t, t, cond)), strict=True):
            rows[k].append(v)
    return {k: torch.cat(v) for k, v in rows.items()}


def main(argv: list[str] | None = None) -> int:
    from musiccm import external, model, synthetic

    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    c = model.load(args.model)
    if not c.is_consistency or c.unet.config.get("time_cond_proj_dim") is not None:
        raise SystemExit(f"{args.model}: needs a consistency student without a guidance embedding")
    grids = {k: grid(c, k) for k in range(2, 7)}
    first, second = grids[2]
    later = sorted({t for k in range(2, 7) for t in grids[k][1:]})
    made_by = {"model": model.content_hash(c.path), "captions": args.captions, "seed": args.seed}
    cache = out / "targets.pt"  # this script's own file from an earlier run into --out (tensors and strings only)
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        if data.get("made_by") != made_by:
            raise SystemExit(f"{cache} was made for {data.get('made_by')}, not {made_by}: remove it or use another "
                             "--out")
    else:
        start = time.perf_counter()
        data = targets(c, [synthetic.clip(i, 0)[1] for i in range(args.captions)], first, second, later, args.seed)
        torch.save({**data, "made_by": made_by}, cache)
        print(f"targets for {args.captions} captions in {time.perf_counter() - start:.0f} s", flush=True)
    c.unet.train().requires_grad_(True)  # trained in place: the targets already hold the frozen student's outputs
    denoise = external.make_denoiser(c, None, 1.0)
    opt = torch.optim.AdamW(c.unet.parameters(), lr=args.lr, weight_decay=0.0)
    g, n, b = torch.Generator().manual_seed(args.seed + 1), len(data["cond"]), args.batch_size
    start, log = time.perf_counter(), (out / "log.jsonl").open("w")
    for step in range(1, args.steps + 1):
        i, j = torch.randint(0, n, (b,), generator=g), torch.randint(0, n, (b,), generator=g)
        x = torch.cat([data["x_T"][i], data["x_t"][j]])
        t = torch.cat([torch.full((b,), first), data["t"][j]])
        pred = jump(denoise, x, t, torch.cat([data["cond"][i], data["cond"][j]]))
        l_jump = torch.nn.functional.mse_loss(pred[:b], data["sample"][i])
        l_reg = torch.nn.functional.mse_loss(pred[b:], data["frozen"][j])
        opt.zero_grad(set_to_none=True)
        (l_jump + args.reg_weight * l_reg).backward()
        torch.nn.utils.clip_grad_norm_(c.unet.parameters(), 1.0)
        opt.step()
        row = {"step": step, "jump_loss": l_jump.item(), "reg_loss": l_reg.item(),
               "elapsed_s": round(time.perf_counter() - start, 1)}
        log.write(json.dumps(row) + "\n")
        if step % 25 == 0:
            print(json.dumps(row), flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            model.save(c, out / f"step-{step}", extra={"self_distill_probe": {**vars(args), "step": step}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
