"""Small helpers shared by the demo's training loops: progress lines and a warm-up + cosine schedule."""

from __future__ import annotations

import logging
import math
import time

import torch

log = logging.getLogger("musiccm.demo")


class Progress:
    """One log line every ``every`` steps with running means of the named losses."""

    def __init__(self, what: str, total: int, every: int = 50):
        self.what, self.total, self.every = what, total, every
        self.sums: dict[str, float] = {}
        self.count = 0
        self.start = time.perf_counter()

    def step(self, i: int, **losses: float) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        if (i + 1) % self.every == 0 or i + 1 == self.total:
            text = " ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items())
            log.info("%s step %d/%d %s (%.0f s)", self.what, i + 1, self.total, text, time.perf_counter() - self.start)
            self.sums, self.count = {}, 0


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05,
                  floor: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup``·steps, then cosine decay to ``floor``·lr."""
    n_warm = max(1, round(warmup * steps))

    def factor(s: int) -> float:
        if s < n_warm:
            return (s + 1) / n_warm
        progress = min(1.0, (s - n_warm) / max(1, steps - n_warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
