"""The one frozen config of a distillation run (STYLE.md §5), saved in every checkpoint and export.

Guidance convention: ``w`` is LCM's / MusicCM's guidance weight (MusicCM eq. 5–6,
x̂ = x + (1+w)·Ψ(x, c) − w·Ψ(x, ∅)). The diffusers ``guidance_scale`` equals ``w + 1``: the default
w = 2.0 is diffusers guidance_scale 3.0; MusicLDM's own default guidance_scale 2.0 is w = 1.0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from musiccm import storage
from musiccm.defaults import DEFAULT_MODEL
from musiccm.retry import DEFAULT_BUDGET_S, MAX_BUDGET_S
from musiccm.schedule import lcm_timesteps

LOSS_TYPES = ("huber", "l2")
FEATURE_NETWORKS = ("audiomae", "clap")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
GUIDANCE_EMBEDDING_DIM = 256  # LCM's w-embedding width (diffusers train_lcm_distill_sd_wds.py)
# Upper bounds, so that a typo fails validation instead of allocating a machine away on every worker.
MAX_CROP_SECONDS = 120.0  # twelve of MusicLDM's 10.24 s windows
MAX_COUNT = 10**9  # steps and step intervals
MAX_BATCH = 4096
MAX_WORKERS = 100_000


@dataclass(frozen=True)
class DistillConfig:
    """Everything a consistency-distillation run needs; JSON-able via :meth:`to_dict` / :meth:`from_dict`."""

    # --- where things are
    teacher: str = DEFAULT_MODEL  # local MusicLDM-layout dir, s3:// prefix or hub id
    # A model whose UNet (same architecture as the teacher's) starts the student instead of the teacher's own,
    # e.g. an exported student fine-tuned further with L_adv; None = the teacher. A resumed run ignores it.
    student_init: str | None = None
    train_manifest: str = ""  # Parquet with `uri` (string) or `audio` (binary), optional `caption`
    name: str = "musiccm-distill"
    storage: str | None = None  # run storage root (local dir or s3://); None = local default
    output: str | None = None  # export directory; None = under the run
    # --- scale
    num_workers: int = 1
    use_gpu: bool = False
    max_steps: int = 1000
    batch_size: int = 4  # per worker
    # --- optimisation
    lr: float = 1e-5  # student AdamW lr (MusicCM / LCM)
    # Discriminator heads are small, new (random init) and must become informative while the student
    # only fine-tunes from a good init: a 10× larger lr (two-time-scale update rule, Heusel et al. 2017;
    # SAGAN uses 4×) lets them keep up; the hinge loss and R1 keep them from running away.
    disc_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"; only used on GPU
    gradient_checkpointing: bool = False
    lora_rank: int = 0  # 0 = full fine-tuning; > 0 = LCM-LoRA style adapters on the student UNet
    # --- consistency distillation (DESIGN.md §3)
    num_ddim_timesteps: int = 50
    k_skip: int = 1  # AudioLCM multi-step solver: t_n = t_{n+k} − 20·k
    # Highest t_{n+k} the solver samples (None = the whole grid, up to 999): a student that will only ever be
    # sampled from t ≤ T (GenerationConfig.max_timestep) spends no training on the noisiest, hardest part.
    max_train_timestep: int | None = None
    w: float = 2.0  # LCM convention; diffusers guidance_scale = w + 1 = 3.0
    w_min: float | None = None  # [w_min, w_max] ⇒ student gets a guidance embedding (time_cond_proj_dim=256)
    w_max: float | None = None
    ema_rate: float = 0.95
    loss_type: str = "huber"
    huber_c: float = 0.001
    distill_weight: float = 3.0  # λ in MusicCM eq. 9: L = L_adv^G + λ·L_distil
    # --- adversarial term (MusicCM eq. 7–8)
    adv_weight: float = 1.0  # 0 = the "w/o L_adv" ablation (no discriminator is built)
    feature_network: str = "audiomae"  # "audiomae" (ViT-B) | "clap" (teacher's CLAP audio tower)
    audiomae_path: str | None = None  # local .safetensors with AudioMAE weights; None = random init (warned)
    # R1 on the heads' input features (StyleGAN-T / ADD): the features are LayerNorm-scaled, so their
    # gradients are O(1) and γ = 1 (StyleGAN2's low-resolution setting) regularises without dominating.
    r1_gamma: float = 1.0
    # 0-based feature-network blocks the heads read: the 3rd, 6th, 9th and 12th of ViT-B's 12 (evenly spaced,
    # last included). The tiny test ViT also has 12 blocks; for feature_network="clap" the indices count the
    # HTSAT Swin blocks across stages (12 for HTSAT-base, 4 for the tiny test CLAP: use e.g. (1, 3)).
    disc_layers: tuple[int, ...] = (2, 5, 8, 11)
    # Timesteps at which L_adv judges the student's one-jump x0 estimate, drawn per clip (ADD judges the
    # student at its sampling steps): e.g. 699 (a 1-step student). Empty = the consistency interval's t_{n+k},
    # the same estimate L_distil uses (no extra UNet call).
    adv_timesteps: tuple[int, ...] = ()
    # --- distribution matching (DMD, Yin et al. 2024; DMD2): the 1-step jump's outputs are pushed from where a
    # "fake" score model (a copy of the teacher's UNet trained on the student's own outputs) would denoise them
    # towards where the teacher with CFG 1 + w would. It targets the 1-step quality a consistency regression
    # settles short of; L_distil then keeps the later sampling steps consistent. Costs a trainable UNet copy
    # (+ AdamW state) and fake_updates + 3 UNet calls per step.
    dmd_weight: float = 0.0  # 0 = off (no fake score is built)
    # The generator's timestep: the student's jump from pure noise at its 1-step sampling timestep. None = the
    # LCM 1-step timestep of the solver grid cut at max_train_timestep (699 for max_train_timestep=699, else 999).
    dmd_timestep: int | None = None
    dmd_min_t: int = 20  # timesteps the generated clips are noised to for matching (DMD2: 2 %..98 % of T)
    dmd_max_t: int = 980
    # The teacher's guidance scale as the real score (diffusers' convention, 1 + w). None = each clip's 1 + w, the
    # guidance the student is distilled for. DMD2 tunes it apart (SD 1.5: 1.75, SDXL: 8): the student's 1-step
    # samples then match the teacher's distribution at that scale.
    dmd_guidance: float | None = None
    fake_lr: float = 1e-4  # the fake score's AdamW lr (DMD2: a faster critic)
    fake_updates: int = 4  # fake-score updates per student step (DMD2's two time-scale rule uses 5)
    # DMD2's GAN term (Yin et al. 2024b, §4.3): a small classifier on the fake score's bottleneck (mid-block)
    # features, trained with the fake score to tell noised training clips from noised 1-step samples, and a
    # non-saturating generator loss on the student's 1-step samples. It gives the student real data to learn from,
    # beyond the teacher's scores. Needs dmd_weight > 0; costs one more fake-score call (forward + backward through
    # its activations) per student step, and doubles the fake-score updates' batch (real clips beside generated).
    gan_weight: float = 0.0  # generator weight; 0 = off (DMD2: 3e-3 ImageNet, 5e-3 SDXL)
    gan_cls_weight: float = 1e-2  # the classifier's loss weight in the fake-score updates (DMD2: 1e-2)
    crop_seconds: float | None = None  # None = the teacher's native window
    # Per-worker memory (MiB) for the latents of clips no longer than the window (never cropped, so the same
    # every epoch); 0 = encode every clip every time. Results are unchanged: it only skips repeated VAE encodes.
    latent_cache_mb: int = 1024
    # --- bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # Seconds between metric reports to Ray Train (ray.train.report) outside checkpoints and validation. Train
    # V2 blocks a report until its controller polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
    # default), so a report every step held fast steps to one per poll. Every step's metrics still go to
    # {run}/metrics. 0 = report every step.
    report_every_s: float = 10.0
    validate_every: int = 500
    validation_prompts: tuple[str, ...] = (
        "upbeat electronic dance music with a driving bass line",
        "calm solo piano, slow and melancholic",
        "energetic rock song with distorted guitars and drums",
        "jazz trio with walking bass, brushed drums and piano",
    )
    validation_steps: tuple[int, ...] = (1, 2, 4)
    max_failures: int = 0
    # How long each storage call (checkpoints, metrics, validation audio, training data, the manifest) rides out
    # an outage with jittered exponential back-off before it fails (musiccm.retry); 0 = no retries.
    storage_retry_s: float = DEFAULT_BUDGET_S
    seed: int = 0
    tiny_feature_network: bool = False  # tests: a small random ViT with the same interface as ViT-B

    def __post_init__(self) -> None:
        # Sequences from argparse (nargs) or JSON arrive as lists: store them as tuples (hashable, frozen).
        for name in ("disc_layers", "adv_timesteps", "validation_prompts", "validation_steps"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    # ------------------------------------------------------------------ helpers
    @property
    def has_w_range(self) -> bool:
        """True when w is sampled from [w_min, w_max] and the student embeds it."""
        return self.w_min is not None and self.w_max is not None

    @property
    def generator_timestep(self) -> int:
        """The timestep of the DMD generator's jump (see ``dmd_timestep``)."""
        if self.dmd_timestep is not None:
            return self.dmd_timestep
        return lcm_timesteps(1, 1000, self.num_ddim_timesteps, self.max_train_timestep)[0]

    @property
    def guidance_scale(self) -> float:
        """The fixed ``w`` in diffusers' convention (w + 1)."""
        return self.w + 1.0

    def replace(self, **changes: Any) -> DistillConfig:
        """A copy with ``changes`` applied (validated)."""
        out = dataclasses.replace(self, **changes)
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``; the result is validated."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown DistillConfig keys {unknown}; allowed keys: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and the allowed values."""

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        def finite(x: Any) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(isinstance(self.teacher, str) and bool(self.teacher), "teacher", "a non-empty model path or hub id")
        for name in ("teacher", "student_init", "train_manifest", "storage", "output", "audiomae_path"):
            if isinstance(getattr(self, name), str):
                storage.check_uri(getattr(self, name))
        need(self.student_init is None or (isinstance(self.student_init, str) and bool(self.student_init)),
             "student_init", "None (the teacher's UNet) or a non-empty model path or hub id")
        need(isinstance(self.train_manifest, str), "train_manifest", "a path or s3:// uri string")
        need(isinstance(self.name, str) and bool(self.name) and "/" not in self.name and ".." not in self.name,
             "name", "a non-empty run name without '/' or '..'")
        need(integer(self.num_workers) and 1 <= self.num_workers <= MAX_WORKERS, "num_workers",
             f"an integer in 1..{MAX_WORKERS}")
        need(integer(self.max_steps) and 1 <= self.max_steps <= MAX_COUNT, "max_steps", f"an integer in 1..{MAX_COUNT}")
        need(integer(self.batch_size) and 1 <= self.batch_size <= MAX_BATCH, "batch_size",
             f"an integer in 1..{MAX_BATCH} (per worker)")
        need(finite(self.lr) and 0 < self.lr <= 1, "lr", "a float in (0, 1]")
        need(finite(self.disc_lr) and 0 < self.disc_lr <= 1, "disc_lr", "a float in (0, 1]")
        need(finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a float >= 0")
        need(integer(self.warmup_steps) and 0 <= self.warmup_steps <= MAX_COUNT, "warmup_steps",
             f"an integer in 0..{MAX_COUNT}")
        need(finite(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm", "a float >= 0 (0 = off)")
        need(self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", f"one of {MIXED_PRECISIONS}")
        need(integer(self.lora_rank) and 0 <= self.lora_rank <= MAX_BATCH, "lora_rank",
             f"an integer in 0..{MAX_BATCH} (0 = full fine-tuning)")
        need(integer(self.num_ddim_timesteps) and 1 <= self.num_ddim_timesteps <= 1000 and
             1000 % self.num_ddim_timesteps == 0, "num_ddim_timesteps", "an integer in 1..1000 that divides 1000")
        need(integer(self.k_skip) and 1 <= self.k_skip < self.num_ddim_timesteps, "k_skip",
             f"an integer in 1..{self.num_ddim_timesteps - 1}")
        first = 1000 // self.num_ddim_timesteps - 1
        need(self.max_train_timestep is None or (integer(self.max_train_timestep) and
             first <= self.max_train_timestep <= 999), "max_train_timestep",
             f"None (the whole grid) or an integer in {first}..999 (the solver grid starts at t = {first})")
        need(finite(self.w) and self.w >= 0, "w", "a float >= 0 (LCM convention; diffusers guidance_scale = w + 1)")
        need((self.w_min is None) == (self.w_max is None), "w_min", "set both w_min and w_max, or neither")
        if self.has_w_range:
            need(finite(self.w_min) and self.w_min >= 0, "w_min", "a float >= 0")
            need(finite(self.w_max) and self.w_max >= self.w_min, "w_max", f"a float >= w_min={self.w_min}")
        need(finite(self.ema_rate) and 0 <= self.ema_rate < 1, "ema_rate", "a float in [0, 1)")
        need(self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}")
        need(finite(self.huber_c) and self.huber_c > 0, "huber_c", "a float > 0")
        need(finite(self.distill_weight) and self.distill_weight >= 0, "distill_weight", "a float >= 0")
        need(all(integer(t) and 0 <= t <= 999 for t in self.adv_timesteps), "adv_timesteps",
             "integers in 0..999 (empty = the consistency interval's t_{n+k})")
        need(finite(self.adv_weight) and self.adv_weight >= 0, "adv_weight", "a float >= 0 (0 = w/o L_adv)")
        need(not self.adv_timesteps or self.adv_weight > 0, "adv_timesteps",
             "empty when adv_weight is 0 (there is no adversarial term to judge at them)")
        need(finite(self.dmd_weight) and self.dmd_weight >= 0, "dmd_weight", "a float >= 0 (0 = off)")
        need(self.distill_weight > 0 or self.adv_weight > 0 or self.dmd_weight > 0, "distill_weight",
             "> 0, or adv_weight or dmd_weight > 0 (at least one loss term)")
        need(self.dmd_timestep is None or (integer(self.dmd_timestep) and 0 <= self.dmd_timestep <= 999),
             "dmd_timestep", "None (the 1-step sampling timestep) or an integer in 0..999")
        need(integer(self.dmd_min_t) and 0 <= self.dmd_min_t <= 999, "dmd_min_t", "an integer in 0..999")
        need(integer(self.dmd_max_t) and self.dmd_min_t <= self.dmd_max_t <= 999, "dmd_max_t",
             f"an integer in {self.dmd_min_t}..999 (>= dmd_min_t)")
        need(self.dmd_guidance is None or (finite(self.dmd_guidance) and self.dmd_guidance >= 1), "dmd_guidance",
             "None (each clip's 1 + w) or a float >= 1 (1 = the teacher without guidance)")
        need(finite(self.fake_lr) and 0 < self.fake_lr <= 1, "fake_lr", "a float in (0, 1]")
        need(integer(self.fake_updates) and 1 <= self.fake_updates <= 100, "fake_updates", "an integer in 1..100")
        need(finite(self.gan_weight) and self.gan_weight >= 0, "gan_weight", "a float >= 0 (0 = off)")
        need(self.gan_weight == 0 or self.dmd_weight > 0, "gan_weight",
             "0 unless dmd_weight > 0 (the GAN classifier sits on the fake score)")
        need(finite(self.gan_cls_weight) and self.gan_cls_weight > 0, "gan_cls_weight", "a float > 0")
        need(self.feature_network in FEATURE_NETWORKS, "feature_network", f"one of {FEATURE_NETWORKS}")
        need(self.audiomae_path is None or (isinstance(self.audiomae_path, str) and bool(self.audiomae_path)),
             "audiomae_path", "None or a path to a .safetensors file")
        need(finite(self.r1_gamma) and self.r1_gamma >= 0, "r1_gamma", "a float >= 0")
        need(isinstance(self.disc_layers, tuple) and len(self.disc_layers) >= 1 and
             all(integer(i) and i >= 0 for i in self.disc_layers) and
             len(set(self.disc_layers)) == len(self.disc_layers), "disc_layers",
             "a non-empty tuple of distinct block indices >= 0")
        need(self.crop_seconds is None or (finite(self.crop_seconds) and 0 < self.crop_seconds <= MAX_CROP_SECONDS),
             "crop_seconds", f"None (native window) or seconds in (0, {MAX_CROP_SECONDS:g}]")
        need(integer(self.latent_cache_mb) and 0 <= self.latent_cache_mb <= 1 << 20, "latent_cache_mb",
             f"an integer in 0..{1 << 20} (MiB per worker; 0 = off)")
        need(integer(self.checkpoint_every) and 1 <= self.checkpoint_every <= MAX_COUNT, "checkpoint_every",
             f"an integer in 1..{MAX_COUNT}")
        need(integer(self.keep_checkpoints) and 1 <= self.keep_checkpoints <= 10_000, "keep_checkpoints",
             "an integer in 1..10000")
        need(finite(self.report_every_s) and 0 <= self.report_every_s <= 86_400, "report_every_s",
             "seconds in 0..86400 (0 = every step)")
        need(integer(self.validate_every) and 0 <= self.validate_every <= MAX_COUNT, "validate_every",
             f"an integer in 0..{MAX_COUNT} (0 = off)")
        need(len(self.validation_prompts) <= MAX_BATCH, "validation_prompts", f"at most {MAX_BATCH} prompts")
        need(finite(self.storage_retry_s) and 0 <= self.storage_retry_s <= MAX_BUDGET_S, "storage_retry_s",
             f"seconds in 0..{MAX_BUDGET_S:g} (0 = no retries)")
        need(isinstance(self.validation_prompts, tuple) and all(isinstance(p, str) for p in self.validation_prompts),
             "validation_prompts", "a tuple of strings")
        need(isinstance(self.validation_steps, tuple) and
             all(integer(s) and 1 <= s <= self.num_ddim_timesteps for s in self.validation_steps),
             "validation_steps", f"a tuple of integers in 1..{self.num_ddim_timesteps}")
        need(integer(self.max_failures) and -1 <= self.max_failures <= 10_000, "max_failures",
             "an integer in -1..10000 (-1 = forever)")
        need(integer(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        need(isinstance(self.tiny_feature_network, bool), "tiny_feature_network", "True or False")
        need(isinstance(self.use_gpu, bool), "use_gpu", "True or False")
        need(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "True or False")
