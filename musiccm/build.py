"""Build MusicLDM-layout models from configs with seeded random weights (tests, benchmarks, defaults).

``full`` reproduces the published MusicLDM architecture (DESIGN.md §2: UNet ≈185 M, VAE ≈55 M,
vocoder ≈55 M, CLAP RoBERTa-base + HTSAT-base). ``tiny`` keeps every structural fact (8 latent
channels, x4 VAE, 64 mel bins, vocoder rates [5, 4, 2, 2, 2], CLAP with a 512-d projection) at a
size that runs in milliseconds. Nothing is downloaded: the tokenizer is a byte-level BPE trained
here on a fixed music vocabulary and loaded as ``RobertaTokenizerFast``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from musiccm.model import MusicLDMComponents

SCALING_FACTOR = 1.075324296951294
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0195,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
)
MUSIC_WORDS = (
    "a an the with and of in on at by for from to slow fast upbeat calm energetic dark bright happy sad "
    "epic dreamy mellow aggressive gentle groovy funky jazzy bluesy ambient cinematic orchestral acoustic "
    "electronic piano guitar bass drums violin cello strings flute trumpet saxophone organ synth pad lead "
    "choir vocals percussion harp clarinet marimba bells beat rhythm melody chords harmony solo ensemble "
    "tempo bpm major minor key song track music tune loop jazz rock pop techno house ambient classical "
    "folk hip hop reggae metal country soul lofi trance dubstep waltz march ballad lullaby"
)


def build_tokenizer(directory: str | Path, max_length: int = 77) -> Any:
    """Train a small byte-level BPE offline and save it as a RobertaTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    corpus = [MUSIC_WORDS] * 4 + [" ".join(reversed(MUSIC_WORDS.split()))]
    bpe.train_from_iterator(
        corpus, vocab_size=600, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tok = RobertaTokenizerFast.from_pretrained(tmp, model_max_length=max_length)
    tok.save_pretrained(directory)
    return RobertaTokenizerFast.from_pretrained(directory)


def unet_config(size: str, guidance_embedding: bool = False, window: int | None = None) -> dict:
    """UNet2DConditionModel config of MusicLDM (``full``) or its tiny twin."""
    widths = (128, 256, 384, 640) if size == "full" else (32, 32, 64, 64)
    return dict(
        sample_size=window or (256 if size == "full" else 32),
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=2 if size == "full" else 1,
        cross_attention_dim=widths,
        attention_head_dim=8,
        norm_num_groups=32 if size == "full" else 8,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=512,
        class_embeddings_concat=True,
        time_cond_proj_dim=256 if guidance_embedding else None,
    )


def vae_config(size: str) -> dict:
    """AutoencoderKL config (x4 down on time and mel, 8 latent channels)."""
    return dict(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(128, 256, 512) if size == "full" else (16, 16, 32),
        layers_per_block=2 if size == "full" else 1,
        latent_channels=8,
        norm_num_groups=32 if size == "full" else 8,
        sample_size=256,
        scaling_factor=SCALING_FACTOR,
        force_upcast=True,
    )


def vocoder_config(size: str) -> dict:
    """SpeechT5HifiGan config: 64 mel bins in, 16 kHz out, hop 160 = 5·4·2·2·2."""
    full = size == "full"
    return dict(
        model_in_dim=64,
        sampling_rate=16000,
        upsample_initial_channel=1024 if full else 64,
        upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4],
        resblock_kernel_sizes=[3, 7, 11] if full else [3],
        resblock_dilation_sizes=[[1, 3, 5]] * 3 if full else [[1, 3]],
        normalize_before=False,
    )


def clap_config(size: str, vocab_size: int) -> dict:
    """ClapModel text (RoBERTa) + audio (HTSAT) config with a 512-d projection."""
    if size == "full":
        return dict(text_config=dict(), audio_config=dict(), projection_dim=512)
    return dict(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=82,
            projection_dim=512,
        ),
        audio_config=dict(
            patch_embeds_hidden_size=16,
            hidden_size=128,
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 2, 4, 8],
            projection_dim=512,
        ),
        projection_dim=512,
    )


def build_components(
    size: str = "tiny", seed: int = 0, guidance_embedding: bool = False, window: int | None = None
) -> MusicLDMComponents:
    """Build a MusicLDM-layout model (teacher: DDIM scheduler) with seeded random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, SpeechT5HifiGan, SpeechT5HifiGanConfig

    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, max_length=512 if size == "full" else 77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(size, guidance_embedding, window))
    vae = AutoencoderKL(**vae_config(size))
    vocab = 50265 if size == "full" else len(tokenizer)
    text_encoder = ClapModel(ClapConfig(**clap_config(size, vocab)))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**vocoder_config(size)))
    return MusicLDMComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        vocoder=vocoder.eval(),
        scheduler=DDIMScheduler(**SCHEDULER),
        feature_extractor=ClapFeatureExtractor(),
        name=f"random-{size}-seed{seed}",
    )
