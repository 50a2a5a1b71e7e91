"""Train the demo model's VAE (log-mel ↔ latents) and vocoder (log-mel → waveform) on the synthetic set.

VAE: L1 reconstruction of random 64-frame crops of MusicLDM log-mels + a small KL term (AudioLDM's VAE
recipe without its GAN); afterwards ``scaling_factor`` = 1 / std of the latents of the training set, as
Stable Diffusion/MusicLDM set theirs, so the diffusion model sees unit-variance latents.
Vocoder: HiFi-GAN generator (SpeechT5HifiGan) trained on multi-resolution STFT losses (spectral
convergence + log magnitude, Parallel WaveGAN §2.3) and an L1 loss on the MusicLDM log-mel of its output,
without the adversarial stage: it converges in minutes on a CPU and is clean enough for soundfont music.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from musiccm.demo import architecture
from musiccm.demo.common import Progress, warmup_cosine
from musiccm.demo.data import DemoData
from musiccm.mel import MelConfig, log_mel

log = logging.getLogger(__name__)
STFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))  # (n_fft, hop, win), PWG's set


def train_vae(data: DemoData, steps: int, batch: int = 16, crop: int = 64, lr: float = 4e-4,
              kl_weight: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu"):
    """A fresh AutoencoderKL trained on random ``crop``-frame windows of the data's log-mels (returned on the CPU)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**architecture.vae_config()).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    g = torch.Generator().manual_seed(seed)
    n, frames = data.mels.shape[:2]
    progress = Progress("vae", steps)
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        start = torch.randint(0, frames - crop + 1, (1,), generator=g).item() // 4 * 4
        x = data.mels[idx, start : start + crop].unsqueeze(1).to(device)  # (B, 1, crop, 64)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.step(i, l1=rec.item(), kl=kl.item())
    vae.eval().requires_grad_(False)
    scale = 1.0 / latent_std(vae, data.mels[: min(256, n)])
    vae.register_to_config(scaling_factor=scale)
    log.info("vae scaling_factor %.4f", scale)
    return vae.cpu()


@torch.no_grad()
def latent_std(vae, mels: torch.Tensor, batch: int = 32) -> float:
    """Standard deviation of the posterior means of ``mels`` (N, T, 64)."""
    z = torch.cat([vae.encode(mels[i : i + batch].unsqueeze(1).to(vae.device)).latent_dist.mode() for i in
                   range(0, len(mels), batch)])
    return float(z.std())


def stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-resolution STFT loss: spectral convergence + L1 of log magnitudes, averaged over resolutions."""
    total = pred.new_zeros(())
    for n_fft, hop, win in STFT_RESOLUTIONS:
        window = torch.hann_window(win, device=pred.device)

        def mag(x: torch.Tensor, n_fft: int = n_fft, hop: int = hop, win: int = win, window=window) -> torch.Tensor:
            spec = torch.stft(x, n_fft, hop, win, window, return_complex=True)
            return spec.abs().clamp_min(1e-7)

        p, t = mag(pred), mag(target)
        sc = torch.linalg.norm(t - p, dim=(1, 2)) / torch.linalg.norm(t, dim=(1, 2)).clamp_min(1e-7)
        total = total + sc.mean() + (p.log() - t.log()).abs().mean()
    return total / len(STFT_RESOLUTIONS)


def train_vocoder(data: DemoData, steps: int, batch: int = 16, frames: int = 32, lr: float = 5e-4,
                  mel_weight: float = 1.0, seed: int = 0, device: str | torch.device = "cpu"):
    """A fresh SpeechT5HifiGan trained to invert the data's MusicLDM log-mels (returned on the CPU)."""
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(seed)
    cfg = MelConfig()
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(**architecture.vocoder_config())).to(device).train()
    opt = torch.optim.AdamW(voc.parameters(), lr=lr, betas=(0.8, 0.99))
    sched = warmup_cosine(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    n, total_frames = data.mels.shape[:2]
    hop = cfg.hop_length
    progress = Progress("vocoder", steps)
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        start = int(torch.randint(0, total_frames - frames + 1, (1,), generator=g))
        mel = data.mels[idx, start : start + frames].to(device)  # (B, frames, 64)
        target = data.waves[idx, start * hop : (start + frames) * hop].to(device)  # (B, frames·hop)
        wav = voc(mel)[:, : target.shape[1]]
        spec = stft_loss(wav, target)
        mel_l1 = F.l1_loss(log_mel(wav, cfg), log_mel(target, cfg))
        loss = spec + mel_weight * mel_l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(voc.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.step(i, stft=spec.item(), mel_l1=mel_l1.item())
    return voc.cpu().eval().requires_grad_(False)
