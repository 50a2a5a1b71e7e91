"""The embedded default model shipped inside the package (runs offline)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "default")
# `--taper` of `musiccm generate` and ray_jobs/batch_generate.py (musiccm.pipeline.GenerationConfig.taper); here so
# both parsers build without importing torch.
TAPER_HELP = ("crop-fusion cross-fade in latent frames: each window's weight ramps linearly over its first and last N "
              "frames; 0 = the plain average, whose weights jump at window edges (default: the windows' overlap, "
              "window minus hop, at most half the window)")


def default_model_path() -> str:
    """Path of the bundled default model (MusicLDM layout)."""
    return DEFAULT_MODEL
