"""Audio front ends as pure torch code: MusicLDM's log-mel, AudioMAE's Kaldi fbank, CLAP's dB-mel.

MusicLDM (AudioLDM's ``TacotronSTFT``): 16 kHz mono → STFT (n_fft = win = 1024, hop 160, periodic Hann,
reflect padding of n_fft/2 on both sides) → magnitude → 64-bin Slaney mel 0–8000 Hz (``librosa.filters.mel``)
→ log(clamp(x, 1e-5)) → (B, T, 64), T = 1 + S // hop, padded/cropped to the window with zeros (AudioLDM's
``pad_spec``).

AudioMAE: 128-bin Kaldi fbank (25 ms Hann frames, 10 ms shift, power, log) normalised as
(x + 4.2677393) / (2·4.5689974) and padded/cropped to 1024 frames.

The discriminator only ever sees MusicLDM mels (real clips, and the student's latents through the VAE
decoder), so :func:`mel_to_fbank` and :func:`mel_to_clap` convert a MusicLDM log-mel into the feature
network's input differentiably: band-average magnitude → linear spectrum (a fixed non-negative
interpolation) → power → the target filter bank, energy-matched for the different window (Parseval).
It is an approximation (band-smoothed spectrum, 64 ms instead of 25/21 ms windows) applied alike to
real and generated mels; both frame rates are 100 frames/s so frames line up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LOG_CLAMP = 1e-5
AUDIOMAE_MEAN = -4.2677393
AUDIOMAE_STD = 4.5689974
AUDIOMAE_FRAMES = 1024
AUDIOMAE_BINS = 128
KALDI_FRAME = 400  # 25 ms at 16 kHz
KALDI_FFT = 512  # Kaldi rounds the 400-sample frame up to a power of two
KALDI_PREEMPHASIS = 0.97


@dataclass(frozen=True)
class MelConfig:
    """MusicLDM's STFT/mel settings; :meth:`from_components` reads them from the model when it has them."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0

    @classmethod
    def from_components(cls, c: Any) -> MelConfig:
        """Rate, hop and bins from the model's geometry; n_fft/win_length/fmin/fmax from model_index.json's
        ``musiccm`` section when present, MusicLDM's defaults otherwise."""
        g = c.geometry
        extra = dict(getattr(c, "extra", {}) or {})
        n_fft = int(extra.get("n_fft", cls.n_fft))
        return cls(
            sample_rate=g.sample_rate,
            n_fft=n_fft,
            win_length=int(extra.get("win_length", n_fft)),
            hop_length=g.hop_length,
            n_mels=g.n_mels,
            fmin=float(extra.get("fmin", cls.fmin)),
            fmax=float(extra.get("fmax", min(cls.fmax, g.sample_rate / 2))),
        )

    def frames(self, num_samples: int) -> int:
        """STFT frames of ``num_samples`` with centred (reflect-padded) frames."""
        return 1 + num_samples // self.hop_length


@functools.lru_cache(maxsize=16)
def _slaney_basis(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)


def float32_front_end(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run an audio front end in float32 with autocast off, whatever the caller's autocast region.

    exp(log-mel), squared magnitudes and filter-bank sums exceed float16's range (65504) on loud or untrained
    inputs: under fp16 autocast the bank matmul overflowed to inf and poisoned the discriminator (seen on an H200,
    ``test_mixed_precision_step_on_gpu[fp16]``). The networks after the front end still run in the caller's precision.
    """

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return fn(x.float(), *args, **kwargs)

    return wrapper


def mel_basis(config: MelConfig) -> torch.Tensor:
    """The (n_mels, n_fft/2+1) Slaney mel filter bank of MusicLDM's front end."""
    return torch.from_numpy(_slaney_basis(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax))


def stft_magnitude(wav: torch.Tensor, config: MelConfig) -> torch.Tensor:
    """|STFT| (B, n_fft/2+1, T) exactly as AudioLDM's STFT: periodic Hann, reflect padding n_fft/2."""
    window = torch.hann_window(config.win_length, periodic=True, device=wav.device, dtype=torch.float32)
    spec = torch.stft(
        wav.float(),
        n_fft=config.n_fft,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window=window,
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    return spec.abs()


def log_mel(wav: torch.Tensor, config: MelConfig = MelConfig()) -> torch.Tensor:
    """MusicLDM log-mel: waveforms (B, S) in [-1, 1] at ``config.sample_rate`` → (B, T, n_mels), T = 1 + S // hop."""
    if wav.ndim != 2:
        raise ValueError(f"log_mel expects waveforms of shape (B, S), got {tuple(wav.shape)}")
    mag = stft_magnitude(wav, config)  # (B, K, T)
    mel = torch.matmul(mel_basis(config).to(mag.device), mag)  # (B, n_mels, T)
    return torch.log(torch.clamp(mel, min=LOG_CLAMP)).transpose(1, 2)


def fit_frames(x: torch.Tensor, frames: int, value: float = 0.0, dim: int = 1) -> torch.Tensor:
    """Crop or pad (with ``value``, at the end) ``x`` along ``dim`` to ``frames`` (AudioLDM's ``pad_spec``)."""
    n = x.shape[dim]
    if n >= frames:
        return x.narrow(dim, 0, frames)
    pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, frames - n]
    return F.pad(x, pad, value=value)


# --------------------------------------------------------------------------- AudioMAE (Kaldi fbank)
def normalise_fbank(fbank: torch.Tensor) -> torch.Tensor:
    """AudioMAE's input normalisation (x − mean) / (2·std) with its AudioSet statistics."""
    return (fbank - AUDIOMAE_MEAN) / (2 * AUDIOMAE_STD)


def kaldi_fbank(wav: torch.Tensor, sample_rate: int = 16000, frames: int = AUDIOMAE_FRAMES) -> torch.Tensor:
    """AudioMAE input from waveforms (B, S): 128-bin Kaldi fbank, normalised, padded/cropped → (B, frames, 128)."""
    import torchaudio.compliance.kaldi as kaldi

    out = []
    for x in wav.float():
        x = x - x.mean()
        fb = kaldi.fbank(
            x[None],
            htk_compat=True,
            sample_frequency=sample_rate,
            use_energy=False,
            window_type="hanning",
            num_mel_bins=AUDIOMAE_BINS,
            dither=0.0,
            frame_shift=10,
        )  # (T, 128)
        out.append(normalise_fbank(fit_frames(fb, frames, dim=0)))  # AudioMAE pads before normalising
    return torch.stack(out)


@functools.lru_cache(maxsize=16)
def _interp_weights(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """(K, n_mels) weights turning band-mean magnitudes into a linear spectrum (each row sums to 1 or 0)."""
    basis = _slaney_basis(sample_rate, n_fft, n_mels, fmin, fmax).astype(np.float64)  # (M, K)
    cover = basis.sum(0)  # (K,)
    interp = basis.T / np.where(cover > 0, cover, 1.0)[:, None]  # (K, M): per-bin mix of the bands covering it
    return interp.astype(np.float32)


def mel_to_linear(logmel: torch.Tensor, config: MelConfig) -> torch.Tensor:
    """Approximate |STFT| (B, T, K) from a MusicLDM log-mel (B, T, n_mels); exact for spectra flat within bands."""
    interp = _interp_weights(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax)
    w = torch.as_tensor(interp, dtype=torch.float32, device=logmel.device)  # (K, M)
    basis = mel_basis(config).to(logmel.device)  # (M, K)
    band_mean = torch.exp(logmel.float()) / basis.sum(1).clamp_min(1e-12)  # (B, T, M)
    return band_mean @ w.T  # (B, T, K)


@functools.lru_cache(maxsize=8)
def _kaldi_banks(n_fft: int, sample_rate: int) -> np.ndarray:
    import torchaudio.compliance.kaldi as kaldi

    banks, _ = kaldi.get_mel_banks(AUDIOMAE_BINS, n_fft, float(sample_rate), 20.0, 0.0, 100.0, -500.0, 1.0)
    return F.pad(banks, (0, 1)).numpy()  # Kaldi drops the Nyquist bin → (128, n_fft/2+1)


def _energy_ratio(window_a: torch.Tensor, fft_a: int, window_b: torch.Tensor, fft_b: int) -> float:
    """Mel-band energy of spectrogram a over b for the same signal, b's band sum taken on b's own grid.

    Per-bin power of noise with PSD S is sr·S·Σw²; a band holds n_fft/sr bins per Hz, so the band energy is
    ∝ Σw²·n_fft whatever the rate (Parseval); the same ratio holds for a tone.
    """
    return float((window_a**2).sum() / (window_b**2).sum()) * fft_a / fft_b


@float32_front_end
def mel_to_fbank(logmel: torch.Tensor, config: MelConfig, frames: int = AUDIOMAE_FRAMES) -> torch.Tensor:
    """Differentiable MusicLDM log-mel (B, T, 64) → AudioMAE input (B, frames, 128), see the module docstring."""
    if config.sample_rate != 16000:
        raise ValueError(f"AudioMAE expects 16 kHz features; this model runs at {config.sample_rate} Hz")
    mag = mel_to_linear(logmel, config)  # (B, T, K)
    freqs = torch.linspace(0, config.sample_rate / 2, mag.shape[-1], device=mag.device)
    omega = 2 * torch.pi * freqs / config.sample_rate
    pre = (1 + KALDI_PREEMPHASIS**2 - 2 * KALDI_PREEMPHASIS * torch.cos(omega)).sqrt()  # |1 − 0.97 e^{−iω}|
    power = (mag * pre) ** 2
    ratio = _energy_ratio(
        torch.hann_window(KALDI_FRAME, periodic=False), KALDI_FFT, torch.hann_window(config.win_length), config.n_fft
    )
    banks = torch.as_tensor(_kaldi_banks(config.n_fft, config.sample_rate), device=mag.device)  # (128, K)
    energy = (power @ banks.T) * ratio  # (B, T, 128)
    fbank = torch.log(energy.clamp_min(torch.finfo(torch.float32).eps))
    # Kaldi frames (snip_edges) are centred 200 samples (1.25 hops) later than centred STFT frames.
    fbank = fbank[:, 1:]
    return normalise_fbank(fit_frames(fbank, frames, value=0.0))  # zero-pad before normalising, as AudioMAE


# --------------------------------------------------------------------------- CLAP audio tower (HTSAT)
@functools.lru_cache(maxsize=8)
def _clap_banks(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float, clap_rate: int) -> np.ndarray:
    import librosa

    # CLAP's Slaney filters are area-normalised in Hz, so evaluating them on our finer frequency grid and
    # summing gives the same band energy (bins·density cancel for resampled band-limited audio).
    grid_fft = n_fft * clap_rate // sample_rate
    banks = librosa.filters.mel(sr=clap_rate, n_fft=grid_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, norm="slaney",
                                htk=False)
    return banks[:, : n_fft // 2 + 1].astype(np.float32)  # (M_clap, K): only the 0..sr/2 part carries energy


@float32_front_end
def mel_to_clap(logmel: torch.Tensor, config: MelConfig, feature_extractor: Any) -> torch.Tensor:
    """Differentiable MusicLDM log-mel (B, T, 64) → CLAP audio input (B, 1, frames, 64) in dB ("rand_trunc" path).

    Clips shorter than the extractor's ``nb_max_samples`` are repeated and padded with silence to its frame
    count, as its default ``padding="repeatpad"`` does to waveforms, so the audio tower sees what it was trained on.
    """
    fe = feature_extractor
    mag = mel_to_linear(logmel, config)  # (B, T, K)
    banks = _clap_banks(config.sample_rate, config.n_fft, int(fe.feature_size), float(fe.frequency_min),
                        float(fe.frequency_max), int(fe.sampling_rate))
    banks = torch.as_tensor(banks, device=mag.device)
    n_clap = int(fe.fft_window_size)
    ratio = _energy_ratio(torch.hann_window(n_clap), n_clap, torch.hann_window(config.win_length), config.n_fft)
    energy = (mag**2 @ banks.T) * ratio
    max_frames = int(fe.nb_max_samples) // int(fe.hop_length) + 1
    db = 10.0 * torch.log10(energy.clamp_min(1e-10))
    if db.shape[1] < max_frames:  # the extractor's "repeatpad": whole repetitions, then silence (-100 dB)
        db = db.repeat(1, max_frames // db.shape[1], 1)
        db = F.pad(db, (0, 0, 0, max_frames - db.shape[1]), value=-100.0)
    return db[:, :max_frames, :].unsqueeze(1)
