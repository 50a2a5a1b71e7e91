"""The embedded default model shipped inside the package (runs offline)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).parent / "assets" / "default")


def default_model_path() -> str:
    """Path of the bundled default model (MusicLDM layout)."""
    return DEFAULT_MODEL
