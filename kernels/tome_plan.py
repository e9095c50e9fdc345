"""The merge plan of a bipartite match, on the GPU: top-r selection and every index the merge kernels
need, in one Triton launch per batch (kernels/tome_triton.py runs the match before it and the merge
after it; read kernels/tome.py for the semantics).

- _plan_kernel, grid (B,): one program per row does the top-r selection and every index the merge
  needs with sorts, a cumsum, gathers and a binary search over L = next_pow2(NA) lanes:
  O(L log^2 L) work, no serial loop over tokens. L = 4096 (N <= 8193) compiles for sm_80 without
  spills; beyond MAX_PLAN_LANES the plan is built with torch ops (plan_torch, also the reference the
  self-check compares the kernel with).

The plan of a Match is a dict of int32 tensors:
    cnt [B, N']  members merged into each output row     off [B, N']  where its members start in csr
    csr [B, r]   input positions of the members, grouped by output row (ascending position)
    grp [B, N]   the output row each input row ends in
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import tome

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MIN_PLAN_LANES, MAX_PLAN_LANES = 256, 4096
I64_MAX, I64_MIN = tl.constexpr(2**63 - 1), tl.constexpr(-(2**63))
SHRINKING = ["N", "NA", "NB", "NOUT", "R"]  # sizes that change every layer: never specialised on


@triton.jit
def _sort_lanes(x, L: tl.constexpr, LOG_L: tl.constexpr, NATIVE: tl.constexpr):
    # Ascending sort of L int64 keys. NATIVE: tl.sort (compiled kernels). The interpreter's cost is
    # per op and its tl.sort is slow at L = 4096 (README, "Measured here"), so there: a stable rank by
    # counting (O(L^2) work in a few ops; blocks are capped at 2^20 elements), or for larger L a
    # bitonic network of tl.gather compare-exchanges. All three give the same sorted values.
    a = tl.arange(0, L)
    if NATIVE:
        return tl.sort(x)
    elif L <= 1024:
        before = (x[None, :] < x[:, None]) | ((x[None, :] == x[:, None]) & (a[None, :] < a[:, None]))
        rank = tl.sum(before.to(tl.int32), axis=1)  # [L] a permutation of 0 .. L-1
        return tl.sum(tl.where(rank[None, :] == a[:, None], x[None, :], 0), axis=1)
    else:
        for i in tl.static_range(1, LOG_L + 1):  # merge bitonic runs of 2^i lanes
            up = (a & (1 << i)) == 0  # this lane's run is sorted ascending
            for j in tl.static_range(i):
                y = tl.gather(x, a ^ (1 << (i - 1 - j)), 0)
                keep_min = ((a & (1 << (i - 1 - j))) == 0) == up  # lower lane of an ascending pair
                x = tl.where(keep_min, tl.minimum(x, y), tl.maximum(x, y))
        return x


@triton.jit(do_not_specialize=SHRINKING)
def _plan_kernel(
    val_ptr,
    idx_ptr,
    part_ptr,
    pos_ptr,
    cnt_ptr,
    off_ptr,
    csr_ptr,
    grp_ptr,
    src_ptr,
    dst_ptr,
    N,
    NA,
    NB,
    NOUT,
    R,
    FROM_SCORES: tl.constexpr,
    L: tl.constexpr,
    LOG_L: tl.constexpr,
    NATIVE_SORT: tl.constexpr,
):
    # Lane a is A token a (position 2a) and, for a < NB, B token a (position 2a + 1).
    b = tl.program_id(0).to(tl.int64)
    a = tl.arange(0, L)
    ma = a < NA
    mb = a < NB
    if FROM_SCORES:  # top-R by one sort of (descending score, ascending index) keys
        s = tl.load(val_ptr + b * NA + a, mask=ma, other=0.0)
        d = tl.load(idx_ptr + b * NA + a, mask=ma, other=0).to(tl.int32)
        s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with 0.0, as in torch.sort
        bits = s.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int order == float order
        ordered = tl.where(s != s, 0x7FFFFFFF, ordered)  # NaN counts as the largest score
        key = ((~ordered).to(tl.int64) << 32) | a.to(tl.int64)
        key = tl.where(ma, key, I64_MAX)
        srt = _sort_lanes(key, L, LOG_L, NATIVE_SORT)
        cut = tl.max(tl.where(a < R, srt, I64_MIN), axis=0)  # the R-th smallest key
        merged = ma & (key <= cut)
    else:  # from a given match: partner[a] is a B index, or -1 if A token a is kept
        p = tl.load(part_ptr + b * NA + a, mask=ma, other=-1)
        merged = p >= 0
        d = tl.maximum(p, 0)
    d = tl.minimum(d, L - 1)
    le = tl.cumsum(merged.to(tl.int32), 0)  # merged A tokens with index <= a
    ck = a + 1 - le  # kept A tokens with index <= a
    row_a = ck - 1 + tl.minimum(a, NB)  # output row of kept A token a
    row_b = a + ck  # output row of B token a
    row_d = tl.gather(row_b, d, 0)  # output row of the partner of A token a
    # merged tokens sorted by (partner, index): the CSR member list, grouped by output row
    mkey = tl.where(merged, (d.to(tl.int64) << 32) | a.to(tl.int64), I64_MAX)
    srt = _sort_lanes(mkey, L, LOG_L, NATIVE_SORT)
    tl.store(csr_ptr + b * R + a, (2 * (srt & 0x7FFFFFFF)).to(tl.int32), mask=a < R)
    # off[a] = merged tokens with partner < a (binary search in srt), the members before both rows
    # of lane a; cnt[a] = merged tokens with partner a
    tgt = a.to(tl.int64) << 32
    off = tl.zeros([L], tl.int32)
    for i in tl.static_range(LOG_L):  # steps L/2, L/4, ..., 1
        off = tl.where(tl.gather(srt, off + (L >> (i + 1)) - 1, 0) < tgt, off + (L >> (i + 1)), off)
    off += (tl.gather(srt, off, 0) < tgt).to(tl.int32)
    nxt = tl.where(a + 1 < L, tl.gather(off, tl.minimum(a + 1, L - 1), 0), R)
    kept = ma & (merged == 0)
    tl.store(pos_ptr + b * NOUT + row_a, (2 * a).to(tl.int64), mask=kept)
    tl.store(pos_ptr + b * NOUT + row_b, (2 * a + 1).to(tl.int64), mask=mb)
    tl.store(cnt_ptr + b * NOUT + row_a, tl.zeros([L], tl.int32), mask=kept)
    tl.store(off_ptr + b * NOUT + row_a, off, mask=kept)
    tl.store(cnt_ptr + b * NOUT + row_b, nxt - off, mask=mb)
    tl.store(off_ptr + b * NOUT + row_b, off, mask=mb)
    tl.store(grp_ptr + b * N + 2 * a, tl.where(merged, row_d, row_a), mask=ma)
    tl.store(grp_ptr + b * N + 2 * a + 1, row_b, mask=mb)
    tl.store(src_ptr + b * R + le - 1, a.to(tl.int64), mask=merged)  # ascending a
    tl.store(dst_ptr + b * R + le - 1, d.to(tl.int64), mask=merged)


def lanes(na: int) -> int:
    """Lanes of the plan kernel for NA A tokens (a power of two, at least MIN_PLAN_LANES)."""
    return max(MIN_PLAN_LANES, triton.next_power_of_2(na))


def launch_options(L: int) -> dict:
    """num_warps of the plan kernel (Triton's default is 4)."""
    return dict(num_warps=4 if L <= 1024 else 8)


def select_top_r(node_max: torch.Tensor, node_idx: torch.Tensor, r: int, n: int) -> tome.Match:
    """Triton twin of tome.select_top_r: one plan-kernel launch (torch beyond MAX_PLAN_LANES)."""
    if lanes((n + 1) // 2) > MAX_PLAN_LANES:
        match = tome.select_top_r(node_max, node_idx, r, n)
        match.plan = plan_torch(match)
        return match
    return build_plan(n, r, scores=(node_max.contiguous(), node_idx.contiguous()))


def build_plan(N: int, r: int, scores=None, partner=None, native_sort=None) -> tome.Match:
    """From (scores, indices) [B, NA] or partner [B, NA] int32 (B index or -1): Match + fused plan."""
    t = scores[0] if scores is not None else partner
    B, NA, NB, NOUT, dev = t.shape[0], (N + 1) // 2, N // 2, N - r, t.device
    i32 = dict(dtype=torch.int32, device=dev)
    pos = torch.empty(B, NOUT, dtype=torch.int64, device=dev)
    cnt, off = torch.empty(B, NOUT, **i32), torch.empty(B, NOUT, **i32)
    csr, grp = torch.empty(B, r, **i32), torch.empty(B, N, **i32)
    src_idx = torch.empty(B, r, dtype=torch.int64, device=dev)
    dst_idx = torch.empty(B, r, dtype=torch.int64, device=dev)
    L = lanes(NA)
    val, idx = scores if scores is not None else (partner, partner)
    _plan_kernel[(B,)](
        val,
        idx,
        partner if partner is not None else val,
        pos,
        cnt,
        off,
        csr,
        grp,
        src_idx,
        dst_idx,
        N,
        NA,
        NB,
        NOUT,
        r,
        FROM_SCORES=scores is not None,
        L=L,
        LOG_L=L.bit_length() - 1,
        **launch_options(L),
        NATIVE_SORT=not INTERPRET if native_sort is None else native_sort,
    )
    plan = dict(cnt=cnt, off=off, csr=csr, grp=grp)
    return tome.Match(src_idx, dst_idx, N, out_pos=pos, plan=plan)


def plan_torch(match: tome.Match) -> dict:
    """The fused plan built with torch ops (huge N; also the reference the self-check compares to)."""
    B = match.src_idx.shape[0]
    cnt = torch.zeros(B, match.n_out, dtype=torch.int32, device=match.src_idx.device)
    cnt.scatter_add_(1, match.dst_out, torch.ones_like(match.dst_out, dtype=torch.int32))
    key = match.dst_out * match.n + 2 * match.src_idx  # members sorted by (output row, position)
    return dict(
        cnt=cnt,
        off=(cnt.cumsum(1, dtype=torch.int32) - cnt),
        csr=(key.sort(dim=1).values % match.n).to(torch.int32),
        grp=match.group.to(torch.int32),
    )


def plan_for(match: tome.Match) -> tuple[torch.Tensor, dict]:
    """(out_pos, plan) of a match (the plan built by the plan kernel if the match came from elsewhere)."""
    if match.plan is None:
        B, NA = match.src_idx.shape[0], (match.n + 1) // 2
        if lanes(NA) > MAX_PLAN_LANES:
            match.plan = plan_torch(match)
        else:
            partner = torch.full((B, NA), -1, dtype=torch.int32, device=match.src_idx.device)
            partner.scatter_(1, match.src_idx, match.dst_idx.to(torch.int32))
            fused = build_plan(match.n, match.r, partner=partner)
            match.plan = fused.plan
            if "out_pos" not in match.__dict__:
                match.out_pos = fused.out_pos
    return match.out_pos.contiguous(), match.plan
