"""Train the demo teacher: a UNet2DConditionModel with MusicLDM's ε-objective on the frozen VAE's latents.

As MusicLDM/AudioLDM: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with t uniform over the 1000 training steps of the DDIM
schedule, MSE on ε, the condition (a CLAP embedding, through ``class_labels``) replaced by the unconditional
embedding of ``""`` for 10% of the clips so classifier-free guidance works. The condition is the CLAP text
embedding of the caption, or, for ``audio_condition_p`` of the clips, the clip's own CLAP audio embedding, as
MusicLDM was trained on audio embeddings (the two towers share one space). The weights saved are an EMA
of the trained ones (rate 0.999 by default), the usual diffusion practice. Optionally the loss is weighted by
Min-SNR-γ, which the demo's one-hour preset uses to learn faster.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from musiccm import external
from musiccm.demo import architecture
from musiccm.demo.common import Progress, warmup_cosine
from musiccm.schedule import ema_update

log = logging.getLogger(__name__)


@torch.no_grad()
def encode_latents(vae, mels: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Log-mels (N, T, 64) → latents (N, 8, T/4, 16) × scaling_factor (posterior mode, as the distillation job)."""
    out = [vae.encode(mels[i : i + batch].unsqueeze(1).to(vae.device)).latent_dist.mode().cpu()
           for i in range(0, len(mels), batch)]
    return torch.cat(out) * vae.config.scaling_factor


def train_teacher(latents: torch.Tensor, text_emb: torch.Tensor, audio_emb: torch.Tensor | None,
                  uncond: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int, batch: int = 16,
                  lr: float = 3e-4, uncond_p: float = 0.1, audio_condition_p: float = 0.25, ema_rate: float = 0.999,
                  seed: int = 0, init=None, snr_gamma: float | None = None, device: str | torch.device = "cpu"):
    """A UNet trained on (latents (N, 8, 64, 16), condition embeddings (N, 512)); returns its EMA copy (on the CPU).

    ``init``: a UNet to continue from (e.g. a saved teacher, to train it longer); default a fresh one.
    ``snr_gamma``: Min-SNR-γ loss weighting (Hang et al. 2023; ``min(SNR, γ) / SNR`` for ε-prediction, as in
    diffusers' training scripts), which stops the many easy low-noise steps from dominating the gradient.
    ``device``: where to train; every random draw stays on the CPU generator, so the batches are the same anywhere.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = (copy.deepcopy(init) if init is not None else UNet2DConditionModel(**architecture.unet_config()))
    unet = unet.to(device).train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = (torch.ones_like(snr) if snr_gamma is None else snr.clamp(max=snr_gamma) / snr).to(device)
    sched = warmup_cosine(opt, steps, warmup=0.02, floor=0.1)
    g = torch.Generator().manual_seed(seed + 3)
    n = len(latents)
    progress = Progress("teacher", steps)
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        x0 = latents[idx]
        cond = text_emb[idx].clone()
        if audio_emb is not None:  # MusicLDM: condition on the clip's own CLAP audio embedding
            use_audio = torch.rand(batch, generator=g) < audio_condition_p
            cond[use_audio] = audio_emb[idx][use_audio]
        drop = torch.rand(batch, generator=g) < uncond_p
        cond[drop] = uncond
        t = torch.randint(0, len(alphas_cumprod), (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        x_t, eps, cond, t = x_t.to(device), eps.to(device), cond.to(device), t.to(device)
        pred = unet(x_t, t, encoder_hidden_states=None, class_labels=cond).sample
        loss = (weights[t] * F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema.parameters(), unet.parameters(), min(ema_rate, (1 + i) / (10 + i)))
        progress.step(i, mse=loss.item())
    return ema.cpu()


def condition_embeddings(components, captions: list[str], waves: torch.Tensor | None, batch: int = 256,
                         audio: torch.Tensor | None = None):
    """(text (N, 512), audio (N, 512) or None, uncond (512,)) CLAP embeddings from the model's own CLAP.

    ``audio``: the clips' audio embeddings if already computed (the CLAP stage saves them); else from ``waves``."""
    text = torch.cat([external.encode_text(components, captions[i : i + batch])[0].cpu()
                      for i in range(0, len(captions), batch)])
    if audio is None and waves is not None:
        audio = external.encode_audio(components, [w.numpy() for w in waves], architecture.SAMPLE_RATE,
                                      batch_size=64).cpu()
    uncond = external.encode_text(components, [""])[0][0].cpu()
    return text, audio, uncond
