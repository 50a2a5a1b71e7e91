"""Adversarial discriminator (MusicCM eq. 7–8, after ADD / StyleGAN-T): a frozen feature network with
small trainable heads on several of its layers.

- Feature network F (frozen, eval): AudioMAE's ViT-B (timm ``vit_base_patch16_224``, ``img_size=(1024,
  128)``, ``in_chans=1``) on 128-bin Kaldi fbank, or the teacher's CLAP audio tower (HTSAT) on its dB-mel
  (the paper's ablation). Both read MusicLDM log-mels through :mod:`musiccm.mel`'s differentiable
  conversions, so real clips and generated latents (through the VAE decoder) take the same path.
- Heads D_k (trainable): per-token MLP + a temporal conv over the layer's tokens, and a projection
  discriminator term ⟨h, W·c⟩ (Miyato & Koyama 2018) on c = [text embedding, mel embedding]; the mel
  embedding is F's pooled last-used layer on the *real* clip, as ADD conditions on the real image.
- ``forward(mel, cond)`` returns per-head token logits (B, N_k) and the heads' input features
  (B, N_k, D_k); R1 is taken w.r.t. the latter (:func:`musiccm.distill.losses.r1_penalty`).
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from musiccm.distill.config import DistillConfig
from musiccm.mel import AUDIOMAE_BINS, AUDIOMAE_FRAMES, MelConfig, mel_to_clap, mel_to_fbank
from musiccm.model import MusicLDMComponents

log = logging.getLogger(__name__)
PATCH = 16
RANDOM_INIT_WARNING = (
    "!!! AudioMAE feature network has RANDOM weights (no `audiomae_path` given). The adversarial term will "
    "judge random ViT features: fine for tests and smoke runs, NOT for real distillation. Pass a local "
    "AudioMAE ViT-B .safetensors file (timm key names) as `audiomae_path`. !!!"
)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


class ViTFeatures(nn.Module):
    """AudioMAE-style ViT: MusicLDM log-mel → fbank (B, 1, frames, 128) → patch tokens of chosen blocks."""

    def __init__(self, mel: MelConfig, layers: tuple[int, ...], mel_frames: int, audiomae_path: str | None = None,
                 tiny: bool = False):
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        self.mel = mel
        if tiny:  # same interface, 12 blocks, a few thousand parameters per block; sized to the clip
            self.frames = max(PATCH, math.ceil(mel_frames / PATCH) * PATCH)
            self.net = VisionTransformer(img_size=(self.frames, AUDIOMAE_BINS), patch_size=PATCH, in_chans=1,
                                         num_classes=0, embed_dim=32, depth=12, num_heads=2, mlp_ratio=2.0)
        else:
            self.frames = AUDIOMAE_FRAMES
            self.net = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=(AUDIOMAE_FRAMES,
                                         AUDIOMAE_BINS), in_chans=1, num_classes=0)
        self.depth = len(self.net.blocks)
        _check_layers(layers, self.depth, "the ViT feature network")
        self.layers = tuple(layers)
        self.dims = [self.net.embed_dim] * len(layers)
        if audiomae_path:
            load_audiomae(self.net, audiomae_path)
        else:
            warnings.warn(RANDOM_INIT_WARNING, stacklevel=2)
            log.warning(RANDOM_INIT_WARNING)
        _freeze(self)

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, 64) MusicLDM log-mel → [(B, N, D)] patch tokens after each chosen block."""
        fbank = mel_to_fbank(mel, self.mel, self.frames)  # (B, frames, 128)
        return self.net.forward_intermediates(fbank.unsqueeze(1), indices=list(self.layers), norm=False,
                                              stop_early=True, output_fmt="NLC", intermediates_only=True)


def load_audiomae(net: nn.Module, path: str) -> None:
    """Load AudioMAE encoder weights (safetensors, timm key names; ``module.``/decoder keys ignored)."""
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as exc:  # file missing / not safetensors: say what is needed
        raise ValueError(f"audiomae_path {path!r} could not be read as safetensors ({type(exc).__name__}: {exc}); "
                         "pass a .safetensors file of AudioMAE ViT-B encoder weights with timm key names") from None
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token", "head.", "fc_norm"))}
    missing, _ = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("head", "fc_norm"))]
    if missing:
        raise ValueError(f"audiomae_path {path!r} lacks ViT-B encoder weights {missing[:5]}… "
                         f"({len(missing)} missing); expected timm vit_base_patch16_224 names for img_size (1024, 128)")


class ClapFeatures(nn.Module):
    """The teacher's CLAP audio tower (HTSAT): MusicLDM log-mel → CLAP dB-mel → tokens of chosen Swin blocks."""

    def __init__(self, teacher: MusicLDMComponents, mel: MelConfig, layers: tuple[int, ...]):
        super().__init__()
        if teacher.feature_extractor is None:
            raise ValueError("feature_network='clap' needs the teacher's CLAP feature_extractor; this model has none")
        self.mel = mel
        self.fe = teacher.feature_extractor
        self.audio = teacher.text_encoder.audio_model  # shared with the (frozen) teacher, not copied
        blocks = [blk for stage in self.audio.audio_encoder.layers for blk in stage.blocks]
        self.depth = len(blocks)
        _check_layers(layers, self.depth, "the CLAP audio tower (HTSAT blocks across stages)")
        self.layers = tuple(layers)
        self.dims = [blocks[i].layernorm_before.normalized_shape[0] for i in layers]
        self._blocks = [blocks[i] for i in layers]  # plain list: not registered twice
        _freeze(self)

    def forward(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, 64) MusicLDM log-mel → [(B, N, D)] tokens after each chosen HTSAT block."""
        x = mel_to_clap(mel, self.mel, self.fe)  # (B, 1, T, 64)
        captured: dict[int, torch.Tensor] = {}
        hooks = [blk.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out[0]))
                 for k, blk in enumerate(self._blocks)]
        try:
            self.audio(input_features=x.to(next(self.audio.parameters()).dtype))
        finally:
            for h in hooks:
                h.remove()
        return [captured[k] for k in range(len(self._blocks))]


def _check_layers(layers: tuple[int, ...], depth: int, what: str) -> None:
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"disc_layers {list(layers)}: {bad} out of range for {what} with {depth} blocks; "
                         f"allowed: distinct indices in 0..{depth - 1}")


class Head(nn.Module):
    """One discriminator head on tokens (B, N, D) with projection conditioning → token logits (B, N)."""

    def __init__(self, dim: int, cond_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.inp = nn.Linear(dim, hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=9, padding=4)  # along tokens (time-major patches)
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)
        self.cmap = nn.Linear(cond_dim, hidden)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, feat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.inp(self.norm(feat.float())), 0.2)  # (B, N, H)
        h = h + F.leaky_relu(self.conv(h.transpose(1, 2)).transpose(1, 2), 0.2)
        h = F.leaky_relu(self.mix(h), 0.2)
        return self.out(h).squeeze(-1) + (h * self.cmap(c)[:, None]).sum(-1) * self.scale  # (B, N)


class Heads(nn.Module):
    """All trainable heads; the one module the job wraps for DDP."""

    def __init__(self, dims: list[int], cond_dim: int, hidden: int):
        super().__init__()
        self.heads = nn.ModuleList([Head(d, cond_dim, hidden) for d in dims])

    def forward(self, features: list[torch.Tensor], c: torch.Tensor) -> list[torch.Tensor]:
        return [head(f, c) for head, f in zip(self.heads, features, strict=True)]


class Discriminator(nn.Module):
    """Frozen feature network + trainable :class:`Heads`; conditioned on text and a (real) mel embedding."""

    def __init__(self, teacher: MusicLDMComponents, config: DistillConfig, mel_frames: int):
        super().__init__()
        mel = MelConfig.from_components(teacher)
        if config.feature_network == "audiomae":
            self.features: nn.Module = ViTFeatures(mel, config.disc_layers, mel_frames, config.audiomae_path,
                                                   tiny=config.tiny_feature_network)
        elif config.feature_network == "clap":
            self.features = ClapFeatures(teacher, mel, config.disc_layers)
        else:
            raise ValueError(f"feature_network {config.feature_network!r} is not one of 'audiomae', 'clap'")
        text_dim = int(teacher.unet.config.get("projection_class_embeddings_input_dim") or 512)
        self.embed_dim = self.features.dims[-1]
        hidden = 32 if config.tiny_feature_network else 256
        self.heads = Heads(self.features.dims, text_dim + self.embed_dim, hidden)

    def train(self, mode: bool = True) -> Discriminator:
        super().train(mode)
        self.features.eval()  # frozen feature network stays in eval mode
        return self

    def feature_maps(self, mel: torch.Tensor) -> list[torch.Tensor]:
        """F's tokens (B, N_k, D_k) for each chosen layer; differentiable w.r.t. ``mel``."""
        return self.features(mel)

    @staticmethod
    def mel_embedding(features: list[torch.Tensor]) -> torch.Tensor:
        """Pooled embedding of a clip (B, D): mean token of the last chosen layer, layer-normalised."""
        pooled = features[-1].float().mean(1)
        return F.layer_norm(pooled, pooled.shape[-1:])

    @staticmethod
    def condition(cond: torch.Tensor, mel_emb: torch.Tensor) -> torch.Tensor:
        """Head conditioning c = [text embedding, mel embedding] (B, 512 + D), no gradient."""
        return torch.cat([cond.float(), mel_emb.float()], dim=1).detach()

    def forward(
        self, mel: torch.Tensor, cond: torch.Tensor, ref_embedding: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Token logits [(B, N_k)] and the heads' input features [(B, N_k, D_k)] for log-mels (B, T, 64).

        ``ref_embedding`` is the real clip's :meth:`mel_embedding` (default: this mel's own).
        """
        feats = self.feature_maps(mel)
        emb = ref_embedding if ref_embedding is not None else self.mel_embedding(feats)
        return self.heads(feats, self.condition(cond, emb)), feats


def describe(disc: Discriminator) -> dict[str, Any]:
    """Facts for logs: feature network, depth, layers, trainable parameters."""
    return {
        "feature_network": type(disc.features).__name__,
        "depth": disc.features.depth,
        "layers": list(disc.features.layers),
        "head_params": sum(p.numel() for p in disc.heads.parameters()),
    }


class BottleneckClassifier(nn.Module):
    """DMD2's GAN classifier (its ``cls_pred_branch``): a conv, GroupNorm and SiLU on the fake score's mid-block
    output (B, C, h, w), pooled to one real-vs-generated logit per clip. Unconditional, as in DMD2. DMD2's strided
    4×4 convs shrink SD's 16×16 bottleneck; a 3×3 conv keeps any size (the demo UNet's is 8×2).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(math.gcd(32, channels), channels),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(1)
