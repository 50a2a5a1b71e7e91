"""The synthetic training set in memory: waveforms prepared exactly as the distillation job prepares them.

Clips are read from a manifest written by :func:`musiccm.synthetic.write_dataset` and go through the same
steps as :func:`musiccm.distill.data.load_clip` (decode, crop/pad to the window, DC removal, peak 0.5), so
the teacher, the VAE and the vocoder see the same signal the distillation job will feed them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from musiccm import synthetic
from musiccm.distill.data import load_clip
from musiccm.mel import MelConfig, fit_frames, log_mel


@dataclass
class DemoData:
    """N clips: waveforms, MusicLDM log-mels, captions and label indices."""

    ids: list[str]
    waves: torch.Tensor  # (N, S) float32, peak 0.5
    mels: torch.Tensor  # (N, T, 64) MusicLDM log-mel, T = S / hop
    captions: list[str]
    labels: dict[str, torch.Tensor]  # attribute → (N,) class index (synthetic.CLASSES order)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: torch.Tensor) -> DemoData:
        idx = index.tolist()
        return DemoData([self.ids[i] for i in idx], self.waves[index], self.mels[index],
                        [self.captions[i] for i in idx], {k: v[index] for k, v in self.labels.items()})


def label_indices(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Class indices of each attribute in :data:`musiccm.synthetic.LABELS` for manifest rows."""
    return {name: torch.tensor([synthetic.CLASSES[name].index(r[name]) for r in rows]) for name in synthetic.LABELS}


def compute_mels(waves: torch.Tensor, config: MelConfig | None = None, batch: int = 256) -> torch.Tensor:
    """MusicLDM log-mels (N, S // hop, n_mels) of prepared waveforms, computed in batches."""
    config = config or MelConfig()
    frames = waves.shape[1] // config.hop_length
    out = [fit_frames(log_mel(waves[i : i + batch], config), frames) for i in range(0, len(waves), batch)]
    return torch.cat(out)


def load(manifest: str, num_samples: int, seed: int = 0) -> DemoData:
    """Read every clip of a synthetic manifest into memory (a fixed crop per clip, chosen by ``seed``)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(manifest).to_pylist()
    g = torch.Generator().manual_seed(seed)
    waves = []
    for r in rows:
        with open(r["uri"], "rb") as f:
            waves.append(load_clip(f.read(), synthetic.SAMPLE_RATE, num_samples, g))
    waves_t = torch.stack(waves)
    return DemoData([r["id"] for r in rows], waves_t, compute_mels(waves_t), [r["caption"] for r in rows],
                    label_indices(rows))
