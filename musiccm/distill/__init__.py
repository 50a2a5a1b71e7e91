"""Consistency distillation of a MusicLDM teacher into a few-step student (MusicCM §3.1–3.2).

Pure library code (no Ray): ``config`` (the run's frozen config), ``data`` (manifest rows → latents),
``losses`` (solver target, consistency and adversarial losses), ``discriminator`` (frozen feature network +
trainable heads) and ``distiller`` (one training step, checkpoint/restore, export).
"""

from musiccm.distill.config import DistillConfig

__all__ = ["DistillConfig"]
