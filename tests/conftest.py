"""Shared fixtures: tiny seeded MusicLDM-layout models built in code and saved in the real layout."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test touches the network
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA; skip `slow` ones only when SKIP_SLOW=1."""
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_slow = pytest.mark.skip(reason="SKIP_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("SKIP_SLOW") == "1":
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_teacher():
    """Tiny teacher components (DDIM scheduler), seeded."""
    from musiccm.build import build_components

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return build_components("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_teacher, tmp_path_factory):
    """The tiny teacher saved in the MusicLDM layout."""
    from musiccm import model

    return model.save(tiny_teacher, tmp_path_factory.mktemp("models") / "tiny-teacher")


@pytest.fixture(scope="session")
def tiny_student_dir(tiny_teacher, tmp_path_factory):
    """A tiny consistency student (LCMScheduler) saved in the MusicLDM layout."""
    from musiccm import model
    from musiccm.student import as_student

    return model.save(as_student(tiny_teacher), tmp_path_factory.mktemp("models") / "tiny-student")


@pytest.fixture(scope="session")
def untrained_student_dir(tmp_path_factory):
    """A tiny consistency student with random weights that says so (model_index.json: trained false)."""
    from musiccm import model
    from musiccm.build import build_components
    from musiccm.student import as_student

    info = {"name": "musiccm-untrained-tiny", "trained": False, "note": "random weights; makes noise"}
    return model.save(as_student(build_components("tiny", seed=0)), tmp_path_factory.mktemp("models") / "untrained",
                      extra=info)
