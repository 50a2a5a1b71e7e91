"""Samplers as short stateless functions (after k-diffusion's ``sampling.py``).

Model contract (see :mod:`musiccm.longform`): ``denoise(x_t, t, cond) -> x0``. Guidance, the
guidance embedding and crop fusion all live inside ``denoise``; the samplers only own the
trajectory. Noise comes from per-row generators so a clip depends on its own seed alone, never on
the batch it was generated in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from musiccm.longform import Denoiser
from musiccm.schedule import alpha_bar, consistency_output, ddim_step, eps_from_x0, renoise

Generators = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generator: Generators = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise drawn on the CPU (device-independent), one generator per row when a list is given."""
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    else:
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    return noise.to(device=device, dtype=dtype)


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    final_alpha: float,
) -> torch.Tensor:
    """Deterministic DDIM (η=0) over ``timesteps`` (descending); returns the final latent x0."""
    x = x_T
    for i, t in enumerate(timesteps):
        tt = _timestep_batch(t, x)
        prev = _timestep_batch(timesteps[i + 1] if i + 1 < len(timesteps) else -1, x)
        a_t = alpha_bar(alphas_cumprod, tt, final_alpha)
        a_prev = alpha_bar(alphas_cumprod, prev, final_alpha)
        x0 = denoise(x, tt, cond)
        x = ddim_step(x, eps_from_x0(x, x0, a_t), a_t, a_prev)
    return x


@torch.no_grad()
def sample_consistency(
    denoise: Denoiser,
    x_T: torch.Tensor,
    cond: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    generator: Generators = None,
) -> torch.Tensor:
    """Consistency multistep sampling (LCM Alg. 1): predict x0, apply the boundary scalings, re-noise.

    Each step re-noises the whole canvas with one fresh noise draw, except after the last step.
    """
    x = x_T
    for i, t in enumerate(timesteps):
        tt = _timestep_batch(t, x)
        x = consistency_output(x, denoise(x, tt, cond), tt)  # denoised estimate of x0
        if i + 1 < len(timesteps):
            a_next = alpha_bar(alphas_cumprod, _timestep_batch(timesteps[i + 1], x), 1.0)
            x = renoise(x, randn(x.shape, generator, x.device, x.dtype), a_next)
    return x
