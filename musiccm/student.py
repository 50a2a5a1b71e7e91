"""Turn a teacher's components into a consistency-student layout (LCMScheduler on the same betas)."""

from __future__ import annotations

from diffusers import LCMScheduler

from musiccm.model import MusicLDMComponents


def consistency_scheduler(teacher_scheduler_config: dict, original_inference_steps: int = 50) -> LCMScheduler:
    """LCMScheduler with the teacher's noise schedule and the 50-step distillation grid (DESIGN.md §3)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas")
    cfg = {k: teacher_scheduler_config[k] for k in keys if k in teacher_scheduler_config}
    return LCMScheduler(
        **cfg,
        original_inference_steps=original_inference_steps,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_scaling=10.0,
    )


def as_student(components: MusicLDMComponents, unet=None) -> MusicLDMComponents:
    """A copy of ``components`` whose scheduler (and optionally UNet) make it a consistency student."""
    return MusicLDMComponents(
        unet=unet if unet is not None else components.unet,
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        vocoder=components.vocoder,
        scheduler=consistency_scheduler(dict(components.scheduler.config)),
        feature_extractor=components.feature_extractor,
        name=components.name,
        path=components.path,
        extra=dict(components.extra),
    )
