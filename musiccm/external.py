"""The one place that calls into diffusers/transformers components (after k-diffusion's external.py).

Everything else sees plain tensors: CLAP text/audio embeddings (B, 512), a ``Denoiser``
``denoise(x_t, t, cond) -> x0`` over latents (B, 8, T, 16), and ``decode(latents) -> waveforms``.
transformers 5 quirk handled here: ``ClapModel.get_*_features`` return output objects whose
``.pooler_output`` holds the normalised vector.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from musiccm.longform import Denoiser, chunked_apply
from musiccm.model import MusicLDMComponents
from musiccm.schedule import classifier_free_guidance, guidance_scale_embedding, model_output_to_x0


def _features(output: object) -> torch.Tensor:
    vec = output.pooler_output if hasattr(output, "pooler_output") else output  # transformers 5 vs 4
    return F.normalize(vec.float(), dim=-1)


def text_max_length(c: MusicLDMComponents) -> int:
    """Token limit: the tokenizer's, capped by the text tower's position table."""
    positions = c.text_encoder.config.text_config.max_position_embeddings - 2  # RoBERTa offset
    return int(min(c.tokenizer.model_max_length, positions))


@torch.no_grad()
def encode_text(c: MusicLDMComponents, prompts: list[str]) -> tuple[torch.Tensor, list[bool]]:
    """L2-normalised CLAP text embeddings (B, D) and, per prompt, whether it was truncated."""
    limit = text_max_length(c)
    lengths = [len(ids) for ids in c.tokenizer(prompts)["input_ids"]]
    tokens = c.tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
    device = c.text_encoder.device
    out = c.text_encoder.get_text_features(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    )
    return _features(out), [n > limit for n in lengths]


@torch.no_grad()
def encode_audio(
    c: MusicLDMComponents, waveforms: list[np.ndarray], sample_rate: int, batch_size: int = 32
) -> torch.Tensor | None:
    """L2-normalised CLAP audio embeddings (B, D), averaged over 10 s chunks; None without an audio front end.

    The chunks of all waveforms go through the audio tower ``batch_size`` at a time (each chunk's features and
    embedding do not depend on its batch), so many short clips cost a few batched forwards, not one each."""
    fe = c.feature_extractor
    if fe is None:
        return None
    import torchaudio.functional as AF

    device = c.text_encoder.device
    if not waveforms:
        return torch.zeros(0, c.text_encoder.config.projection_dim, device=device)
    chunks, owner = [], []
    for j, wav in enumerate(waveforms):
        x = torch.as_tensor(np.asarray(wav, dtype=np.float32))
        if sample_rate != fe.sampling_rate:
            x = AF.resample(x, sample_rate, fe.sampling_rate)
        for i in range(0, max(len(x), 1), fe.nb_max_samples):
            chunks.append(x[i : i + fe.nb_max_samples].numpy())
            owner.append(j)
    embeddings = []
    for i in range(0, len(chunks), batch_size):
        # Chunks never exceed max length, so "rand_trunc" never crops at random: scores are deterministic.
        feats = fe(chunks[i : i + batch_size], sampling_rate=fe.sampling_rate, return_tensors="pt",
                   truncation="rand_trunc")
        out = c.text_encoder.get_audio_features(
            input_features=feats["input_features"].to(device), is_longer=feats["is_longer"].to(device)
        )
        embeddings.append(_features(out))
    chunk_emb = torch.cat(embeddings)
    # Normalising the per-waveform sum of unit chunk embeddings is normalising their mean.
    summed = chunk_emb.new_zeros(len(waveforms), chunk_emb.shape[1])
    summed.index_add_(0, torch.tensor(owner, device=chunk_emb.device), chunk_emb)
    return F.normalize(summed, dim=-1)


def make_denoiser(
    c: MusicLDMComponents, uncond: torch.Tensor | None, guidance_scale: float
) -> Denoiser:
    """x0-predicting denoiser from the UNet.

    Teacher: classifier-free guidance with cond and uncond in one batched forward. Student with a
    guidance embedding (``time_cond_proj_dim``): one forward with w = guidance_scale − 1 embedded.
    Student without: one conditional forward (guidance was distilled in).
    """
    unet, sched = c.unet, c.scheduler
    prediction_type = sched.config.prediction_type
    dtype = unet.dtype
    w_dim = unet.config.get("time_cond_proj_dim")
    use_cfg = not c.is_consistency and guidance_scale != 1.0

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        a = sched.alphas_cumprod.to(x_t.device)[t]
        x_in, t_in, cond_in = x_t, t, cond
        if use_cfg:  # (2B, C, T, F): cond rows then uncond rows
            assert uncond is not None
            x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
            cond_in = torch.cat([cond, uncond.expand(cond.shape[0], -1)])
        w_emb = None
        if w_dim is not None:
            w = torch.full((x_in.shape[0],), guidance_scale - 1.0, device=x_t.device)
            w_emb = guidance_scale_embedding(w, w_dim).to(dtype)
        out = unet(
            x_in.to(dtype), t_in, encoder_hidden_states=None, class_labels=cond_in.to(dtype), timestep_cond=w_emb
        ).sample.float()
        if use_cfg:
            out = classifier_free_guidance(*out.chunk(2), guidance_scale)
        return model_output_to_x0(out, x_t.float(), a, prediction_type)

    return denoise


@torch.no_grad()
def decode(
    c: MusicLDMComponents,
    latents: torch.Tensor,
    num_samples: int,
    latent_chunk: int | None = None,
    mel_chunk: int | None = None,
) -> torch.Tensor:
    """Latents (B, C, T, F) → waveforms (B, num_samples): VAE then vocoder, in cross-faded chunks."""
    g = c.geometry
    latent_chunk = latent_chunk or g.window_frames
    # A vocoder may ask for its own chunk length (Griffin-Lim: long chunks, so phases agree across a minute).
    mel_chunk = mel_chunk or getattr(c.vocoder, "chunk_frames", None) or g.window_frames * g.vae_factor
    vae_dtype = c.vae.dtype
    z = latents.to(vae_dtype) / c.vae.config.scaling_factor

    def vae_decode(chunk: torch.Tensor) -> torch.Tensor:  # (B, C, t, F) -> (B, 1, 4t, 64)
        return c.vae.decode(chunk).sample

    mel = chunked_apply(vae_decode, z, latent_chunk, max(latent_chunk // 8, 1), g.vae_factor, dim=2)
    mel = mel.squeeze(1).to(c.vocoder.dtype)  # (B, M, n_mels)
    needed = -(-num_samples // g.hop_length)
    mel = mel[:, :needed]

    def vocode(chunk: torch.Tensor) -> torch.Tensor:  # (B, m, n_mels) -> (B, hop·m + extra)
        return c.vocoder(chunk)

    wav = chunked_apply(vocode, mel, mel_chunk, max(mel_chunk // 16, 1), g.hop_length, dim=1)
    return wav[:, :num_samples].float()
