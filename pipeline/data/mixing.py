"""Source mixing weights, and the adaptive mixer fed back from the training loop.

Modes (data.mixing):
- sample:   every sample draws its source with probability ∝ weight (open_clip-style interleave)
- batch:    every batch draws one source ∝ weight (LAVIS / official EVLGen style); the only mode that
            may mix image and video sources
- adaptive: per-sample draws like `sample`, with shares that follow each source's recent training
            loss (compact-representations paper §4.1: weight ∝ current loss), with a floor:
                share_s = floor + (1 - n·floor) · w_s·L_s / Σ_k w_k·L_k
            w_s is the configured weight (so equal losses give the configured mixture), L_s the mean of
            the last `adaptive_window` losses reported for s (sources not reported yet use the mean of
            the others, or 1). If n·floor ≥ 1 the shares are uniform.

The shares live in a shared-memory float64 tensor created before the DataLoader starts its workers;
the trainer's `report_loss` rewrites it in place and every worker reads it when it draws a batch, so
feedback reaches num_workers > 0 without restarting anything. Batches already prefetched (up to
num_workers × prefetch_factor) were drawn with the older shares.
"""

from __future__ import annotations

import math
import random
from collections import deque

import torch


def normalize(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"source weights must have a positive sum, got {weights}")
    return [w / total for w in weights]


def adaptive_shares(base: list[float], losses: list[float | None], floor: float) -> list[float]:
    n = len(base)
    known = [x for x in losses if x is not None and math.isfinite(x) and x > 0]
    fill = sum(known) / len(known) if known else 1.0
    lw = [b * (x if (x is not None and math.isfinite(x) and x > 0) else fill) for b, x in zip(base, losses)]
    if n * floor >= 1.0:
        return [1.0 / n] * n
    p = normalize(lw)
    return [floor + (1.0 - n * floor) * q for q in p]


def choose(shares: list[float], rng: random.Random, alive: list[bool] | None = None) -> int:
    if alive is not None:
        shares = [s if a else 0.0 for s, a in zip(shares, alive)]
    total = sum(shares)
    if total <= 0:
        raise RuntimeError("no data source can produce samples")
    r = rng.random() * total
    acc = 0.0
    for i, s in enumerate(shares):
        acc += s
        if r < acc:
            return i
    return max(i for i, s in enumerate(shares) if s > 0)


class AdaptiveMixer:
    """Main-process side: keeps loss windows, writes shares into `shared` (a shared-memory tensor)."""

    def __init__(self, names: list[str], base_weights: list[float], floor: float, window: int):
        self.names = list(names)
        self.base = normalize(base_weights)
        self.floor = floor
        self.window = window
        self.history: dict[str, deque] = {n: deque(maxlen=window) for n in self.names}
        self.shared = torch.tensor(self.shares(), dtype=torch.float64).share_memory_()

    def report_loss(self, losses: dict[str, float]) -> list[float]:
        for name, value in losses.items():
            if name not in self.history:
                raise KeyError(f"unknown data source {name!r}; known: {self.names}")
            value = float(value)
            if math.isfinite(value):
                self.history[name].append(value)
        shares = self.shares()
        self.shared.copy_(torch.tensor(shares, dtype=torch.float64))
        return shares

    def mean_losses(self) -> list[float | None]:
        return [sum(h) / len(h) if h else None for h in (self.history[n] for n in self.names)]

    def shares(self) -> list[float]:
        return adaptive_shares(self.base, self.mean_losses(), self.floor)

    def state_dict(self) -> dict:
        return {n: list(h) for n, h in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, values in state.items():
            if n in self.history:
                self.history[n].clear()
                self.history[n].extend(float(v) for v in values)
        self.shared.copy_(torch.tensor(self.shares(), dtype=torch.float64))
