"""Token merging (ToMe bipartite soft matching) in plain PyTorch: the eager reference.

Shapes: B batch, N tokens in, C channels, Cm metric channels, r merges, N' = N - r tokens out,
NA = ceil(N/2) tokens in set A (even positions), NB = floor(N/2) in set B (odd positions).

Algorithm (Bolya et al., "Token Merging: Your ViT but Faster"), written from the paper:
  1. normalise the metric rowwise; A = even positions, B = odd positions;
  2. every A token finds its most cosine-similar B token (score, index); the protected first
     token (CLS, position 0, in A) gets score -inf and never merges;
  3. the r A tokens with the highest scores merge into their B partners,
     r clamped to (N - protected) // 2, r <= 0 is the identity (inputs returned unchanged);
  4. "wavg": x' = sum(s*x) / sum(s); "mean": x' = plain mean of the tokens in the group (the group is
     the B token and every A token merged into it, sizes ignored; official EVLGen code);
     "sum": x' = sum(x) (used for source tracking). In every mode s' = sum(s).

Output order: the kept tokens in ascending original position. A merged group sits at the position of
its B token; merged-away A tokens vanish. So the protected CLS stays first and r = 0 keeps order.

Tie rules (shared with the Triton kernels): an A token whose best score is reached by several B
tokens takes the lowest B index; equal scores in the top-r selection prefer the lowest A index.
They apply to bitwise-equal scores. The backends sum the dot products in different orders (BLAS
may even differ per column), so candidates equal in exact arithmetic can land an ulp apart and
resolve differently; that only swaps one equally good merge for another.

Precision: scores in float32 (float64 for float64 metrics), computed as (a.b * 1/|a|) * 1/|b| with
the norms clamped at 1e-12: the same rounding steps as the Triton kernel (correctly rounded square
roots and reciprocals, two multiplies per score instead of a division), so metrics whose dot
products are exact (small integers, duplicates of one vector) give bitwise-equal scores in both.
For half-precision x the Triton merge accumulates in float32 and rounds once; this eager merge
computes each r-row correction in float32 and adds it in x's dtype. size=None means all ones as
float32 (counts stay exact past 256).
Gradients: to x, and to size only when the size passed in requires grad: otherwise the returned
size is marked non-differentiable and x is not saved for backward (sizes start as constant ones,
so a chain of merges never builds a size-gradient path). The matching is not differentiable.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("wavg", "mean", "sum")


class Match:
    """The outcome of bipartite matching for one layer; apply it to any [B, N, ...] tensor.

    src_idx [B, r]: A indices merged away, ascending; dst_idx [B, r]: the B index each merges into.
    out_pos [B, N'], dst_out [B, r], group [B, N] are derived on first use. `plan` holds
    backend-private tensors (the Triton path's fused plan) and may be None.
    """

    def __init__(self, src_idx: Tensor, dst_idx: Tensor, n: int, out_pos=None, plan=None):
        self.src_idx, self.dst_idx = src_idx, dst_idx
        self.n, self.r = n, src_idx.shape[1]
        self.n_out = n - self.r
        self.plan = plan
        if out_pos is not None:
            self.out_pos = out_pos  # else computed below on first use

    @functools.cached_property
    def _maps(self):
        B, n, dev = self.src_idx.shape[0], self.n, self.src_idx.device
        pos = torch.arange(n, device=dev).expand(B, n)  # [B, N]
        kept = torch.ones(B, n, dtype=torch.bool, device=dev)
        kept[:, 0::2].scatter_(1, self.src_idx, False)  # [B, N] survives as an output token
        rank = kept.cumsum(1) - 1  # [B, N] output row of each kept position
        slot = torch.where(kept, rank, self.n_out)  # merged-away positions go to a spare slot
        out_pos = pos.new_zeros(B, self.n_out + 1).scatter_(1, slot, pos)[:, : self.n_out]
        dst_out = rank.gather(1, 2 * self.dst_idx + 1)  # [B, r] output row of each partner
        group = rank.clone()
        group[:, 0::2].scatter_(1, self.src_idx, dst_out)
        return out_pos, dst_out, group

    @functools.cached_property
    def out_pos(self) -> Tensor:  # [B, N'] original position of each output token
        return self._maps[0]

    @property
    def dst_out(self) -> Tensor:  # [B, r] output row each merged-away token lands in
        return self._maps[1]

    @property
    def group(self) -> Tensor:  # [B, N] output row holding each input token
        return self._maps[2]


def match_scores(metric: Tensor, protect_first: bool = True) -> tuple[Tensor, Tensor]:
    """Best B partner of every A token: (score [B, NA] fp32, index [B, NA] int64)."""
    m = metric.detach()
    m = m.float() if m.dtype != torch.float64 else m
    inv = 1.0 / (m * m).sum(-1).sqrt().clamp_min(1e-12)  # [B, N] reciprocal norms
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, NA, NB] dot products
    scores.mul_(inv[:, 0::2, None]).mul_(inv[:, None, 1::2])  # cosine similarity, in place
    if protect_first:
        scores[:, 0] = -torch.inf
    return scores.max(dim=-1)  # first (lowest) index on ties


def clamp_r(n: int, r: int, protect_first: bool = True) -> int:
    return max(0, min(int(r), (n - int(protect_first)) // 2))


def select_top_r(node_max: Tensor, node_idx: Tensor, r: int, n: int) -> Match:
    """The r best A tokens (stable: lowest A index first on ties) and their partners."""
    order = node_max.sort(dim=-1, descending=True, stable=True).indices  # [B, NA]
    src_idx = order[:, :r].sort(dim=-1).values  # [B, r] ascending
    return Match(src_idx, node_idx.gather(1, src_idx), n)


def bipartite_match(metric: Tensor, r: int, protect_first: bool = True) -> Match:
    """metric [B, N, Cm] -> Match with clamp(r) merges."""
    B, N, _ = metric.shape
    r = clamp_r(N, r, protect_first)
    if r == 0:
        empty = torch.empty(B, 0, dtype=torch.long, device=metric.device)
        return Match(empty, empty, N)
    node_max, node_idx = match_scores(metric, protect_first)
    return select_top_r(node_max, node_idx, r, N)


def merge_apply(match: Match, x: Tensor, size: Tensor | None = None, mode: str = "wavg"):
    """x [B, N, ...], size [B, N, 1] or None -> (x' [B, N', ...], s' [B, N', 1])."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    B, N = x.shape[:2]
    if size is None:
        size = torch.ones(B, N, 1, dtype=torch.float32, device=x.device)
    if match.r == 0:
        return x, size
    xf, sf = x.reshape(B * N, -1), size.reshape(B * N)  # [B*N, C], [B*N]
    if torch.is_grad_enabled() and (x.requires_grad or size.requires_grad):
        out, s_out = _MergeFunction.apply(xf, sf, match, mode)
    else:
        out, s_out, _ = _merge(match, xf, sf, mode)
    return out.view(B, match.n_out, *x.shape[2:]), s_out.view(B, match.n_out, 1)


def _merge(match: Match, xf: Tensor, sf: Tensor, mode: str):
    """xf [B*N, C], sf [B*N] -> out [B*N', C], s_out [B*N'], W [B*N'] (each group's weight)."""
    B, N, n_out = match.src_idx.shape[0], match.n, match.n_out
    base = torch.arange(B, device=xf.device)[:, None]
    rows = (match.out_pos + base * N).flatten()  # [B*N'] input row of each output row
    src = (2 * match.src_idx + base * N).flatten()  # [B*r]
    dst_out = (match.dst_out + base * n_out).flatten()  # [B*r] output row of each partner
    out = xf.index_select(0, rows)  # [B*N', C] one pass over x: the kept tokens
    s_src = sf.index_select(0, src)  # [B*r]
    s_out = sf.index_select(0, rows).index_add_(0, dst_out, s_src)  # [B*N'] summed sizes
    x_src = xf.index_select(0, src)  # [B*r, C]
    if mode == "sum":
        return out.index_add_(0, dst_out, x_src), s_out, torch.ones_like(s_out)
    if mode == "wavg":
        W = s_out  # sum(s) of the group
        w = s_src / W.index_select(0, dst_out)  # [B*r]
    else:
        W = torch.ones_like(s_out).index_add_(0, dst_out, torch.ones_like(s_src))  # group count
        w = 1.0 / W.index_select(0, dst_out)  # [B*r]
    # x' = x_dst + sum_i w_i (x_i - x_dst): the weighted average, touching only r rows
    x_dst = out.index_select(0, dst_out)  # [B*r, C]
    acc = torch.promote_types(xf.dtype, torch.float32)
    delta = w.to(acc)[:, None] * (x_src.to(acc) - x_dst.to(acc))
    return out.index_add_(0, dst_out, delta.to(xf.dtype)), s_out, W


class _MergeFunction(torch.autograd.Function):
    """_merge with a gather-shaped backward: every input row feeds exactly one output row, so
    dx_i = g_o * w_i / W_o (o = group of i), and ds_i = g_o . (x_i - x'_o) / W_o + gs_o (wavg)."""

    @staticmethod
    def forward(ctx, xf, sf, match, mode):
        out, s_out, W = _merge(match, xf, sf, mode)
        ctx.size_grad = ctx.needs_input_grad[1]
        if not ctx.size_grad:  # constant sizes stay constant: no size-gradient path downstream
            ctx.mark_non_differentiable(s_out)
        keep_x = ctx.size_grad and mode == "wavg"  # only d(size) reads x and x'
        ctx.save_for_backward(sf, W, *((xf, out) if keep_x else ()))
        ctx.match, ctx.mode = match, mode
        ctx.set_materialize_grads(False)
        return out, s_out

    @staticmethod
    def backward(ctx, g, gs):
        sf, W = ctx.saved_tensors[:2]
        m = ctx.match
        base = torch.arange(m.src_idx.shape[0], device=W.device)[:, None]
        grp = (m.group + base * m.n_out).flatten()  # [B*N] output row of every input row
        Wg = W.index_select(0, grp)  # [B*N]
        gx = gsz = None
        if ctx.size_grad and ctx.needs_input_grad[1]:
            gsz = gs.index_select(0, grp) if gs is not None else torch.zeros_like(sf)
            if ctx.mode == "wavg" and g is not None:
                xf, out = ctx.saved_tensors[2:]
                gg = g.index_select(0, grp)  # [B*N, C]
                acc = torch.promote_types(xf.dtype, torch.float32)
                dot = torch.linalg.vecdot(gg.to(acc), (xf - out.index_select(0, grp)).to(acc))
                gsz = (dot / Wg + gsz).to(sf.dtype)
        if ctx.needs_input_grad[0] and g is not None:
            scale = (sf / Wg) if ctx.mode == "wavg" else 1.0 / Wg  # [B*N]
            gx = g.index_select(0, grp).mul_(scale.to(g.dtype)[:, None])
        return gx, gsz, None, None


def merge_source(match: Match, source: Tensor | None = None, dtype=torch.float32) -> Tensor:
    """Which original tokens each output token holds: [B, N', N0] 0/1 (source=None: N0 = N)."""
    if source is None:
        if match.r == 0:
            eye = torch.eye(match.n, dtype=dtype, device=match.src_idx.device)
            return eye.expand(match.src_idx.shape[0], -1, -1).clone()
        return F.one_hot(match.group, match.n_out).transpose(1, 2).to(dtype)  # [B, N', N]
    return merge_apply(match, source, None, mode="sum")[0]


def unmerge(match: Match, x: Tensor) -> Tensor:
    """x' [B, N', ...] -> [B, N, ...]: every input token takes the value of its output token."""
    if match.r == 0:
        return x
    B = x.shape[0]
    idx = match.group.view(B, match.n, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def prop_attn_bias(size: Tensor, dtype=None) -> Tensor:
    """Proportional attention: log(s) added to the logits of every key, [B, N, 1] -> [B, 1, 1, N]."""
    bias = size[..., 0].log()[:, None, None, :]
    return bias if dtype is None else bias.to(dtype)


def merge_tokens_eager(x, metric, size, r, protect_first=True, mode="wavg"):
    """kernels.merge_tokens on the eager backend: (x2, s2)."""
    return merge_apply(bipartite_match(metric, r, protect_first), x, size, mode)
