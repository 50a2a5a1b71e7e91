"""A label classifier as the evaluation's feature network, for data sets whose labels we know (the demo).

Where Cnn14 (AudioSet) gives FD_pann its embedding and IS/KL their class posteriors, a model trained on the
synthetic music's labels does the same job for the demo: its pooled embedding feeds the Fréchet distance
and KID, the logits of its ``logits_head`` (the instrument) feed IS and KL, and each head's argmax gives
attribute accuracy against the prompt's labels. A small CNN over MusicLDM log-mels (any length; global
average over time). Saved as ``config.json`` + ``model.safetensors``; loading never unpickles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from musiccm.mel import MelConfig, log_mel

log = logging.getLogger(__name__)
MEL_MEAN, MEL_STD = -5.0, 3.0  # rough log-mel statistics of peak-0.5 music; a fixed input scaling


class LabelClassifier(nn.Module):
    """Log-mel (B, T, 64) → embedding (B, D) and one logit vector per labelled attribute."""

    def __init__(self, classes: dict[str, list[str]], width: int = 32, embed_dim: int = 128,
                 logits_head: str | None = None, sample_rate: int = 16000):
        super().__init__()
        self.classes = {k: list(v) for k, v in classes.items()}
        self.logits_head = logits_head or next(iter(classes))
        self.sample_rate = sample_rate
        self.config = dict(classes=self.classes, width=width, embed_dim=embed_dim, logits_head=self.logits_head,
                           sample_rate=sample_rate)
        chans = (1, width // 2, width, 2 * width, 2 * width)
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:], strict=True):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU(),
                       nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.GELU(), nn.AvgPool2d((2, 2))]
        self.conv = nn.Sequential(*blocks)
        self.embed = nn.Linear(chans[-1], embed_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(embed_dim, len(v)) for k, v in self.classes.items()})

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = ((mel - MEL_MEAN) / MEL_STD).unsqueeze(1)  # (B, 1, T, 64)
        h = self.conv(x)  # (B, C, T/16, 4)
        h = h.mean(dim=(2, 3))  # global average: any clip length
        emb = self.embed(h)
        act = F.gelu(emb)
        return emb, {k: head(act) for k, head in self.heads.items()}

    @torch.no_grad()
    def wave_features(self, wave: torch.Tensor, sample_rate: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A mono waveform (S,) at any rate → (embedding (D,), {head: logits}), through MusicLDM's log-mel."""
        import torchaudio.functional as AF

        x = wave.float()
        if sample_rate != self.sample_rate:
            x = AF.resample(x, sample_rate, self.sample_rate)
        x = x - x.mean()
        x = 0.5 * x / (x.abs().max() + 1e-8)  # the training clips' level (MusicLDM's normalize_wav)
        mel = log_mel(x[None].to(next(self.parameters()).device), MelConfig(sample_rate=self.sample_rate))
        emb, logits = self(mel)
        return emb[0].cpu(), {k: v[0].cpu() for k, v in logits.items()}


def train(mels: torch.Tensor, labels: dict[str, torch.Tensor], steps: int, classes: dict[str, list[str]] | None = None,
          batch: int = 32, lr: float = 1e-3, min_frames: int = 128, seed: int = 0,
          device: str | torch.device = "cpu") -> LabelClassifier:
    """Train on log-mels (N, T, 64) with label indices; random crops of ≥ ``min_frames`` frames (length-robust).
    Returned on the CPU."""
    from musiccm import synthetic
    from musiccm.demo.common import warmup_cosine

    classes = classes or {k: list(synthetic.CLASSES[k]) for k in labels}
    torch.manual_seed(seed)
    net = LabelClassifier(classes).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps, warmup=0.1)
    g = torch.Generator().manual_seed(seed + 4)
    n, frames = mels.shape[:2]
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        length = int(torch.randint(min(min_frames, frames), frames + 1, (1,), generator=g))
        start = int(torch.randint(0, frames - length + 1, (1,), generator=g))
        _, logits = net(mels[idx, start : start + length].to(device))
        target = {k: labels[k][idx].to(device) for k in classes}
        losses = {k: F.cross_entropy(logits[k], target[k]) for k in classes}
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (i + 1) % 100 == 0 or i + 1 == steps:
            acc = {k: float((logits[k].argmax(1) == target[k]).float().mean()) for k in classes}
            log.info("classifier step %d/%d loss %.3f acc %s", i + 1, steps, loss.item(),
                     {k: round(v, 2) for k, v in acc.items()})
    return net.cpu().eval().requires_grad_(False)


def save(net: LabelClassifier, directory: str | Path) -> str:
    """``config.json`` + ``model.safetensors`` in ``directory``."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(net.config, indent=2) + "\n")
    return str(d)


def load(directory: str | Path, device: str = "cpu") -> LabelClassifier:
    """Load a saved classifier (safetensors only); ValueError if the directory is not one."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise ValueError(f"{directory}: not a label classifier (needs config.json and model.safetensors)")
    net = LabelClassifier(**json.loads((d / "config.json").read_text()))
    state = load_file(str(d / "model.safetensors"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit the config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    return net.to(device).eval().requires_grad_(False)
