"""Load and save MusicLDM-layout models (diffusers' directory layout, hub id or local directory).

A model directory holds ``model_index.json`` and one sub-folder per component: ``unet``
(UNet2DConditionModel), ``vae`` (AutoencoderKL), ``text_encoder`` (transformers ClapModel),
``tokenizer`` (RobertaTokenizerFast), ``vocoder`` (SpeechT5HifiGan, or the weightless
:class:`musiccm.vocoders.GriffinLimVocoder` when model_index.json names ``["musiccm", "GriffinLimVocoder"]``),
``scheduler`` (DDIMScheduler for a teacher, LCMScheduler for a consistency student) and optionally
``feature_extractor`` (ClapFeatureExtractor). Weights are read with safetensors only: no pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from musiccm import vocoders
from musiccm.geometry import AudioGeometry

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "vocoder", "scheduler")
CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "ClapModel"),
    "tokenizer": ("transformers", "RobertaTokenizerFast"),
    "vocoder": ("transformers", "SpeechT5HifiGan"),
    "feature_extractor": ("transformers", "ClapFeatureExtractor"),
}
CONSISTENCY_SCHEDULERS = ("LCMScheduler",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model path or directory that cannot be used, with the reason."""


@dataclass
class MusicLDMComponents:
    """The parts of a MusicLDM-layout model, loaded once and shared by sampling and distillation."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    vocoder: Any
    scheduler: Any
    feature_extractor: Any = None
    name: str = "unnamed"
    path: str | None = None
    extra: dict = field(default_factory=dict)  # model_index.json's "musiccm" section, if any

    @property
    def geometry(self) -> AudioGeometry:
        """Audio/latent geometry from the unet, vae and vocoder configs."""
        return AudioGeometry.from_configs(
            dict(self.unet.config), dict(self.vae.config), self.vocoder.config.to_dict()
        )

    @property
    def is_consistency(self) -> bool:
        """True for a distilled student (its scheduler is a consistency scheduler)."""
        return type(self.scheduler).__name__ in CONSISTENCY_SCHEDULERS

    @property
    def has_guidance_embedding(self) -> bool:
        """True when the UNet takes a guidance-scale embedding (``time_cond_proj_dim``)."""
        return self.unet.config.get("time_cond_proj_dim") is not None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> MusicLDMComponents:
        """Move every torch module to ``device``."""
        for module in (self.unet, self.vae, self.text_encoder, self.vocoder):
            module.to(device)
        return self


def resolve(path_or_id: str, local_files_only: bool = False, cache_dir: str | None = None) -> str:
    """Return a local directory for a model directory, an ``s3://`` prefix or a hub id."""
    if path_or_id.startswith("s3://"):
        from musiccm import storage

        digest = hashlib.sha256(path_or_id.encode()).hexdigest()[:16]
        root = Path(cache_dir or Path.home() / ".cache" / "musiccm" / "models") / digest
        if not (root / "model_index.json").exists():
            # Download beside the cache entry, then rename: a concurrent reader never sees half a model.
            root.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)  # a partial entry from an older, non-atomic download
            tmp = tempfile.mkdtemp(prefix=f".{digest}.tmp-", dir=root.parent)
            try:
                storage.download_dir(path_or_id, tmp)
                try:
                    os.rename(tmp, root)
                except OSError:  # another process finished first
                    if not (root / "model_index.json").exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return _check_layout(str(root), path_or_id)
    local = os.path.expanduser(path_or_id)
    if os.path.exists(local) or not _HUB_ID.match(path_or_id) or path_or_id.startswith("."):
        if not os.path.isdir(local):
            raise ModelError(f"model path {path_or_id!r} does not exist or is not a directory")
        return _check_layout(local, path_or_id)
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            path_or_id,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    except Exception as exc:
        where = "the local hub cache" if local_files_only else "the hub"
        raise ModelError(
            f"could not get model {path_or_id!r} from {where}: {type(exc).__name__}: {exc}. "
            "Pass a local MusicLDM-layout directory, or run where the hub is reachable."
        ) from None
    return _check_layout(local, path_or_id)


def _check_layout(directory: str, name: str) -> str:
    if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ModelError(f"model {name!r} has no model_index.json (not a MusicLDM-layout directory)")
    missing = [c for c in REQUIRED if not os.path.isdir(os.path.join(directory, c))]
    if missing:
        raise ModelError(f"model {name!r} lacks component(s) {', '.join(missing)}; need {', '.join(REQUIRED)}")
    return directory


def check_loadable(directory: str, name: str, components: Iterable[str] = REQUIRED) -> None:
    """ModelError unless the model in ``directory`` (local, or an ``s3://`` prefix) would load, without loading it.

    Every config of ``components`` parses, the scheduler class exists, and each weights file is a complete
    safetensors file whose tensors have the names and shapes of the module its config describes (built on the meta
    device, compared with the safetensors headers): the error names the component and the first differences.
    See :mod:`musiccm.model_check`.
    """
    from musiccm import model_check

    model_check.check(directory, name, components)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load(
    path_or_id: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
    cache_dir: str | None = None,
) -> MusicLDMComponents:
    """Load a MusicLDM-layout model with the libraries' own ``from_pretrained`` (safetensors only)."""
    import diffusers
    from diffusers import AutoencoderKL
    from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizerFast, SpeechT5HifiGan

    directory = resolve(path_or_id, local_files_only=local_files_only, cache_dir=cache_dir)
    check_loadable(directory, path_or_id)  # a damaged file is named here, not met as some library's error
    index = json.loads(Path(directory, "model_index.json").read_text())
    sched_cfg = json.loads(Path(directory, "scheduler", "scheduler_config.json").read_text())
    sched_cls = getattr(diffusers, sched_cfg.get("_class_name", ""), None)
    if sched_cls is None or not hasattr(sched_cls, "from_config"):
        raise ModelError(f"model {path_or_id!r}: unknown scheduler class {sched_cfg.get('_class_name')!r}")
    try:
        unet = _unet(directory, dtype)
        vae = AutoencoderKL.from_pretrained(directory, subfolder="vae", use_safetensors=True)
        vae_dtype = torch.float32 if vae.config.get("force_upcast", False) else dtype
        text_encoder = ClapModel.from_pretrained(directory, subfolder="text_encoder", use_safetensors=True)
        if vocoders.vocoder_class(index.get("vocoder")) == vocoders.CLASS_NAME:  # weightless phase reconstruction
            vocoder = vocoders.GriffinLimVocoder.from_pretrained(directory, subfolder="vocoder")
        else:
            vocoder = SpeechT5HifiGan.from_pretrained(directory, subfolder="vocoder", use_safetensors=True)
        tokenizer = RobertaTokenizerFast.from_pretrained(directory, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {path_or_id!r} could not be loaded: {_one_line(exc)}") from None
    feature_extractor = None
    if os.path.isdir(os.path.join(directory, "feature_extractor")):
        feature_extractor = ClapFeatureExtractor.from_pretrained(directory, subfolder="feature_extractor")
    components = MusicLDMComponents(
        unet=unet.eval(),
        vae=(vae if vae.dtype == vae_dtype else vae.to(vae_dtype)).eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        vocoder=vocoder.eval(),
        scheduler=sched_cls.from_config(sched_cfg),
        feature_extractor=feature_extractor,
        name=path_or_id,
        path=directory,
        extra=index.get("musiccm", {}),
    )
    for module in (unet, vae, text_encoder, vocoder):
        module.requires_grad_(False)
    return components.to(device)


def unet_differences(config: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """How a UNet config's architecture differs from ``reference`` ("" when it does not), ignoring bookkeeping
    keys (``_name_or_path``...) and the optional guidance embedding (``time_cond_proj_dim``)."""

    def arch(c: Mapping[str, Any]) -> dict[str, Any]:
        plain = json.loads(json.dumps(dict(c), default=str))  # tuples (a built model) == lists (a loaded one)
        return {k: v for k, v in plain.items() if not k.startswith("_") and k != "time_cond_proj_dim"}

    ours, theirs = arch(config), arch(reference)
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    return "; ".join(f"{k} = {ours.get(k)!r} (reference {theirs.get(k)!r})" for k in keys)


def _unet(directory: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(directory, subfolder="unet", torch_dtype=dtype, use_safetensors=True)


def load_unet(
    path_or_id: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
    cache_dir: str | None = None,
) -> torch.nn.Module:
    """Only the UNet of a MusicLDM-layout model (safetensors), frozen, in eval mode: e.g. a student's start."""
    directory = resolve(path_or_id, local_files_only=local_files_only, cache_dir=cache_dir)
    check_loadable(directory, path_or_id, components=("unet",))
    try:
        unet = _unet(directory, dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model {path_or_id!r}: its UNet could not be loaded: {_one_line(exc)}") from None
    return unet.eval().requires_grad_(False).to(device)


def save(components: MusicLDMComponents, directory: str | os.PathLike, extra: dict | None = None) -> str:
    """Save in the MusicLDM layout (atomically: a temporary sibling directory, then a rename)."""
    import diffusers

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        components.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        components.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        components.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        components.vocoder.save_pretrained(tmp / "vocoder", safe_serialization=True)
        components.tokenizer.save_pretrained(tmp / "tokenizer")
        components.scheduler.save_pretrained(tmp / "scheduler")
        index: dict[str, Any] = {"_class_name": "MusicLDMPipeline", "_diffusers_version": diffusers.__version__}
        for name, lib_cls in CLASSES.items():
            if name == "feature_extractor" and components.feature_extractor is None:
                continue
            index[name] = list(lib_cls)
        index["scheduler"] = ["diffusers", type(components.scheduler).__name__]
        if isinstance(components.vocoder, vocoders.GriffinLimVocoder):
            index["vocoder"] = ["musiccm", vocoders.CLASS_NAME]
        if components.feature_extractor is not None:
            components.feature_extractor.save_pretrained(tmp / "feature_extractor")
        musiccm_extra = {**components.extra, **(extra or {})}
        if musiccm_extra:
            index["musiccm"] = musiccm_extra
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def content_hash(directory: str | os.PathLike) -> str:
    """sha256 over every file of a model directory (relative path and bytes), first 16 hex digits."""
    outer = hashlib.sha256()
    root = Path(directory)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{path.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()[:16]
