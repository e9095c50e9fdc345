"""`simvlg bench flops` for the P-Former (issue 15), on the meta device like flops.py:

- `model.kind: pformer` (pformer_opt2.7b): one sentence's stage-0 step: the P-Former (BERT + heads:
  forward and backward), the frozen LLM reading [N prompts | the sentence] (forward, and the backward
  that carries the gradient to the prompts), and the rest (the VQ search over the LLM's vocabulary,
  N x V distances per sentence, plus the contrastive and loss arithmetic);
- SimVLG with `train.align_weight > 0`: the frozen P-Former's forward on the caption (the targets),
  counted in flops.measure_model through `frozen_pformer` (its row "pformer" in the table).

The BERT side is max_text_tokens long (the official code pads to it); the LLM side as flops.text_length.
"""

from __future__ import annotations

import torch

from pipeline.schema import Config, ModelConfig

from .flops import GIB, PETA, _g, _module_flops, count_step, text_length
from .pformer import build_pformer, build_stage0


def frozen_pformer(model_cfg: ModelConfig, llm_width: int):
    """The alignment targets' P-Former at full size on the meta device (model.pformer.arch_config)."""
    return build_pformer(model_cfg.pformer, llm_width, meta=True).freeze()


def bert_ids(model_cfg: ModelConfig) -> torch.Tensor:
    return torch.zeros(1, model_cfg.pformer.max_text_tokens, dtype=torch.long, device="meta")


def _children_flops(counts: dict, prefix: str) -> int:
    """FLOPs of a module whose own forward is never called (stage 0 calls the P-Former's parts: encode,
    prompts_from_cls), as the sum over its direct children."""
    depth = prefix.count(".") + 1
    return int(
        sum(
            sum(v.values()) for k, v in counts.items() if k.startswith(prefix + ".") and k.count(".") == depth
        )
    )


def measure_stage0(cfg: Config, text_tokens: int | None = None) -> dict:
    m = cfg.model
    stage0 = build_stage0(m.pformer, m.llm, meta=True)
    L = text_length(m, text_tokens)
    ids = torch.zeros(1, L, dtype=torch.long, device="meta")
    second = (bert_ids(m),) if m.pformer.views == 2 else ()  # views 2: a second masked view through BERT
    c, f, b = count_step(
        lambda: stage0(bert_ids(m), None, ids, None, ids, *second)["loss"], list(stage0.parameters())
    )

    # the module tracker credits the LLM's backward to the P-Former's parts (active until the gradient
    # has left them), so the P-Former's own step is counted alone and the LLM's backward is the rest
    def pformer_alone():
        out = stage0.pformer(bert_ids(m)).float().sum()
        return out + stage0.pformer.encode(*second, None).float().sum() if second else out

    alone, _, _ = count_step(pformer_alone, list(stage0.parameters()))
    pf = (_children_flops(f, "PFormerStage0.pformer"), alone.bwd)
    llm_fwd = _module_flops(f, "PFormerStage0.llm")
    c.parts = {
        "pformer": pf,
        "llm": (llm_fwd, c.bwd - pf[1]),
        "vq search, losses": (c.fwd - pf[0] - llm_fwd, 0),
    }
    trainable = sum(p.numel() for p in stage0.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in stage0.parameters() if not p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in stage0.parameters() if not p.requires_grad)
    return {
        "count": c,
        "trainable": trainable,
        "frozen": frozen,
        "frozen_bytes": frozen_bytes,
        "num_prompts": m.pformer.num_prompts,
        "bert_tokens": m.pformer.max_text_tokens,
        "text_tokens": L,
        "vocab": stage0.llm.get_input_embeddings().weight.shape[0],
    }


def print_stage0(cfg: Config, r: dict) -> None:
    t, s = cfg.train, r["pformer_stage0"]
    c = s["count"]
    print(
        f"simvlg bench flops: {r['config']} (P-Former stage 0, meta device; FLOPs from "
        "torch.utils.flop_counter)"
    )
    print(
        f"  tokens: {s['bert_tokens']} BERT -> {s['num_prompts']} prompts, text {s['text_tokens']}; VQ "
        f"codebook {s['vocab']} LLM embeddings"
    )
    print(
        f"  parameters: trainable {s['trainable'] / 1e6:,.2f} M (P-Former), frozen "
        f"{s['frozen'] / 1e6:,.1f} M (LLM)"
    )
    print("  GFLOP per sentence       forward   backward      total")
    for name, (fw, bw) in c.parts.items():
        print(f"    {name:<20} {_g(fw):>10} {_g(bw):>10} {_g(fw + bw):>10}")
    print(f"    {'all':<20} {_g(c.fwd):>10} {_g(c.bwd):>10} {_g(c.total):>10}")
    print(
        f"  memory: activations saved for backward {c.saved_bytes / 2**20:,.1f} MiB/sentence, "
        f"{c.saved_bytes * t.micro_batch / GIB:,.1f} GiB per micro-batch of {t.micro_batch}; frozen "
        f"weights {s['frozen_bytes'] / GIB:,.2f} GiB; trainable fp32 weights+grads+AdamW "
        f"{16 * s['trainable'] / GIB:,.2f} GiB"
    )
    total = c.total * t.global_batch * t.steps
    print(
        f"\n  pretraining: {t.steps:,} steps x {t.global_batch} sentences x {_g(c.total)} GFLOP = "
        f"{total / PETA:,.0f} PFLOP"
    )
