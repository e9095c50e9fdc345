"""Triton twins of kernels.tome: fused bipartite matching and the size-weighted merge (fwd + bwd).

Same semantics, output order and tie rules as kernels/tome.py (read that docstring first).

Kernels (a forward merge_tokens is three launches: match, plan, merge; plus allocations)
- _match_kernel, grid (B, ceil(NA/BLOCK_A)): the A tile and its norms are loaded once; per B tile one
  tl.dot (16-bit metrics: native 16-bit operands, exact products, fp32 accumulation, tensor cores;
  fp32 metrics: tf32x3 on NVIDIA, ieee elsewhere), scores (a.b * 1/|a|) * 1/|b| with correctly
  rounded sqrt and reciprocals (as eager; two multiplies per score, no per-score division), and
  one max-with-index reduction. Scores never leave registers.
- _plan_kernel, grid (B,): the top-r selection and the merge plan, one program per row
  (kernels/tome_plan.py; torch ops beyond its MAX_PLAN_LANES).
- _merge_fwd_kernel, grid (B, ceil(N'/BLOCK_R), ceil(C/BLOCK_C)): each block of output rows reads its
  own rows, then the rows merged into them, which are one contiguous run of the plan's CSR list,
  in tiles of BLOCK_M rows reduced with a one-hot tl.dot. A group of r tied tokens costs r/BLOCK_M
  full tiles, not r one-row steps. fp32 accumulation, one division, one write.
- _merge_bwd_kernel, grid (B, ceil(N/BLOCK_N)): one program per block of *input* rows; each input row
  belongs to exactly one output row, so dx is a gather (no atomics). x and x' are read (and saved for
  backward) only when the size gradient is needed. No atomics anywhere: deterministic.
Sizes that enter without requires_grad leave marked non-differentiable (see tome.py).

Recompiles: the sizes that shrink every layer (N, NA, NB, N', R) are do_not_specialize, block sizes
do not depend on N, and the plan's lane count is at least tome_plan.MIN_PLAN_LANES: a 12-layer
TomeFormer at 257 tokens compiles 4 variants forward (match, plan, merge with and without sizes), 2
backward.
kernels/jit_check.py counts the variants a run compiles and compiles them for a GPU target offline.

Interpreter: with TRITON_INTERPRET=1 (set before this module is imported) everything runs on CPU
tensors. Loads are cast to fp32 right away (bf16 is mis-read by the interpreter otherwise) and dots
run in fp32 there; compiled 16-bit dots use the same values (exact round trips), so only the
summation order differs. Supported dtypes: float32, float16, bfloat16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tome, tome_plan
from .tome_plan import INTERPRET, _plan_kernel, plan_for, select_top_r

_MODE_ID = {"wavg": 0, "mean": 1, "sum": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHRINKING = tome_plan.SHRINKING  # sizes that change every layer: never specialised on


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


@triton.jit(do_not_specialize=_SHRINKING)
def _match_kernel(
    m_ptr,
    val_ptr,
    idx_ptr,
    N,
    NA,
    NB,
    CM,
    PROTECT: tl.constexpr,
    DOT16: tl.constexpr,
    PREC: tl.constexpr,
    ONE_K: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ia = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)  # [BLOCK_A] A indices
    ma = ia < NA
    base = m_ptr + b * N * CM
    dt = m_ptr.dtype.element_ty
    k = tl.arange(0, BLOCK_K)
    a_ptrs = base + (2 * ia)[:, None] * CM + k[None, :]  # [BLOCK_A, BLOCK_K]
    na = tl.zeros([BLOCK_A], tl.float32)
    for k0 in range(0, CM, BLOCK_K):  # |a|^2 once per program
        a0 = tl.load(a_ptrs + k0, mask=ma[:, None] & (k0 + k < CM)[None, :], other=0.0).to(tl.float32)
        na += tl.sum(a0 * a0, axis=1)
    ra = tl.math.div_rn(tl.full([BLOCK_A], 1.0, tl.float32), tl.maximum(tl.math.sqrt_rn(na), 1e-12))
    if ONE_K:  # the whole A tile stays in registers, in the dot's operand type
        a_tile = tl.load(a_ptrs, mask=ma[:, None] & (k < CM)[None, :], other=0.0).to(tl.float32)
        if DOT16:
            a_tile = a_tile.to(dt)  # exact: the values came from dt
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_A], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        ib = b0 + tl.arange(0, BLOCK_B)  # [BLOCK_B] B indices
        mb = ib < NB
        dot = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        nb = tl.zeros([BLOCK_B], tl.float32)
        for k0 in range(0, CM, BLOCK_K):
            mk = (k0 + k < CM)[None, :]
            v = tl.load(
                base + (2 * ib + 1)[:, None] * CM + (k0 + k)[None, :], mask=mb[:, None] & mk, other=0.0
            ).to(tl.float32)
            nb += tl.sum(v * v, axis=1)
            if ONE_K:
                at = a_tile
            else:
                at = tl.load(a_ptrs + k0, mask=ma[:, None] & mk, other=0.0).to(tl.float32)
                if DOT16:
                    at = at.to(dt)
            if DOT16:  # 16-bit operands: products exact in fp32, fp32 accumulation, tensor cores
                dot = tl.dot(at, tl.trans(v.to(dt)), dot)
            else:
                dot = tl.dot(at, tl.trans(v), dot, input_precision=PREC)
        rb = tl.math.div_rn(tl.full([BLOCK_B], 1.0, tl.float32), tl.maximum(tl.math.sqrt_rn(nb), 1e-12))
        s = (dot * ra[:, None]) * rb[None, :]  # [BLOCK_A, BLOCK_B] cosine, rounded as eager
        s = tl.where(mb[None, :], s, float("-inf"))
        bm, bi = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        upd = bm > best  # strict: an earlier tile keeps ties (lowest B index)
        best = tl.where(upd, bm, best)
        best_i = tl.where(upd, bi + b0, best_i)
    if PROTECT:
        best = tl.where(ia == 0, float("-inf"), best)
        best_i = tl.where(ia == 0, 0, best_i)
    tl.store(val_ptr + b * NA + ia, best, mask=ma)
    tl.store(idx_ptr + b * NA + ia, best_i.to(tl.int64), mask=ma)


@triton.jit
def _onehot_dot(hw, xm, x_dtype: tl.constexpr, DOT16: tl.constexpr, SPLIT: tl.constexpr):
    # hw [R, M] (one-hot rows times member weights) @ xm [M, C] in fp32. DOT16: 16-bit operands
    # on tensor cores: xm round-trips exactly; SPLIT: weights are not all 0/1, so they go in as
    # hi + lo parts (exact for integer sizes < 2^16 in bf16, < 2^22 in fp16).
    if DOT16:
        x16 = xm.to(x_dtype)
        hi = hw.to(x_dtype)
        acc = tl.dot(hi, x16)
        if SPLIT:
            acc = tl.dot((hw - hi.to(tl.float32)).to(x_dtype), x16, acc)
        return acc
    else:
        return tl.dot(hw, xm, input_precision="ieee")


@triton.jit(do_not_specialize=_SHRINKING)
def _merge_fwd_kernel(
    x_ptr,
    s_ptr,
    pos_ptr,
    cnt_ptr,
    off_ptr,
    csr_ptr,
    grp_ptr,
    out_ptr,
    sout_ptr,
    wsum_ptr,
    N,
    NOUT,
    R,
    C,
    MODE: tl.constexpr,
    HAS_SIZE: tl.constexpr,
    DOT16: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    o0 = tl.program_id(1) * BLOCK_R
    r_loc = tl.arange(0, BLOCK_R)
    o = o0 + r_loc  # [BLOCK_R] output rows
    mo = o < NOUT
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    mc = c < C
    xb = x_ptr + b * N * C
    pos = tl.load(pos_ptr + b * NOUT + o, mask=mo, other=0)
    x = tl.load(xb + pos[:, None] * C + c[None, :], mask=mo[:, None] & mc[None, :], other=0.0).to(tl.float32)
    if HAS_SIZE:
        s = tl.load(s_ptr + b * N + pos, mask=mo, other=1.0).to(tl.float32)
    else:
        s = tl.full([BLOCK_R], 1.0, tl.float32)
    if MODE == 0:
        w = s
    else:
        w = tl.full([BLOCK_R], 1.0, tl.float32)
    acc = x * w[:, None]
    wsum = w
    ssum = s
    # the rows merged into o0 .. o_last are one contiguous run m0 .. m1 of the CSR list
    o_last = tl.minimum(o0 + BLOCK_R, NOUT) - 1
    m0 = tl.load(off_ptr + b * NOUT + o0)
    m1 = tl.load(off_ptr + b * NOUT + o_last) + tl.load(cnt_ptr + b * NOUT + o_last)
    for m in range(m0, m1, BLOCK_M):
        mi = m + tl.arange(0, BLOCK_M)
        mm = mi < m1
        p = tl.load(csr_ptr + b * R + mi, mask=mm, other=0)  # input positions of the members
        row = tl.load(grp_ptr + b * N + p, mask=mm, other=-1) - o0  # their local output rows
        xm = tl.load(xb + p[:, None] * C + c[None, :], mask=mm[:, None] & mc[None, :], other=0.0).to(
            tl.float32
        )  # [BLOCK_M, BLOCK_C]
        if HAS_SIZE:
            sm = tl.load(s_ptr + b * N + p, mask=mm, other=0.0).to(tl.float32)
        else:
            sm = mm.to(tl.float32)
        if MODE == 0:
            wm = sm
        else:
            wm = mm.to(tl.float32)
        hit = (r_loc[:, None] == row[None, :]) & mm[None, :]  # [BLOCK_R, BLOCK_M] one-hot
        hw = tl.where(hit, wm[None, :], 0.0)
        acc += _onehot_dot(hw, xm, out_ptr.dtype.element_ty, DOT16, SPLIT)
        wsum += tl.sum(hw, axis=1)
        ssum += tl.sum(tl.where(hit, sm[None, :], 0.0), axis=1)
    if MODE == 2:
        wsum = tl.full([BLOCK_R], 1.0, tl.float32)
    else:
        acc = tl.math.div_rn(acc, wsum[:, None] + tl.zeros_like(acc))
    tl.store(
        out_ptr + b * NOUT * C + o[:, None] * C + c[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mo[:, None] & mc[None, :],
    )
    if tl.program_id(2) == 0:
        tl.store(sout_ptr + b * NOUT + o, ssum.to(sout_ptr.dtype.element_ty), mask=mo)
        tl.store(wsum_ptr + b * NOUT + o, wsum, mask=mo)


@triton.jit(do_not_specialize=_SHRINKING)
def _merge_bwd_kernel(
    g_ptr,
    gs_ptr,
    x_ptr,
    s_ptr,
    out_ptr,
    wsum_ptr,
    grp_ptr,
    gx_ptr,
    gsz_ptr,
    N,
    NOUT,
    C,
    MODE: tl.constexpr,
    HAS_SIZE: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GS: tl.constexpr,
    HAS_GS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input rows
    mi = i < N
    o = tl.load(grp_ptr + b * N + i, mask=mi, other=0)  # output row holding each input row
    W = tl.load(wsum_ptr + b * NOUT + o, mask=mi, other=1.0)
    if MODE == 0 and HAS_SIZE:
        w = tl.load(s_ptr + b * N + i, mask=mi, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_N], 1.0, tl.float32)
    scale = tl.math.div_rn(w, W)  # d x'_o / d x_i
    dot = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m2 = mi[:, None] & (c < C)[None, :]
        g = tl.load(g_ptr + b * NOUT * C + o[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
        if NEED_GX:
            tl.store(
                gx_ptr + b * N * C + i[:, None] * C + c[None, :],
                (g * scale[:, None]).to(gx_ptr.dtype.element_ty),
                mask=m2,
            )
        if NEED_GS and MODE == 0:
            xi = tl.load(x_ptr + b * N * C + i[:, None] * C + c[None, :], mask=m2, other=0.0).to(tl.float32)
            xo = tl.load(out_ptr + b * NOUT * C + o[:, None] * C + c[None, :], mask=m2, other=0.0).to(
                tl.float32
            )
            dot += tl.sum(g * (xi - xo), axis=1)
    if NEED_GS:
        gs = tl.math.div_rn(dot, W)  # d x'_o / d s_i = (x_i - x'_o) / S_o  (wavg; zero otherwise)
        if HAS_GS:
            gs += tl.load(gs_ptr + b * NOUT + o, mask=mi, other=0.0).to(tl.float32)
        tl.store(gsz_ptr + b * N + i, gs.to(gsz_ptr.dtype.element_ty), mask=mi)


def _dot16(t: torch.Tensor) -> bool:
    """16-bit tl.dot operands: compiled kernels only (the interpreter's 16-bit dot is unreliable)."""
    return t.dtype != torch.float32 and not INTERPRET


def _fp32_precision() -> str:
    return "tf32x3" if torch.version.hip is None and not INTERPRET else "ieee"


def match_scores(metric: torch.Tensor, protect_first: bool = True, block_a=None, block_b=None, block_k=None):
    """Fused Triton version of tome.match_scores: (score [B, NA] fp32, index [B, NA] int64)."""
    _check(metric)
    m = metric.contiguous()
    B, N, CM = m.shape
    NA, NB = (N + 1) // 2, N // 2
    val = torch.empty(B, NA, dtype=torch.float32, device=m.device)
    idx = torch.empty(B, NA, dtype=torch.int64, device=m.device)
    ba, bb = block_a or 64, block_b or 64  # independent of N: no recompiles as N shrinks
    # Cm <= 128: the whole A tile stays in registers. Else 32-wide chunks, 8 warps, 2 stages: what
    # compiles for sm_80 without register spills (128-wide fp32 chunks in 3 stages would also need
    # 192 KB of shared memory, more than an A100 has; kernels/jit_check.py shows these figures)
    bk = block_k or (_p2(CM, 16, 128) if CM <= 128 else 32)
    _match_kernel[(B, triton.cdiv(NA, ba))](
        m,
        val,
        idx,
        N,
        NA,
        NB,
        CM,
        PROTECT=bool(protect_first),
        DOT16=_dot16(m),
        PREC=_fp32_precision(),
        ONE_K=CM <= bk,
        BLOCK_A=ba,
        BLOCK_B=bb,
        BLOCK_K=bk,
        **launch_options("_match_kernel", ONE_K=CM <= bk),
    )
    return val, idx


def bipartite_match(metric: torch.Tensor, r: int, protect_first: bool = True) -> tome.Match:
    """Two launches: match kernel, then the plan kernel (top-r and the merge plan)."""
    B, N, _ = metric.shape
    r = tome.clamp_r(N, r, protect_first)
    if r == 0:
        return tome.bipartite_match(metric, 0, protect_first)
    return select_top_r(*match_scores(metric, protect_first), r, N)


def launch_options(kernel: str, **consts) -> dict:
    """num_warps / num_stages that differ from Triton's defaults (4 / 3), from the constexprs."""
    if kernel == "_plan_kernel":
        return tome_plan.launch_options(consts["L"])
    if kernel == "_match_kernel" and not consts["ONE_K"]:
        return dict(num_warps=8, num_stages=2)
    return {}


class _MergeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, pos, plan, mode, blocks):
        B, N, C = x.shape
        cnt, off, csr, grp = plan["cnt"], plan["off"], plan["csr"], plan["grp"]
        NOUT, R = pos.shape[1], csr.shape[1]
        out = torch.empty(B, NOUT, C, dtype=x.dtype, device=x.device)
        sdt = size.dtype if size is not None else torch.float32
        sout = torch.empty(B, NOUT, dtype=sdt, device=x.device)
        wsum = torch.empty(B, NOUT, dtype=torch.float32, device=x.device)
        br, bm, bc = blocks
        grid = (B, triton.cdiv(NOUT, br), triton.cdiv(C, bc))
        _merge_fwd_kernel[grid](
            x,
            size if size is not None else x,
            pos,
            cnt,
            off,
            csr,
            grp,
            out,
            sout,
            wsum,
            N,
            NOUT,
            R,
            C,
            MODE=mode,
            HAS_SIZE=size is not None,
            DOT16=_dot16(x),
            SPLIT=mode == 0 and size is not None,
            BLOCK_R=br,
            BLOCK_M=bm,
            BLOCK_C=bc,
        )
        ctx.size_grad = size is not None and ctx.needs_input_grad[1]
        if not ctx.size_grad:  # constant sizes stay constant: no size-gradient path downstream
            ctx.mark_non_differentiable(sout)
        keep_x = ctx.size_grad and mode == 0  # only d(size) reads x and x'
        keep_s = size is not None and mode == 0  # the weights s_i / S_o of dx
        ctx.save_for_backward(wsum, grp, size if keep_s else None, *((x, out) if keep_x else ()))
        ctx.mode, ctx.x_meta = mode, (x.shape, x.dtype, sdt)
        ctx.set_materialize_grads(False)
        return out, sout

    @staticmethod
    def backward(ctx, g, gs):
        wsum, grp, size = ctx.saved_tensors[:3]
        x, out = ctx.saved_tensors[3:] if len(ctx.saved_tensors) > 3 else (None, None)
        (B, N, C), dtype, sdt = ctx.x_meta
        NOUT = wsum.shape[1]
        need_gx = ctx.needs_input_grad[0] and g is not None
        need_gs = ctx.size_grad and ctx.needs_input_grad[1]
        if not (need_gx or need_gs):
            return (None,) * 6
        g = g.contiguous() if g is not None else torch.zeros(B, NOUT, C, dtype=dtype, device=wsum.device)
        gx = torch.empty(B, N, C, dtype=dtype, device=g.device) if need_gx else None
        gsz = torch.empty(B, N, dtype=sdt, device=g.device) if need_gs else None
        bn, bc = 16, _p2(C, 16, 256)
        _merge_bwd_kernel[(B, triton.cdiv(N, bn))](
            g,
            gs.contiguous() if gs is not None else g,
            x if x is not None else g,
            size if size is not None else wsum,
            out if out is not None else g,
            wsum,
            grp,
            gx if need_gx else g,
            gsz if need_gs else wsum,
            N,
            NOUT,
            C,
            MODE=ctx.mode,
            HAS_SIZE=size is not None,
            NEED_GX=need_gx,
            NEED_GS=need_gs,
            HAS_GS=gs is not None,
            BLOCK_N=bn,
            BLOCK_C=bc,
        )
        return gx, gsz, None, None, None, None


def merge_apply(
    match: tome.Match,
    x: torch.Tensor,
    size: torch.Tensor | None = None,
    mode: str = "wavg",
    block_r=None,
    block_c=None,
    block_m=None,
):
    """Triton version of tome.merge_apply: x [B, N, ...] -> (x' [B, N', ...], s' [B, N', 1])."""
    if mode not in _MODE_ID:
        raise ValueError(f"mode must be one of {tuple(_MODE_ID)}, got {mode!r}")
    _check(x)
    B, N = x.shape[:2]
    if match.r == 0:
        if size is None:
            size = torch.ones(B, N, 1, dtype=torch.float32, device=x.device)
        return x, size
    x3 = x.reshape(B, N, -1).contiguous()
    s2 = size.reshape(B, N).contiguous() if size is not None else None
    pos, plan = plan_for(match)
    C = x3.shape[2]
    blocks = (block_r or 16, block_m or 16, block_c or _p2(C, 16, 128))
    out, sout = _MergeFunction.apply(x3, s2, pos, plan, _MODE_ID[mode], blocks)
    return out.view(B, match.n_out, *x.shape[2:]), sout.view(B, match.n_out, 1)


def _check(t: torch.Tensor):
    if t.dtype not in DTYPES:
        raise TypeError(f"triton backend supports {DTYPES}, got {t.dtype}; use backend='eager'")


KERNELS = (_match_kernel, _plan_kernel, _merge_fwd_kernel, _merge_bwd_kernel)
