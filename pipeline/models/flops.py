"""`simvlg bench flops CONFIG [--vs blip2]`: training compute of a config, offline, on the meta device.

The full-size model is built on the meta device from the config's architecture JSONs (no weights, no
memory, no download) and one sample's training step is run under torch.utils.flop_counter:

- forward / backward FLOPs per sample, split into ViT / connector / LLM (matmuls, convolutions and
  attention; elementwise ops are not counted, as usual for FLOP counters);
- trainable and frozen parameters, soft-prompt length;
- activation memory: bytes autograd saves for backward in the forward pass (a saved-tensors hook;
  parameters excluded), per sample and per micro-batch; plus weight / optimizer-state memory.
- video configs (gradients flow through the ViT into its temporal modules): activation memory per
  micro-batch with and without ViT activation checkpointing (model.vision.grad_checkpointing).
  Checkpointed blocks save through torch.utils.checkpoint's own hooks, which the counter does not
  see, so "with" is the measured rest + every block's kept input + one block recomputed at a time
  (the peak during backward), and the recompute's FLOPs (one more ViT forward) are counted.

The text is BOS + prompt + max_text_tokens caption tokens (captions at the length cap: an upper
bound; --text-tokens sets it); BOS + prompt are the text input the joint connector reads.
Nothing here needs a GPU. The meta LLM uses eager attention
(transformers' SDPA mask code reads mask values, which meta tensors cannot give): the same matmul
FLOPs, but it saves the attention probabilities for backward where SDPA/flash-attn would not, so
the activation estimate is slightly high (OPT-2.7b: ~8.5 MiB of ~300 MiB per sample).

--vs blip2 also counts BLIP-2 (same ViT, OPT and text length):
- stage 1 (Q-Former with ITC + ITM + LM, no LLM): the ViT forward once; ITC = query forward
  (cross-attention to the image) + text forward; ITM = 3 multimodal forwards (positive pair, hard
  negative text, hard negative image: BLIP-2's `text_ids_all` / `image_embeds_all`) + ITM head;
  LM = a text forward (the query keys/values are cached from ITC, so they are not recomputed; the
  extra attention over 32 cached keys is left out) + BERT's LM head (768 -> 30522). Each with its
  backward. Measured on transformers' Blip2QFormerModel with its text FFN (use_qformer_text_input).
- stage 2: exactly this pipeline's `model.connector: qformer` model (32 queries, same LLM).
and prints the total pretraining compute for the paper's step counts beside paper Table 2.

--vs connectors counts the same model with each connector (TomeFormer, Q-Former, the joint connector
of models/joint.py with model.joint's sizes) and prints them side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config, ConfigError, ModelConfig, load_config

from .llm import IGNORE

# BLIP-2 pretraining (Li et al. 2023, sec. 3.4): 250k + 80k steps; batch 1680 (ViT-g, stage 1) and
# 1920 (OPT, stage 2). Paper Table 2 (SimVLG, 8 x A100-80G, OPT-2.7b): time per 5k steps and totals.
BLIP2_STEPS = (250_000, 80_000)
BLIP2_BATCH = (1680, 1920)
PAPER_TABLE2 = [  # (model, stage-1 per 5k, stage-2 per 5k, steps, clock time hours, MSCOCO CIDEr)
    ("BLIP-2", "3 h 50 min", "2 h 40 min", "330k", 234, 137.7),
    ("SimVLG", "-", "2 h 45 min", "250k", 133, 139.1),
    ("SimVLG", "-", "2 h 45 min", "150k", 80, 137.0),
    ("SimVLG (55M)", "-", "2 h 35 min", "90k", 47, 136.8),
]
GIGA, TERA, PETA, GIB = 1e9, 1e12, 1e15, 2**30


@dataclass
class Count:
    fwd: int = 0
    bwd: int = 0
    parts: dict = field(default_factory=dict)  # name -> (fwd, bwd)
    saved_bytes: int = 0  # activations autograd keeps for backward

    @property
    def total(self) -> int:
        return self.fwd + self.bwd

    def add(self, name: str, other: Count, times: int = 1) -> None:
        self.fwd += times * other.fwd
        self.bwd += times * other.bwd
        self.saved_bytes += times * other.saved_bytes
        self.parts[name] = (times * other.fwd, times * other.bwd)


@contextmanager
def saved_activation_bytes(params, out: list):
    """Sum the bytes of tensors saved for backward (parameters and their views excluded)."""
    param_ids = {id(p) for p in params}
    seen = set()

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in param_ids and id(base) not in param_ids and id(t) not in seen:
            seen.add(id(t))
            out[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _module_flops(counts: dict, prefix: str) -> int:
    return int(sum(counts.get(prefix, {}).values()))


def count_step(fn, params) -> tuple[Count, dict, dict]:
    """Run fn() -> scalar loss, then its backward, under one flop counter (so that backward FLOPs
    are attributed to modules too) -> (Count, forward counts by module, backward counts by module)."""
    saved = [0]
    fc = FlopCounterMode(display=False)
    with fc:
        with saved_activation_bytes(params, saved):
            loss = fn()
        fwd_total = fc.get_total_flops()
        fwd = {k: dict(v) for k, v in fc.get_flop_counts().items()}
        loss.backward()
    both = fc.get_flop_counts()
    bwd = {k: {op: n - fwd.get(k, {}).get(op, 0) for op, n in v.items()} for k, v in both.items()}
    return Count(fwd_total, fc.get_total_flops() - fwd_total, saved_bytes=saved[0]), fwd, bwd


def text_length(model_cfg: ModelConfig, text_tokens: int | None) -> int:
    if text_tokens is not None:
        return text_tokens
    if model_cfg.llm.truncation == "sequence":  # the whole row is capped
        return model_cfg.llm.max_text_tokens
    return 1 + len(model_cfg.llm.prompt.split()) + model_cfg.llm.max_text_tokens  # BOS + prompt ~ words


def pixel_shape(cfg: Config) -> tuple:
    s = cfg.model.vision.image_size
    return (1, cfg.data.num_frames, 3, s, s) if cfg.model.video.enabled else (1, 3, s, s)


def measure_model(model_cfg: ModelConfig, px_shape: tuple, L: int, align_weight: float = 0.0) -> dict:
    """One training sample of a SimVLG (or Q-Former-connector) model on the meta device; with
    align_weight > 0 also the frozen P-Former's forward on the caption (flops_pformer.py)."""
    from .simvlg import build_model

    model = build_model(model_cfg, meta=True)
    px = torch.empty(px_shape, device="meta")
    ids = torch.zeros(1, L, dtype=torch.long, device="meta")
    mask = torch.ones(1, L, dtype=torch.long, device="meta")
    labels = ids.clone()
    labels[:, : min(L - 1, 1 + len(model_cfg.llm.prompt.split()))] = IGNORE  # BOS + prompt: text input
    extra = ()
    if align_weight > 0:  # position match: the assignment's FLOPs are a [29, 29] problem on the host
        from .flops_pformer import bert_ids, frozen_pformer

        width = model.llm.get_input_embeddings().weight.shape[1]
        model.align_to(frozen_pformer(model_cfg, width), align_weight, "position")
        extra = (bert_ids(model_cfg), None)
    c, f, b = count_step(lambda: model(px, ids, mask, labels, *extra)["loss"], list(model.parameters()))
    for name in ("vision", "connector", "llm") + (("pformer",) if extra else ()):
        c.parts[name] = (_module_flops(f, f"SimVLG.{name}"), _module_flops(b, f"SimVLG.{name}"))
    # the module tracker keeps the LLM "active" in backward until the gradient has flowed through
    # the connector too, so the LLM's backward is what the others leave over
    c.parts["llm"] = (c.parts["llm"][0], c.bwd - c.parts["connector"][1] - c.parts["vision"][1])
    n_frames = px_shape[1] if len(px_shape) == 5 else 1
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    v = model.vision
    block_input = n_frames * v.num_tokens * v.width * torch.empty((), dtype=v.dtype).element_size()
    return {
        "count": c,
        "params": model.parameter_counts(),
        "soft_prompt": model.soft_prompt_length(n_frames),
        "vision_tokens": v.num_tokens,
        "vision_width": v.width,
        "text_tokens": L,
        "frozen_bytes": frozen,
        "vision_blocks": v.num_blocks,
        "block_input_bytes": block_input,
    }


def checkpointing_memory(model_cfg: ModelConfig, px_shape: tuple, L: int) -> dict:
    """Video: activation bytes per sample with and without ViT activation checkpointing."""
    runs = {}
    for on in (False, True):
        vision = model_cfg.vision.model_copy(update={"grad_checkpointing": on})
        runs[on] = measure_model(model_cfg.model_copy(update={"vision": vision}), px_shape, L)
    off, on = runs[False], runs[True]
    n, kept = off["vision_blocks"], off["block_input_bytes"]
    inside = off["count"].saved_bytes - on["count"].saved_bytes  # what the blocks saved, all of them
    one_block = inside / n
    return {
        "without": off["count"].saved_bytes,
        "with": on["count"].saved_bytes + n * kept + one_block,
        "block_inputs": n * kept,
        "one_block": one_block,
        "blocks": n,
        "recompute_flops": on["count"].total - off["count"].total,
    }


def blip2_stage1(model_cfg: ModelConfig, vit_fwd: int, n_visual: int, width: int, L: int) -> dict:
    """BLIP-2 stage-1 step per sample (see the module docstring); the ViT forward from SimVLG's count."""
    from transformers import Blip2QFormerModel

    from .llm import hf_config_from_json
    from .qformer import qformer_config

    q = model_cfg.qformer
    arch = q.arch_config or model_cfg.tomeformer.arch_config
    if arch is None:
        raise ValueError("--vs blip2 needs model.qformer.arch_config (or tomeformer.arch_config)")
    bert = hf_config_from_json(arch)
    qcfg = qformer_config(bert, q, width)
    qcfg.use_qformer_text_input = True  # the text FFN stage 1 uses
    C, V = qcfg.hidden_size, bert.vocab_size
    with torch.device("meta"):
        qf = Blip2QFormerModel(qcfg)
        queries = nn.Parameter(torch.empty(1, q.num_queries, C))
        itc_heads = nn.ModuleList([nn.Linear(C, 256), nn.Linear(C, 256)])  # vision_proj, text_proj
        itm_head = nn.Linear(C, 2)
        lm_head = nn.Sequential(nn.Linear(C, C), nn.LayerNorm(C), nn.Linear(C, V))  # BertLMPredictionHead
    img = torch.empty(1, n_visual, width, device="meta")  # frozen ViT output: no grad
    params = list(qf.parameters()) + [queries]
    text = lambda n: torch.empty(n, L, C, device="meta", requires_grad=True)  # word+pos emb

    def itc():
        zq = qf(query_embeds=queries, encoder_hidden_states=img).last_hidden_state
        zt = qf(query_embeds=text(1), query_length=0).last_hidden_state
        return itc_heads[0](zq).sum() + itc_heads[1](zt[:, 0]).sum()

    def itm():
        x = torch.cat([queries.expand(3, -1, -1), text(3)], dim=1)
        z = qf(
            query_embeds=x, query_length=q.num_queries, encoder_hidden_states=img.expand(3, -1, -1)
        ).last_hidden_state
        return itm_head(z[:, : q.num_queries]).sum()

    def lm():
        z = qf(query_embeds=text(1), query_length=0).last_hidden_state
        return lm_head(z).sum()

    total = Count(fwd=vit_fwd)
    total.parts["vision"] = (vit_fwd, 0)
    for name, fn in (("ITC", itc), ("ITM (3 pairs)", itm), ("LM", lm)):
        c, _, _ = count_step(
            fn,
            params + list(itc_heads.parameters()) + list(itm_head.parameters()) + list(lm_head.parameters()),
        )
        total.add(name, c)
    return {"count": total}


CONNECTORS = ("tomeformer", "qformer", "joint")


def connector_variants(m: ModelConfig) -> dict[str, ModelConfig]:
    """The model with each connector (the Q-Former built from the TomeFormer's BERT arch if it has
    none of its own)."""
    q = m.qformer.model_copy(update={"arch_config": m.qformer.arch_config or m.tomeformer.arch_config})
    return {c: m.model_copy(update={"connector": c, "qformer": q}) for c in CONNECTORS}


def report(cfg: Config, vs: str | None = None, text_tokens: int | None = None) -> dict:
    if cfg.model.kind == "pformer":  # P-Former stage 0 (flops_pformer.py)
        from .flops_pformer import measure_stage0

        return {"config": cfg.run.name, "pformer_stage0": measure_stage0(cfg, text_tokens)}
    L = text_length(cfg.model, text_tokens)
    out = {
        "config": cfg.run.name,
        "simvlg": measure_model(cfg.model, pixel_shape(cfg), L, cfg.train.align_weight),
    }
    if vs == "connectors":
        out["connectors"] = {
            c: out["simvlg"] if c == cfg.model.connector else measure_model(m, pixel_shape(cfg), L)
            for c, m in connector_variants(cfg.model).items()
        }
    if cfg.model.video.enabled and cfg.model.connector == "tomeformer":
        ck = out["vit_checkpointing"] = checkpointing_memory(cfg.model, pixel_shape(cfg), L)
        if cfg.model.vision.grad_checkpointing:  # the hook missed what the checkpointed blocks keep
            out["simvlg"]["count"].saved_bytes = round(ck["with"])
    if vs == "blip2":
        if cfg.model.video.enabled:
            raise ValueError("--vs blip2 compares image pretraining; this config is a video config")
        m = cfg.model
        q = m.qformer.model_copy(update={"arch_config": m.qformer.arch_config or m.tomeformer.arch_config})
        stage2_cfg = m.model_copy(update={"connector": "qformer", "qformer": q})
        out["blip2_stage2"] = measure_model(stage2_cfg, pixel_shape(cfg), L)
        sim = out["simvlg"]
        out["blip2_stage1"] = blip2_stage1(
            stage2_cfg, sim["count"].parts["vision"][0], sim["vision_tokens"], sim["vision_width"], L
        )
    return out


# ------------------------------------------------------------------------------------- output
def _g(x) -> str:
    return f"{x / GIGA:,.1f}"


def _print_model(title: str, m: dict, micro_batch: int, precision: str = "bf16") -> None:
    c: Count = m["count"]
    p = m["params"]
    print(f"\n{title}")
    print(f"  tokens: {m['vision_tokens']} visual -> soft prompt {m['soft_prompt']}, text {m['text_tokens']}")
    print(
        f"  parameters: trainable {p['trainable'] / 1e6:,.2f} M, frozen {p['frozen'] / 1e6:,.1f} M "
        f"(ViT {p['vision'] / 1e6:,.1f} M, LLM {p['llm'] / 1e6:,.1f} M)"
    )
    print("  GFLOP per sample         forward   backward      total")
    for name, (f, b) in c.parts.items():
        print(f"    {name:<20} {_g(f):>10} {_g(b):>10} {_g(f + b):>10}")
    print(f"    {'all':<20} {_g(c.fwd):>10} {_g(c.bwd):>10} {_g(c.total):>10}")
    tr = p["trainable"]
    copy = (
        ""
        if precision == "fp32"
        else f"+ a {precision} copy {2 * tr / GIB:,.2f} GiB under DeepSpeed {precision}; "
    )
    print(
        f"  memory: activations saved for backward {c.saved_bytes / 2**20:,.1f} MiB/sample, "
        f"{c.saved_bytes * micro_batch / GIB:,.1f} GiB per micro-batch of {micro_batch}; frozen weights "
        f"{m['frozen_bytes'] / GIB:,.2f} GiB; trainable fp32 weights+grads+AdamW {16 * tr / GIB:,.2f} GiB "
        f"({copy}ZeRO-2 shards grads and states)"
    )


def print_report(cfg: Config, r: dict) -> None:
    if "pformer_stage0" in r:
        from .flops_pformer import print_stage0

        return print_stage0(cfg, r)
    t = cfg.train
    print(f"simvlg bench flops: {r['config']} (meta device; FLOPs from torch.utils.flop_counter)")
    s = r["simvlg"]
    _print_model(f"SimVLG ({cfg.model.connector})", s, t.micro_batch, t.precision)
    if t.align_weight > 0:
        print(
            f"  with the P-Former alignment loss (train.align_weight {t.align_weight}): row pformer is the "
            "frozen P-Former's forward on the caption; its weights are among the frozen ones"
        )
    ck = r.get("vit_checkpointing")
    if ck:
        mb, on = t.micro_batch, cfg.model.vision.grad_checkpointing
        print(
            f"  ViT activation checkpointing (gradients reach the temporal modules inside the ViT; "
            f"this config: {'on' if on else 'off'}), per micro-batch of {mb}:"
        )
        print(f"    without: {ck['without'] * mb / GIB:,.2f} GiB activations saved for backward")
        print(
            f"    with:    {ck['with'] * mb / GIB:,.2f} GiB = the rest + {ck['blocks']} block inputs "
            f"{ck['block_inputs'] * mb / GIB:,.2f} GiB + one block recomputed "
            f"{ck['one_block'] * mb / GIB:,.2f} GiB; costs one more ViT forward "
            f"({_g(ck['recompute_flops'])} GFLOP per sample)"
        )
    sim_total = s["count"].total * t.global_batch * t.steps
    if "connectors" in r:
        print_connectors(r["connectors"], t.micro_batch)
    if "blip2_stage1" not in r:
        print(
            f"\n  pretraining: {t.steps:,} steps x {t.global_batch} samples x "
            f"{_g(s['count'].total)} GFLOP = {sim_total / PETA:,.0f} PFLOP"
        )
        return
    s1, s2 = r["blip2_stage1"]["count"], r["blip2_stage2"]["count"]
    print("\nBLIP-2 stage 1 (Q-Former: ITC + ITM + LM; ViT forward, no LLM)")
    print("  GFLOP per sample         forward   backward      total")
    for name, (f, b) in s1.parts.items():
        print(f"    {name:<20} {_g(f):>10} {_g(b):>10} {_g(f + b):>10}")
    print(f"    {'all':<20} {_g(s1.fwd):>10} {_g(s1.bwd):>10} {_g(s1.total):>10}")
    print(f"  activations saved for backward (Q-Former): {s1.saved_bytes / 2**20:,.1f} MiB/sample")
    _print_model("BLIP-2 stage 2 (= model.connector: qformer)", r["blip2_stage2"], t.micro_batch, t.precision)
    b1 = s1.total * BLIP2_BATCH[0] * BLIP2_STEPS[0]
    b2 = s2.total * BLIP2_BATCH[1] * BLIP2_STEPS[1]
    print("\nTotal pretraining compute (per-sample fwd+bwd x batch x steps)")
    print(f"  {'':<22}{'GFLOP/sample':>13}{'batch':>7}{'steps':>9}{'PFLOP':>10}")
    rows = [
        ("BLIP-2 stage 1", s1.total, BLIP2_BATCH[0], BLIP2_STEPS[0], b1),
        ("BLIP-2 stage 2", s2.total, BLIP2_BATCH[1], BLIP2_STEPS[1], b2),
        ("BLIP-2 total", None, None, sum(BLIP2_STEPS), b1 + b2),
        (f"SimVLG ({r['config']})", s["count"].total, t.global_batch, t.steps, sim_total),
    ]
    for name, g, b, n, tot in rows:
        print(f"  {name:<22}{(_g(g) if g else ''):>13}{(b or ''):>7}{n:>9,}{tot / PETA:>10,.0f}")
    print(f"  BLIP-2 / SimVLG compute: {(b1 + b2) / sim_total:.2f}x")
    ratio1 = s1.total * BLIP2_BATCH[0] / (s["count"].total * t.global_batch)
    ratio2 = s2.total * BLIP2_BATCH[1] / (s["count"].total * t.global_batch)
    print(
        f"  per step vs SimVLG: stage 1 {ratio1:.2f}x, stage 2 {ratio2:.2f}x  "
        f"(paper Table 2 time per 5k steps: 230/165 = 1.39x, 160/165 = 0.97x)"
    )
    print("\nPaper Table 2 (8 x A100-80G, OPT-2.7b):")
    print(f"  {'model':<14}{'stage 1 / 5k':>14}{'stage 2 / 5k':>14}{'steps':>7}{'clock':>8}{'COCO':>7}")
    for name, a, b, n, h, cider in PAPER_TABLE2:
        print(f"  {name:<14}{a:>14}{b:>14}{n:>7}{h:>6} h{cider:>7}")
    print("  BLIP-2 / SimVLG clock time: 234 / 133 = 1.76x (250k), 234 / 80 = 2.93x (150k)")


def print_connectors(runs: dict, micro_batch: int) -> None:
    print(
        f"\nConnectors side by side (same ViT, LLM and {next(iter(runs.values()))['text_tokens']} text "
        "tokens; one sample, forward + backward)"
    )
    print(
        f"  {'connector':<12}{'soft prompt':>12}{'trainable M':>13}{'connector GFLOP':>17}{'LLM GFLOP':>11}"
        f"{'all GFLOP':>11}{'activations GiB/micro-batch':>29}"
    )
    for name, m in runs.items():
        c: Count = m["count"]
        con, llm = c.parts["connector"], c.parts["llm"]
        print(
            f"  {name:<12}{m['soft_prompt']:>12}{m['params']['trainable'] / 1e6:>13,.2f}"
            f"{_g(sum(con)):>17}{_g(sum(llm)):>11}{_g(c.total):>11}"
            f"{c.saved_bytes * micro_batch / GIB:>29,.1f}"
        )


def _jsonable(r: dict) -> dict:
    out = {}
    for k, v in r.items():
        if isinstance(v, Count):
            out[k] = asdict(v) | {"total": v.total}
        elif isinstance(v, dict):
            out[k] = _jsonable(v)
        else:
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simvlg bench flops", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a YAML config file, or the name of a packaged one")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key (repeatable)",
    )
    p.add_argument(
        "--vs",
        choices=["blip2", "connectors"],
        default=None,
        help="also count BLIP-2's two stages, or this model with each connector",
    )
    p.add_argument(
        "--text-tokens",
        type=int,
        default=None,
        help="text length per sample (default: BOS + prompt + max_text_tokens)",
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the numbers to this file")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"simvlg: config error: {e}", file=sys.stderr)
        return 1
    try:
        r = report(cfg, args.vs, args.text_tokens)
    except ValueError as e:
        print(f"simvlg bench flops: {e}", file=sys.stderr)
        return 1
    print_report(cfg, r)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(_jsonable(r), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
