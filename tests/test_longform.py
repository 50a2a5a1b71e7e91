"""Crop layout and fusion as pure functions (MusicCM §3.3)."""

import pytest
import torch

from musiccm.build import SCHEDULER
from musiccm.geometry import AudioGeometry
from musiccm.longform import canvas_denoiser, chunked_apply, fuse, fusion_weights, window_starts, window_weights
from musiccm.sampling import sample_consistency
from musiccm.schedule import alpha_bar
from musiccm.student import consistency_scheduler

FULL = AudioGeometry(16000, 160, 64, 4, 8, 256, 8)


@pytest.mark.parametrize("length,window,hop", [(256, 256, 192), (257, 256, 192), (1504, 256, 192), (1000, 32, 7)])
def test_windows_cover_every_frame_and_end_flush(length, window, hop):
    starts = window_starts(length, window, hop)
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] == max(length - window, 0)
    assert all(b - a <= hop for a, b in zip(starts, starts[1:], strict=False))


def test_window_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="hop"):
        window_starts(100, 10, 11)
    with pytest.raises(ValueError, match="≥ 1"):
        window_starts(100, 0, 1)


@pytest.mark.parametrize("taper", [0, 4])
def test_fusion_weights_sum_to_one(taper):
    starts = window_starts(300, 32, 20)
    w = fusion_weights(300, starts, window_weights(32, taper))
    total = torch.zeros(300, dtype=torch.float64)
    for k, s in enumerate(starts):
        total[s : s + 32] += w[k].double()
    torch.testing.assert_close(total, torch.ones(300, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("taper", [0, 5])
def test_identical_windows_fuse_to_identity(taper):
    canvas = torch.randn(8, 300, 16)
    starts = window_starts(300, 32, 24)
    crops = torch.stack([canvas[:, s : s + 32] for s in starts])
    torch.testing.assert_close(fuse(crops, starts, 300, taper), canvas, atol=1e-6, rtol=0)


def test_canvas_denoiser_equals_global_denoiser_for_local_model():
    """A frame-local denoiser gives the same x0 fused over windows as on the whole canvas."""
    calls = []

    def local(x, t, cond):
        calls.append(x.shape[0])
        return torch.tanh(x) * cond[:, :1, None, None] + t.float()[:, None, None, None] / 1000

    x = torch.randn(2, 8, 1504, 16)
    t = torch.tensor([999, 999])
    cond = torch.tensor([[1.0], [2.0]])
    fused = canvas_denoiser(local, window=256, hop=192, crop_batch_size=3)(x, t, cond)
    torch.testing.assert_close(fused, local(x, t, cond), atol=1e-5, rtol=0)
    assert max(calls[:-1]) <= 3  # memory: never more than one batch of windows per call


def test_one_window_is_the_plain_path_bit_for_bit():
    def model(x, t, cond):
        return x * 0.5 + cond[:, :1, None, None]

    x = torch.randn(1, 8, 256, 16)
    args = (x, torch.tensor([999]), torch.ones(1, 1))
    assert torch.equal(canvas_denoiser(model, 256, 192)(*args), model(*args))


def test_sixty_second_canvas_shape():
    assert FULL.latent_shape(1, 60.0) == (1, 8, 1504, 16)
    assert FULL.native_duration == pytest.approx(10.24)
    x = torch.zeros(FULL.latent_shape(1, 60.0))
    out = canvas_denoiser(lambda x, t, c: x + 1, FULL.window_frames, 192)(x, torch.tensor([999]), torch.zeros(1, 1))
    assert out.shape == x.shape and torch.allclose(out, torch.ones_like(out))


def test_shared_noise_keeps_variance_in_overlaps():
    """Re-noising the fused canvas with one draw keeps Var = 1 − ᾱ in overlaps and elsewhere alike."""
    lcm = consistency_scheduler(SCHEDULER)
    seen = []

    def zero_x0(x, t, cond):
        if int(t[0]) == 499:
            seen.append(x.clone())
        return torch.zeros_like(x)

    denoise = canvas_denoiser(zero_x0, window=32, hop=20, crop_batch_size=64)
    x_T = torch.randn(64, 8, 200, 16, generator=torch.Generator().manual_seed(0))
    sample_consistency(denoise, x_T, torch.zeros(64, 1), [999, 499], lcm.alphas_cumprod,
                       torch.Generator().manual_seed(1))
    crops = torch.cat(seen)  # windows at t = 499
    expected = (1 - alpha_bar(lcm.alphas_cumprod, torch.tensor([499]), 1.0)).sqrt().item()
    assert crops.std().item() == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("length", [10, 64, 100, 333])
def test_chunked_apply_matches_whole_for_local_fn(length):
    def up(x):  # a frame-local "decoder" producing scale·n + 3 frames
        y = torch.repeat_interleave(x * 2, 4, dim=-1)
        return torch.cat([y, y[..., :3]], dim=-1)

    x = torch.randn(2, 3, length)
    whole = up(x)[..., : 4 * length]
    torch.testing.assert_close(chunked_apply(up, x, chunk=32, overlap=8, scale=4), whole, atol=1e-5, rtol=0)


def test_chunked_apply_crossfades_between_chunks():
    x = torch.zeros(1, 100)
    offsets = iter(range(100))

    def fn(chunk):
        return chunk + next(offsets)  # every chunk returns a different constant

    y = chunked_apply(fn, x, chunk=40, overlap=10, scale=1)
    assert y.shape == (1, 100)
    assert (y.diff(dim=1).abs() <= 1.0 / 10 + 1e-6).all()  # no jump larger than one ramp step
