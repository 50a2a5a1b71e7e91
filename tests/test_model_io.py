"""MusicLDM-layout loading and saving: local directory, hub id (offline cache), diffusers' own classes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
from transformers import ClapModel, SpeechT5HifiGan

from musiccm import model


def test_layout_is_complete_and_pickle_free(tiny_student_dir):
    root = Path(tiny_student_dir)
    index = json.loads((root / "model_index.json").read_text())
    for name in ("unet", "vae", "text_encoder", "tokenizer", "vocoder", "scheduler", "feature_extractor"):
        assert (root / name).is_dir() and name in index
    assert index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert index["text_encoder"] == ["transformers", "ClapModel"]
    assert not [p for p in root.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert len(list(root.rglob("*.safetensors"))) == 4


def test_diffusers_and_transformers_classes_load_it(tiny_student_dir):
    d = tiny_student_dir
    assert UNet2DConditionModel.from_pretrained(d, subfolder="unet").config.in_channels == 8
    assert AutoencoderKL.from_pretrained(d, subfolder="vae").config.latent_channels == 8
    assert ClapModel.from_pretrained(d, subfolder="text_encoder").config.projection_dim == 512
    assert SpeechT5HifiGan.from_pretrained(d, subfolder="vocoder").config.upsample_rates == [5, 4, 2, 2, 2]
    assert LCMScheduler.from_pretrained(d, subfolder="scheduler").config.original_inference_steps == 50


def test_round_trip_preserves_weights(tiny_teacher, tiny_teacher_dir):
    loaded = model.load(tiny_teacher_dir)
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        a, b = getattr(tiny_teacher, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not loaded.is_consistency and loaded.geometry == tiny_teacher.geometry


def test_hub_id_through_the_real_hub_cache(tiny_student_dir, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, offline (local_files_only)."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-musicldm" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_student_dir, snap)
    (cache / "models--acme--tiny-musicldm" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-musicldm" / "refs" / "main").write_text("0" * 40)
    c = model.load("acme/tiny-musicldm", local_files_only=True, cache_dir=str(cache))
    assert c.is_consistency and c.name == "acme/tiny-musicldm"
    with pytest.raises(model.ModelError, match="acme/missing"):
        model.load("acme/missing", local_files_only=True, cache_dir=str(cache))


def test_missing_path_and_missing_components_are_named(tiny_student_dir, tmp_path):
    with pytest.raises(model.ModelError, match="does not exist"):
        model.load(str(tmp_path / "nope"))
    with pytest.raises(model.ModelError, match="model_index.json"):
        model.load(str(tmp_path))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_student_dir, broken)
    shutil.rmtree(broken / "unet")
    shutil.rmtree(broken / "vocoder")
    with pytest.raises(model.ModelError, match="unet, vocoder"):
        model.load(str(broken))


def test_pickled_weights_are_refused(tiny_student_dir, tmp_path):
    """Only safetensors are read: a directory holding only a pickle checkpoint does not load."""
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_student_dir, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({}, bad / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(model.ModelError):
        model.load(str(bad))


def test_content_hash_tracks_bytes(tiny_student_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_student_dir, copy)
    assert model.content_hash(copy) == model.content_hash(tiny_student_dir)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert model.content_hash(copy) != model.content_hash(tiny_student_dir)


def test_save_is_atomic_on_failure(tiny_teacher, tmp_path, monkeypatch):
    target = tmp_path / "m"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tiny_teacher.vocoder), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        model.save(tiny_teacher, target)
    assert list(tmp_path.iterdir()) == []


def test_check_loadable_accepts_every_model_it_can_load(tiny_teacher_dir, tiny_student_dir):
    """Saved teachers and students, and the bundled default (Griffin-Lim vocoder, float16 UNet), pass; only the
    UNet is checked when asked."""
    from musiccm.defaults import DEFAULT_MODEL

    for directory in (tiny_teacher_dir, tiny_student_dir, DEFAULT_MODEL):
        model.check_loadable(directory, directory)
    model.check_loadable(tiny_teacher_dir, "t", components=("unet",))


@pytest.mark.parametrize("broken, needles", [
    ("unet_shape", ("unet", "conv_in.weight", "[32, 4, 3, 3]", "[32, 8, 3, 3]")),
    ("unet_missing", ("unet", "missing", "conv_in.bias")),
    ("vae_truncated", ("vae", "truncated")),
    ("clap_missing", ("text_encoder", "missing", "text_projection.linear1.weight")),
])
def test_check_loadable_and_load_refuse_damaged_weights(broken_models, broken, needles):
    """Weights that do not match their config (a tensor of another shape, a missing tensor) or a truncated file are
    named before any weight is read: by check_loadable, and by load (which would otherwise fail with an unrelated
    error, or, for CLAP, quietly leave the tensor random)."""
    directory = broken_models[broken]
    with pytest.raises(model.ModelError) as info:
        model.check_loadable(directory, "m")
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    with pytest.raises(model.ModelError, match=needles[0]):
        model.load(directory)


def test_check_loadable_names_unexpected_tensors_and_bad_files(tiny_teacher_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    extra = tmp_path / "extra"
    shutil.copytree(tiny_teacher_dir, extra)
    weights = extra / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.extra_layer.weight"] = torch.zeros(3)
    save_file(tensors, weights)
    with pytest.raises(model.ModelError, match=r"vae.*unexpected.*decoder\.extra_layer\.weight"):
        model.check_loadable(str(extra), "m")
    weights.write_bytes(b"\x00" * 5)  # shorter than a header
    with pytest.raises(model.ModelError, match="vae.*truncated"):
        model.check_loadable(str(extra), "m")
    weights.write_bytes((12).to_bytes(8, "little") + b"not json!!!!")
    with pytest.raises(model.ModelError, match="vae.*not a safetensors file"):
        model.check_loadable(str(extra), "m")
    scheduler = extra / "scheduler" / "scheduler_config.json"
    scheduler.write_text('{"_class_name": "NoSuchScheduler"}')
    with pytest.raises(model.ModelError, match="unknown scheduler class 'NoSuchScheduler'"):
        model.check_loadable(str(extra), "m")
    scheduler.write_text("{not json")
    with pytest.raises(model.ModelError, match="scheduler_config.json"):
        model.check_loadable(str(extra), "m")


def test_check_loadable_is_fast(tiny_teacher_dir):
    import time

    model.check_loadable(tiny_teacher_dir, "warm-up")  # the first call imports the model classes
    start = time.perf_counter()
    model.check_loadable(tiny_teacher_dir, "t")
    assert time.perf_counter() - start < 1.0
