"""DeepSpeed around the SimVLG model: the JSON config filled from the YAML, and the frozen parts kept
out of the engine (never cast, never broadcast, never checkpointed).

    ds = deepspeed_config(cfg)                      # batch, precision, clipping, ZeRO stage from the YAML
    with frozen_children_detached(model):           # the ViT/LLM stay exactly as loaded
        engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds, ...)
    exclude_frozen_from_state_dict(model)           # checkpoints hold the trainable part only
    init_distributed()                              # deepspeed.init_distributed, and no /dev/shm leak
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import Config

DS_OVERRIDDEN = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
)
# fp16 dynamic loss scaling as torch.cuda.amp.GradScaler's defaults (the official run's AMP): start at
# 2^16, halve on every overflow (hysteresis 1), double after 2000 clean steps. A ds_config's own "fp16"
# block may change these; "enabled" always follows train.precision.
FP16_SCALING = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 2000,
    "hysteresis": 1,
    "min_loss_scale": 1,
}


def deepspeed_config(cfg: Config) -> dict:
    """The JSON config with every batch/precision/clipping field taken from the YAML (grad_clip 0:
    no clipping); fp16 gets dynamic loss scaling (FP16_SCALING unless the JSON sets its own)."""
    raw = json.loads(Path(cfg.train.ds_config).read_text())
    ds = {k: v for k, v in raw.items() if not k.startswith("_") and k not in DS_OVERRIDDEN}
    t = cfg.train
    fp16 = {"enabled": t.precision == "fp16"}
    if t.precision == "fp16":
        own = {k: v for k, v in (raw.get("fp16") or {}).items() if k != "enabled"}
        fp16.update({**FP16_SCALING, **own})
    ds.update(
        train_batch_size=t.global_batch,
        train_micro_batch_size_per_gpu=t.micro_batch,
        gradient_accumulation_steps=t.grad_accum,
        gradient_clipping=t.grad_clip,
        bf16={"enabled": t.precision == "bf16"},
        fp16=fp16,
    )
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    ds["steps_per_print"] = 10**9  # we log ourselves
    return ds


@contextmanager
def frozen_children_detached(model: torch.nn.Module):
    """Take every direct child whose parameters are all frozen (SimVLG: the ViT and the LLM) out of
    `model` for the duration, then put it back. deepspeed.initialize casts every parameter of the
    module it is given to the engine dtype (and broadcasts it); frozen weights must stay exactly as
    loaded, in their own dtype, so the engine never sees them. The model's forward uses them as usual
    afterwards; ZeRO only ever touches the parameters handed to its optimizer."""
    detached = {}
    for name, child in list(model.named_children()):
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            detached[name] = child
            setattr(model, name, None)
    try:
        yield list(detached)
    finally:
        for name, child in detached.items():
            setattr(model, name, child)


def check_world(cfg: Config, world_size: int) -> None:
    t = cfg.train
    if t.micro_batch * t.grad_accum * world_size != t.global_batch:
        raise SystemExit(
            f"simvlg train: train.global_batch is {t.global_batch} but micro_batch {t.micro_batch} x "
            f"grad_accum {t.grad_accum} x {world_size} running ranks = "
            f"{t.micro_batch * t.grad_accum * world_size}; fix the config or launch.nodes/"
            f"gpus_per_node (the config expects {cfg.world_size} ranks)"
        )


def exclude_frozen_from_state_dict(model: torch.nn.Module) -> None:
    """Checkpoints hold the trainable part only. DeepSpeed's exclude_frozen_parameters misses tied
    frozen weights (OPT's lm_head is embed_tokens: 257 MB at 2.7b), so drop every frozen name."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop(module, state_dict, prefix, local_metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop)


def init_distributed() -> None:
    """deepspeed.init_distributed (NCCL on CUDA, else gloo), then give back DeepSpeed's CPU shared memory.

    On CPU ranks of one node DeepSpeed's shm comm op creates /dev/shm/deepspeed_allreduce_buffer_<uid>_
    <MASTER_ADDR>_<MASTER_PORT>_<rank> (66 MiB each) and never unlinks it: every run, killed or not,
    leaves its buffers in RAM until reboot (measured here: 266 files, 18 GB of a 24 GiB machine, the
    OOM killer ending runs). Once every rank has mapped every buffer (the barrier), each rank unlinks its
    own name; the mappings stay valid and the memory is freed when the last rank exits."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    name = Path("/dev/shm") / "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(dist.get_rank()),
        ]
    )
    if not torch.cuda.is_available():  # every rank, file or not: a collective must be symmetric
        dist.barrier()  # every rank is past DeepSpeed's shm set-up, which opened every rank's buffer
        name.unlink(missing_ok=True)
