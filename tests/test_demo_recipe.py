"""The demo recipe end to end at toy size: every stage runs, and what it saves loads through the public API."""

from __future__ import annotations

import json
import re
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
           "--classifier-steps", "3", "--teacher-more-steps", "2", "--threads", "1", "--vocoder", "hifigan",
           "--teacher-snr-gamma", "5", "--teacher-ema-rate", "0.99", "--clap-text-warmup-steps", "2"]
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
    saved = json.loads((work / "teacher_recipe.json").read_text())
    assert (saved["teacher_steps"], saved["teacher_snr_gamma"], saved["teacher_ema_rate"]) == (3, 5.0, 0.99)
    assert saved["clap_text_warmup_steps"] == 2
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


def test_parts_stage_saves_the_clap_audio_embeddings_the_teacher_reuses(work, caplog):
    from musiccm import external

    cfg = recipe.RecipeConfig(work=str(work), train_clips=24)
    data = recipe.train_data(cfg)
    path = work / "parts" / recipe.AUDIO_EMBEDDINGS
    saved = recipe.load_audio_embeddings(path, data)
    # what the teacher stage would otherwise compute from the waveforms with the saved CLAP
    audio = external.encode_audio(recipe.frozen_parts(cfg), [w.numpy() for w in data.waves], 16000)
    assert saved is not None and saved.shape == (24, 512)
    torch.testing.assert_close(saved, audio, rtol=1e-4, atol=1e-5)
    other = data.subset(torch.arange(23))  # other clips: not used
    assert recipe.load_audio_embeddings(path, other) is None and "other clips" in caplog.text


def test_classifier_rejects_a_directory_that_is_not_one(tmp_path):
    with pytest.raises(ValueError, match="not a label classifier"):
        classifier.load(tmp_path)


def test_device_choice():
    assert recipe.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert recipe.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        recipe.resolve_device("tpu")
    r = subprocess.run([sys.executable, "recipes/demo/train.py", "--device", "tpu", "--stages", "classifier"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "device must be" in r.stderr
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU here"):
            recipe.resolve_device("cuda")


@pytest.mark.gpu
def test_toy_recipe_trains_on_the_gpu(tmp_path):
    cmd = [sys.executable, "recipes/demo/train.py", "--work", str(tmp_path), "--train-clips", "24", "--heldout-clips",
           "4", "--vae-steps", "3", "--vocoder-steps", "3", "--clap-steps", "3", "--teacher-steps", "3",
           "--classifier-steps", "3", "--teacher-more-steps", "2", "--vocoder", "hifigan", "--device", "cuda"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("parts", "teacher", "teacher_more", "classifier"):
        assert re.search(rf"stage {stage} done in \d+ s on cuda", r.stdout), stage
    teacher = model.load(str(tmp_path / "teacher"))  # saved from the GPU, loads on the CPU
    assert [p["steps"] for p in teacher.extra["phases"]] == [3, 2]
    out = MusicCM(teacher, GenerationConfig(steps=2)).generate(["slow piano without drums"], 2.56, [0])
    assert np.isfinite(out.waveforms).all()
    classifier.load(tmp_path / "classifier")


def test_presets_and_overrides():
    full, hour = recipe.preset("full"), recipe.preset("hour", teacher_steps=7, seed=None)
    assert full == recipe.RecipeConfig() and full.work == "outputs/demo"
    assert hour.work == "outputs/demo-hour" and hour.teacher_steps == 7 and hour.teacher_more_steps == 0
    assert hour.vae_steps < full.vae_steps and hour.seed == full.seed
    assert (full.clap_text_warmup_steps, hour.clap_text_warmup_steps) == (0, 1500)
    with pytest.raises(ValueError, match="unknown preset 'day'; allowed: \\['full', 'hour'\\]"):
        recipe.preset("day")
    with pytest.raises(ValueError, match="teacher_snr_gamma must be ≥ 0"):
        recipe.preset("hour", teacher_snr_gamma=-1.0)
    with pytest.raises(ValueError, match="teacher_ema_rate must be in \\[0, 1\\)"):
        recipe.preset("hour", teacher_ema_rate=1.0)
    with pytest.raises(ValueError, match="clap_text_warmup_steps must be ≥ 0"):
        recipe.preset("hour", clap_text_warmup_steps=-1)


def test_min_snr_weighting_reduces_to_plain_mse_and_changes_training_when_active():
    from musiccm.demo.train_teacher import train_teacher

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 8, architecture.WINDOW_LATENT_FRAMES, 16, generator=g)
    text, uncond = torch.nn.functional.normalize(torch.randn(4, 512, generator=g), dim=1), torch.zeros(512)
    alphas = architecture.scheduler().alphas_cumprod

    def first_weight(**kw):
        unet = train_teacher(latents, text, None, uncond, alphas, 2, batch=2, ema_rate=0.0, **kw)
        return unet.conv_in.weight.detach().clone()

    plain = first_weight()
    assert torch.equal(first_weight(snr_gamma=1e12), plain)  # γ above every SNR: weights all 1
    assert not torch.allclose(first_weight(snr_gamma=0.1), plain)


def test_teacher_probe_reports_attribute_accuracy_and_fd(work):
    heldout = work / "data" / "heldout"
    cmd = [sys.executable, "benchmarks/teacher_probe.py", str(work / "teacher"), "--prompts",
           str(heldout / "prompts.parquet"), "--classifier", str(work / "classifier"), "--limit", "3", "--steps", "2",
           "--batch-size", "2"]
    r = subprocess.run([*cmd, "--reference", str(heldout / "manifest.parquet"), "--spacing", "trailing"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert (row["steps"], row["clips"], row["spacing"]) == (2, 3, "trailing")
    acc = row["accuracy"]
    assert set(acc) == {"instrument", "tempo", "mode", "drums", "mean"}
    assert all(v in {0.0, 33.3, 66.7, 100.0} for k, v in acc.items() if k != "mean")
    assert isinstance(row["fd_cls"], float) and row["fd_cls"] >= 0
    r = subprocess.run([*cmd, "--reference", ""], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "fd_cls" not in json.loads(r.stdout.strip().splitlines()[-1])
    # every call names its reference: the default (outputs/demo/...) exists only where the recipe has run
    r = subprocess.run([*cmd, "--reference", "", "--max-timestep", "599"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "--max-timestep applies to consistency students" in r.stderr
    r = subprocess.run([*cmd, "--reference", str(work / "missing.parquet")], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "missing.parquet: no such file" in r.stderr


def test_text_warmup_trains_only_the_text_tower_to_read_the_labels(tmp_path):
    from transformers import ClapConfig, ClapModel

    from musiccm import synthetic
    from musiccm.demo.train_clap import warm_up_text
    from musiccm.external import _features

    torch.manual_seed(0)
    params, captions = zip(*(synthetic.clip(i, seed=0) for i in range(32)), strict=True)
    labels = {name: torch.tensor([classes.index(getattr(p, name)) for p in params])
              for name, classes in synthetic.CLASSES.items()}
    tokenizer = architecture.train_tokenizer(list(captions), tmp_path / "tokenizer")
    tokens = tokenizer(list(captions), padding="max_length", truncation=True, max_length=architecture.TEXT_MAX_LENGTH,
                       return_tensors="pt")
    clap = ClapModel(ClapConfig(**architecture.clap_config(len(tokenizer))))
    probes = torch.nn.ModuleDict({name: torch.nn.Linear(512, 2 * len(c)) for name, c in synthetic.CLASSES.items()})
    audio_before = [p.detach().clone() for p in clap.audio_model.parameters()]
    text_before = [p.detach().clone() for p in clap.text_model.parameters()]

    def text_loss() -> float:
        with torch.no_grad():
            t = _features(clap.get_text_features(**tokens))
            return sum(torch.nn.functional.cross_entropy(probes[name](t)[:, len(c):], labels[name]).item()
                       for name, c in synthetic.CLASSES.items())

    before = text_loss()
    warm_up_text(clap, probes, tokens, labels, steps=100, batch=16, lr=3e-3, g=torch.Generator().manual_seed(0),
                 device="cpu")
    assert text_loss() < 0.7 * before
    assert all(torch.equal(a, b) for a, b in zip(audio_before, clap.audio_model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(text_before, clap.text_model.parameters(), strict=True))
