"""Long-form generation by crop fusion (MusicCM §3.3, after MultiDiffusion).

Windows of the model's native latent length slide over a latent canvas of any length. At every
sampling step all windows are denoised in batches, their x0 predictions are fused by the
least-squares rule (per latent frame, the weighted average of the windows covering it), and the
sampler re-noises the whole canvas with one shared noise draw. Memory stays at the canvas plus one
batch of windows. Decoding long canvases goes through :func:`chunked_apply` the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# denoise(x_t (N, C, T, F), t (N,), cond (N, D)) -> x0 (N, C, T, F)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def window_starts(length: int, window: int, hop: int) -> list[int]:
    """Start frames of windows of ``window`` frames, ``hop`` apart, the last one flush with the end."""
    if window < 1 or hop < 1:
        raise ValueError(f"window and hop must be ≥ 1, got window={window}, hop={hop}")
    if hop > window:
        raise ValueError(f"hop ({hop}) must not exceed the window ({window}): frames would be uncovered")
    if length <= window:
        return [0]
    starts = list(range(0, length - window, hop))
    starts.append(length - window)
    return starts


def window_weights(window: int, taper: int = 0) -> torch.Tensor:
    """Per-frame weight of one window (W,): 1 inside, a linear ramp over ``taper`` frames at each edge."""
    w = torch.ones(window)
    if taper > 0:
        ramp = torch.arange(1, taper + 1, dtype=torch.float32) / (taper + 1)
        w[:taper] = ramp
        w[-taper:] = ramp.flip(0)
    return w


def fusion_weights(length: int, starts: list[int], weights: torch.Tensor) -> torch.Tensor:
    """Normalised weight of every (window, frame) pair, (num_windows, W); each covered frame sums to 1."""
    window = weights.numel()
    total = torch.zeros(length, dtype=torch.float64)
    for s in starts:
        total[s : s + window] += weights.double()
    if (total <= 0).any():
        raise ValueError("the window layout leaves frames uncovered")
    return torch.stack([(weights.double() / total[s : s + window]).float() for s in starts])


def fuse(crops: torch.Tensor, starts: list[int], length: int, taper: int = 0) -> torch.Tensor:
    """Least-squares fusion of crops (K, C, W, F) starting at ``starts`` into one canvas (C, length, F)."""
    window = crops.shape[2]
    norm = fusion_weights(length, starts, window_weights(window, taper)).to(crops)
    canvas = crops.new_zeros(crops.shape[1], length, crops.shape[3])
    for k, s in enumerate(starts):
        canvas[:, s : s + window] += crops[k] * norm[k][None, :, None]
    return canvas


def canvas_denoiser(
    denoise: Denoiser, window: int, hop: int, crop_batch_size: int = 8, taper: int = 0
) -> Denoiser:
    """Wrap a native-length denoiser so it accepts canvases of any length (MusicCM §3.3).

    Canvases no longer than one window go straight to ``denoise`` (the plain path).
    """
    if crop_batch_size < 1:
        raise ValueError(f"crop_batch_size must be ≥ 1, got {crop_batch_size}")

    def fused(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch, _, length, _ = x_t.shape  # (B, C, T, F)
        if length <= window:
            return denoise(x_t, t, cond)
        starts = window_starts(length, window, hop)
        norm = fusion_weights(length, starts, window_weights(window, taper)).to(x_t)
        jobs = [(b, k) for b in range(batch) for k in range(len(starts))]
        out = torch.zeros_like(x_t)
        # 1. Denoise windows of all canvases in batches of crop_batch_size.
        for i in range(0, len(jobs), crop_batch_size):
            chunk = jobs[i : i + crop_batch_size]
            idx = torch.tensor([b for b, _ in chunk], device=x_t.device)
            crops = torch.stack([x_t[b, :, starts[k] : starts[k] + window] for b, k in chunk])
            x0 = denoise(crops, t[idx], cond[idx])  # (n, C, W, F)
            # 2. Accumulate the normalised weighted average (least-squares fusion).
            for j, (b, k) in enumerate(chunk):
                out[b, :, starts[k] : starts[k] + window] += x0[j] * norm[k][None, :, None]
        return out

    return fused


def chunked_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    chunk: int,
    overlap: int,
    scale: int,
    dim: int = -1,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping chunks of ``x`` along ``dim`` and cross-fade the outputs.

    ``fn`` maps n input frames to about ``scale``·n output frames along the same axis (extra frames
    are dropped, missing ones are an error). The result has exactly ``scale``·len frames; chunks
    overlap by ``overlap`` input frames, blended with a linear cross-fade. Memory holds one chunk.
    """
    dim = dim % x.ndim
    length = x.shape[dim]
    if length <= chunk:
        return fn(x).narrow(dim, 0, scale * length)
    if not 0 <= overlap < chunk:
        raise ValueError(f"overlap must be in [0, chunk), got overlap={overlap}, chunk={chunk}")
    starts = window_starts(length, chunk, chunk - overlap)
    out: torch.Tensor | None = None
    prev_end = 0  # end (in output frames) of what has been written so far
    for s in starts:
        y = fn(x.narrow(dim, s, chunk))
        if y.shape[dim] < scale * chunk:
            raise ValueError(f"fn returned {y.shape[dim]} frames for {chunk}, expected ≥ {scale * chunk}")
        y = y.narrow(dim, 0, scale * chunk)
        if out is None:
            shape = list(y.shape)
            shape[dim] = scale * length
            out = y.new_zeros(shape)
        o0 = scale * s
        fade = max(prev_end - o0, 0)  # frames shared with the previous chunk
        if fade > 0:
            ramp = torch.linspace(0.0, 1.0, fade + 2, device=y.device, dtype=y.dtype)[1:-1]
            view = [1] * y.ndim
            view[dim] = fade
            ramp = ramp.reshape(view)
            head = out.narrow(dim, o0, fade)
            head.mul_(1 - ramp).add_(y.narrow(dim, 0, fade) * ramp)
        out.narrow(dim, o0 + fade, scale * chunk - fade).copy_(y.narrow(dim, fade, scale * chunk - fade))
        prev_end = o0 + scale * chunk
    assert out is not None
    return out
