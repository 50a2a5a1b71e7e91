"""The real MusicLDM architecture with random weights, through the public API, on CPU."""

import pytest
import soundfile as sf
import torch

from musiccm import model
from musiccm.build import build_components
from musiccm.cli import main
from musiccm.pipeline import GenerationConfig, MusicCM
from musiccm.student import as_student


def n_params(m: torch.nn.Module) -> float:
    return sum(p.numel() for p in m.parameters()) / 1e6


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    c = as_student(build_components("full", seed=0))
    assert 180 < n_params(c.unet) < 190  # ≈185 M
    assert 50 < n_params(c.vae) < 60  # ≈55 M
    assert 50 < n_params(c.vocoder) < 60  # ≈55 M
    g = c.geometry
    assert (g.sample_rate, g.hop_length, g.n_mels, g.vae_factor, g.latent_channels, g.window_frames) == (
        16000, 160, 64, 4, 8, 256)
    path = model.save(c, tmp_path_factory.mktemp("full") / "musicldm-random")
    del c
    return path


@pytest.mark.slow
def test_full_size_one_step_and_long_form(full_dir):
    c = model.load(full_dir)
    assert c.geometry.latent_shape(1, 10.24) == (1, 8, 256, 16)
    gen = MusicCM(c)
    short = gen.generate(["an epic orchestral score"], 10.24, [0], GenerationConfig(steps=1))
    assert short.waveforms.shape == (1, 163840)
    long = gen.generate(["an epic orchestral score"], 30.0, [0], GenerationConfig(steps=2, crop_batch_size=2))
    assert long.waveforms.shape == (1, 480000)
    assert torch.isfinite(torch.from_numpy(long.waveforms)).all()


@pytest.mark.slow
def test_full_size_cli_writes_flac(full_dir, tmp_path):
    out = tmp_path / "full.flac"
    assert main(["generate", "--model", full_dir, "--prompt", "lofi hip hop", "--duration", "10.24",
                 "--steps", "1", "--out", str(out)]) == 0
    assert sf.info(out).frames == 163840
