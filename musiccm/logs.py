"""Quiet third-party logging in CLIs and Ray actors."""

from __future__ import annotations

import os


def quiet_libraries() -> None:
    """No progress bars or info logs from diffusers/transformers/huggingface_hub (errors still show)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
