"""TomeFormer: a BERT encoder with ToMe token merging between attention and FFN in every layer.

    tf = build_tomeformer(cfg.tomeformer)              # bert-base-uncased weights (first num_layers layers)
    y = tf(x)                                          # [B, 257, 768] -> [B, 29, 768] with r = 19 x 12
    y, sources = tf.forward_with_sources(x)            # + per layer [B, N_l, N0] 0/1: tokens -> patches

One layer (BERT is post-LN):
    q, k, v = Wq x, Wk x, Wv x                                     [B, h, N, d]
    a = softmax(q k^T / sqrt(d) + log(size)) v                     proportional attention (SDPA float mask)
    x = LN(x + W_o a)
    x, size = merge_tokens(x, metric = mean_heads(k), size, r)     [B, N - r, C]; CLS protected
    x = LN(x + FFN(x))

Parameter names match transformers' BertModel (embeddings.position_embeddings, encoder.layer.{i}.
attention.self.query, ...), so any BERT-family checkpoint loads directly. Word embeddings and the
pooler are not built (the inputs are visual tokens: the official code comments word embeddings out);
position and token-type embeddings + LayerNorm are applied to the inputs, as in the official code.

Three explicit choices (the config resolves `official: true` into them, see pipeline/schema.py):
    merge_mode   "wavg" size-weighted average of a group | "mean" plain mean (official)
    prop_attn    + log(size) on every key (proportional attention) | off (official)
    token_order  "original": kept tokens in original order, a merged group at its B token's place |
                 "tome": ToMe's output order [kept A tokens, then all B tokens] (official); the order
                 decides the next layer's even/odd A/B split, so it changes which tokens can merge
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import bipartite_match, clamp_r, merge_apply, merge_source
from pipeline.config import MergeSchedule, TomeFormerConfig

from .llm import hf_config_from_json


def layer_r(r: int | list[int] | MergeSchedule, num_layers: int) -> list[int]:
    """r per layer: a constant, an explicit list, or a linear schedule start -> end."""
    if isinstance(r, MergeSchedule):
        if num_layers == 1:
            return [r.start]
        return [round(r.start + (r.end - r.start) * i / (num_layers - 1)) for i in range(num_layers)]
    if isinstance(r, list):
        if len(r) != num_layers:
            raise ValueError(f"r has {len(r)} entries for {num_layers} layers")
        return list(r)
    return [int(r)] * num_layers


def token_counts(n: int, rs: list[int]) -> list[int]:
    """Tokens after each layer, starting from n (CLS protected; r clamped like the kernel)."""
    out = []
    for r in rs:
        n -= clamp_r(n, r, True)
        out.append(n)
    return out


class Embeddings(nn.Module):
    """BertEmbeddings without word embeddings: inputs_embeds + position + token type 0, LayerNorm."""

    def __init__(self, c):
        super().__init__()
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x):  # [B, N, C]
        N = x.shape[1]
        if N > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"{N} visual tokens but the TomeFormer has "
                f"{self.position_embeddings.num_embeddings} positions"
            )
        x = x + self.position_embeddings.weight[:N] + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class DenseLayerNorm(nn.Module):
    """BertSelfOutput / BertOutput: LN(residual + dropout(W x))."""

    def __init__(self, d_in, d_out, c):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseLayerNorm(c.hidden_size, c.hidden_size, c)


class Intermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        from transformers.activations import ACT2FN

        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = ACT2FN[c.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))


def tome_order(pos: torch.Tensor) -> torch.Tensor:
    """pos [B, N'] original positions of a merge's outputs -> the permutation [B, N'] that puts them in
    ToMe's order: even positions (kept A tokens, CLS first) ascending, then odd ones (B tokens)."""
    return ((pos % 2) * (pos.shape[1] * 2 + 2) + pos).argsort(dim=1)


class TomeLayer(nn.Module):
    def __init__(self, c, r: int, merge_mode: str, prop_attn: bool, token_order: str, backend: str):
        super().__init__()
        if token_order not in ("original", "tome"):
            raise ValueError(f"token_order must be 'original' or 'tome', got {token_order!r}")
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseLayerNorm(c.intermediate_size, c.hidden_size, c)
        self.num_heads = c.num_attention_heads
        self.attn_dropout = c.attention_probs_dropout_prob
        self.r, self.backend = r, backend
        self.mode, self.prop_attn, self.token_order = merge_mode, prop_attn, token_order

    def forward(self, x, size, source=None):
        B, N, C = x.shape  # x [B, N, C], size [B, N, 1] float32 or None
        sa, h = self.attention.self, self.num_heads
        q, k, v = (lin(x).view(B, N, h, C // h).transpose(1, 2) for lin in (sa.query, sa.key, sa.value))
        bias = None
        if self.prop_attn and size is not None:
            bias = size[..., 0].log()[:, None, None, :].to(q.dtype)  # [B, 1, 1, N] log(size) per key
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = self.attention.output(a.transpose(1, 2).reshape(B, N, C), x)  # [B, N, C]

        metric = k.mean(1)  # [B, N, d] keys averaged over heads
        match = bipartite_match(metric.detach(), self.r, True, self.backend)
        x, size = merge_apply(match, x, size, self.mode, self.backend)  # [B, N', C], [B, N', 1]
        if source is not None:
            source = merge_source(match, source)  # [B, N', N0]
        if self.token_order == "tome" and match.r > 0:  # kept A tokens, then all B tokens
            order = tome_order(match.out_pos)  # [B, N']
            x = x.gather(1, order[..., None].expand_as(x))
            size = size.gather(1, order[..., None])
            if source is not None:
                source = source.gather(1, order[..., None].expand_as(source))

        x = self.output(self.intermediate(x), x)  # [B, N', C]
        return x, size, source


class Encoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TomeFormer(nn.Module):
    """BERT with token merging: [B, N, C] -> [B, N - sum(r), C] (see the module docstring)."""

    def __init__(
        self,
        bert_config,
        rs: list[int],
        merge_mode: str = "wavg",
        prop_attn: bool = True,
        token_order: str = "original",
        backend: str = "auto",
    ):
        super().__init__()
        c = bert_config
        if c.hidden_size % c.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.config, self.rs = c, list(rs)
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(TomeLayer(c, r, merge_mode, prop_attn, token_order, backend) for r in rs)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def token_counts(self, n: int) -> list[int]:
        return token_counts(n, self.rs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layers(x, track_sources=False)[0]  # [B, N', C]

    def forward_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(y [B, N', C], per layer [B, N_l, N0] 0/1: which input tokens each token holds)."""
        return self._layers(x, track_sources=True)

    def _layers(self, x: torch.Tensor, track_sources: bool):
        x = self.embeddings(x)  # [B, N0, C]
        size = None  # all ones, created by the merge (float32)
        source, sources = None, []
        if track_sources:  # identity before the first merge
            B, N0 = x.shape[:2]
            source = torch.eye(N0, device=x.device).expand(B, N0, N0)
        for layer in self.encoder.layer:
            x, size, source = layer(x, size, source)
            if track_sources:
                sources.append(source)
        return x, sources


# ------------------------------------------------------------------------------------ loading
def load_bert_weights(tf: TomeFormer, bert_state: dict[str, torch.Tensor]) -> None:
    """Copy a BertModel state dict (first num_layers layers; no word embeddings, no pooler)."""
    sd = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    own = tf.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(f"BERT checkpoint lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    for k, t in own.items():
        if sd[k].shape != t.shape:
            raise ValueError(f"BERT checkpoint {k}: shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}")
    tf.load_state_dict({k: sd[k] for k in own}, strict=True)


def build_tomeformer(cfg: TomeFormerConfig, *, meta: bool = False) -> TomeFormer:
    """From cfg.init (HF id or folder of a BERT-family model); on meta from cfg.arch_config."""
    rs = layer_r(cfg.r, cfg.num_layers)
    kw = dict(
        merge_mode=cfg.merge_mode,
        prop_attn=cfg.prop_attn,
        token_order=cfg.token_order,
        backend=cfg.kernel_backend,
    )
    if meta:
        if cfg.arch_config is None:
            raise ValueError("model.tomeformer.arch_config is needed to build on the meta device")
        bert_cfg = hf_config_from_json(cfg.arch_config)
        _check_depth(bert_cfg, cfg)
        with torch.device("meta"):
            return TomeFormer(bert_cfg, rs, **kw)
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(cfg.init, dtype=torch.float32)
    _check_depth(bert.config, cfg)
    tf = TomeFormer(bert.config, rs, **kw)
    load_bert_weights(tf, bert.state_dict())
    return tf


def _check_depth(bert_cfg, cfg: TomeFormerConfig):
    if bert_cfg.num_hidden_layers < cfg.num_layers:
        raise ValueError(
            f"tomeformer.num_layers {cfg.num_layers} > {bert_cfg.num_hidden_layers} layers in {cfg.init}"
        )
