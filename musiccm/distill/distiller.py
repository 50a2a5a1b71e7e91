"""One consistency-distillation run's state and step: student, EMA target, discriminator, optimisers.

``Distiller.train_step`` is MusicCM §3.1–3.2 (L = adv_weight·L_adv^G + λ·L_distil, then the discriminator's
hinge + γ/2·R1), built from the pure functions of :mod:`musiccm.distill.losses`; with ``dmd_weight`` > 0 also
DMD2's distribution matching (+ dmd_weight·L_DMD on the student's 1-step jump, then updates of a fake score).
With ``gan_weight`` > 0 DMD2's GAN term joins it: a classifier on the fake score's mid-block features.
It knows nothing of Ray: the job passes ``wrap`` (Ray's ``prepare_model``: DDP) for the trainable modules and saves
``checkpoint_tensors()`` (safetensors) + ``checkpoint_meta()`` (JSON) wherever it likes.

Randomness: the noise, timesteps and guidance weights of step s on rank r come from a generator seeded
with (config.seed, r, s) unless the caller passes one, so a restored run draws exactly what the
uninterrupted run would have drawn, on every rank, without saving generator states.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn

from musiccm import external
from musiccm import model as model_io
from musiccm.distill.config import GUIDANCE_EMBEDDING_DIM, DistillConfig
from musiccm.distill.data import LatentCache, PreparedBatch, prepare_batch, window_samples
from musiccm.distill.discriminator import BottleneckClassifier, Discriminator
from musiccm.distill.losses import (
    consistency_distillation_loss,
    distribution_matching_loss,
    gan_classifier_loss,
    gan_generator_loss,
    guided_eps,
    hinge_d_loss,
    hinge_g_loss,
    r1_penalty,
    sample_guidance,
    sample_solver_timesteps,
    student_jump,
    warmup_lr,
)
from musiccm.model import MusicLDMComponents
from musiccm.sampling import randn
from musiccm.schedule import (
    alpha_bar,
    consistency_output,
    ema_update,
    eps_from_x0,
    guidance_scale_embedding,
    model_output_to_x0,
    renoise,
    training_target,
    x0_from_eps,
)
from musiccm.student import as_student

CHECKPOINT_FORMAT = 1
# LCM-LoRA's target modules (diffusers examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py).
LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]
_PRIME = 1_000_003


def step_generator(seed: int, rank: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, rank, step, stream) alone: resumable without saved RNG state."""
    mixed = (((seed * _PRIME + rank) * _PRIME + step) * _PRIME + stream) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def unet_forward(unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                 w_emb: torch.Tensor | None) -> torch.Tensor:
    """MusicLDM's UNet call (CLAP vector as ``class_labels``, no cross-attention context) → raw output.

    Works on a plain, LoRA (peft) or DDP-wrapped UNet, which ``external.make_denoiser`` (reading
    ``unet.config``/``dtype``) does not; it is the same call and belongs next to it in ``musiccm.external``.
    """
    return unet(x_t, t, encoder_hidden_states=None, class_labels=cond, timestep_cond=w_emb).sample


def build_student_unet(teacher_unet: nn.Module, guidance_embedding: bool, init: nn.Module | None = None) -> nn.Module:
    """A float32 copy of the teacher's UNet (or of ``init``, a UNet of the same architecture, e.g. an earlier
    student); with ``guidance_embedding`` it gains ``time_cond_proj_dim=256`` when it has none, whose new
    projection is zero-initialised so the student starts as exactly its source."""
    from diffusers import UNet2DConditionModel

    source = teacher_unet if init is None else init
    if init is not None:
        differ = model_io.unet_differences(init.config, teacher_unet.config)
        if differ:
            raise ValueError(f"student_init's UNet differs from the teacher's: {differ}; need the teacher's "
                             "UNet architecture")
    cfg = dict(source.config)
    add = guidance_embedding and cfg.get("time_cond_proj_dim") is None
    if add:
        cfg["time_cond_proj_dim"] = GUIDANCE_EMBEDDING_DIM
    unet = UNet2DConditionModel.from_config(cfg)
    missing, unexpected = unet.load_state_dict(source.state_dict(), strict=False)
    if unexpected or set(missing) - {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"student UNet does not match its source: missing {missing}, unexpected {unexpected}")
    if add:
        nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet.float()


def add_lora(unet: nn.Module, rank: int, train_also: tuple[str, ...] = ()) -> nn.Module:
    """LCM-LoRA style adapters (peft; B = 0 so the student starts as the teacher); ``train_also`` names
    base parameters (by prefix) that stay trainable, e.g. a new guidance projection."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=True, target_modules=LORA_TARGETS)
    peft_unet = get_peft_model(unet, config)
    for name, p in peft_unet.base_model.model.named_parameters():
        if name.startswith(train_also):
            p.requires_grad_(True)
    return peft_unet


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def _trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()


def _frozen(module: nn.Module) -> Callable[..., Any]:
    """``module`` called with detached weights: gradients reach its inputs, never its parameters (nor DDP's
    reducer), so one model's loss can flow through another without touching the other's grads."""
    weights = {n: p.detach() for n, p in module.named_parameters()}
    return lambda *args, **kwargs: torch.func.functional_call(module, weights, args, kwargs)


@contextmanager
def _mid_block_output(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects the output of ``unet``'s mid block (its bottleneck) for each UNet call inside the block."""
    found: list[torch.Tensor] = []
    handle = _unwrap(unet).mid_block.register_forward_hook(lambda _module, _args, out: found.append(out))
    try:
        yield found
    finally:
        handle.remove()


class Distiller:
    """Student UNet + EMA target + discriminator heads + optimisers of one distillation run (no Ray).

    The ``teacher`` components are moved to ``device`` and frozen in place. ``wrap`` (e.g. Ray's
    ``prepare_model``) is applied to the student UNet and to the discriminator heads; ``rank`` only selects
    this rank's noise stream (:func:`step_generator`). ``student_init`` (a UNet with the teacher's architecture,
    ``config.student_init`` loaded) starts the student instead of the teacher's UNet.
    """

    def __init__(
        self,
        teacher: MusicLDMComponents,
        config: DistillConfig,
        device: torch.device | str = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        rank: int = 0,
        student_init: nn.Module | None = None,
    ):
        config.validate()
        self.config, self.rank, self.step = config, rank, 0
        self.device = torch.device(device)
        # 1. Frozen teacher, VAE, CLAP, vocoder (moved to the device, eval, no grad).
        self.teacher = teacher.to(self.device)
        for m in (teacher.unet, teacher.vae, teacher.text_encoder, teacher.vocoder):
            m.eval().requires_grad_(False)
        g = teacher.geometry
        self.mel_frames = window_samples(teacher, config.crop_seconds) // g.hop_length
        self.latent_cache = LatentCache(config.latent_cache_mb * 2**20) if config.latent_cache_mb > 0 else None
        self.alphas = teacher.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = teacher.scheduler.config.prediction_type
        self.teacher_w_dim = teacher.unet.config.get("time_cond_proj_dim")
        self.uncond = external.encode_text(teacher, [""])[0].to(self.device)  # (1, D): MusicLDM's ∅ condition
        # 2. Student (copy of the teacher's UNet, + guidance embedding for a w range), LoRA, EMA target, and
        # 3. the discriminator (frozen feature network + trainable heads; none when adv_weight = 0).
        # New weights (LoRA, heads, a random feature network) come from config.seed, identical on every rank
        # and in a resumed run, without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet = build_student_unet(teacher.unet, config.has_w_range, student_init)
            self.w_dim = unet.config.get("time_cond_proj_dim")
            if config.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            if config.lora_rank > 0:
                extra = ("time_embedding.cond_proj",) if config.has_w_range else ()
                unet = add_lora(unet, config.lora_rank, extra)
            self.disc: Discriminator | None = None
            if config.adv_weight > 0:
                self.disc = Discriminator(teacher, config, self.mel_frames)
            gan_head = None
            if config.gan_weight > 0:
                if getattr(teacher.unet, "mid_block", None) is None:
                    raise ValueError("gan_weight > 0 needs a teacher UNet with a mid block: DMD2's classifier "
                                     "reads the fake score's bottleneck features")
                gan_head = BottleneckClassifier(teacher.unet.config.block_out_channels[-1])
        self.student_module = unet.to(self.device).train()
        self.target = copy.deepcopy(self.student_module).requires_grad_(False).eval()
        self.student = wrap(self.student_module) if wrap else self.student_module
        self._student_params = _trainable(self.student_module)
        target_params = dict(self.target.named_parameters())
        self._ema_pairs = [(target_params[n], p) for n, p in self._student_params]
        with torch.no_grad():  # DDP may have broadcast rank 0's weights into the student: the target follows
            for tp, sp in self._ema_pairs:
                tp.copy_(sp)
        self.heads: nn.Module | None = None
        if self.disc is not None:
            self.disc = self.disc.to(self.device).train()
            self.heads = wrap(self.disc.heads) if wrap else self.disc.heads
        # 4. The fake score of distribution matching: a trainable float32 copy of the teacher's UNet (DMD2).
        self.fake_module: nn.Module | None = None
        self.fake: nn.Module | None = None
        if config.dmd_weight > 0:
            self.fake_module = copy.deepcopy(teacher.unet).to(self.device, torch.float32).train().requires_grad_(True)
            if config.gradient_checkpointing:
                self.fake_module.enable_gradient_checkpointing()
            self.fake = wrap(self.fake_module) if wrap else self.fake_module
        # 4b. DMD2's GAN classifier on the fake score's bottleneck, trained with it (same optimiser).
        self.gan_module: nn.Module | None = None
        self.gan: nn.Module | None = None
        if gan_head is not None:
            self.gan_module = gan_head.to(self.device).train()
            self.gan = wrap(self.gan_module) if wrap else self.gan_module
        # 5. Optimisers: AdamW for the student (LCM); Adam(0, 0.99) for the heads (StyleGAN-T/ADD GAN practice);
        # AdamW for the fake score.
        self.opt_g = torch.optim.AdamW([p for _, p in self._student_params], lr=config.lr,
                                       weight_decay=config.weight_decay)
        self.opt_d = None
        if self.disc is not None:
            self.opt_d = torch.optim.AdamW(self.disc.heads.parameters(), lr=config.disc_lr, betas=(0.0, 0.99),
                                           weight_decay=config.weight_decay)
        self.opt_fake = None
        if self.fake_module is not None:
            self.opt_fake = torch.optim.AdamW(self._fake_params(), lr=config.fake_lr, weight_decay=config.weight_decay)
        # 6. Mixed precision (GPU only): autocast; a GradScaler for fp16 (one per loss-scaled optimiser).
        on_gpu = self.device.type == "cuda"
        amp = config.mixed_precision if on_gpu else "no"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.fake_scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16" and self.fake is not None)

    def _fake_params(self) -> list[nn.Parameter]:
        """The fake score's parameters, then the GAN classifier's (one optimiser, one clipping norm)."""
        assert self.fake_module is not None
        return [*self.fake_module.parameters(), *(self.gan_module.parameters() if self.gan_module else ())]

    # ------------------------------------------------------------------ model callables (losses contract)
    def _w_emb(self, w: torch.Tensor, dim: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if dim is None else guidance_scale_embedding(w.to(self.device), dim).to(dtype)

    def _x0_fn(self, unet: nn.Module) -> Callable[..., torch.Tensor]:
        def x0(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out = unet_forward(unet, x_t, t, cond, self._w_emb(w, self.w_dim, x_t.dtype))
            a = alpha_bar(self.alphas, t, float(self.alphas[0]))
            return model_output_to_x0(out.float(), x_t.float(), a, self.prediction_type)

        return x0

    def _teacher_eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self._eps(self.teacher.unet, x_t, t, cond)

    def _eps(self, unet: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """ε of a UNet with the teacher's architecture and objective (the teacher, or the fake score)."""
        w_emb = self._w_emb(torch.zeros(x_t.shape[0]), self.teacher_w_dim, x_t.dtype)  # distilled teacher: w = 0
        out = unet_forward(unet, x_t, t, cond, w_emb).float()
        if self.prediction_type == "epsilon":
            return out
        a = alpha_bar(self.alphas, t, float(self.alphas[0]))
        return eps_from_x0(x_t.float(), model_output_to_x0(out, x_t.float(), a, self.prediction_type), a)

    def _decode_mel(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, T, F) → log-mel (B, 4T, 64) through the frozen VAE decoder, differentiably (fp32)."""
        vae = self.teacher.vae
        with torch.autocast(self.device.type, enabled=False):
            z = latents.float() / vae.config.scaling_factor
            return vae.decode(z.to(vae.dtype)).sample.squeeze(1).float()

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()

    # ------------------------------------------------------------------ training
    def prepare_batch(self, rows: dict[str, Any], generator: torch.Generator | None) -> PreparedBatch:
        """:func:`musiccm.distill.data.prepare_batch` with this run's frozen models and config."""
        return prepare_batch(rows, self.teacher, self.config, generator, self.latent_cache)

    def set_lr(self) -> tuple[float, float]:
        """Warm-up learning rates for the current step, applied to every optimiser; returns (lr, disc_lr)."""
        cfg = self.config
        lr = warmup_lr(cfg.lr, self.step, cfg.warmup_steps)
        disc_lr = warmup_lr(cfg.disc_lr, self.step, cfg.warmup_steps)
        for opt, value in ((self.opt_g, lr), (self.opt_d, disc_lr),
                           (self.opt_fake, warmup_lr(cfg.fake_lr, self.step, cfg.warmup_steps))):
            for group in opt.param_groups if opt is not None else ():
                group["lr"] = value
        return lr, disc_lr

    def _clip(self, params: list[torch.Tensor]) -> float:
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        return float(torch.nn.utils.clip_grad_norm_(params, limit))

    def train_step(self, batch: PreparedBatch, generator: torch.Generator | None = None) -> dict[str, float]:
        """One optimisation step: student (G) then discriminator (D), EMA, warm-up; returns float metrics.

        Under DDP every rank must call this the same number of times with B > 0 (it raises on B = 0).
        """
        cfg = self.config
        if batch.latents.shape[0] == 0:
            raise ValueError("train_step needs at least one row (every row of this batch was skipped)")
        gen = generator if generator is not None else step_generator(cfg.seed, self.rank, self.step)
        x0 = batch.latents.to(self.device).float()  # (B, C, T, F)
        cond = batch.cond.to(self.device).float()  # (B, D)
        b = x0.shape[0]
        # 1. Randomness of this step: noise, solver interval (t_{n+k}, t_n), guidance weights.
        noise = randn(x0.shape, gen, self.device)
        t, t_prev = sample_solver_timesteps(b, cfg.k_skip, gen, len(self.alphas), cfg.num_ddim_timesteps,
                                            cfg.max_train_timestep)
        t, t_prev = t.to(self.device), t_prev.to(self.device)
        w = sample_guidance(b, cfg.w, cfg.w_min, cfg.w_max, gen).to(self.device)
        lr, disc_lr = self.set_lr()
        # 2. Generator step: λ·L_distil + adv_weight·L_adv^G (+ dmd_weight·L_DMD).
        self.student.train()
        with self._autocast():
            distill, pred = consistency_distillation_loss(
                self._x0_fn(self.student), self._x0_fn(self.target), self._teacher_eps, x0, noise, t, t_prev,
                cond, self.uncond, w, self.alphas, cfg.loss_type, cfg.huber_c,
            )
            loss_g = cfg.distill_weight * distill
            adv_g = torch.zeros((), device=self.device)
            if self.disc is not None:
                with torch.no_grad():
                    real_feats = self.disc.feature_maps(batch.mel.to(self.device).float())
                c = self.disc.condition(cond, self.disc.mel_embedding(real_feats))
                fake_feats = self.disc.feature_maps(self._decode_mel(self._adv_prediction(pred, x0, cond, w, gen)))
                # Heads with detached weights: G's loss must not touch D's grads (nor DDP's reducer).
                fake_logits = _frozen(self.disc.heads)(fake_feats, c)
                adv_g = hinge_g_loss(fake_logits)
                loss_g = loss_g + cfg.adv_weight * adv_g
            dmd, gan_g, generated = torch.zeros((), device=self.device), torch.zeros((), device=self.device), None
            if self.fake is not None:
                dmd, gan_g, generated = self._dmd_loss(cond, w, gen, tuple(x0.shape))
                loss_g = loss_g + cfg.dmd_weight * dmd + cfg.gan_weight * gan_g
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler.scale(loss_g).backward()
        self.scaler.unscale_(self.opt_g)
        grad_norm = self._clip([p for _, p in self._student_params])
        self.scaler.step(self.opt_g)
        self.scaler.update()
        ema_update([tp for tp, _ in self._ema_pairs], [sp for _, sp in self._ema_pairs], cfg.ema_rate)
        metrics = {"distill_loss": distill.item(), "adv_g_loss": adv_g.item(), "dmd_loss": dmd.item(),
                   "gan_g_loss": gan_g.item(), "loss": loss_g.item(),
                   "lr": lr, "grad_norm": grad_norm, "grad_scale": float(self.scaler.get_scale()) if
                   self.scaler.is_enabled() else 1.0}
        # 3. Discriminator step: hinge + γ/2·R1 on the heads' input features of real clips (fp32).
        metrics.update(self._d_step([f.detach() for f in fake_feats], real_feats, c) if self.disc is not None
                       else {"adv_d_loss": 0.0, "r1": 0.0, "disc_grad_norm": 0.0, "disc_skipped": 0.0})
        # 4. Fake score (DMD2): the teacher's own objective on this step's generated clips.
        metrics.update(self._fake_step(generated, x0, cond, gen) if generated is not None
                       else {"fake_loss": 0.0, "gan_cls_loss": 0.0, "fake_skipped": 0.0})
        metrics.update({"disc_lr": disc_lr if self.disc is not None else 0.0, "batch_size": float(b),
                        "skipped": float(batch.skipped), "t_mean": float(t.float().mean()),
                        "w_mean": float(w.mean())})
        self.step += 1
        return metrics

    def _adv_prediction(self, pred: torch.Tensor, x0: torch.Tensor, cond: torch.Tensor, w: torch.Tensor,
                        gen: torch.Generator) -> torch.Tensor:
        """What L_adv judges: the distillation's own estimate ``pred``, or with ``adv_timesteps`` the student's
        one-jump estimate from fresh noise at one of those timesteps per clip (drawn after the step's other
        randomness, so runs without it draw exactly as before)."""
        choices = self.config.adv_timesteps
        if not choices:
            return pred
        pick = torch.randint(len(choices), (x0.shape[0],), generator=gen, device=gen.device)
        s = torch.tensor(choices, device=gen.device)[pick].to(self.device)
        noise = randn(x0.shape, gen, self.device)
        return student_jump(self._x0_fn(self.student), x0, noise, s, cond, w, self.alphas)[1]

    def _noised(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                       torch.Tensor]:
        """``x0`` noised to a timestep in [dmd_min_t, dmd_max_t] per clip → (x_t, t, ᾱ_t, noise)."""
        cfg = self.config
        t = torch.randint(cfg.dmd_min_t, cfg.dmd_max_t + 1, (x0.shape[0],), generator=gen).to(self.device)
        noise = randn(tuple(x0.shape), gen, self.device)
        a = alpha_bar(self.alphas, t, float(self.alphas[0]))
        return renoise(x0, noise, a), t, a, noise

    def _dmd_loss(self, cond: torch.Tensor, w: torch.Tensor, gen: torch.Generator,
                  shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distribution matching (DMD): the student's 1-step sample from fresh noise, noised again to a random t
        and denoised there by the teacher with CFG 1 + w, or ``dmd_guidance`` when set (real score), and by the
        fake score, gives the loss of :func:`distribution_matching_loss`. With the GAN term, the sample noised once
        more (drawn after the rest, so runs without it draw as before) goes through the fake score and its
        classifier, both with detached weights, for DMD2's generator loss. Returns (L_DMD, L_GAN^G or 0, the
        detached generated clips)."""
        b = shape[0]
        x_T = randn(shape, gen, self.device)  # what sampling starts from: pure noise at the first timestep
        t1 = torch.full((b,), self.config.generator_timestep, dtype=torch.long, device=self.device)
        x0 = consistency_output(x_T, self._x0_fn(self.student)(x_T, t1, cond, w), t1)
        x_t, t, a, _ = self._noised(x0.detach(), gen)
        w_real = w if self.config.dmd_guidance is None else torch.full_like(w, self.config.dmd_guidance - 1)
        with torch.no_grad():
            x0_real = x0_from_eps(x_t.float(), guided_eps(self._teacher_eps, x_t, t, cond, self.uncond, w_real), a)
            assert self.fake_module is not None
            x0_fake = x0_from_eps(x_t.float(), self._eps(self.fake_module, x_t, t, cond), a)
        gan = torch.zeros((), device=self.device)
        if self.gan_module is not None:
            x_g, t_g, _, _ = self._noised(x0, gen)
            with _mid_block_output(self.fake_module) as mid:
                self._eps(_frozen(self.fake_module), x_g, t_g, cond)
            gan = gan_generator_loss(_frozen(self.gan_module)(mid[0]))
        return distribution_matching_loss(x0, x0_real, x0_fake), gan, x0.detach()

    def _fake_step(self, generated: torch.Tensor, real: torch.Tensor, cond: torch.Tensor,
                   gen: torch.Generator) -> dict[str, float]:
        """``fake_updates`` steps of the fake score on the generated clips with the teacher's diffusion objective;
        with the GAN term, the same call also runs the training clips ``real`` (noised alike) and its classifier
        learns to tell them apart from the generated ones at the fake score's bottleneck."""
        assert self.fake is not None and self.opt_fake is not None
        cfg, b = self.config, generated.shape[0]
        total, total_cls, skipped = 0.0, 0.0, 0
        w_emb = self._w_emb(torch.zeros(2 * b if self.gan is not None else b), self.teacher_w_dim, generated.dtype)
        for _ in range(cfg.fake_updates):
            x_t, t, a, noise = self._noised(generated, gen)
            cls = torch.zeros((), device=self.device)
            if self.gan is not None:  # one call on [generated; real] (DDP: one forward per backward)
                x_r, t_r, _, _ = self._noised(real, gen)
                with self._autocast(), _mid_block_output(self.fake) as mid:
                    out = unet_forward(self.fake, torch.cat([x_t, x_r]), torch.cat([t, t_r]), torch.cat([cond, cond]),
                                       w_emb).float()[:b]
                    logits = self.gan(mid[0])
                cls = gan_classifier_loss(logits[b:], logits[:b])
            else:
                with self._autocast():
                    out = unet_forward(self.fake, x_t, t, cond, w_emb).float()
            denoise = torch.nn.functional.mse_loss(out, training_target(generated, noise, a, self.prediction_type))
            loss = denoise + cfg.gan_cls_weight * cls
            self.opt_fake.zero_grad(set_to_none=True)
            self.fake_scaler.scale(loss).backward()
            self.fake_scaler.unscale_(self.opt_fake)
            norm = self._clip(self._fake_params())
            if self.fake_scaler.is_enabled():
                self.fake_scaler.step(self.opt_fake)  # skips non-finite steps itself
                self.fake_scaler.update()
            elif math.isfinite(norm):  # the norm is of all-reduced gradients: the same decision on every rank
                self.opt_fake.step()
            else:
                skipped += 1
            total += denoise.item() / cfg.fake_updates
            total_cls += cls.item() / cfg.fake_updates
        return {"fake_loss": total, "gan_cls_loss": total_cls, "fake_skipped": float(skipped)}

    def _d_step(self, fake_feats: list[torch.Tensor], real_feats: list[torch.Tensor],
                c: torch.Tensor) -> dict[str, float]:
        assert self.heads is not None and self.opt_d is not None
        b = c.shape[0]
        real_in = [f.detach().float().requires_grad_(True) for f in real_feats]
        both = [torch.cat([r, f.float()]) for r, f in zip(real_in, fake_feats, strict=True)]
        logits = self.heads(both, torch.cat([c, c]))  # one forward of the (DDP-wrapped) heads
        real_logits, fake_logits = [lg[:b] for lg in logits], [lg[b:] for lg in logits]
        hinge = hinge_d_loss(real_logits, fake_logits)
        r1 = r1_penalty(real_logits, real_in) if self.config.r1_gamma > 0 else torch.zeros((), device=self.device)
        loss_d = hinge + 0.5 * self.config.r1_gamma * r1
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        norm = self._clip(list(self.disc.heads.parameters()))
        skipped = not math.isfinite(norm)  # same on every rank: the norm is of all-reduced gradients
        if skipped:  # e.g. fp16 features overflowed: skip, as GradScaler does for G, rather than poison the heads
            self.opt_d.zero_grad(set_to_none=True)
        else:
            self.opt_d.step()
        return {"adv_d_loss": hinge.item(), "r1": r1.item(), "disc_grad_norm": norm, "disc_skipped": float(skipped)}

    # ------------------------------------------------------------------ checkpoints
    def _named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        names = [n for n, _ in self._student_params]
        target = dict(self.target.named_parameters())
        groups = {"student": {n: p for n, p in self._student_params}, "target": {n: target[n] for n in names}}
        if self.disc is not None:
            groups["heads"] = dict(self.disc.heads.state_dict())
        if self.fake_module is not None:
            groups["fake"] = dict(self.fake_module.state_dict())
        if self.gan_module is not None:
            groups["gan"] = dict(self.gan_module.state_dict())
        return groups

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named = {"opt_g": self.opt_g, "opt_d": self.opt_d, "opt_fake": self.opt_fake}
        return {k: opt for k, opt in named.items() if opt is not None}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Student (trainable parameters), EMA target, heads, fake score and optimiser state as flat CPU tensors
        (``group/name``), contiguous and unshared: ready for ``safetensors.torch.save_file``."""
        out = {f"{group}/{name}": _cpu(t) for group, named in self._named_state().items() for name, t in named.items()}
        for key, opt in self._optimizers().items():
            for idx, state in opt.state_dict()["state"].items():
                for name, value in state.items():
                    out[f"{key}/{idx}/{name}"] = _cpu(torch.as_tensor(value))
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        """JSON-able facts needed to resume: step, config, optimiser groups, scaler, RNG, trainable names."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config.to_dict(),
            "optimizers": {k: opt.state_dict()["param_groups"] for k, opt in self._optimizers().items()},
            "scaler": {k: (float(v) if isinstance(v, float) else v) for k, v in self.scaler.state_dict().items()},
            "fake_scaler": {k: (float(v) if isinstance(v, float) else v)
                            for k, v in self.fake_scaler.state_dict().items()},
            "rng": {"torch": torch.get_rng_state().tolist()},
            "trainable": [n for n, _ in self._student_params],
            "guidance_embedding": self.w_dim is not None,
        }

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Load a checkpoint made by :meth:`checkpoint_tensors` / :meth:`checkpoint_meta` (exact round trip)."""
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')!r} is not {CHECKPOINT_FORMAT}")
        saved = DistillConfig.from_dict(meta["config"])
        structure = ("teacher", "lora_rank", "w_min", "w_max", "feature_network", "disc_layers", "tiny_feature_network")
        for key in structure:
            if getattr(saved, key) != getattr(self.config, key):
                raise ValueError(f"checkpoint was made with {key}={getattr(saved, key)!r}, this run has "
                                 f"{getattr(self.config, key)!r}; resume with the same model structure")
        for key, part in (("adv_weight", "the discriminator"), ("dmd_weight", "the fake score"),
                          ("gan_weight", "the GAN classifier")):
            if (getattr(saved, key) > 0) != (getattr(self.config, key) > 0):
                raise ValueError(f"checkpoint has {key}={getattr(saved, key)}, this run {getattr(self.config, key)}: "
                                 f"a run cannot switch {part} on or off when resuming")
        with torch.no_grad():
            for group, named in self._named_state().items():
                missing = [n for n in named if f"{group}/{n}" not in tensors]
                if missing:
                    raise ValueError(f"checkpoint lacks {len(missing)} {group} tensors, e.g. {missing[:3]}")
                for name, t in named.items():
                    t.copy_(tensors[f"{group}/{name}"].to(t.device, t.dtype))
        for key, opt in self._optimizers().items():
            state: dict[int, dict[str, torch.Tensor]] = {}
            for name, value in tensors.items():
                if name.startswith(f"{key}/"):
                    _, idx, field = name.split("/", 2)
                    state.setdefault(int(idx), {})[field] = value.clone()
            opt.load_state_dict({"state": state, "param_groups": meta["optimizers"][key]})
        for key, scaler in (("scaler", self.scaler), ("fake_scaler", self.fake_scaler)):
            if meta.get(key):
                scaler.load_state_dict(meta[key])
        torch.set_rng_state(torch.tensor(meta["rng"]["torch"], dtype=torch.uint8))
        self.step = int(meta["step"])
        self.set_lr()

    # ------------------------------------------------------------------ export / validation
    def student_unet(self, use_ema: bool = True) -> nn.Module:
        """A standalone copy of the student's UNet (EMA target by default), LoRA merged, in eval mode."""
        unet = copy.deepcopy(_unwrap(self.target if use_ema else self.student_module))
        if hasattr(unet, "merge_and_unload"):  # peft LoRA → plain UNet2DConditionModel
            unet = unet.merge_and_unload()
        return unet.eval().requires_grad_(False)

    def student_components(self, use_ema: bool = True) -> MusicLDMComponents:
        """The student as MusicLDM-layout components (LCMScheduler), for in-memory validation."""
        return as_student(self.teacher, unet=self.student_unet(use_ema))

    def export(self, directory: str, use_ema: bool = True) -> str:
        """Save the student (EMA weights by default, LoRA merged) as a MusicLDM-layout directory; returns it."""
        extra = {
            "name": self.config.name,
            "note": f"consistency student distilled from {self.config.teacher} by musiccm.distill",
            "distill": {"step": self.step, "use_ema": use_ema, "config": self.config.to_dict(),
                        "guidance": "LCM w; diffusers guidance_scale = w + 1"},
        }
        return model_io.save(self.student_components(use_ema), directory, extra=extra)
