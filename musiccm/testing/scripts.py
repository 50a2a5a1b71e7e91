"""Repository scripts (``benchmarks/``, ``scripts/``, ``ray_jobs/``) loaded as modules, for tests of their parts."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_script(relative: str) -> ModuleType:
    """The script at ``relative`` (to the repository root) imported as a module named after its file."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unet_state(directory: str | Path) -> dict:
    """The UNet weights of a saved model directory (name → tensor)."""
    from musiccm import model

    return model.load_unet(str(directory)).state_dict()
