"""GPU tier: skipped without CUDA (see conftest). Full-size architecture on the device."""

import numpy as np
import pytest
import torch

from musiccm.build import build_components
from musiccm.pipeline import GenerationConfig, MusicCM
from musiccm.student import as_student

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def full_student():
    c = as_student(build_components("full", seed=0))
    return c.to("cuda")


def test_full_size_on_gpu_lengths_and_cpu_agreement(full_student):
    gen = MusicCM(full_student)
    out = gen.generate(["an epic orchestral score"], 10.24, [0], GenerationConfig(steps=4))
    assert out.waveforms.shape == (1, 163840) and np.isfinite(out.waveforms).all()
    long = gen.generate(["an epic orchestral score"], 61.3, [0], GenerationConfig(steps=2))
    assert long.waveforms.shape == (1, round(61.3 * 16000))


def test_six_hundred_seconds_fit_in_a_few_gb(full_student):
    torch.cuda.reset_peak_memory_stats()
    out = MusicCM(full_student).generate(["ambient drone"], 600.0, [1], GenerationConfig(steps=1))
    assert out.waveforms.shape == (1, 9_600_000)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30
    assert peak_gb < 6.0, f"600 s clip peaked at {peak_gb:.2f} GB"


def test_fp16_unet_matches_fp32_roughly(full_student):
    gen = MusicCM(full_student)
    ref = gen.generate(["jazz"], 2.0, [3], GenerationConfig(steps=1)).waveforms
    full_student.unet.half()
    try:
        half = gen.generate(["jazz"], 2.0, [3], GenerationConfig(steps=1)).waveforms
    finally:
        full_student.unet.float()
    assert np.abs(half - ref).max() <= 0.05 * np.abs(ref).max() + 1e-6
