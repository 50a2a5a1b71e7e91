"""Diffusion and consistency math shared by sampling and distillation.

Every formula lives here once (STYLE.md §3): noise-schedule look-ups, x0/eps conversions, the DDIM
step, LCM timesteps on the 50-step grid, the consistency boundary scalings, classifier-free
guidance, the guidance-scale embedding and the EMA update. All functions are pure tensor code.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Right-pad ``x`` with singleton dims so it broadcasts against a tensor of rank ``ndim``."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def alpha_bar(alphas_cumprod: torch.Tensor, t: torch.Tensor, final_alpha: float) -> torch.Tensor:
    """ᾱ_t for integer timesteps ``t`` (B,); negative t means "before step 0" and gives ``final_alpha``."""
    t = t.long()
    values = alphas_cumprod.to(t.device)[t.clamp(min=0)]
    return torch.where(t >= 0, values, torch.full_like(values, final_alpha))


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ  (DDPM eq. 15 solved for x0); ``a`` is ᾱ_t of shape (B,)."""
    a = append_dims(a, x_t.ndim).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − √ᾱ·x0) / √(1−ᾱ), the inverse of :func:`x0_from_eps`."""
    a = append_dims(a, x_t.ndim).to(x_t.dtype)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def model_output_to_x0(
    output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Turn a UNet output of the given ``prediction_type`` (epsilon | v_prediction | sample) into x0."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, output, a)
    a = append_dims(a, x_t.ndim).to(x_t.dtype)
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")


def training_target(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What a UNet of ``prediction_type`` is trained to output at x_t = renoise(x0, noise, a): ε, v = √ᾱ·ε − √(1−ᾱ)·x0
    (diffusers' ``get_velocity``), or x0 — the inverse of :func:`model_output_to_x0`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = append_dims(a, x0.ndim).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, v_prediction, sample")


def ddim_step(
    x_t: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM step (η=0, Song et al. 2021 eq. 12): x_prev = √ᾱ'·x0 + √(1−ᾱ')·ε."""
    x0 = x0_from_eps(x_t, eps, a_t)
    a_prev = append_dims(a_prev, x_t.ndim).to(x_t.dtype)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def renoise(x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): √ᾱ·x0 + √(1−ᾱ)·noise."""
    a = append_dims(a, x0.ndim).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> list[int]:
    """DDIMScheduler's "leading" timesteps, e.g. 50 steps → [981, 961, …, 1] with offset 1."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps // num_steps
    return [i * ratio + steps_offset for i in reversed(range(num_steps))]


def solver_grid(num_train_timesteps: int = 1000, original_steps: int = 50) -> list[int]:
    """The distillation grid t = [19, 39, …, 999] (LCM's ``lcm_origin_timesteps``), ascending."""
    k = num_train_timesteps // original_steps
    return [i * k - 1 for i in range(1, original_steps + 1)]


def lcm_timesteps(
    num_steps: int, num_train_timesteps: int = 1000, original_steps: int = 50, max_timestep: int | None = None
) -> list[int]:
    """LCMScheduler's inference timesteps: 1 → [999]; 4 → [999, 759, 499, 259] (DESIGN.md §3).

    ``max_timestep`` keeps only the grid points ≤ it and spaces the steps over those by the same rule
    (4 steps, 759 → [759, 579, 379, 199]): the first step then starts below T from pure noise, as
    diffusers' "leading" DDIM spacing does (MusicLDM's 4-step DDIM starts at t = 751). Meant for students
    whose x0 at t = T is still poor: with MusicLDM's betas, sqrt(ᾱ_999) = 0.012, so an ε-parameterised x0
    there magnifies any ε error 84-fold.
    """
    grid = solver_grid(num_train_timesteps, original_steps)[::-1]
    if max_timestep is not None:
        grid = [t for t in grid if t <= max_timestep]
        if not grid:
            raise ValueError(f"max_timestep {max_timestep} is below the grid's first timestep "
                             f"{solver_grid(num_train_timesteps, original_steps)[0]}")
    if not 1 <= num_steps <= len(grid):
        raise ValueError(f"consistency steps must be in 1..{len(grid)}, got {num_steps}")
    indices = [math.floor(i * len(grid) / num_steps) for i in range(num_steps)]
    return [grid[i] for i in indices]


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consistency boundary condition (LCM): c_skip = σ²/((10t)²+σ²), c_out = 10t/√((10t)²+σ²)."""
    scaled = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip.float(), c_out.float()


def consistency_output(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x_t, t) = c_skip(t)·x_t + c_out(t)·x0 — equals x_t exactly at t = 0."""
    c_skip, c_out = boundary_scalings(t)
    c_skip = append_dims(c_skip.to(x_t.device), x_t.ndim).to(x_t.dtype)
    c_out = append_dims(c_out.to(x_t.device), x_t.ndim).to(x_t.dtype)
    return c_skip * x_t + c_out * x0


def classifier_free_guidance(
    cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float | torch.Tensor
) -> torch.Tensor:
    """Diffusers convention: uncond + g·(cond − uncond). LCM's w equals g − 1 (MusicCM eq. 5–6)."""
    if isinstance(guidance_scale, torch.Tensor):
        guidance_scale = append_dims(guidance_scale.to(cond.device, cond.dtype), cond.ndim)
    return uncond + guidance_scale * (cond - uncond)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of the LCM guidance weight w (B,) → (B, dim), as in diffusers' LCM pipelines."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1))
    )
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


@torch.no_grad()
def ema_update(
    target: Iterable[torch.nn.Parameter], source: Iterable[torch.nn.Parameter], rate: float
) -> None:
    """θ⁻ ← rate·θ⁻ + (1 − rate)·θ, in place (consistency-model target network)."""
    for t, s in zip(target, source, strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - rate)
