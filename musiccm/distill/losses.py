"""Consistency-distillation and adversarial losses as pure tensor functions (MusicCM §3.1–3.2).

Models come in as callables (STYLE.md §1, after openai/consistency_models ``consistency_losses``):
- ``teacher_eps(x_t, t, cond) -> ε`` (B, C, T, F): the frozen teacher's noise prediction;
- ``student(x_t, t, cond, w) -> x0`` and ``target(x_t, t, cond, w) -> x0``: raw x0 predictions of the
  student and of its EMA target (the boundary scalings are applied here, once).
Every formula (ᾱ look-up, DDIM step, CFG, boundary scalings, forward noising) is imported from
:mod:`musiccm.schedule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from musiccm.schedule import alpha_bar, classifier_free_guidance, consistency_output, ddim_step, renoise, solver_grid

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
X0Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_TYPES = ("huber", "l2")


def sample_solver_timesteps(
    batch: int,
    k_skip: int,
    generator: torch.Generator | None,
    num_train_timesteps: int = 1000,
    num_ddim_timesteps: int = 50,
    max_timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n), each (B,) long: t_{n+k} = grid[n] with n uniform, t_n = max(t_{n+k} − ratio·k, 0).

    Grid [19, 39, …, 999] for 1000/50 (DESIGN.md §3), cut to t ≤ ``max_timestep`` when given; ``k_skip`` > 1 is
    AudioLCM's multi-step solver.
    """
    if k_skip < 1:
        raise ValueError(f"k_skip must be >= 1, got {k_skip}")
    grid = torch.tensor(solver_grid(num_train_timesteps, num_ddim_timesteps), dtype=torch.long)
    if max_timestep is not None:
        grid = grid[grid <= max_timestep]
        if len(grid) == 0:
            raise ValueError(f"max_timestep {max_timestep} is below the solver grid's first timestep")
    n = torch.randint(0, len(grid), (batch,), generator=generator)
    start = grid[n]
    prev = (start - (num_train_timesteps // num_ddim_timesteps) * k_skip).clamp(min=0)
    return start, prev


def sample_guidance(
    batch: int, w: float, w_min: float | None, w_max: float | None, generator: torch.Generator | None
) -> torch.Tensor:
    """LCM guidance weights (B,): the fixed ``w``, or uniform in [w_min, w_max] when a range is given."""
    if w_min is None or w_max is None:
        return torch.full((batch,), float(w))
    return w_min + (w_max - w_min) * torch.rand(batch, generator=generator)


@torch.no_grad()
def guided_eps(
    teacher_eps: EpsFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    w: float | torch.Tensor,
) -> torch.Tensor:
    """The teacher's classifier-free-guided ε̃ = (1+w)·ε_c − w·ε_∅ (diffusers guidance_scale = 1 + w), float32.

    Cond and uncond go through the teacher in one batched forward; ``uncond`` is (D,), (1, D) or (B, D).
    """
    b = x_t.shape[0]
    uncond = uncond.reshape(1, -1) if uncond.ndim == 1 else uncond
    uncond = uncond.expand(b, -1) if uncond.shape[0] == 1 else uncond
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond must be (1, D) or (B, D) like cond {tuple(cond.shape)}, got {tuple(uncond.shape)}")
    eps = teacher_eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond.to(cond)]))  # (2B, ...)
    eps_c, eps_u = eps.float().chunk(2)
    if isinstance(w, torch.Tensor):
        w = w.to(x_t.device, torch.float32)
    return classifier_free_guidance(eps_c, eps_u, 1.0 + w)


@torch.no_grad()
def solver_target(
    teacher_eps: EpsFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    w: float | torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """One guided DDIM step x_t → x̂_{t_prev} of the teacher (MusicCM eq. 5–6).

    x̂ = x + (1+w)·Ψ(x, c) − w·Ψ(x, ∅) with Ψ the DDIM increment; DDIM is affine in ε for a fixed x, so
    this equals one DDIM step with the guided ε̃ of :func:`guided_eps`.
    """
    eps_g = guided_eps(teacher_eps, x_t, t, cond, uncond, w)
    final_alpha = float(alphas_cumprod[0])  # t_prev is clamped at 0, so never used
    a_t = alpha_bar(alphas_cumprod, t, final_alpha).to(x_t.device)
    a_prev = alpha_bar(alphas_cumprod, t_prev, final_alpha).to(x_t.device)
    return ddim_step(x_t.float(), eps_g, a_t, a_prev)


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Mean L2, or LCM's pseudo-Huber √((p − q)² + c²) − c (elementwise mean), as a float32 scalar."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if loss_type == "huber":
        return (diff.pow(2) + huber_c**2).sqrt().sub(huber_c).mean()
    raise ValueError(f"loss_type {loss_type!r} is not one of {LOSS_TYPES}")


def student_jump(
    student: X0Fn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The data forward-noised to ``t`` and the student's consistency output f_θ(x_t, t) there (its x0 estimate,
    what one sampling step from ``t`` returns): ``(x_t, f_θ)``."""
    a_t = alpha_bar(alphas_cumprod, t, float(alphas_cumprod[0])).to(x0.device)
    x_t = renoise(x0, noise, a_t)
    return x_t, consistency_output(x_t, student(x_t, t, cond, w).float(), t.to(x0.device))


def consistency_distillation_loss(
    student: X0Fn,
    target: X0Fn,
    teacher_eps: EpsFn,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    w: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    loss_type: str = "huber",
    huber_c: float = 0.001,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_distil (MusicCM eq. 4, LCM Alg. 1): d(f_θ(x_{t_{n+k}}, t_{n+k}), f_θ⁻(x̂_{t_n}, t_n)).

    Returns the loss and the student's consistency output f_θ (B, C, T, F) (its x0 estimate, which the
    adversarial term judges unless the run sets ``adv_timesteps``).
    """
    # 1–2. Forward-noise the data to t_{n+k}; the student's consistency function there (f = x at t = 0).
    x_t, pred = student_jump(student, x0, noise, t, cond, w, alphas_cumprod)
    # 3. Teacher: one guided DDIM step to t_n; EMA target's consistency function there (no gradient).
    with torch.no_grad():
        x_prev = solver_target(teacher_eps, x_t, t, t_prev, cond, uncond, w, alphas_cumprod)
        target_pred = consistency_output(x_prev, target(x_prev, t_prev, cond, w).float(), t_prev.to(x0.device))
    return consistency_loss(pred, target_pred, loss_type, huber_c), pred


def distribution_matching_loss(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's generator loss (Yin et al. 2024, eq. 7–8 with DMD2's normalisation): ½‖x0 − sg(x0 − g)‖², mean.

    ``x0_real`` and ``x0_fake`` are the real score's (teacher, CFG) and the fake score's denoised estimates of
    ``x0`` noised to some t; g = (x0_fake − x0_real) / mean|x0 − x0_real| per clip, so the loss's gradient w.r.t.
    x0 is g / numel: it moves each generated clip from where the fake score (its own distribution) would put it
    towards where the teacher would.
    """
    with torch.no_grad():
        dims = tuple(range(1, x0.ndim))
        scale = (x0.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-6)
        grad = torch.nan_to_num((x0_fake.float() - x0_real.float()) / scale)
    return 0.5 * F.mse_loss(x0.float(), (x0.float() - grad).detach())


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """DMD2's non-saturating generator loss E[softplus(−D(fake))] (= −log σ(D(fake)))."""
    return F.softplus(-fake_logits.float()).mean()


def gan_classifier_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """DMD2's classifier loss E[softplus(−D(real))] + E[softplus(D(fake))]: logistic real-vs-generated."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def _mean_over_heads(values: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.float() for v in values]).mean()


def _as_list(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [logits] if isinstance(logits, torch.Tensor) else list(logits)


def hinge_d_loss(
    real_logits: torch.Tensor | Sequence[torch.Tensor], fake_logits: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """Discriminator hinge loss E[relu(1 − D(real))] + E[relu(1 + D(fake))], averaged over heads (eq. 8)."""
    real, fake = _as_list(real_logits), _as_list(fake_logits)
    return _mean_over_heads([F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake, strict=True)])


def hinge_g_loss(fake_logits: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Generator hinge loss −E[D(fake)], averaged over heads (MusicCM eq. 7)."""
    return _mean_over_heads([-f.mean() for f in _as_list(fake_logits)])


def r1_penalty(
    logits: torch.Tensor | Sequence[torch.Tensor], features: torch.Tensor | Sequence[torch.Tensor]
) -> torch.Tensor:
    """R1 = E_b ||∇_{F_k} Σ D_k(F_k)||², averaged over heads, w.r.t. each head's INPUT features (ADD / StyleGAN-T).

    ``features`` must require grad; the caller adds (γ/2)·R1 to the discriminator loss. Heads whose output
    does not depend on their input contribute exactly 0. Built with ``create_graph`` so it trains the heads.
    """
    logits, features = _as_list(logits), _as_list(features)
    if len(logits) != len(features):
        raise ValueError(f"{len(logits)} logit tensors for {len(features)} feature tensors")
    penalties = []
    for out, feat in zip(logits, features, strict=True):
        if not (out.requires_grad and feat.requires_grad):
            penalties.append(torch.zeros((), device=feat.device))
            continue
        (grad,) = torch.autograd.grad(out.sum(), feat, create_graph=True, allow_unused=True)
        if grad is None:
            penalties.append(torch.zeros((), device=feat.device))
            continue
        penalties.append(grad.float().pow(2).reshape(grad.shape[0], -1).sum(1).mean())
    return _mean_over_heads(penalties)


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up from base_lr/warmup to base_lr over ``warmup_steps`` optimiser steps, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)

