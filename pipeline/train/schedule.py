"""Learning rate: linear warm-up from `warmup_start_lr` to `lr`, then cosine to `min_lr` at the last
step (`cosine`: paper section 4, smooth per step), or LAVIS's per-inner-epoch staircase (`lavis`: what
the official code runs). A pure function of the step, so resuming needs no scheduler state."""

import math

from pipeline.config import TrainConfig


def lr_at(step: int, t: TrainConfig) -> float:
    if t.lr_schedule == "lavis":
        return lavis_lr_at(step, t)
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
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lavis_lr_at(step: int, t: TrainConfig) -> float:
    """LAVIS's linear_warmup_cosine_lr under its iteration runner (the official run): inner epochs of
    `iters_per_inner_epoch` steps; in epoch 0 a linear warm-up over `warmup_steps` (then flat at lr);
    from epoch 1 on, lr for the whole epoch is the cosine at epoch / (steps // iters_per_inner_epoch)
    (a staircase of 50 steps for 250k / 5k). The last epoch is 49/50 of the way, so min_lr is never
    quite reached, as in the official code."""
    ipe = t.iters_per_inner_epoch
    epoch, i = divmod(step, ipe)
    if epoch == 0:
        return min(t.lr, t.warmup_start_lr + (t.lr - t.warmup_start_lr) * i / max(t.warmup_steps, 1))
    max_epoch = max(1, t.steps // ipe)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch))
