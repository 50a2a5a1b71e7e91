"""The demo recipe end to end at toy size: every stage runs, and what it saves loads through the public API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musiccm import model
from musiccm.demo import architecture, recipe
from musiccm.evaluation import classifier
from musiccm.pipeline import GenerationConfig, MusicCM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("demo")
    cmd = [sys.executable, "recipes/demo/train.py", "--work", str(work), "--train-clips", "24", "--heldout-clips",
           "4", "--vae-steps", "3", "--vocoder-steps", "3", "--clap-steps", "3", "--teacher-steps", "3",
           "--classifier-steps", "3", "--teacher-more-steps", "2", "--threads", "1", "--vocoder", "hifigan"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


def test_stages_write_a_musicldm_layout_teacher(work):
    teacher = model.load(str(work / "teacher"))
    assert not teacher.is_consistency and teacher.extra["trained"] is True
    g = teacher.geometry
    assert (g.sample_rate, g.hop_length, g.n_mels, g.vae_factor, g.latent_channels) == (16000, 160, 64, 4, 8)
    assert g.window_frames == architecture.WINDOW_LATENT_FRAMES and abs(g.native_duration - 2.56) < 1e-9
    # the VAE's scaling factor was measured on the data, not copied from MusicLDM
    assert teacher.vae.config.scaling_factor != pytest.approx(1.075324296951294)
    out = MusicCM(teacher, GenerationConfig(steps=2)).generate(["slow piano without drums"], 3.0, [0])
    assert out.waveforms.shape == (1, 48000) and np.isfinite(out.waveforms).all()
    assert json.loads((work / "teacher_recipe.json").read_text())["teacher_steps"] == 3
    assert [p["steps"] for p in teacher.extra["phases"]] == [3, 2]  # trained, then continued once


def test_data_and_classifier_outputs(work):
    import pyarrow.parquet as pq

    train = pq.read_table(work / "data" / "train" / "manifest.parquet")
    assert train.num_rows == 24 and {"uri", "caption", "instrument"} <= set(train.column_names)
    prompts = pq.read_table(work / "data" / "heldout" / "prompts.parquet")
    assert prompts.num_rows == 4 and "prompt" in prompts.column_names
    net = classifier.load(work / "classifier")
    emb, logits = net.wave_features(torch.randn(16000), 16000)
    assert emb.shape == (128,) and set(logits) == {"instrument", "tempo", "mode", "drums"}


def test_rerun_skips_finished_stages(work):
    before = (work / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    r = subprocess.run([sys.executable, "recipes/demo/train.py", "--work", str(work), "--stages", "teacher",
                        "--train-clips", "24", "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "stage skipped" in r.stdout
    assert (work / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before


def test_classifier_rejects_a_directory_that_is_not_one(tmp_path):
    with pytest.raises(ValueError, match="not a label classifier"):
        classifier.load(tmp_path)


def test_presets_and_overrides():
    full, hour = recipe.preset("full"), recipe.preset("hour", teacher_steps=7, seed=None)
    assert full == recipe.RecipeConfig() and full.work == "outputs/demo"
    assert hour.work == "outputs/demo-hour" and hour.teacher_steps == 7 and hour.teacher_more_steps == 0
    assert hour.vae_steps < full.vae_steps and hour.seed == full.seed
    with pytest.raises(ValueError, match="unknown preset 'day'; allowed: \\['full', 'hour'\\]"):
        recipe.preset("day")
