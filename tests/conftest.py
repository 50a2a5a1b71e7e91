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


@pytest.fixture(scope="session")
def broken_models(tiny_teacher_dir, tmp_path_factory) -> dict[str, str]:
    """Copies of the tiny teacher with damaged weights, each still a complete MusicLDM layout:

    ``unet_shape``: one UNet tensor of another shape; ``unet_missing``: one UNet tensor deleted;
    ``vae_truncated``: the VAE's safetensors cut in half (as by an interrupted copy);
    ``clap_missing``: one CLAP tensor deleted (transformers would load it with that tensor random).
    """
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken-models")
    out = {}
    for name in ("unet_shape", "unet_missing", "vae_truncated", "clap_missing"):
        out[name] = shutil.copytree(tiny_teacher_dir, root / name).as_posix()
    unet = "unet/diffusion_pytorch_model.safetensors"
    tensors = load_file(os.path.join(out["unet_shape"], unet))
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :4].contiguous()  # 8 input channels → 4
    save_file(tensors, os.path.join(out["unet_shape"], unet), metadata={"format": "pt"})
    tensors = load_file(os.path.join(out["unet_missing"], unet))
    del tensors["conv_in.bias"]
    save_file(tensors, os.path.join(out["unet_missing"], unet), metadata={"format": "pt"})
    vae = os.path.join(out["vae_truncated"], "vae", "diffusion_pytorch_model.safetensors")
    with open(vae, "rb") as f:
        data = f.read()
    with open(vae, "wb") as f:
        f.write(data[: len(data) // 2])
    clap = os.path.join(out["clap_missing"], "text_encoder", "model.safetensors")
    tensors = load_file(clap)
    del tensors["text_projection.linear1.weight"]
    save_file(tensors, clap, metadata={"format": "pt"})
    return out


@pytest.fixture
def restartable_s3(tmp_path, monkeypatch):
    """A SeaweedFS server on a fixed port and data directory, so a test can stop it (an outage) and start it
    again with the same objects; buckets `data`, `gen`, `runs`; the AWS environment points at it."""
    from musiccm.testing.seaweed import SeaweedFS, free_ports

    server = SeaweedFS(data_dir=str(tmp_path / "weed"), port=free_ports(1)[0])
    server.start()
    try:
        for bucket in ("data", "gen", "runs"):
            server.make_bucket(bucket)
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server
    finally:
        server.stop()
