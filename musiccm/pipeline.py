"""Text-to-music generation: prompts → waveforms, short clips and long-form by crop fusion."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from musiccm import external
from musiccm.longform import canvas_denoiser
from musiccm.model import MusicLDMComponents
from musiccm.sampling import randn, sample_consistency, sample_ddim
from musiccm.schedule import lcm_timesteps

MAX_SEED = 2**63 - 1


def consistency_timesteps(c: MusicLDMComponents, steps: int, max_timestep: int | None = None) -> list[int]:
    """A consistency student's sampling timesteps on its scheduler's grid (schedule.lcm_timesteps), from
    ``max_timestep`` (None: LCM's own, from t = 999)."""
    sched = c.scheduler.config
    return lcm_timesteps(steps, sched.num_train_timesteps, sched.get("original_inference_steps", 50), max_timestep)


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample; ``None`` fields take the model's defaults (see :meth:`MusicCM.resolve`)."""

    steps: int | None = None  # student: 4, teacher: 50
    guidance_scale: float | None = None  # diffusers convention (LCM w = g − 1); teacher default 2.0
    hop_frames: int | None = None  # crop-fusion hop in latent frames; default 3/4 of the window
    crop_batch_size: int = 8  # windows denoised per UNet call on long canvases
    # Fusion weights: n = a linear ramp over each window's first and last n frames; 0 = the plain average, whose
    # weights jump where a window starts or ends (audible seams when windows disagree: benchmarks/RESULTS.md,
    # "Long-form seams"). None = the windows' overlap (window − hop, at most half the window): a full cross-fade.
    taper: int | None = None
    max_duration: float = 600.0  # seconds; longer requests are rejected
    # Consistency students: highest sampling timestep (see schedule.lcm_timesteps). None = the model's own
    # default (model_index.json "musiccm": {"max_timestep": …}), else LCM's 999.
    max_timestep: int | None = None


@dataclass
class Generated:
    """One batch of results: waveforms (B, S) float32 in [-1, 1] and per-prompt facts."""

    waveforms: np.ndarray
    sample_rate: int
    truncated: list[bool]
    config: GenerationConfig


class MusicCM:
    """Generate music from text with a MusicLDM teacher (DDIM + CFG) or a distilled consistency student."""

    def __init__(self, components: MusicLDMComponents, config: GenerationConfig | None = None):
        self.c = components
        self.config = self.resolve(config or GenerationConfig())
        self._uncond: torch.Tensor | None = None

    def resolve(self, config: GenerationConfig) -> GenerationConfig:
        """Fill model-dependent defaults and validate every field."""
        window = self.c.geometry.window_frames
        steps = config.steps if config.steps is not None else (4 if self.c.is_consistency else 50)
        guidance = config.guidance_scale
        if guidance is None:
            guidance = 3.0 if self.c.is_consistency else 2.0
        hop = config.hop_frames if config.hop_frames is not None else max(1, window * 3 // 4)
        limit = 50 if self.c.is_consistency else self.c.scheduler.config.num_train_timesteps
        if not isinstance(steps, int) or not 1 <= steps <= limit:
            raise ValueError(f"steps must be an integer in 1..{limit} for this model, got {steps!r}")
        if not math.isfinite(guidance) or guidance < 1.0:
            raise ValueError(f"guidance_scale must be a finite number ≥ 1, got {guidance!r}")
        if not 1 <= hop <= window:
            raise ValueError(f"hop_frames must be in 1..{window} (the native window), got {hop}")
        if config.crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be ≥ 1, got {config.crop_batch_size}")
        taper = config.taper if config.taper is not None else min(window - hop, window // 2)
        if isinstance(taper, bool) or not isinstance(taper, int) or not 0 <= taper <= window // 2:
            raise ValueError(f"taper must be an integer in 0..{window // 2}, got {taper!r}")
        if not (math.isfinite(config.max_duration) and config.max_duration > 0):
            raise ValueError(f"max_duration must be a positive number, got {config.max_duration!r}")
        max_t = config.max_timestep if config.max_timestep is not None else self.c.extra.get("max_timestep")
        if self.c.is_consistency:
            n_train = self.c.scheduler.config.num_train_timesteps
            if max_t is not None and not (isinstance(max_t, int) and 0 <= max_t < n_train):
                raise ValueError(f"max_timestep must be an integer in 0..{n_train - 1}, got {max_t!r}")
            consistency_timesteps(self.c, steps, max_t)  # raises if steps do not fit below max_timestep
        elif config.max_timestep is not None:
            raise ValueError("max_timestep applies to consistency students only; this model samples with DDIM")
        return replace(config, steps=steps, guidance_scale=float(guidance), hop_frames=hop, taper=taper,
                       max_timestep=max_t)

    def check_duration(self, duration: float, max_duration: float | None = None) -> float:
        """Validate a requested duration in seconds; return it as a float."""
        limit = max_duration if max_duration is not None else self.config.max_duration
        if isinstance(duration, bool) or not isinstance(duration, int | float) or not math.isfinite(duration):
            raise ValueError(f"duration must be a finite number of seconds, got {duration!r}")
        sr = self.c.geometry.sample_rate
        if duration <= 0 or round(duration * sr) < 1:
            raise ValueError(f"duration must be > 0 s (at least one sample at {sr} Hz), got {duration}")
        if duration > limit:
            raise ValueError(f"duration {duration} s is above the limit of {limit} s")
        return float(duration)

    def uncond(self) -> torch.Tensor:
        """CLAP embedding of the empty prompt (MusicLDM's unconditional input), cached."""
        if self._uncond is None:
            self._uncond = external.encode_text(self.c, [""])[0]
        return self._uncond

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        duration: float,
        seeds: list[int],
        config: GenerationConfig | None = None,
    ) -> Generated:
        """Generate one clip per prompt, all of ``duration`` seconds, each from its own seed."""
        cfg = self.resolve(config) if config is not None else self.config
        duration = self.check_duration(duration, cfg.max_duration)
        if not prompts or len(prompts) != len(seeds):
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError("prompt must be a non-empty string")
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {s!r}")
        g = self.c.geometry
        device = self.c.device
        cond, truncated = external.encode_text(self.c, prompts)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        # 1. Initial noise of the whole canvas, one draw per clip (device-independent CPU noise).
        x_T = randn(g.latent_shape(len(prompts), duration), generators, device) * self.c.scheduler.init_noise_sigma
        # 2. The x0 denoiser, wrapped by crop fusion when the canvas is longer than a window.
        uncond = self.uncond() if not self.c.is_consistency else None
        denoise = external.make_denoiser(self.c, uncond, cfg.guidance_scale)
        denoise = canvas_denoiser(denoise, g.window_frames, cfg.hop_frames, cfg.crop_batch_size, cfg.taper)
        # 3. The trajectory.
        ac = self.c.scheduler.alphas_cumprod
        if self.c.is_consistency:
            ts = consistency_timesteps(self.c, cfg.steps, cfg.max_timestep)
            latents = sample_consistency(denoise, x_T, cond.to(device), ts, ac, generators)
        else:
            self.c.scheduler.set_timesteps(cfg.steps)
            ts = [int(t) for t in self.c.scheduler.timesteps]
            final = float(self.c.scheduler.final_alpha_cumprod)
            latents = sample_ddim(denoise, x_T, cond.to(device), ts, ac, final)
        # 4. Decode in chunks and crop to exactly round(duration · sr) samples.
        wav = external.decode(self.c, latents, g.num_samples(duration))
        return Generated(wav.clamp(-1, 1).cpu().numpy(), g.sample_rate, truncated, cfg)

    def describe(self) -> dict:
        """Model facts for tags, metric rows and summaries."""
        return {
            "model": self.c.name,
            "kind": "consistency" if self.c.is_consistency else "diffusion",
            "sample_rate": self.c.geometry.sample_rate,
            "native_duration_s": self.c.geometry.native_duration,
            "config": asdict(self.config),
        }
