"""Train the demo model's CLAP (text and audio towers) contrastively on the synthetic captions and clips.

The symmetric InfoNCE loss of CLAP (Wu et al. 2023) on L2-normalised 512-d embeddings with CLAP's learnable
temperatures; clips whose labels are identical count as positives of each other (their captions say the
same thing), so they are not pushed apart. At this data size an auxiliary cross-entropy on the labels,
from linear probes on both towers' embeddings, speeds up learning what the captions are about; the probes
are discarded, only the ClapModel is saved. An optional text warm-up (``text_warmup_steps``) first trains the text
tower alone on those probes: a text step costs a fraction of a joint one, and after 500 joint steps without it the
captions' embeddings were still barely separated by instrument (benchmarks/clap_probe.py).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from musiccm import synthetic
from musiccm.demo import architecture
from musiccm.demo.common import Progress, warmup_cosine
from musiccm.demo.data import DemoData
from musiccm.external import _features

log = logging.getLogger(__name__)


def audio_features(fe, waves: torch.Tensor, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """CLAP input features (N, 1, frames, 64) and ``is_longer`` (N, 1) of prepared waveforms."""
    feats, longer = [], []
    for i in range(0, len(waves), batch):
        out = fe([w.numpy() for w in waves[i : i + batch]], sampling_rate=fe.sampling_rate, return_tensors="pt",
                 truncation="rand_trunc")
        feats.append(out["input_features"])
        longer.append(out["is_longer"])
    return torch.cat(feats), torch.cat(longer)


@torch.no_grad()
def embed_audio(clap, feats: torch.Tensor, longer: torch.Tensor, batch: int = 64,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """L2-normalised CLAP audio embeddings (N, 512) of `audio_features`' output, on the CPU.

    For clips of at most 10 s (one CLAP chunk) these are :func:`musiccm.external.encode_audio`'s embeddings."""
    return torch.cat([_features(clap.get_audio_features(input_features=feats[i : i + batch].to(device),
                                                        is_longer=longer[i : i + batch].to(device))).cpu()
                      for i in range(0, len(feats), batch)])


def positives(labels: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """(B, B) target distribution: uniform over the batch items whose labels all match row i's."""
    same = torch.ones(len(idx), len(idx), dtype=torch.bool)
    for v in labels.values():
        lab = v[idx]
        same &= lab[:, None] == lab[None, :]
    same = same.float()
    return same / same.sum(1, keepdim=True)


def warm_up_text(clap, probes: nn.ModuleDict, tokens, labels: dict[str, torch.Tensor], steps: int, batch: int,
                 lr: float, g: torch.Generator, device: str | torch.device) -> None:
    """Train the text tower alone to predict the captions' labels through the probes' text halves.

    Per caption the text tower costs a small fraction of a joint step's audio tower, so this teaches it to read the
    captions (instrument, tempo, drums, mode) before the joint contrastive phase cheaply."""
    text_params = list(clap.text_model.parameters()) + list(clap.text_projection.parameters())
    params = text_params + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps, warmup=0.1)
    progress = Progress("clap text warm-up", steps)
    n = len(tokens["input_ids"])
    for i in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        t = _features(clap.get_text_features(input_ids=tokens["input_ids"][idx].to(device),
                                             attention_mask=tokens["attention_mask"][idx].to(device)))
        loss = t.new_zeros(())
        for name, probe in probes.items():
            k = len(synthetic.CLASSES[name])
            loss = loss + F.cross_entropy(probe(t)[:, k:], labels[name][idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        progress.step(i, aux=loss.item())


def train_clap(data: DemoData, tokenizer, steps: int, batch: int = 32, lr: float = 5e-4, aux_weight: float = 1.0,
               seed: int = 0, device: str | torch.device = "cpu", text_warmup_steps: int = 0,
               text_warmup_batch: int = 128):
    """A fresh ClapModel trained on (caption, clip) pairs.

    Returns (model on the CPU, feature extractor, the trained model's audio embeddings (N, 512) of the training
    clips): the features are in memory here, so the teacher stage need not extract them again.
    ``text_warmup_steps`` > 0 first trains the text tower alone on the captions' labels (`warm_up_text`)."""
    from transformers import ClapConfig, ClapModel

    torch.manual_seed(seed)
    fe = architecture.feature_extractor()
    clap = ClapModel(ClapConfig(**architecture.clap_config(len(tokenizer)))).to(device).train()
    probes = nn.ModuleDict({name: nn.Linear(512, 2 * len(classes)) for name, classes in synthetic.CLASSES.items()})
    probes = probes.to(device)
    params = list(clap.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps, warmup=0.1)
    log.info("clap: extracting audio features of %d clips", len(data))
    feats, longer = audio_features(fe, data.waves)
    tokens = tokenizer(data.captions, padding="max_length", truncation=True, max_length=architecture.TEXT_MAX_LENGTH,
                       return_tensors="pt")
    g = torch.Generator().manual_seed(seed + 2)
    if text_warmup_steps:
        warm_up_text(clap, probes, tokens, data.labels, text_warmup_steps, text_warmup_batch, lr, g, device)
    progress = Progress("clap", steps)
    for i in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        a = _features(clap.get_audio_features(input_features=feats[idx].to(device),
                                              is_longer=longer[idx].to(device)))  # (B, 512)
        t = _features(clap.get_text_features(input_ids=tokens["input_ids"][idx].to(device),
                                             attention_mask=tokens["attention_mask"][idx].to(device)))
        target = positives(data.labels, idx).to(device)
        labels = {name: v[idx].to(device) for name, v in data.labels.items()}
        logits_a = clap.logit_scale_a.exp() * a @ t.T
        logits_t = clap.logit_scale_t.exp() * t @ a.T
        contrastive = 0.5 * (F.cross_entropy(logits_a, target) + F.cross_entropy(logits_t, target))
        aux = a.new_zeros(())
        for name, probe in probes.items():
            k = len(synthetic.CLASSES[name])
            out_a, out_t = probe(a)[:, :k], probe(t)[:, k:]
            aux = aux + F.cross_entropy(out_a, labels[name]) + F.cross_entropy(out_t, labels[name])
        loss = contrastive + aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            clap.logit_scale_a.clamp_(0, 4.6052)  # CLAP caps the temperature at 100
            clap.logit_scale_t.clamp_(0, 4.6052)
        top1 = (target.gather(1, logits_a.argmax(1, keepdim=True)) > 0).float().mean()  # audio → a matching text
        progress.step(i, contrastive=contrastive.item(), aux=aux.item(), top1=top1.item())
    clap = clap.eval().requires_grad_(False)
    log.info("clap: audio embeddings of the %d training clips", len(data))
    return clap.cpu(), fe, embed_audio(clap, feats, longer, device=device)
