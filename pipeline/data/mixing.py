"""Mixing over arms, and the adaptive mixer fed back from the training loop.

An arm is what a sample is drawn from: a data source ("laion"), or, when sources name tasks
(data.sources[].tasks), a (source, task) pair ("coco/captioning", "coco/objects"). An arm's configured
weight is its source's weight (normalised over sources) x its task's weight (normalised within the
source).

Modes (data.mixing):
- sample:   every sample draws its arm with probability ∝ weight (open_clip-style interleave)
- batch:    every batch draws one source ∝ weight (LAVIS / official EVLGen style), every sample one of
            that source's tasks ∝ task weight; the only mode that may mix image and video sources
- adaptive: per-sample draws like `sample`, with shares that follow each arm's recent training loss
            (compact-representations paper §4.1, Eq. 4: weight_S = L_S / Σ_s L_s):
                share_a = w_a·L_a / Σ_k w_k·L_k
            w_a is the configured weight (equal losses give the configured mixture; all weights equal:
            the paper's rule), L_a the mean of the last `adaptive_window` losses reported for a (an arm
            not reported yet counts as the mean of the others, or 1: training starts at the weights).
            Floor: a share below `adaptive_floor` is raised to it and the others shrink to fill the
            rest, keeping their ratios (repeated until none is below), so the shares are exactly the
            paper's formula whenever none is below the floor. (This module's first rule,
            floor + (1 - n·floor)·p, moved every share even when none was low.) n·floor must be < 1.
data.tasks.minimum_per_batch: every batch first takes that many samples of each arm (of the batch's
source, in batch mode), the rest drawn by the shares: the paper's "minimum number of samples per task,
so this can always be computed for all tasks" (every arm's loss is seen every step).

Adaptive shares and exact resume (ShareSchedule): batch g uses the shares in force when the trainer
asked for batch g - delay, with delay = num_workers x prefetch_factor + 1. The trainer-side loader
publishes each batch's shares into a shared-memory ring before it asks for a batch, and a DataLoader
worker making batch g reads slot g (waiting, should it ever run ahead, until g is published). Batch g
is therefore a function of the loss history alone, not of how far the workers had prefetched, and the
ring's published rows travel with the loader state, so a resumed run draws exactly what the
uninterrupted run drew. The price: a share change reaches the data `delay` batches after the loss
that caused it, against an adaptive_window of hundreds of steps.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass

import torch

from .tasks import TASKS, pair_name


@dataclass(frozen=True)
class Arm:
    name: str  # "laion", or "coco/captioning" when sources name tasks
    source: int  # index into the loader's sources
    task: str
    weight: float  # configured share: source weight (normalised) x task weight (normalised in the source)


def make_arms(sources: list[str], weights: list[float], tasks: list[dict[str, float]]) -> list[Arm]:
    """The mixing arms: one per source while every source is captioning only (named as the source,
    so logs and checkpoints read as before tasks existed), else one per (source, task)."""
    for name, own in zip(sources, tasks):
        bad = [t for t in own if t not in TASKS]
        if bad or not own:
            raise ValueError(
                f"data source {name!r}: unknown task(s) {bad or '(none)'}; tasks: {', '.join(TASKS)}"
            )
    shares = normalize(weights)
    if all(list(own) == ["captioning"] for own in tasks):
        return [Arm(n, i, "captioning", s) for i, (n, s) in enumerate(zip(sources, shares))]
    return [
        Arm(pair_name(n, t), i, t, s * w)
        for i, (n, s, own) in enumerate(zip(sources, shares, tasks))
        for t, w in zip(own, normalize(list(own.values())))
    ]


def normalize(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"mixing weights must have a positive sum, got {weights}")
    return [w / total for w in weights]


def adaptive_shares(base: list[float], losses: list[float | None], floor: float) -> list[float]:
    """Shares ∝ base·loss with a floor (the module docstring). A loss that is None, non-finite or
    <= 0 counts as the mean of the usable ones (1 if none). n·floor >= 1 gives uniform shares."""
    n = len(base)
    ok = [x is not None and math.isfinite(x) and x > 0 for x in losses]
    known = [x for x, good in zip(losses, ok) if good]
    fill = sum(known) / len(known) if known else 1.0
    if n * floor >= 1.0:
        return [1.0 / n] * n
    raw = [b * (x if good else fill) for b, x, good in zip(base, losses, ok)]
    pinned = [False] * n
    while True:  # at most n rounds: each pins at least one more share at the floor
        free = 1.0 - floor * sum(pinned)
        rest = sum(r for r, p in zip(raw, pinned) if not p)
        shares = [floor if p else free * r / rest for r, p in zip(raw, pinned)]
        low = [i for i, (s, p) in enumerate(zip(shares, pinned)) if not p and s < floor]
        if not low:
            return shares
        for i in low:
            pinned[i] = True


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


class ShareSchedule:
    """The shares each batch uses, by global batch index, in a shared-memory ring (module docstring).
    `publish` runs in the trainer's process, `get` in the DataLoader workers."""

    def __init__(self, arms: int, delay: int):
        if delay < 1:
            raise ValueError(f"share delay must be >= 1, got {delay}")
        self.delay, self.size = delay, delay + 2  # slots: the published window and a margin
        self.ring = torch.zeros(self.size, arms, dtype=torch.float64).share_memory_()  # [size, arms]
        self.ready = torch.full((1,), -1, dtype=torch.int64).share_memory_()  # last published batch

    def publish(self, upto: int, shares: list[float]) -> None:
        """Batches up to `upto` not yet published get `shares`."""
        start = int(self.ready[0]) + 1
        if upto < start:
            return
        row = torch.tensor(shares, dtype=torch.float64)
        for g in range(max(start, upto - self.size + 1), upto + 1):
            self.ring[g % self.size] = row
        self.ready[0] = upto  # after the rows: a worker that sees it reads finished rows

    def get(self, g: int) -> list[float]:
        while int(self.ready[0]) < g:  # only when a worker runs more than `delay` batches ahead
            time.sleep(0.001)
        if g <= int(self.ready[0]) - self.size:
            raise RuntimeError(
                f"the shares of batch {g} were overwritten before a worker read them "
                f"(published up to {int(self.ready[0])}, ring of {self.size})"
            )
        return self.ring[g % self.size].tolist()

    def rows(self, start: int) -> list[list[float]]:
        """Published rows of batches start.. (what a resumed loader must replay)."""
        return [self.ring[g % self.size].tolist() for g in range(start, int(self.ready[0]) + 1)]

    def restore(self, start: int, rows: list[list[float]]) -> None:
        """Batches start.. were published with `rows` before a checkpoint; nothing after."""
        for i, row in enumerate(rows[: self.size]):
            self.ring[(start + i) % self.size] = torch.tensor(row, dtype=torch.float64)
        self.ready[0] = start + min(len(rows), self.size) - 1


class AdaptiveMixer:
    """Trainer-process side of adaptive mixing: a loss window per arm -> shares, published per batch
    through a ShareSchedule that the workers read."""

    def __init__(
        self, names: list[str], base_weights: list[float], floor: float, window: int, delay: int = 1
    ):
        if len(set(names)) != len(names):
            raise ValueError(f"mixing arms repeat: {names}")
        self.names = list(names)
        self.base = normalize(base_weights)
        self.floor = floor
        self.window = window
        self.history: dict[str, deque] = {n: deque(maxlen=window) for n in self.names}
        self.current = self.shares()
        self.schedule = ShareSchedule(len(self.names), delay)

    def report_loss(self, losses: dict[str, float]) -> list[float]:
        for name, value in losses.items():
            if name not in self.history:
                raise KeyError(f"unknown mixing arm {name!r}; known: {self.names}")
            value = float(value)
            if math.isfinite(value):
                self.history[name].append(value)
        self.current = self.shares()
        return self.current

    def publish(self, upto: int) -> None:
        """Before the trainer asks for batch k: batches up to k + delay get today's shares."""
        self.schedule.publish(upto, self.current)

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
        self.current = self.shares()
