"""Command-line flags of `ray_jobs/distill.py`: one flag per :class:`DistillConfig` field, plus job-only flags.

Flags are generated from the dataclass fields (``--k-skip`` for ``k_skip``), so the CLI and the config can
never disagree; every field must have a help text in :data:`HELP` (a test checks it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any

from musiccm.distill.config import FEATURE_NETWORKS, LOSS_TYPES, MIXED_PRECISIONS, DistillConfig

LOCAL_STORAGE = os.path.join("outputs", "runs")  # default run root when --storage is not given
FAIL_HOOK_ENV = "MUSICCM_DISTILL_FAIL_AT"  # test hook "RANK:STEP", see musiccm.jobs.distill_loop.maybe_fail

HELP: dict[str, str] = {
    "teacher": "teacher model: MusicLDM-layout directory, s3:// prefix (downloaded once per node) or hub id, e.g. "
    "ucsd-reach/musicldm (default: the bundled demo student, itself a consistency model: for smoke runs only). "
    "On a multi-node cluster use an s3:// prefix or a hub id: a local path must exist on every node",
    "student_init": "start the student (and its EMA target) from this model's UNet instead of the teacher's: a "
    "MusicLDM-layout directory, s3:// prefix or hub id whose UNet has the teacher's architecture, e.g. an exported "
    "student to fine-tune with the adversarial term (default: the teacher's UNet). A resumed run continues from its "
    "checkpoint and does not read it",
    "train_manifest": "training manifest: Parquet file or directory (local or s3://) with a `uri` column (local "
    "path or s3:// uri of an audio file) and/or an `audio` column (encoded audio bytes), optional `caption` "
    "(missing/empty: the clip's own CLAP audio embedding is the condition)",
    "name": "run name: the run lives in {storage}/{name}; rerunning with the same name and storage resumes "
    "from its latest checkpoint",
    "storage": f"run storage root, local directory or s3://bucket/prefix (default: ./{LOCAL_STORAGE}). "
    "S3 settings come from the standard AWS_* environment",
    "output": "where the exported student (EMA weights, MusicLDM layout) lands, local or s3:// "
    "(default: {storage}/{name}/export)",
    "num_workers": "Ray Train workers (DDP ranks); one GPU each with --use-gpu",
    "use_gpu": "one GPU per worker (NCCL); without it the workers train on CPU (gloo)",
    "max_steps": "total optimisation steps of the run; a resumed run continues up to this step",
    "batch_size": "training clips per worker per step (global batch = batch size x workers)",
    "lr": "student AdamW learning rate (MusicCM/LCM use 1e-5)",
    "disc_lr": "discriminator heads' learning rate",
    "weight_decay": "AdamW weight decay of student and heads",
    "warmup_steps": "linear learning-rate warm-up steps",
    "max_grad_norm": "gradient clipping norm (0 = no clipping)",
    "mixed_precision": "autocast dtype on GPU (ignored on CPU)",
    "gradient_checkpointing": "recompute UNet activations in the backward pass (less memory, ~30% slower)",
    "lora_rank": "0 = full fine-tuning of the student UNet; > 0 = LCM-LoRA adapters of this rank",
    "num_ddim_timesteps": "DDIM solver grid size (50: t = 19, 39, ..., 999)",
    "k_skip": "solver skip k (AudioLCM multi-step solver): t_n = t_{n+k} - (1000/grid)*k",
    "max_train_timestep": "highest solver timestep t_{n+k} trained on (default: the whole grid, up to 999); for a "
    "student that will be sampled with --max-timestep at or below it",
    "w": "teacher guidance weight in the LCM/MusicCM convention (x = x + (1+w)*eps(c) - w*eps(none)); "
    "diffusers guidance_scale = w + 1, so the default w=2 is guidance_scale 3.0 and MusicLDM's default "
    "guidance_scale 2.0 is w=1",
    "w_min": "lower end of a guidance range [w_min, w_max] (LCM convention, w = guidance_scale - 1) sampled "
    "per clip; the student then gets a guidance embedding (time_cond_proj_dim=256). Set both or neither",
    "w_max": "upper end of the guidance range (LCM convention; see --w-min)",
    "ema_rate": "EMA rate of the target network (LCM: 0.95); the export uses the EMA weights",
    "loss_type": "consistency distance: pseudo-Huber or L2",
    "huber_c": "pseudo-Huber constant c",
    "distill_weight": "lambda in L = adv_weight*L_adv^G + lambda*L_distil (MusicCM eq. 9)",
    "adv_weight": "weight of the adversarial generator loss; 0 = the 'w/o L_adv' ablation (no discriminator)",
    "feature_network": "frozen discriminator feature network: AudioMAE ViT-B or the teacher's CLAP audio tower",
    "audiomae_path": "local .safetensors with AudioMAE ViT-B weights (timm names); without it the ViT is "
    "randomly initialised (a loud warning; fine only for smoke runs)",
    "r1_gamma": "R1 penalty weight gamma on the discriminator heads' input features (0 = off)",
    "disc_layers": "feature-network blocks (0-based) that get a discriminator head",
    "adv_timesteps": "timesteps at which the adversarial term judges the student's one-jump x0 estimate, one drawn "
    "per clip (several arguments; e.g. 699 for a student sampled in 1 step from t = 699, or its whole sampling "
    "schedule); costs one more student UNet call per step. Not given: the consistency interval's t_{n+k}, the "
    "estimate the distillation loss uses",
    "dmd_weight": "weight of the distribution-matching loss (DMD/DMD2) on the student's 1-step jump: a fake-score "
    "UNet (a copy of the teacher's, trained on the student's outputs) and the teacher with CFG w + 1 (or "
    "--dmd-guidance) judge the jump's outputs noised to t in [dmd_min_t, dmd_max_t]. 0 = off; for fine-tuning a "
    "distilled student (--student-init) towards better 1-step samples. Costs a trainable UNet copy and "
    "fake_updates + 3 UNet calls per step",
    "dmd_timestep": "timestep of the generator's jump from pure noise (default: the student's 1-step sampling "
    "timestep, 699 with --max-train-timestep 699, else 999)",
    "dmd_min_t": "lowest timestep the generated clips are noised to for distribution matching",
    "dmd_max_t": "highest timestep the generated clips are noised to for distribution matching",
    "dmd_guidance": "guidance scale (diffusers' convention, 1 + w) of the teacher as the real score of distribution "
    "matching (default: each clip's w + 1, the guidance the student is distilled for; DMD2 tunes it on its own)",
    "fake_lr": "AdamW learning rate of the fake-score UNet (with --dmd-weight)",
    "fake_updates": "fake-score updates per student step (with --dmd-weight; DMD2's two time-scale rule)",
    "gan_weight": "weight of DMD2's GAN generator loss (with --dmd-weight): a classifier on the fake score's "
    "mid-block features, trained in the fake-score updates to tell noised training clips from noised 1-step "
    "samples, judges the student's 1-step samples (non-saturating loss). 0 = off; DMD2 used 3e-3 to 5e-3. "
    "Costs one more fake-score call per step and real clips beside the generated ones in each fake-score update",
    "gan_cls_weight": "weight of the GAN classifier's loss in the fake-score updates (with --gan-weight; DMD2: 1e-2)",
    "crop_seconds": "training crop length in seconds (default: the teacher's native window, 10.24 s)",
    "latent_cache_mb": "MiB per worker for the VAE latents of clips no longer than the training window (never "
    "cropped, so identical every epoch): from the second epoch on they are not encoded again. 0 = off; clips "
    "longer than the window are randomly cropped and always encoded",
    "checkpoint_every": "save a checkpoint (safetensors + JSON) every N steps, and at the last step",
    "report_every_s": "seconds between metric reports to Ray Train between checkpoints (0 = every step). Ray "
    "Train V2 holds each report until its controller polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, "
    "2 s by default), so reporting every step caps a fast job at one step per poll; every step's metrics are "
    "written to {run}/metrics regardless",
    "keep_checkpoints": "checkpoints kept in storage (older ones are deleted by Ray Train)",
    "validate_every": "every N steps (and at the last step) rank 0 samples the validation prompts with each "
    "of --validation-steps and writes audio + per-clip metrics under {run}/validation (0 = off)",
    "validation_prompts": "fixed validation prompts (several arguments)",
    "validation_steps": "sampling step counts used for validation (several arguments)",
    "max_failures": "worker-group restarts Ray Train may do, each from the latest checkpoint (-1 = forever)",
    "storage_retry_s": "how long each storage call (checkpoints, metrics, validation audio, the manifest and "
    "training data) rides out an outage (unreachable endpoint, 5xx, throttling, resets) with jittered "
    "exponential back-off before it fails; 0 = no retries",
    "seed": "run seed: student init (LoRA/heads), per-(rank, step) noise, data crops, validation seeds",
    "tiny_feature_network": "tests only: a tiny random ViT instead of ViT-B as discriminator features",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(field: dataclasses.Field) -> tuple[type, bool, bool]:
    """(element type, optional, tuple) from the field's annotation (a string under postponed evaluation)."""
    ann = str(field.type).replace(" ", "")
    optional = ann.endswith("|None")
    ann = ann.removesuffix("|None")
    is_tuple = ann.startswith("tuple[")
    base = ann.removeprefix("tuple[").removesuffix(",...]")
    types = {"int": int, "float": float, "str": str, "bool": bool}
    if base not in types:
        raise TypeError(f"DistillConfig.{field.name}: unsupported annotation {field.type!r} for a CLI flag")
    return types[base], optional, is_tuple


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The job's parser: every DistillConfig field as a flag (defaults from the dataclass) + job flags."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"loss_type": LOSS_TYPES, "feature_network": FEATURE_NETWORKS, "mixed_precision": MIXED_PRECISIONS}
    for f in dataclasses.fields(DistillConfig):
        kind, _, is_tuple = _kind(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        text = HELP.get(f.name, "(undocumented)")
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["choices"] = choices.get(f.name)
            if is_tuple:
                kwargs["nargs"] = "+"
                kwargs["metavar"] = f.name.upper().removesuffix("S")
        if f.name == "train_manifest":
            kwargs.update(required=True, default=None)
        shown = (" ".join(map(str, default)) or "none") if is_tuple else default
        p.add_argument(_flag(f.name), help=f"{text} (default: {shown})".replace("%", "%%"),
                       **kwargs)
    job = p.add_argument_group("job (not part of the saved config)")
    job.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="Ray CPUs reserved per training worker (default 1). Leave at least one CPU of the "
                     "cluster free for the Ray Data read tasks, or the data stream stalls")
    job.add_argument("--no-resource-check", dest="resource_check", action="store_false",
                     help="skip the preflight check of the cluster's GPUs/CPUs (for autoscaling clusters whose "
                     "worker nodes are not up yet)")
    return p


def check_job_flags(args: argparse.Namespace) -> None:
    """The job-only flags, bounded before Ray starts (ValueError says what is allowed)."""
    cpus = args.cpus_per_worker
    if not (math.isfinite(cpus) and 0 < cpus <= 1024):
        raise ValueError(f"--cpus-per-worker {cpus:g} is invalid; allowed: a number of CPUs in (0, 1024]")


def to_config(args: argparse.Namespace) -> DistillConfig:
    """Parsed flags → validated DistillConfig (ValueError names the bad field and what is allowed)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(DistillConfig):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    config = DistillConfig(**values)
    config.validate()
    return config


def fail_hook(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """The test hook from ``MUSICCM_DISTILL_FAIL_AT=RANK:STEP`` (unset: None). Off by default."""
    raw = (env if env is not None else os.environ).get(FAIL_HOOK_ENV, "").strip()
    if not raw:
        return None
    rank, sep, step = raw.partition(":")
    if not (sep and rank.isdigit() and step.isdigit() and int(step) >= 1):
        raise ValueError(f"{FAIL_HOOK_ENV}={raw!r}; expected RANK:STEP with integers, STEP >= 1")
    return int(rank), int(step)
