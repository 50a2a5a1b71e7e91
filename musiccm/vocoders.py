"""A phase-reconstruction vocoder for models too small to have a good neural one (the demo model).

``GriffinLimVocoder`` inverts MusicLDM's log-mel exactly as :mod:`musiccm.mel` computes it: mel power → linear
magnitude by non-negative least squares against the same Slaney filter bank (projected gradient from the
pseudo-inverse), then Griffin-Lim (Griffin & Lim 1984, with the fast momentum of Perraudin et al. 2013) with
the front end's STFT (periodic Hann, n_fft = win = 1024, hop 160, centred frames) started from zero phase,
so it is deterministic. It has no weights: its ``config.json`` says everything.

It quacks like ``transformers.SpeechT5HifiGan`` where the rest of the code looks: ``forward(mel (B, T, n_mels))
→ (B, hop·T)``, ``config.sampling_rate``, ``config.upsample_rates`` (the hop's factors), ``config.model_in_dim``,
``config.to_dict()``, ``save_pretrained`` / ``from_pretrained``; ``model_index.json`` names it
``["musiccm", "GriffinLimVocoder"]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from musiccm.mel import MelConfig, mel_basis

CONFIG_NAME = "config.json"
CLASS_NAME = "GriffinLimVocoder"


@dataclass
class GriffinLimConfig:
    """Front-end settings (must equal the model's mel front end) and iteration counts."""

    sampling_rate: int = 16000
    model_in_dim: int = 64  # mel bins
    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 2, 2, 2])  # product = hop (160)
    n_fft: int = 1024
    win_length: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0
    n_iter: int = 32  # Griffin-Lim iterations
    nnls_iter: int = 50  # projected-gradient steps of the mel → magnitude inversion
    momentum: float = 0.99

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)

    def to_dict(self) -> dict:
        return {"_class_name": CLASS_NAME, **asdict(self)}


class GriffinLimVocoder(nn.Module):
    """MusicLDM log-mel (B, T, n_mels) → waveform (B, hop·T) by NNLS mel inversion + Griffin-Lim."""

    # Long clips are vocoded in chunks of this many mel frames (30 s; memory is a few magnitude frames per
    # sample, no activations), cross-faded: Griffin-Lim phases of separately inverted chunks do not line up.
    chunk_frames = 3000

    def __init__(self, config: GriffinLimConfig | None = None):
        super().__init__()
        self.config = config or GriffinLimConfig()
        c = self.config
        mel = MelConfig(sample_rate=c.sampling_rate, n_fft=c.n_fft, win_length=c.win_length, hop_length=c.hop_length,
                        n_mels=c.model_in_dim, fmin=c.fmin, fmax=c.fmax)
        self.register_buffer("basis", mel_basis(mel), persistent=False)  # (M, K)
        self.register_buffer("window", torch.hann_window(c.win_length, periodic=True), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def magnitude(self, mel_power: torch.Tensor) -> torch.Tensor:
        """Non-negative least squares: the |STFT| (B, K, T) whose mel is closest to ``mel_power`` (B, M, T)."""
        basis = self.basis
        step = 1.0 / float(torch.linalg.matrix_norm(basis, ord=2) ** 2)  # 1/L for ½‖B·S − m‖²
        s = (torch.linalg.pinv(basis) @ mel_power).clamp_min(0)
        for _ in range(self.config.nnls_iter):
            s = (s - step * basis.T @ (basis @ s - mel_power)).clamp_min(0)
        return s

    @torch.no_grad()
    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        c = self.config
        squeeze = spectrogram.ndim == 2
        logmel = spectrogram[None] if squeeze else spectrogram  # (B, T, M)
        frames = logmel.shape[1]
        mag = self.magnitude(torch.exp(logmel.float()).transpose(1, 2))  # (B, K, T)
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)  # a centred STFT of T·hop samples has T + 1 frames
        import torchaudio.functional as AF

        wav = AF.griffinlim(mag, self.window, c.n_fft, c.hop_length, c.win_length, power=1.0, n_iter=c.n_iter,
                            momentum=c.momentum, length=frames * c.hop_length, rand_init=False)
        return wav[0] if squeeze else wav

    def save_pretrained(self, directory: str | Path, **_: object) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, subfolder: str | None = None, **_: object) -> GriffinLimVocoder:
        d = Path(directory) / (subfolder or "")
        try:
            config = config_from_dict(json.loads((d / CONFIG_NAME).read_text()))
        except ValueError as exc:
            raise ValueError(f"{d / CONFIG_NAME}: {exc}") from None
        return cls(config)


def config_from_dict(raw: dict) -> GriffinLimConfig:
    """A vocoder ``config.json``'s settings; ValueError naming what is wrong and what is allowed."""
    raw = dict(raw)
    if raw.pop("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ValueError(f"does not describe a {CLASS_NAME}")
    fields = GriffinLimConfig.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown {CLASS_NAME} settings {unknown}; allowed: {sorted(fields)}")
    return GriffinLimConfig(**raw)


def vocoder_class(index_entry: list | None) -> str:
    """'GriffinLimVocoder' or 'SpeechT5HifiGan' from model_index.json's ``vocoder`` entry (default HiFi-GAN)."""
    if isinstance(index_entry, list) and len(index_entry) == 2 and index_entry[1] == CLASS_NAME:
        return CLASS_NAME
    return "SpeechT5HifiGan"
