"""Learning rate: linear warm-up from `warmup_start_lr` to `lr`, then cosine to `min_lr` at the last
step (paper section 4, as BLIP-2). A pure function of the step, so resuming needs no scheduler state."""

import math

from pipeline.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    if step < t.warmup_steps:
        return t.warmup_start_lr + (t.lr - t.warmup_start_lr) * step / t.warmup_steps
    decay_steps = max(1, t.steps - 1 - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-d tensors), as BLIP-2."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
