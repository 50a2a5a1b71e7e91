"""Audio ↔ latent geometry read from a model's own configs, never from constants."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class AudioGeometry:
    """How many samples, mel frames and latent frames a duration takes for one model."""

    sample_rate: int  # vocoder.config.sampling_rate
    hop_length: int  # product of the vocoder's upsample rates (samples per mel frame)
    n_mels: int  # vocoder.config.model_in_dim
    vae_factor: int  # 2 ** (len(vae.block_out_channels) - 1), on both time and frequency
    latent_channels: int
    window_frames: int  # the UNet's native latent length (unet.config.sample_size)
    unet_multiple: int  # latent lengths are rounded up to this (2 ** number of UNet downsamplers)

    @classmethod
    def from_configs(cls, unet: dict, vae: dict, vocoder: dict) -> AudioGeometry:
        """Derive the geometry from the unet, vae and vocoder config dicts."""
        rates = vocoder["upsample_rates"]
        sample_size = unet["sample_size"]
        window = sample_size[0] if isinstance(sample_size, list | tuple) else sample_size
        return cls(
            sample_rate=int(vocoder["sampling_rate"]),
            hop_length=math.prod(int(r) for r in rates),
            n_mels=int(vocoder["model_in_dim"]),
            vae_factor=2 ** (len(vae["block_out_channels"]) - 1),
            latent_channels=int(vae["latent_channels"]),
            window_frames=int(window),
            unet_multiple=2 ** (len(unet["block_out_channels"]) - 1),
        )

    @property
    def latent_bins(self) -> int:
        """Latent frequency bins (64 mel bins / 4 = 16 for MusicLDM)."""
        return self.n_mels // self.vae_factor

    @property
    def frames_per_second(self) -> float:
        """Mel frames per second (100 for MusicLDM)."""
        return self.sample_rate / self.hop_length

    @property
    def native_duration(self) -> float:
        """Seconds covered by one native window (10.24 s for MusicLDM)."""
        return self.window_frames * self.vae_factor * self.hop_length / self.sample_rate

    def num_samples(self, duration: float) -> int:
        """Exact output length: round(duration · sample_rate)."""
        return round(duration * self.sample_rate)

    def latent_frames(self, duration: float) -> int:
        """Latent frames needed to cover ``duration``, rounded up to the UNet's multiple."""
        mel = math.ceil(self.num_samples(duration) / self.hop_length)
        latent = math.ceil(mel / self.vae_factor)
        return max(self.unet_multiple, math.ceil(latent / self.unet_multiple) * self.unet_multiple)

    def latent_shape(self, batch: int, duration: float) -> tuple[int, int, int, int]:
        """(B, C, T, F) of the latent canvas for ``duration``."""
        return (batch, self.latent_channels, self.latent_frames(duration), self.latent_bins)
