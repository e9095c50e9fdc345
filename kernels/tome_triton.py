"""Triton twins of kernels.tome: fused bipartite matching and the size-weighted merge (fwd + bwd).

Same semantics, output order and tie rules as kernels/tome.py (read that docstring first).

Kernels (a forward merge_tokens is four launches: match, rank, plan, merge; plus allocations)
- _match_kernel, grid (B, ceil(NA/BLOCK_A)): loads A and B metric tiles, accumulates A.B^T, |A|^2 and
  |B|^2 over Cm chunks in fp32, divides by the norms, keeps a running row max/argmax over B tiles.
  The NA x NB score matrix never leaves registers.
- _rank_kernel, grid (B, ceil(NA/BLOCK_L)): top-r without a sort: a token is selected iff fewer than
  r tokens beat it (higher score, or equal score and lower index). Writes partner[a] or -1.
- _plan_kernel, same grid: from the partner row, by counting, every index the merge needs: output
  position of each token, src/dst lists, and per output row the CSR list of rows merged into it.
- _merge_fwd_kernel, grid (B, ceil(N'/BLOCK_R), ceil(C/BLOCK_C)): each output row reads its own
  input row and the rows merged into it, accumulates sum(w*x) and sum(w) in fp32, divides once,
  writes once. x is read once and x' written once.
- _merge_bwd_kernel, grid (B, ceil(N/BLOCK_N)): one program per block of *input* rows; every input
  row belongs to exactly one output row, so dx is a gather (no atomics), and d(size) reduces over C
  inside the program. Forward and backward are deterministic: no atomics anywhere.
The rank and plan kernels cost O(NA^2) compares per row (fine for N = 257, ~4M at N = 4096).

Interpreter: with TRITON_INTERPRET=1 (set before this module is imported) everything runs on CPU
tensors. Loads are cast to fp32 right away (bf16 is mis-read by the interpreter otherwise).
Supported dtypes: float32, float16, bfloat16. Matching uses IEEE fp32 dots (no TF32), so scores match
the eager path up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tome

_MODE_ID = {"wavg": 0, "mean": 1, "sum": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _p2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


@triton.jit
def _match_kernel(m_ptr, val_ptr, idx_ptr, N, NA, NB, CM,
                  PROTECT: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    ia = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)  # [BLOCK_A] A indices
    ma = ia < NA
    base = m_ptr + b * N * CM
    best = tl.full([BLOCK_A], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK_A], tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        ib = b0 + tl.arange(0, BLOCK_B)  # [BLOCK_B] B indices
        mb = ib < NB
        dot = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
        na = tl.zeros([BLOCK_A], tl.float32)
        nb = tl.zeros([BLOCK_B], tl.float32)
        for k0 in range(0, CM, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mk = k < CM
            a = tl.load(base + (2 * ia)[:, None] * CM + k[None, :],
                        mask=ma[:, None] & mk[None, :], other=0.0).to(tl.float32)
            v = tl.load(base + (2 * ib + 1)[:, None] * CM + k[None, :],
                        mask=mb[:, None] & mk[None, :], other=0.0).to(tl.float32)
            dot += tl.dot(a, tl.trans(v), input_precision="ieee")
            na += tl.sum(a * a, axis=1)
            nb += tl.sum(v * v, axis=1)
        na = tl.maximum(tl.sqrt(na), 1e-12)
        nb = tl.maximum(tl.sqrt(nb), 1e-12)
        s = dot / na[:, None] / nb[None, :]  # [BLOCK_A, BLOCK_B] cosine scores
        s = tl.where(mb[None, :], s, float("-inf"))
        bm = tl.max(s, axis=1)
        bi = tl.argmax(s, axis=1, tie_break_left=True)  # lowest B index in the tile
        upd = bm > best  # strict: an earlier tile keeps ties
        best = tl.where(upd, bm, best)
        best_i = tl.where(upd, bi + b0, best_i)
    if PROTECT:
        best = tl.where(ia == 0, float("-inf"), best)
        best_i = tl.where(ia == 0, 0, best_i)
    tl.store(val_ptr + b * NA + ia, best, mask=ma)
    tl.store(idx_ptr + b * NA + ia, best_i.to(tl.int64), mask=ma)


@triton.jit
def _rank_kernel(val_ptr, idx_ptr, part_ptr, NA, R, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr):
    # Top-R selection without a sort: A token a is selected iff fewer than R tokens rank before
    # it, "before" meaning a higher score, or an equal score and a lower index (a stable sort).
    b = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # [BLOCK_L] A tokens
    ma = a < NA
    s = tl.load(val_ptr + b * NA + a, mask=ma, other=float("-inf"))
    rank = tl.zeros([BLOCK_L], tl.int32)
    for j0 in range(0, NA, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        sj = tl.load(val_ptr + b * NA + j, mask=j < NA, other=float("-inf"))
        before = (sj[None, :] > s[:, None]) | ((sj[None, :] == s[:, None]) & (j[None, :] < a[:, None]))
        rank += tl.sum((before & (j < NA)[None, :]).to(tl.int32), axis=1)
    d = tl.load(idx_ptr + b * NA + a, mask=ma, other=0).to(tl.int32)
    tl.store(part_ptr + b * NA + a, tl.where(rank < R, d, -1), mask=ma)


@triton.jit
def _plan_kernel(part_ptr, pos_ptr, cnt_ptr, off_ptr, csr_ptr, grp_ptr, src_ptr, dst_ptr,
                 N, NA, NB, NOUT, R, BLOCK_L: tl.constexpr, BLOCK_J: tl.constexpr):
    # From partner[a] (B index, or -1 if A token a is kept) to every index the merge needs.
    # Lane a is A token a and, for a < NB, B token a. All counts are over the partner row.
    b = tl.program_id(0).to(tl.int64)
    a = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    ma = a < NA
    mb = a < NB
    p = tl.load(part_ptr + b * NA + a, mask=ma, other=-1)
    merged = p >= 0
    d = tl.maximum(p, 0)
    le_a = tl.zeros([BLOCK_L], tl.int32)  # merged A tokens with index <= a
    le_d = tl.zeros([BLOCK_L], tl.int32)  # merged A tokens with index <= partner of a
    cnt = tl.zeros([BLOCK_L], tl.int32)  # A tokens merged into B token a
    off = tl.zeros([BLOCK_L], tl.int32)  # A tokens merged into B tokens < a
    slot = tl.zeros([BLOCK_L], tl.int32)  # merged tokens before a in (partner, index) order
    for j0 in range(0, NA, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        pj = tl.load(part_ptr + b * NA + j, mask=j < NA, other=-1)[None, :]
        mj = pj >= 0
        jj = j[None, :]
        le_a += tl.sum((mj & (jj <= a[:, None])).to(tl.int32), axis=1)
        le_d += tl.sum((mj & (jj <= d[:, None])).to(tl.int32), axis=1)
        cnt += tl.sum((pj == a[:, None]).to(tl.int32), axis=1)
        off += tl.sum((mj & (pj < a[:, None])).to(tl.int32), axis=1)
        first = (pj < d[:, None]) | ((pj == d[:, None]) & (jj < a[:, None]))
        slot += tl.sum((mj & first).to(tl.int32), axis=1)
    kept = ma & (merged == 0)
    ck = a + 1 - le_a  # kept A tokens with index <= a
    row_a = ck - 1 + tl.minimum(a, NB)  # output row of kept A token a (position 2a)
    row_b = a + ck  # output row of B token a (position 2a + 1)
    row_d = 2 * d + 1 - le_d  # output row of the partner of a merged-away A token
    tl.store(pos_ptr + b * NOUT + row_a, (2 * a).to(tl.int64), mask=kept)
    tl.store(pos_ptr + b * NOUT + row_b, (2 * a + 1).to(tl.int64), mask=mb)
    tl.store(cnt_ptr + b * NOUT + row_a, tl.zeros([BLOCK_L], tl.int32), mask=kept)
    tl.store(off_ptr + b * NOUT + row_a, tl.zeros([BLOCK_L], tl.int32), mask=kept)
    tl.store(cnt_ptr + b * NOUT + row_b, cnt, mask=mb)
    tl.store(off_ptr + b * NOUT + row_b, off, mask=mb)
    tl.store(csr_ptr + b * R + slot, 2 * a, mask=merged)  # grouped by output row, ascending a
    tl.store(grp_ptr + b * N + 2 * a, tl.where(merged, row_d, row_a), mask=ma)
    tl.store(grp_ptr + b * N + 2 * a + 1, row_b, mask=mb)
    tl.store(src_ptr + b * R + le_a - 1, a.to(tl.int64), mask=merged)  # ascending a
    tl.store(dst_ptr + b * R + le_a - 1, d.to(tl.int64), mask=merged)


@triton.jit
def _merge_fwd_kernel(x_ptr, s_ptr, pos_ptr, cnt_ptr, off_ptr, csr_ptr, out_ptr, sout_ptr, wsum_ptr,
                      N, NOUT, R, C,
                      MODE: tl.constexpr, HAS_SIZE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] output rows
    mo = o < NOUT
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels
    mc = c < C
    pos = tl.load(pos_ptr + b * NOUT + o, mask=mo, other=0)
    cnt = tl.load(cnt_ptr + b * NOUT + o, mask=mo, other=0)
    off = tl.load(off_ptr + b * NOUT + o, mask=mo, other=0)
    xb = x_ptr + b * N * C
    x = tl.load(xb + pos[:, None] * C + c[None, :], mask=mo[:, None] & mc[None, :],
                other=0.0).to(tl.float32)
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
    for k in range(0, tl.max(cnt, axis=0)):  # the rows merged into each output row
        mk = mo & (k < cnt)
        p = tl.load(csr_ptr + b * R + off + k, mask=mk, other=0)
        xk = tl.load(xb + p[:, None] * C + c[None, :], mask=mk[:, None] & mc[None, :],
                     other=0.0).to(tl.float32)
        if HAS_SIZE:
            sk = tl.load(s_ptr + b * N + p, mask=mk, other=0.0).to(tl.float32)
        else:
            sk = mk.to(tl.float32)
        if MODE == 0:
            wk = sk
        else:
            wk = mk.to(tl.float32)
        acc += xk * wk[:, None]
        wsum += wk
        ssum += sk
    if MODE == 2:
        wsum = tl.full([BLOCK_R], 1.0, tl.float32)
    else:
        acc = acc / wsum[:, None]
    tl.store(out_ptr + b * NOUT * C + o[:, None] * C + c[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mo[:, None] & mc[None, :])
    if tl.program_id(2) == 0:
        tl.store(sout_ptr + b * NOUT + o, ssum.to(sout_ptr.dtype.element_ty), mask=mo)
        tl.store(wsum_ptr + b * NOUT + o, wsum, mask=mo)


@triton.jit
def _merge_bwd_kernel(g_ptr, gs_ptr, x_ptr, s_ptr, out_ptr, wsum_ptr, grp_ptr, gx_ptr, gsz_ptr,
                      N, NOUT, C,
                      MODE: tl.constexpr, HAS_SIZE: tl.constexpr, NEED_GX: tl.constexpr,
                      NEED_GS: tl.constexpr, HAS_GS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] input rows
    mi = i < N
    o = tl.load(grp_ptr + b * N + i, mask=mi, other=0)  # output row holding each input row
    W = tl.load(wsum_ptr + b * NOUT + o, mask=mi, other=1.0)
    if MODE == 0 and HAS_SIZE:
        w = tl.load(s_ptr + b * N + i, mask=mi, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_N], 1.0, tl.float32)
    scale = w / W  # d x'_o / d x_i
    dot = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m2 = mi[:, None] & (c < C)[None, :]
        g = tl.load(g_ptr + b * NOUT * C + o[:, None] * C + c[None, :], mask=m2,
                    other=0.0).to(tl.float32)
        if NEED_GX:
            tl.store(gx_ptr + b * N * C + i[:, None] * C + c[None, :],
                     (g * scale[:, None]).to(gx_ptr.dtype.element_ty), mask=m2)
        if NEED_GS and MODE == 0:
            xi = tl.load(x_ptr + b * N * C + i[:, None] * C + c[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            xo = tl.load(out_ptr + b * NOUT * C + o[:, None] * C + c[None, :], mask=m2,
                         other=0.0).to(tl.float32)
            dot += tl.sum(g * (xi - xo), axis=1)
    if NEED_GS:
        gs = dot / W  # d x'_o / d s_i = (x_i - x'_o) / S_o  (wavg only; zero otherwise)
        if HAS_GS:
            gs += tl.load(gs_ptr + b * NOUT + o, mask=mi, other=0.0).to(tl.float32)
        tl.store(gsz_ptr + b * N + i, gs.to(gsz_ptr.dtype.element_ty), mask=mi)


def match_scores(metric: torch.Tensor, protect_first: bool = True, block_a=None, block_b=None,
                 block_k=None):
    """Fused Triton version of tome.match_scores: (score [B, NA] fp32, index [B, NA] int64)."""
    _check(metric)
    m = metric.contiguous()
    B, N, CM = m.shape
    NA, NB = (N + 1) // 2, N // 2
    val = torch.empty(B, NA, dtype=torch.float32, device=m.device)
    idx = torch.empty(B, NA, dtype=torch.int64, device=m.device)
    ba = block_a or _p2(NA, 16, 64)
    bb = block_b or _p2(NB, 16, 64)
    bk = block_k or _p2(CM, 16, 64)
    _match_kernel[(B, triton.cdiv(NA, ba))](m, val, idx, N, NA, NB, CM, PROTECT=bool(protect_first),
                                            BLOCK_A=ba, BLOCK_B=bb, BLOCK_K=bk)
    return val, idx


def bipartite_match(metric: torch.Tensor, r: int, protect_first: bool = True) -> tome.Match:
    """Three launches: match kernel, rank kernel (top-r), plan kernel; the Match carries the plan."""
    B, N, _ = metric.shape
    r = tome.clamp_r(N, r, protect_first)
    if r == 0:
        return tome.bipartite_match(metric, 0, protect_first)
    return select_top_r(*match_scores(metric, protect_first), r, N)


def select_top_r(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, n: int) -> tome.Match:
    """Triton twin of tome.select_top_r (rank kernel + plan kernel)."""
    B, NA = node_max.shape
    node_max, node_idx = node_max.contiguous(), node_idx.contiguous()
    partner = torch.empty(B, NA, dtype=torch.int32, device=node_max.device)
    bl, bj = _p2(NA, 16, 128), _p2(NA, 16, 32)
    _rank_kernel[(B, triton.cdiv(NA, bl))](node_max, node_idx, partner, NA, r, BLOCK_L=bl,
                                           BLOCK_J=bj)
    return _plan(partner, n, r)


def _plan(partner: torch.Tensor, N: int, r: int) -> tome.Match:
    """partner [B, NA] int32 (B index or -1) -> Match with src/dst, out_pos and the fused plan."""
    B, NA, NB, NOUT, dev = partner.shape[0], (N + 1) // 2, N // 2, N - r, partner.device
    i32 = dict(dtype=torch.int32, device=dev)
    pos = torch.empty(B, NOUT, dtype=torch.int64, device=dev)
    cnt, off = torch.empty(B, NOUT, **i32), torch.empty(B, NOUT, **i32)
    csr, grp = torch.empty(B, r, **i32), torch.empty(B, N, **i32)
    src_idx = torch.empty(B, r, dtype=torch.int64, device=dev)
    dst_idx = torch.empty(B, r, dtype=torch.int64, device=dev)
    bl, bj = _p2(NA, 16, 128), _p2(NA, 16, 32)
    _plan_kernel[(B, triton.cdiv(NA, bl))](partner, pos, cnt, off, csr, grp, src_idx, dst_idx,
                                           N, NA, NB, NOUT, r, BLOCK_L=bl, BLOCK_J=bj)
    plan = dict(cnt=cnt, off=off, csr=csr, grp=grp)
    return tome.Match(src_idx, dst_idx, N, out_pos=pos, plan=plan)


def _plan_for(match: tome.Match) -> tuple[torch.Tensor, dict]:
    """The fused plan of a match (built by the plan kernel if the match came from elsewhere)."""
    if match.plan is None:
        B, NA = match.src_idx.shape[0], (match.n + 1) // 2
        partner = torch.full((B, NA), -1, dtype=torch.int32, device=match.src_idx.device)
        partner.scatter_(1, match.src_idx, match.dst_idx.to(torch.int32))
        fused = _plan(partner, match.n, match.r)
        match.plan = fused.plan
        if "out_pos" not in match.__dict__:
            match.out_pos = fused.out_pos
    return match.out_pos.contiguous(), match.plan


class _MergeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, pos, plan, mode, blocks):
        B, N, C = x.shape
        cnt, off, csr = plan["cnt"], plan["off"], plan["csr"]
        NOUT, R = pos.shape[1], csr.shape[1]
        out = torch.empty(B, NOUT, C, dtype=x.dtype, device=x.device)
        sdt = size.dtype if size is not None else torch.float32
        sout = torch.empty(B, NOUT, dtype=sdt, device=x.device)
        wsum = torch.empty(B, NOUT, dtype=torch.float32, device=x.device)
        br, bc = blocks
        grid = (B, triton.cdiv(NOUT, br), triton.cdiv(C, bc))
        _merge_fwd_kernel[grid](x, size if size is not None else x, pos, cnt, off, csr, out, sout,
                                wsum, N, NOUT, R, C, MODE=mode, HAS_SIZE=size is not None,
                                BLOCK_R=br, BLOCK_C=bc)
        ctx.save_for_backward(x, size, out, wsum, plan["grp"])
        ctx.mode, ctx.has_size = mode, size is not None
        ctx.set_materialize_grads(False)
        if size is None:
            ctx.mark_non_differentiable(sout)
        return out, sout

    @staticmethod
    def backward(ctx, g, gs):
        x, size, out, wsum, grp = ctx.saved_tensors
        B, N, C = x.shape
        NOUT = out.shape[1]
        need_gx = ctx.needs_input_grad[0]
        need_gs = ctx.has_size and ctx.needs_input_grad[1]
        if g is None:
            g = torch.zeros_like(out)
        g = g.contiguous()
        gx = torch.empty_like(x) if need_gx else None
        gsz = torch.empty_like(size) if need_gs else None
        if not (need_gx or need_gs):
            return (None,) * 6
        bn, bc = 16, _p2(C, 16, 256)
        _merge_bwd_kernel[(B, triton.cdiv(N, bn))](
            g, gs.contiguous() if gs is not None else g, x, size if size is not None else x, out,
            wsum, grp, gx if need_gx else x, gsz if need_gs else wsum, N, NOUT, C,
            MODE=ctx.mode, HAS_SIZE=ctx.has_size, NEED_GX=need_gx, NEED_GS=need_gs,
            HAS_GS=gs is not None, BLOCK_N=bn, BLOCK_C=bc)
        return gx, gsz, None, None, None, None


def merge_apply(match: tome.Match, x: torch.Tensor, size: torch.Tensor | None = None,
                mode: str = "wavg", block_r=None, block_c=None):
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
    pos, plan = _plan_for(match)
    C = x3.shape[2]
    blocks = (block_r or _p2(match.n_out, 16, 16), block_c or _p2(C, 16, 256))
    out, sout = _MergeFunction.apply(x3, s2, pos, plan, _MODE_ID[mode], blocks)
    return out.view(B, match.n_out, *x.shape[2:]), sout.view(B, match.n_out, 1)


def _check(t: torch.Tensor):
    if t.dtype not in DTYPES:
        raise TypeError(f"triton backend supports {DTYPES}, got {t.dtype}; use backend='eager'")
