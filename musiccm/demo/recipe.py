"""The demo recipe, stage by stage: synthetic data → tokenizer, VAE, vocoder, CLAP, teacher → MusicLDM layout.

Every stage writes its result under ``work`` and is skipped when that result exists, so an interrupted run
continues where it stopped. Distillation is not here: it is ``ray_jobs/distill.py`` itself, run by
``recipes/demo/train.py`` on the teacher this module assembles.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from musiccm import model, synthetic
from musiccm.demo import architecture
from musiccm.demo.data import DemoData, load
from musiccm.vocoders import GriffinLimVocoder

log = logging.getLogger(__name__)
# The trained CLAP's audio embeddings of the training clips, saved by the parts stage for the teacher stages.
AUDIO_EMBEDDINGS = "clap_audio_embeddings.safetensors"
WINDOW_SECONDS = architecture.WINDOW_LATENT_FRAMES * 4 * 160 / architecture.SAMPLE_RATE  # 2.56


@dataclass(frozen=True)
class RecipeConfig:
    """Sizes and steps of one demo run (the defaults are the "full" preset's; "hour" made the shipped model)."""

    work: str = "outputs/demo"
    train_clips: int = 6000
    heldout_clips: int = 256
    data_seed: int = 0
    heldout_seed: int = 1
    vae_steps: int = 1500
    # "griffinlim": the weightless phase-reconstruction vocoder (musiccm/vocoders.py); "hifigan": train a small
    # SpeechT5HifiGan for vocoder_steps. At this budget Griffin-Lim reconstructs the mels far better
    # (benchmarks/vocoder_probe.py), so the demo ships it.
    vocoder: str = "griffinlim"
    vocoder_steps: int = 2500
    clap_steps: int = 1200
    # Steps of text-tower-only training on the captions' labels before CLAP's joint phase (0 = none, as in the
    # full preset); see musiccm/demo/train_clap.py's warm_up_text.
    clap_text_warmup_steps: int = 0
    teacher_steps: int = 5000
    teacher_lr: float = 3e-4
    # Min-SNR-γ loss weighting of the teacher (0 = plain ε-MSE, as in the full preset) and the
    # rate of its EMA weights; the "hour" preset's faster schedule (higher lr, γ = 5, shorter EMA) was chosen
    # by benchmarks/teacher_probe.py (recipes/demo/README.md).
    teacher_snr_gamma: float = 0.0
    teacher_ema_rate: float = 0.999
    # A second phase continuing the saved teacher (EMA weights) with a fresh warm-up + cosine schedule at
    # teacher_more_lr: how the full preset's teacher was made (5,000 steps looked undertrained in a quality probe).
    teacher_more_steps: int = 8000
    teacher_more_lr: float = 2e-4
    classifier_steps: int = 1500
    seed: int = 0

    @property
    def root(self) -> Path:
        return Path(self.work)

    def __post_init__(self) -> None:
        if self.vocoder not in ("griffinlim", "hifigan"):
            raise ValueError(f"vocoder must be 'griffinlim' or 'hifigan', got {self.vocoder!r}")
        if self.teacher_snr_gamma < 0:
            raise ValueError(f"teacher_snr_gamma must be ≥ 0 (0 = off), got {self.teacher_snr_gamma}")
        if not 0 <= self.teacher_ema_rate < 1:
            raise ValueError(f"teacher_ema_rate must be in [0, 1), got {self.teacher_ema_rate}")
        if self.clap_text_warmup_steps < 0:
            raise ValueError(f"clap_text_warmup_steps must be ≥ 0 (0 = none), got {self.clap_text_warmup_steps}")

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage_data(cfg: RecipeConfig) -> None:
    """Render the training clips and the held-out reference clips (2.56 s each) with their manifests."""
    for name, count, seed in (("train", cfg.train_clips, cfg.data_seed), ("heldout", cfg.heldout_clips,
                                                                           cfg.heldout_seed)):
        manifest = cfg.path("data", name, "manifest.parquet")
        if manifest.exists():
            continue
        start = time.perf_counter()
        synthetic.write_dataset(cfg.path("data", name), count, seed=seed, seconds=WINDOW_SECONDS)
        log.info("data: %d %s clips in %.0f s", count, name, time.perf_counter() - start)
    prompts = cfg.path("data", "heldout", "prompts.parquet")
    if not prompts.exists():
        synthetic.write_prompts(prompts, cfg.heldout_clips, seed=cfg.heldout_seed)


def train_data(cfg: RecipeConfig) -> DemoData:
    """The training clips in memory (waveforms, mels, captions, labels)."""
    n = round(WINDOW_SECONDS * architecture.SAMPLE_RATE)
    return load(str(cfg.path("data", "train", "manifest.parquet")), n, seed=cfg.seed)


def _done(path: Path) -> bool:
    if path.exists():
        log.info("%s exists: stage skipped", path)
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    return False


def stage_parts(cfg: RecipeConfig, data: DemoData, device: str = "cpu") -> None:
    """Tokenizer, VAE, (HiFi-GAN) vocoder and CLAP, each saved with its library's ``save_pretrained``."""
    from musiccm.demo.train_autoencoders import train_vae, train_vocoder
    from musiccm.demo.train_clap import train_clap

    parts = cfg.path("parts")
    if not _done(parts / "tokenizer"):
        architecture.train_tokenizer(data.captions, parts / "tokenizer")
    if not _done(parts / "vae"):
        train_vae(data, cfg.vae_steps, seed=cfg.seed, device=device).save_pretrained(parts / "vae",
                                                                                      safe_serialization=True)
    if cfg.vocoder == "hifigan" and not _done(parts / "vocoder"):
        train_vocoder(data, cfg.vocoder_steps, seed=cfg.seed, device=device).save_pretrained(
            parts / "vocoder", safe_serialization=True)
    if not _done(parts / "text_encoder"):
        from transformers import RobertaTokenizerFast

        tokenizer = RobertaTokenizerFast.from_pretrained(parts / "tokenizer")
        clap, fe, audio = train_clap(data, tokenizer, cfg.clap_steps, seed=cfg.seed, device=device,
                                     text_warmup_steps=cfg.clap_text_warmup_steps)
        clap.save_pretrained(parts / "text_encoder", safe_serialization=True)
        fe.save_pretrained(parts / "feature_extractor")
        save_audio_embeddings(parts / AUDIO_EMBEDDINGS, audio, data)


def _waves_digest(data: DemoData) -> str:
    return hashlib.sha256(data.waves.contiguous().numpy().tobytes()).hexdigest()


def save_audio_embeddings(path: Path, audio: torch.Tensor, data: DemoData) -> None:
    """Save the CLAP audio embeddings of ``data``'s clips, keyed by a digest of the exact waveforms."""
    from safetensors.torch import save_file

    meta = {"clips": str(len(data)), "waves_sha256": _waves_digest(data)}
    save_file({"audio": audio.contiguous()}, path, metadata=meta)


def load_audio_embeddings(path: Path, data: DemoData) -> torch.Tensor | None:
    """The embeddings `save_audio_embeddings` saved, or None when absent or made from other clips."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(path, framework="pt") as f:
        if (f.metadata() or {}).get("waves_sha256") != _waves_digest(data):
            log.warning("%s was computed from other clips: recomputing the CLAP audio embeddings", path)
            return None
        log.info("CLAP audio embeddings of the training clips from %s", path)
        return f.get_tensor("audio")


def frozen_parts(cfg: RecipeConfig, unet=None) -> model.MusicLDMComponents:
    """The trained parts as components (the UNet: ``unet`` or a fresh one of the demo architecture)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ClapFeatureExtractor, ClapModel, RobertaTokenizerFast, SpeechT5HifiGan

    parts = cfg.path("parts")
    vocoder = (SpeechT5HifiGan.from_pretrained(parts / "vocoder").eval() if cfg.vocoder == "hifigan"
               else GriffinLimVocoder())
    return model.MusicLDMComponents(
        unet=unet if unet is not None else UNet2DConditionModel(**architecture.unet_config()).eval(),
        vae=AutoencoderKL.from_pretrained(parts / "vae").eval(),
        text_encoder=ClapModel.from_pretrained(parts / "text_encoder").eval(),
        tokenizer=RobertaTokenizerFast.from_pretrained(parts / "tokenizer"),
        vocoder=vocoder,
        scheduler=architecture.scheduler(),
        feature_extractor=ClapFeatureExtractor.from_pretrained(parts / "feature_extractor"),
        name="musiccm-demo-teacher",
    )


def _conditions(cfg: RecipeConfig, c: model.MusicLDMComponents, data: DemoData):
    """The teacher's CLAP conditions of ``data`` (train_teacher.condition_embeddings), reusing the saved audio ones."""
    from musiccm.demo.train_teacher import condition_embeddings

    audio = load_audio_embeddings(cfg.path("parts", AUDIO_EMBEDDINGS), data)
    return condition_embeddings(c, data.captions, data.waves, audio=audio)


def _teacher_training(cfg: RecipeConfig) -> dict:
    """train_teacher's loss weighting and EMA rate from the recipe (both teacher phases use them)."""
    return {"snr_gamma": cfg.teacher_snr_gamma or None, "ema_rate": cfg.teacher_ema_rate}


def stage_teacher(cfg: RecipeConfig, data: DemoData, device: str = "cpu") -> None:
    """Train the teacher UNet on the frozen parts and save the whole teacher in the MusicLDM layout."""
    from musiccm.demo.train_teacher import encode_latents, train_teacher

    target = cfg.path("teacher")
    if _done(target / "model_index.json"):
        return
    c = frozen_parts(cfg).to(device)
    latents = encode_latents(c.vae, data.mels)
    log.info("teacher: latents %s, std %.3f", tuple(latents.shape), float(latents.std()))
    text, audio, uncond = _conditions(cfg, c, data)
    sched = c.scheduler
    c.unet = train_teacher(latents, text, audio, uncond, sched.alphas_cumprod, cfg.teacher_steps, lr=cfg.teacher_lr,
                           seed=cfg.seed, device=device, **_teacher_training(cfg))
    c = c.to("cpu")
    info = {"name": "musiccm-demo-teacher", "trained": True, "recipe": cfg.to_dict(),
            "phases": [{"steps": cfg.teacher_steps, "lr": cfg.teacher_lr}],
            "note": "demo teacher trained on synthetic soundfont music (recipes/demo)"}
    model.save(c, target, extra=info)
    (cfg.path("teacher_recipe.json")).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def stage_teacher_more(cfg: RecipeConfig, data: DemoData, device: str = "cpu") -> None:
    """Continue training the saved teacher for ``teacher_more_steps`` (once: recorded in its model_index.json)."""
    from musiccm.demo.train_teacher import encode_latents, train_teacher

    if cfg.teacher_more_steps == 0:
        log.info("teacher_more_steps is 0: stage skipped")
        return
    target = cfg.path("teacher")
    c = model.load(str(target), device=device)
    phases = c.extra.get("phases", [{"steps": cfg.teacher_steps, "lr": cfg.teacher_lr}])
    if len(phases) > 1:
        log.info("teacher already continued (%s): stage skipped", phases)
        return
    latents = encode_latents(c.vae, data.mels)
    text, audio, uncond = _conditions(cfg, c, data)
    c.unet = train_teacher(latents, text, audio, uncond, c.scheduler.alphas_cumprod, cfg.teacher_more_steps,
                           lr=cfg.teacher_more_lr, seed=cfg.seed + 1, init=c.unet, device=device,
                           **_teacher_training(cfg))
    c = c.to("cpu")
    phases = [*phases, {"steps": cfg.teacher_more_steps, "lr": cfg.teacher_more_lr}]
    model.save(c, target, extra={"phases": phases, "recipe": cfg.to_dict()})


def stage_classifier(cfg: RecipeConfig, data: DemoData, device: str = "cpu") -> None:
    """The evaluation classifier (embedding for FD, logits for IS/KL, heads for attribute accuracy)."""
    from musiccm.evaluation import classifier

    target = cfg.path("classifier")
    if _done(target / "model.safetensors"):
        return
    net = classifier.train(data.mels, data.labels, cfg.classifier_steps, seed=cfg.seed, device=device)
    classifier.save(net, target)


# Named sizes for `recipes/demo/train.py --preset`. "hour" made the shipped default model, musiccm-demo-v4: the whole
# recipe with one 300-step distillation ran in 54–91 min measured on 2 cores; hour.sh now distils 750 steps and took
# 30 min end to end on 2026-12-02 with the distillation job's report fix, on a day the 2-core machine ran about 3
# times faster than for an earlier 119-min timing (recipes/demo/README.md). It has a faster teacher schedule and a
# CLAP whose text tower first learns the captions' labels alone
# (without that warm-up, 500 CLAP steps left the captions' embeddings barely separated by instrument and the
# teacher followed its prompts weakly). "full" made the
# first default, musiccm-demo-v1 (≈ 2.4 h of training on 2 cores, then ≈ 36 min per distillation).
# recipes/demo/README.md has both runs' stage times and figures.
PRESETS = {
    "full": RecipeConfig(),
    "hour": RecipeConfig(work="outputs/demo-hour", vae_steps=600, clap_steps=500, clap_text_warmup_steps=1500,
                         teacher_steps=3500, teacher_lr=1e-3, teacher_snr_gamma=5.0, teacher_ema_rate=0.998,
                         teacher_more_steps=0, classifier_steps=500),
}


def preset(name: str, **overrides) -> RecipeConfig:
    """The named preset with the given fields replaced (``None`` values keep the preset's)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {list(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


STAGES = {"data": None, "parts": stage_parts, "teacher": stage_teacher, "teacher_more": stage_teacher_more,
          "classifier": stage_classifier}


def resolve_device(name: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; an explicit CUDA device must exist."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use --device cpu (or auto)")
    return name


def run(cfg: RecipeConfig, stages: tuple[str, ...] = tuple(STAGES), device: str = "cpu") -> None:
    """Run the named stages in order (``data`` first if asked; the others load the training set once).

    ``device``: where the training stages run (``auto``, ``cpu``, ``cuda``, ``cuda:N``); data rendering and
    everything saved stay on the CPU.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; allowed: {list(STAGES)}")
    device = resolve_device(device)
    torch.manual_seed(cfg.seed)
    if "data" in stages:
        stage_data(cfg)
    rest = [s for s in stages if s != "data"]
    if rest:
        data = train_data(cfg)
        log.info("loaded %d training clips", len(data))
        for name in rest:
            start = time.perf_counter()
            STAGES[name](cfg, data, device)
            log.info("stage %s done in %.0f s on %s", name, time.perf_counter() - start, device)
