"""The demo model's architecture: MusicLDM's layout and audio front end at a size that trains on 2 CPU cores.

Same structure as MusicLDM (DESIGN.md §2): 16 kHz, hop 160, 64 mel bins, an AutoencoderKL that downsamples
x4 on both axes into 8 channels, a UNet2DConditionModel conditioned through ``class_labels`` on 512-d CLAP
embeddings, a SpeechT5HifiGan vocoder with upsample rates [5, 4, 2, 2, 2] and a ClapModel (RoBERTa text tower,
HTSAT audio tower). Smaller in every width, and with a native window of 2.56 s (64 latent frames) instead of
10.24 s: a training step is then ~0.35 s instead of ~2.5 s, and longer clips come from crop fusion. The UNet
keeps self-attention on its two coarsest levels only (attention over 32x8 tokens dominated the step time).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from musiccm.build import MUSIC_WORDS, SCHEDULER

WINDOW_LATENT_FRAMES = 64  # 2.56 s at 100 mel frames/s and a x4 VAE
SAMPLE_RATE = 16000
TOKENIZER_VOCAB = 1200
TEXT_MAX_LENGTH = 64


def unet_config() -> dict:
    """Teacher/student UNet (≈5.7 M parameters)."""
    widths = (32, 64, 96, 128)
    return dict(
        sample_size=WINDOW_LATENT_FRAMES,
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=widths,
        layers_per_block=1,
        cross_attention_dim=widths,
        attention_head_dim=8,
        norm_num_groups=16,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=512,
        class_embeddings_concat=True,
    )


def vae_config(scaling_factor: float = 1.0) -> dict:
    """AutoencoderKL: log-mel (1, T, 64) ↔ latents (8, T/4, 16); ``scaling_factor`` = 1/std of trained latents."""
    return dict(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def vocoder_config() -> dict:
    """SpeechT5HifiGan: 64 mel bins at 100 frames/s → 16 kHz (≈0.9 M parameters)."""
    return dict(
        model_in_dim=64,
        sampling_rate=SAMPLE_RATE,
        upsample_initial_channel=128,
        upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[16, 16, 8, 4, 4],
        resblock_kernel_sizes=[3, 7, 11],
        resblock_dilation_sizes=[[1, 3, 5]] * 3,
        normalize_before=False,
    )


def clap_config(vocab_size: int) -> dict:
    """ClapModel: small RoBERTa text tower and HTSAT audio tower, 512-d joint space."""
    return dict(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=TEXT_MAX_LENGTH + 2,
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


def feature_extractor() -> Any:
    """CLAP audio front end at the model's own rate: 16 kHz, hop 160 (100 frames/s like MusicLDM's mels),
    64 bins 0–8 kHz, 10 s per chunk ("repeatpad" fills shorter clips by repetition)."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(feature_size=64, sampling_rate=SAMPLE_RATE, hop_length=160, max_length_s=10,
                                fft_window_size=1024, frequency_min=0, frequency_max=8000)


def train_tokenizer(captions: list[str], directory: str | Path) -> Any:
    """A byte-level BPE trained on the captions (plus a general music vocabulary), saved as RobertaTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(captions) + [MUSIC_WORDS] * 8, vocab_size=TOKENIZER_VOCAB, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tok = RobertaTokenizerFast.from_pretrained(tmp, model_max_length=TEXT_MAX_LENGTH)
    tok.save_pretrained(Path(directory))
    return RobertaTokenizerFast.from_pretrained(Path(directory))


def scheduler() -> Any:
    """The teacher's DDIMScheduler: MusicLDM's noise schedule, unchanged."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER)
