"""The Griffin-Lim vocoder: inverts MusicLDM's log-mel, exact lengths, deterministic, saved and loaded in the layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from musiccm import model
from musiccm.mel import MelConfig, log_mel
from musiccm.vocoders import GriffinLimConfig, GriffinLimVocoder


def chord(seconds: float = 1.0, sr: int = 16000) -> torch.Tensor:
    t = torch.arange(round(seconds * sr)) / sr
    env = torch.exp(-3 * (t % 0.5))  # two struck notes
    return 0.3 * env * sum(torch.sin(2 * torch.pi * f * t) / (k + 1) for k, f in enumerate((220.0, 277.2, 329.6)))


def test_reconstructs_the_mel_it_was_given():
    x = chord()[None]
    mel = log_mel(x)[:, :100]  # (1, 100, 64)
    voc = GriffinLimVocoder()
    y = voc(mel)
    assert y.shape == (1, 100 * 160)
    back = log_mel(y)[:, 2:98]  # edges see the zero padding of the STFT
    err = (back - mel[:, 2:98]).abs().mean()
    noise = (log_mel(torch.randn_like(y) * y.std())[:, 2:98] - mel[:, 2:98]).abs().mean()
    assert err < 0.35 and err < noise / 4  # far closer than noise with the same level
    assert torch.equal(voc(mel), y)  # zero-phase start: deterministic


def test_magnitude_is_a_nonnegative_least_squares_fit():
    voc = GriffinLimVocoder()
    mag = torch.rand(1, 513, 5) * torch.linspace(1, 0, 513)[None, :, None]
    mel = voc.basis @ mag
    fit = voc.magnitude(mel)
    assert (fit >= 0).all()
    assert torch.allclose(voc.basis @ fit, mel, rtol=0.05, atol=1e-3 * float(mel.max()))


def test_saved_and_loaded_in_the_musicldm_layout(tmp_path, tiny_teacher):
    c = model.MusicLDMComponents(**{**tiny_teacher.__dict__, "vocoder": GriffinLimVocoder(GriffinLimConfig(n_iter=4))})
    path = model.save(c, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["vocoder"] == ["musiccm", "GriffinLimVocoder"]
    assert not list((tmp_path / "m" / "vocoder").glob("*.safetensors"))  # weightless
    loaded = model.load(path)
    assert isinstance(loaded.vocoder, GriffinLimVocoder) and loaded.vocoder.config.n_iter == 4
    assert loaded.geometry == tiny_teacher.geometry
    from musiccm.pipeline import GenerationConfig, MusicCM

    out = MusicCM(loaded, GenerationConfig(steps=2)).generate(["piano"], 3.3, [0])
    assert out.waveforms.shape == (1, 52800) and np.isfinite(out.waveforms).all()


def test_rejects_a_config_of_another_class(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "SpeechT5HifiGan"}))
    with pytest.raises(ValueError, match="does not describe a GriffinLimVocoder"):
        GriffinLimVocoder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "GriffinLimVocoder", "bogus": 1}))
    with pytest.raises(ValueError, match="unknown GriffinLimVocoder settings"):
        GriffinLimVocoder.from_pretrained(tmp_path)


def test_front_end_must_match():
    assert GriffinLimConfig().hop_length == MelConfig().hop_length
