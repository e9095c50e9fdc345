"""kernels/: eager and Triton token merging against a direct transcription of ToMe's algorithm.

Triton runs through the interpreter on CPU (TRITON_INTERPRET=1 must be set before triton is
imported; kernels imports triton lazily). Grids are kept small: the interpreter pays per program.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import functools
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kernels
import kernels.roofline
from kernels import tome

HAS_TRITON = os.environ.get("TRITON_INTERPRET") == "1" and kernels.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton (interpreter) not available")
BACKENDS = ["eager", pytest.param("triton", marks=needs_triton)]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
SETTINGS = dict(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)


def reference(x, metric, size, r, protect_first=True, mode="wavg"):
    """ToMe's bipartite soft matching + merge, step by step, in float64.

    Returns (x', s', pos, separated): rows put in original-position order (pos: each row's
    representative position) and whether the example is free of near-ties (< 1e-4) that would let
    float32 and float64 scoring choose differently.
    """
    B, N, C = x.shape
    r = min(r, (N - int(protect_first)) // 2)
    if size is None:
        size = torch.ones(B, N, 1)
    if r <= 0:
        return x.double(), size.double(), torch.arange(N).expand(B, N), True
    m = metric.double()
    m = m / m.norm(dim=-1, keepdim=True)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, NA, NB]
    if protect_first:
        scores[:, 0, :] = -float("inf")
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
    dst = node_idx.gather(1, src)

    top = node_max.sort(dim=-1, descending=True).values
    separated = bool((top[:, r - 1] - top[:, r] > 1e-4).all()) if r < top.shape[1] else True
    if scores.shape[2] > 1:
        best2 = scores.topk(2, dim=-1).values
        gap = (best2[..., 0] - best2[..., 1]).gather(1, src)
        separated = separated and bool((gap > 1e-4).all())

    def merge(t, reduce):
        ta, tb = t[:, 0::2], t[:, 1::2]
        c = t.shape[-1]
        kept = ta.gather(1, unm[..., None].expand(-1, -1, c))
        moved = ta.gather(1, src[..., None].expand(-1, -1, c))
        tb = tb.scatter_reduce(1, dst[..., None].expand(-1, -1, c), moved, reduce=reduce)
        return torch.cat([kept, tb], dim=1)

    xd, sd = x.double(), size.double()
    if mode == "wavg":
        out = merge(xd * sd, "sum") / merge(sd, "sum")
    else:
        out = merge(xd, "mean" if mode == "mean" else "sum")
    s2 = merge(sd, "sum")
    pos = torch.cat([2 * unm, torch.arange(1, N, 2).expand(B, -1)], dim=1)
    perm = pos.argsort(dim=1)
    out = out.gather(1, perm[..., None].expand_as(out))
    return out, s2.gather(1, perm[..., None]), pos.gather(1, perm), separated


def make(B, N, C, Cm, seed, dtype=torch.float32, sized=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g).to(dtype)
    metric = torch.randn(B, N, Cm, generator=g).to(dtype)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float() if sized else None
    return x, metric, size


def expected_plan(match):
    """The Triton plan, built independently: per output row the count and offset of the rows
    merged into it, their positions sorted by (output row, position), and each input's row."""
    B = match.src_idx.shape[0]
    cnt = torch.zeros(B, match.n_out, dtype=torch.long).scatter_add_(
        1, match.dst_out, torch.ones_like(match.dst_out)
    )
    key = match.dst_out * match.n + 2 * match.src_idx
    csr = key.sort(dim=1).values % match.n
    return dict(cnt=cnt, off=cnt.cumsum(1) - cnt, csr=csr, grp=match.group)


def check_plan(plan, match):
    want = expected_plan(match)  # off: members before each row, for every row (block bounds)
    for k in ("cnt", "off", "csr", "grp"):
        assert torch.equal(plan[k].long(), want[k]), k


shapes = dict(
    B=st.integers(1, 3),
    N=st.integers(1, 40),
    C=st.integers(1, 16),
    Cm=st.integers(3, 16),
    r=st.integers(-2, 25),
    protect=st.booleans(),
    mode=st.sampled_from(tome.MODES),
    sized=st.booleans(),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=200, **SETTINGS)
@given(**shapes)
def test_eager_matches_reference(B, N, C, Cm, r, protect, mode, sized, seed):
    x, metric, size = make(B, N, C, Cm, seed, sized=sized)
    want, want_s, pos, separated = reference(x, metric, size, r, protect, mode)
    assume(separated)
    match = kernels.bipartite_match(metric, r, protect, backend="eager")
    got, got_s = kernels.merge_apply(match, x, size, mode, backend="eager")
    assert got.shape == (B, N - tome.clamp_r(N, r, protect), C)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_s.double(), want_s)
    torch.testing.assert_close(match.out_pos, pos)


@needs_triton
@settings(max_examples=100, **SETTINGS)
@given(
    B=st.integers(1, 2),
    N=st.integers(1, 33),
    C=st.integers(1, 40),
    Cm=st.integers(2, 20),
    r=st.integers(-1, 20),
    protect=st.booleans(),
    mode=st.sampled_from(tome.MODES),
    sized=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_triton_matches_eager(B, N, C, Cm, r, protect, mode, sized, seed, dtype):
    x, metric, size = make(B, N, C, Cm, seed, dtype, sized)
    if dtype == torch.float32:
        assume(reference(x, metric, size, r, protect, mode)[3])
    me = kernels.bipartite_match(metric, r, protect, backend="eager")
    if me.r:  # kernels.bipartite_match(backend="triton") step by step, to look at the scores
        vt, it = kernels._triton().match_scores(metric, protect)
        mt = kernels._triton().select_top_r(vt, it, me.r, N)
        ve, ie = tome.match_scores(metric, protect)
        torch.testing.assert_close(vt, ve, atol=1e-5, rtol=1e-5)
        # the same matching unless two candidates are within float32 rounding of each other
        top = ve.sort(dim=-1, descending=True).values
        assume(me.r == top.shape[1] or bool((top[:, me.r - 1] - top[:, me.r] > 1e-4).all()))
        assume(torch.equal(ie.gather(1, me.src_idx), it.gather(1, me.src_idx)))
    else:
        mt = kernels.bipartite_match(metric, r, protect, backend="triton")
    assert torch.equal(me.src_idx, mt.src_idx) and torch.equal(me.dst_idx, mt.dst_idx)
    assert torch.equal(me.out_pos, mt.out_pos)
    if me.r:  # the fused plan from scores == the fused plan from the eager match's partners
        _, plan = kernels._triton().tome_plan.plan_for(me)
        for k, v in plan.items():
            assert torch.equal(v, mt.plan[k]), k
        check_plan(mt.plan, me)
    xe, se = kernels.merge_apply(me, x, size, mode, backend="eager")
    xt, st_ = kernels.merge_apply(me, x, size, mode, backend="triton")
    assert xt.dtype == x.dtype and st_.dtype == se.dtype
    tol = TOL[dtype] * (4 if mode == "sum" else 1)
    torch.testing.assert_close(xt.float(), xe.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(st_, se)
    if dtype == torch.float32:
        want = reference(x, metric, size, r, protect, mode)[0]
        torch.testing.assert_close(xt.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "N,protect,r,n_out",
    [
        (1, True, 5, 1),
        (1, False, 5, 1),
        (2, True, 5, 2),
        (2, False, 5, 1),
        (3, True, 5, 2),
        (3, False, 5, 2),
        (10, True, 0, 10),
        (10, True, -4, 10),
        (10, True, 99, 6),
        (10, False, 99, 5),
        (11, True, 99, 6),
        (11, False, 99, 6),
    ],
)
def test_clamp_and_small_n(backend, N, protect, r, n_out):
    x, metric, size = make(2, N, 5, 4, seed=N)
    x2, s2 = kernels.merge_tokens(x, metric, size, r, protect, backend=backend)
    assert x2.shape == (2, n_out, 5) and s2.shape == (2, n_out, 1)
    torch.testing.assert_close(s2.sum(1), size.sum(1))
    if n_out == N:  # identity: inputs come back unchanged
        assert x2 is x and s2 is size
        x2, s2 = kernels.merge_tokens(x, metric, None, r, protect, backend=backend)
        assert x2 is x and torch.equal(s2, torch.ones(2, N, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_example(backend):
    # N=3, CLS protected: A = {0, 2}, B = {1}; token 2 merges into token 1.
    x = torch.tensor([[[1.0, 0.0], [2.0, 4.0], [5.0, 1.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0]]])
    metric = torch.randn(1, 3, 4)
    x2, s2, src = kernels.merge_tokens_with_source(x, metric, size, 1, backend=backend)
    torch.testing.assert_close(x2, torch.tensor([[[1.0, 0.0], [17 / 4, 7 / 4]]]))
    torch.testing.assert_close(s2, torch.tensor([[[1.0], [4.0]]]))
    torch.testing.assert_close(src, torch.tensor([[[1.0, 0, 0], [0, 1, 1]]]))
    xm, sm = kernels.merge_tokens(x, metric, size, 1, mode="mean", backend=backend)
    torch.testing.assert_close(xm, torch.tensor([[[1.0, 0.0], [3.5, 2.5]]]))
    torch.testing.assert_close(sm, s2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_rules(backend):
    # every A token (0, 2, 4, 6, 8) is the same vector v; B tokens 1 and 3 equal v, 5 and 7 do not.
    v, w = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([-1.0, 0.3, 2.0])
    metric = torch.stack([v, v, v, v, v, w, v, w, v])[None].repeat(2, 1, 1)
    metric[1] *= 3.0  # second batch row: same ties at another scale
    match = kernels.bipartite_match(metric, 3, protect_first=True, backend=backend)
    # all unprotected A scores are equal -> lowest A indices 1, 2, 3 win; argmax -> lowest B (0)
    assert match.src_idx.tolist() == [[1, 2, 3]] * 2
    assert match.dst_idx.tolist() == [[0, 0, 0]] * 2
    assert match.out_pos.tolist() == [[0, 1, 3, 5, 7, 8]] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_rows_independent(backend):
    x, metric, size = make(3, 23, 6, 5, seed=3)
    metric[1] = metric[1, :1].expand(23, -1)  # all tokens identical: ties everywhere
    metric[2] *= 1e3
    x[2] *= -7
    x2, s2 = kernels.merge_tokens(x, metric, size, 7, backend=backend)
    for b in range(3):
        xb, sb = kernels.merge_tokens(x[b : b + 1], metric[b : b + 1], size[b : b + 1], 7, backend=backend)
        torch.testing.assert_close(x2[b : b + 1], xb)
        torch.testing.assert_close(s2[b : b + 1], sb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("protect", [True, False])
def test_sizes_and_sources_over_layers(backend, protect):
    B, N = 2, 37
    x0, metric, _ = make(B, N, 8, 6, seed=11)
    x, size, source = x0, None, None
    for r in (5, 7, 9, 30):
        x, size, source = kernels.merge_tokens_with_source(
            x, metric, size, r, source, protect, backend=backend
        )
        metric = x[..., :6] + 0.1 * torch.randn_like(x[..., :6])
        n = x.shape[1]
        assert source.shape == (B, n, N)
        assert torch.equal(size.sum(1), torch.full((B, 1), float(N)))  # sizes sum to N
        assert bool(((source == 0) | (source == 1)).all())
        assert torch.equal(source.sum(1), torch.ones(B, N))  # each original token in one output
        torch.testing.assert_close(source.sum(-1, keepdim=True), size)
        # size-weighted averaging all the way == plain average of the original tokens held
        torch.testing.assert_close(x, source @ x0 / size, atol=1e-5, rtol=1e-5)
    if protect:
        assert bool((source[:, 0, 0] == 1).all()) and bool((source[:, 0].sum(-1) == 1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerge_and_prop_attn_bias(backend):
    x, metric, size = make(2, 15, 4, 5, seed=5)
    match = kernels.bipartite_match(metric, 4, backend=backend)
    x2, s2 = kernels.merge_apply(match, x, size, backend=backend)
    full = kernels.unmerge(match, x2)
    assert full.shape == x.shape
    src = kernels.merge_source(match)
    torch.testing.assert_close(full, src.transpose(1, 2) @ x2)
    bias = kernels.prop_attn_bias(s2, dtype=torch.bfloat16)
    assert bias.shape == (2, 1, 1, 11) and bias.dtype == torch.bfloat16
    # proportional attention == attention over keys repeated size times
    q, k = torch.randn(1, 3), torch.randn(11, 3)
    s = s2[0, :, 0]
    lhs = torch.softmax(q @ k.T + kernels.prop_attn_bias(s2)[0, 0], -1) @ k
    kk = k.repeat_interleave(s.long(), 0)
    torch.testing.assert_close(lhs, torch.softmax(q @ kk.T, -1) @ kk)


def _fixed_match(B=2, N=13):
    # several A tokens into the same B token, plus a protected CLS
    src = torch.tensor([[1, 2, 5], [1, 3, 4]])[:B]
    dst = torch.tensor([[0, 0, 4], [2, 2, 2]])[:B]  # [B, r]
    return tome.Match(src, dst, N)


@pytest.mark.parametrize("mode", tome.MODES)
def test_gradcheck_eager(mode):
    match = _fixed_match()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 3, dtype=torch.float64, generator=g, requires_grad=True)
    s = (torch.rand(2, 13, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: tome.merge_apply(match, a, b, mode), (x, s))
    assert torch.autograd.gradcheck(lambda a: tome.merge_apply(match, a, None, mode)[0], (x,))


@settings(max_examples=60, **SETTINGS)
@given(**shapes)
def test_eager_grads_match_reference(B, N, C, Cm, r, protect, mode, sized, seed):
    # the eager backward is hand-written (a gather); check it against autograd through the
    # transcription
    x, metric, size = make(B, N, C, Cm, seed, dtype=torch.float64, sized=True)
    size = size.double()
    assume(reference(x, metric, size, r, protect, mode)[3])
    g = torch.Generator().manual_seed(seed + 1)
    grads = []
    for fn in (reference, tome.merge_tokens_eager):
        xx, ss = x.clone().requires_grad_(), size.clone().requires_grad_()
        x2, s2 = fn(xx, metric, ss, r, protect, mode)[:2]
        gx = torch.randn(x2.shape, generator=g, dtype=torch.float64)
        gs = torch.randn(s2.shape, generator=g, dtype=torch.float64)
        grads.append(torch.autograd.grad((x2 * gx).sum() + (s2 * gs).sum(), [xx, ss]))
        g = torch.Generator().manual_seed(seed + 1)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)


@needs_triton
@pytest.mark.parametrize("mode", tome.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["both", "x", "size", "x_only_input"])
def test_triton_grads_equal_eager(mode, dtype, which):
    match = _fixed_match()
    x0, _, s0 = make(2, 13, 20, 1, seed=1, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    gx = torch.randn(2, 10, 20, generator=g).to(dtype)
    gs = torch.randn(2, 10, 1, generator=g)
    grads = []
    for backend in ("eager", "triton"):
        x = x0.clone().requires_grad_()
        s = None if which == "x_only_input" else s0.clone().requires_grad_()
        x2, s2 = kernels.merge_apply(match, x, s, mode, backend=backend)
        loss = {"x": (x2.float() * gx).sum(), "size": (s2 * gs).sum()}.get(
            which, (x2.float() * gx).sum() + (s2 * gs).sum()
        )
        loss.backward()
        grads.append((x.grad, None if s is None else s.grad))
    (xe, se), (xt, st_) = grads
    tol = TOL[dtype]
    if xe is None:
        assert xt is None or not xt.any()
    else:
        torch.testing.assert_close(xt.float(), xe.float(), atol=tol, rtol=tol)
    if se is not None:
        torch.testing.assert_close(st_, se, atol=10 * tol, rtol=10 * tol)


@needs_triton
def test_triton_tiles_and_long_merge_lists():
    tt = kernels._triton()
    # several B tiles, several Cm chunks, several C blocks, many A tokens into one B token
    x, metric, size = make(2, 70, 40, 37, seed=7)
    metric[:, 0::2] = metric[:, 3:4] + 0.01 * metric[:, 0::2]  # A tokens all near token 3
    ve, ie = tome.match_scores(metric)
    vt, it = tt.match_scores(metric, block_a=16, block_b=16, block_k=16)
    torch.testing.assert_close(vt, ve, atol=1e-5, rtol=1e-5)
    assert torch.equal(it, ie)
    match = tome.select_top_r(ve, ie, 30, 70)
    from kernels import tome_plan

    _, plan = tome_plan.plan_for(match)
    assert int(plan["cnt"].max()) > 16  # one group spans two 16-row member tiles
    check_plan(plan, match)
    for mode in tome.MODES:
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ss = [size.clone().requires_grad_(), size.clone().requires_grad_()]
        oe = tome.merge_apply(match, xs[0], ss[0], mode)
        ot = tt.merge_apply(match, xs[1], ss[1], mode, block_r=16, block_c=16, block_m=16)
        for a, b in zip(ot, oe):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        sum(o.sum() for o in oe).backward()
        sum(o.sum() for o in ot).backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad)
        torch.testing.assert_close(ss[1].grad, ss[0].grad, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_ties_across_tiles():
    # B tokens 4 and 20 are the same vector and sit in different 16-wide tiles: every A token ties
    # between them and the earlier tile (lowest index) must keep it. (Bitwise ties need the same
    # arithmetic for both columns; the interpreter's numpy tl.dot only gives that at the same
    # column of a tile, hence 16-wide tiles here.)
    tt = kernels._triton()
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        metric = torch.randn(1, 80, 24, generator=g)
        metric[0, 41] = metric[0, 9]
        metric[0, 0::2] = metric[0, 9] + 0.05 * metric[0, 0::2]
        metric[0, 10] = metric[0, 9]  # A token 5 equals both: score 1
        vt, it = tt.match_scores(metric, True, 16, 16, 16)
        ve, ie = tome.match_scores(metric, True)
        assert torch.equal(it, ie) and set(it[0, 1:].tolist()) == {4}
        torch.testing.assert_close(vt, ve, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_deterministic():
    x, metric, size = make(2, 31, 24, 8, seed=9, dtype=torch.bfloat16)
    runs = [kernels.merge_tokens(x, metric, size, 9, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@needs_triton
@pytest.mark.parametrize(
    "B,N,C,Cm,r", [(2, 257, 768, 64, 19), (1, 65, 4096, 4096, 20), (1, 4097, 32, 48, 1500)]
)  # N = 4097: ~2 s
def test_triton_large(B, N, C, Cm, r):
    tt = kernels._triton()
    x, metric, size = make(B, N, C, Cm, seed=4, dtype=torch.bfloat16)
    ve, ie = tome.match_scores(metric)
    vt, it = tt.match_scores(metric, True, *((256, 256, 64) if N > 1000 else ()))  # fewer programs
    torch.testing.assert_close(vt, ve, atol=1e-5, rtol=1e-5)
    s = tome.F.normalize(metric.float(), dim=-1)
    s = s[:, 0::2] @ s[:, 1::2].transpose(1, 2)
    top2 = s.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 1e-5  # winners not within float32 rounding
    assert bool(clear[:, 1:].float().mean() > 0.9)
    assert torch.equal(it[clear], ie[clear])
    me, mt = tome.select_top_r(ve, ie, r, N), tt.select_top_r(ve, ie, r, N)  # same scores
    for k in ("src_idx", "dst_idx", "out_pos"):
        assert torch.equal(getattr(me, k), getattr(mt, k)), k
    assert torch.equal(mt.plan["grp"].long(), me.group)
    check_plan(mt.plan, me)
    xe, se = kernels.merge_apply(me, x, size, backend="eager")
    xt, st_ = tt.merge_apply(mt, x, size, block_r=64 if N > 1000 else None)
    torch.testing.assert_close(xt.float(), xe.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(st_, se)


def test_bad_arguments():
    x, metric, size = make(1, 9, 4, 4, seed=0)
    with pytest.raises(ValueError):
        kernels.merge_tokens(x, metric, size, 2, mode="max")
    with pytest.raises(ValueError):
        kernels.merge_tokens(x, metric, size, 2, backend="cuda")
    assert kernels.merge_tokens(x, metric, size, 2, backend="auto")[0].shape == (1, 7, 4)


def test_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.triton_available()\n"
        "x = torch.randn(2, 9, 4)\n"
        "assert kernels.merge_tokens(x, x, None, 3)[0].shape == (2, 6, 4)\n"
        "try:\n"
        "    kernels.merge_tokens(x, x, None, 3, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ok', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_kernels_import_nothing_of_ours():
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    for name in os.listdir(root):
        if name.endswith(".py"):
            with open(os.path.join(root, name)) as f:
                text = f.read()
            assert "import pipeline" not in text and "from pipeline" not in text, name


def test_bench_runs_small(tmp_path, monkeypatch):
    import io

    from kernels import bench

    monkeypatch.setitem(bench.SHAPES, "tiny", (33, 16, 8, 5, False, 2, 2))
    monkeypatch.setitem(bench.SHAPES, "tiny-ties", (33, 16, 8, 12, True, 2, 2))
    out = tmp_path / "bench.json"
    buf = io.StringIO()
    res = bench.run(["tiny", "tiny-ties"], ["float32"], torch.device("cpu"), 2, True, False, str(out), buf)
    assert out.exists() and all(res["checks"].values()) and not res["failed"]
    assert {r["impl"] for r in res["rows"]} == {"transcription", "eager"}
    assert all(r["launches"] and r["bytes"] for r in res["rows"])
    # the roofline table: every shape x GPU, with the eager estimate from the counted bytes
    assert {(e["shape"], e["gpu"]) for e in res["roofline"]} == {
        (s, g) for s in ("tiny", "tiny-ties") for g in kernels.roofline.GPUS
    }
    assert all(e["triton_fwd_us"] < e["eager_fwd_us"] for e in res["roofline"])
    assert "Expected GPU time" in buf.getvalue()


def test_roofline_counts_follow_the_shape():
    from kernels import roofline

    s = roofline.Shape(B=4, N=257, C=768, Cm=64, r=19)
    fwd = {k: b for k, b, _ in roofline.triton_kernels(s)}
    assert fwd["merge fwd"] >= roofline.min_bytes(s)  # x read once and x' written once, at least
    assert fwd["merge fwd"] < 1.05 * roofline.min_bytes(s)  # ... plus small index arrays
    grad = {k: b for k, b, _ in roofline.triton_kernels(roofline.Shape(4, 257, 768, 64, 19, size_grad=True))}
    assert grad["merge bwd"] > 1.9 * fwd["merge bwd"]  # d(size) reads x and x' again


@needs_triton
def test_bench_check_and_variants_print(monkeypatch):
    import io

    from kernels import jit_check, selfcheck

    monkeypatch.setattr(selfcheck, "SHAPES", {"random": (1, 21, 8, 6, 5), "tie-heavy": (1, 21, 8, 6, 7)})
    buf = io.StringIO()
    assert selfcheck.report("cpu", dtypes=(torch.float32,), file=buf) == 0
    assert buf.getvalue().count(" ok ") == 4 and "interpreter" in buf.getvalue()
    buf = io.StringIO()
    small = functools.partial(jit_check.tomeformer_pass, N=41, layers=4, r=5)
    monkeypatch.setattr(jit_check, "tomeformer_pass", small)
    assert jit_check.print_variants("cpu", file=buf) == 0
    assert "6 kernel variants" in buf.getvalue()


# ----------------------------------------------------------------------------- tie-heavy inputs
def identical_tokens(B, N, Cm, seed=0, dtype=torch.float32):
    """Every token the same small-integer vector (black frames, padding): exact dot products, so
    both backends score all pairs bitwise equal and the tie rules alone decide."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(-3, 4, (Cm,), generator=g).float()
    v[0] = 5.0  # never the zero vector
    return v.expand(B, N, Cm).to(dtype).contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,r", [(37, 12), (133, 66), (4097, 1900)])  # N = 4097: ~2 s
def test_all_identical_tokens(backend, N, r):
    B, C = 1, 8
    metric = identical_tokens(B, N, 16)
    x, _, size = make(B, N, C, 4, seed=N)
    if backend == "triton" and N > 1000:  # wide match tiles: fewer interpreted programs
        tt = kernels._triton()
        match = tt.select_top_r(*tt.match_scores(metric, True, 256, 256), r, N)
    else:
        match = kernels.bipartite_match(metric, r, backend=backend)
    # every A token scores 1 with every B token: lowest B index (0) wins, lowest A indices merge
    assert match.src_idx.tolist() == [list(range(1, r + 1))]
    assert match.dst_idx.tolist() == [[0] * r]
    if backend == "triton":
        check_plan(match.plan, tome.bipartite_match(metric, r))
        assert int(match.plan["cnt"].max()) == r  # one output row receives all r members
    kw = dict(block_r=64) if (backend == "triton" and N > 1000) else {}
    xx = x.clone().requires_grad_()
    impl = kernels._triton().merge_apply if backend == "triton" else tome.merge_apply
    x2, s2 = impl(match, xx, size, "wavg", **kw)
    want, want_s = tome.merge_apply(tome.bipartite_match(metric, r), x, size)
    torch.testing.assert_close(x2, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2, want_s)
    x2.sum().backward()
    group = torch.cat([torch.tensor([1]), 2 * torch.arange(1, r + 1)])  # B token 0 + members
    w = size[0, group, 0] / size[0, group, 0].sum()
    torch.testing.assert_close(xx.grad[0, group, 0], w)


@needs_triton
def test_plan_with_tl_sort_equals_bitonic_network():
    # compiled kernels sort with tl.sort, the interpreter with a tl.gather network (tl.sort is
    # slow there); keys are unique, so both must give the same plan. Run tl.sort once here.
    kernels._triton()
    metric = make(1, 37, 4, 6, seed=3)[1]
    metric[0, 9:20] = metric[0, 3]  # ties
    ve, ie = tome.match_scores(metric)
    from kernels import tome_plan

    ms = [tome_plan.build_plan(37, 11, scores=(ve, ie), native_sort=n) for n in (False, True)]
    for k in ("src_idx", "dst_idx", "out_pos"):
        assert torch.equal(getattr(ms[0], k), getattr(ms[1], k)), k
    for k in ms[0].plan:
        assert torch.equal(ms[0].plan[k], ms[1].plan[k]), k
    check_plan(ms[1].plan, tome.select_top_r(ve, ie, 11, 37))


@needs_triton
def test_plan_ranks_special_scores():
    # -0.0 ties with 0.0 (lowest index first), -inf (protected) last, as torch's stable sort
    tt = kernels._triton()
    val = torch.tensor([[float("-inf"), 0.0, -0.0, 0.5, -0.0, -1.0, 0.0, 0.5]])
    idx = torch.tensor([[0, 3, 1, 2, 0, 6, 5, 4]])
    for r in range(1, 8):
        me, mt = tome.select_top_r(val, idx, r, 16), tt.select_top_r(val, idx, r, 16)
        assert torch.equal(mt.src_idx, me.src_idx) and torch.equal(mt.dst_idx, me.dst_idx), r
        check_plan(mt.plan, me)


# ----------------------------------------------------------------------------- size gradients
def saved_tensors(fn):
    """Run fn and list the tensors autograd saves for backward (via saved_tensors_hooks)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["wavg", "mean"])
def test_sizes_carry_no_grad(backend, mode):
    B, N, C = 2, 41, 12
    x0, metric, _ = make(B, N, C, 6, seed=21)

    def chain(size):
        x, sizes = x0.clone().requires_grad_(), []
        for r in (6, 5, 4, 3):
            x, size = kernels.merge_tokens(x, x[..., :6].detach(), size, r, mode=mode, backend=backend)
            sizes.append(size)
        x.sum().backward()  # saves nothing itself
        return sizes

    sizes, saved = saved_tensors(lambda: chain(None))
    assert not any(s.requires_grad for s in sizes)
    assert not [t.shape for t in saved if t.shape[-1] == C]  # x and x' never saved
    # a caller's size that needs a gradient still gets one, and then x is saved (wavg only)
    s0 = torch.ones(B, N, 1, requires_grad=True)
    sizes_g, saved_g = saved_tensors(lambda: chain(s0))
    assert all(s.requires_grad for s in sizes_g) and s0.grad is not None
    n_x = len([t for t in saved_g if t.shape[-1] == C])
    assert n_x == (8 if mode == "wavg" else 0)  # x and x' for each of the 4 merges
    assert len(saved) <= len(saved_g) - n_x + 1  # +1: the first merge's size, when given


@needs_triton
def test_sizes_carry_no_grad_triton_grads_equal_eager():
    x0, metric, _ = make(2, 41, 12, 6, seed=22)
    grads = []
    for backend in ("eager", "triton"):
        x, size = x0.clone().requires_grad_(), None
        xs = x
        for r in (6, 5, 4):
            x, size = kernels.merge_tokens(x, metric[:, : x.shape[1]], size, r, backend=backend)
        (x.square().sum() + size.sum()).backward()  # size takes part in the loss: still no grad path
        grads.append(xs.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def tiny_tomeformer(backend, n_tokens=37, layers=3, r=4, hidden=32):
    from transformers import BertConfig

    from pipeline.models.tomeformer import TomeFormer

    cfg = BertConfig(
        hidden_size=hidden,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        max_position_embeddings=n_tokens,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return TomeFormer(cfg, [r] * layers, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tomeformer_sizes_carry_no_grad(backend):
    tf = tiny_tomeformer(backend)
    x0 = torch.randn(2, 37, 32)
    sizes = []
    hooks = [
        layer.register_forward_hook(lambda m, i, out: sizes.append(out[1])) for layer in tf.encoder.layer
    ]
    y, saved = saved_tensors(lambda: tf(x0.clone().requires_grad_()))
    for h in hooks:
        h.remove()
    assert len(sizes) == 3 and not any(s.requires_grad for s in sizes)
    y.sum().backward()

    def stack(size):  # the same layers, entered with a size that needs a gradient (the old chain)
        x = tf.embeddings(x0.clone().requires_grad_())
        for layer in tf.encoder.layer:
            x, size, _ = layer(x, size)
        return x

    s0 = torch.ones(2, 37, 1, requires_grad=True)
    y_g, saved_g = saved_tensors(lambda: stack(s0))
    torch.testing.assert_close(y_g, y)

    def nbytes(ts):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())

    # every layer's pre-merge x ([2, N, 32] fp32) is no longer kept alive for backward
    pre_merge = sum(2 * n * 32 * 4 for n in [37] + tf.token_counts(37)[:-1])
    assert nbytes(saved_g) - nbytes(saved) >= pre_merge


# ----------------------------------------------------------------------------- verified dispatch
@pytest.fixture
def auto_on_cpu(monkeypatch):
    """`auto` treats CPU tensors like CUDA ones (the interpreter stands in for the GPU), with small
    self-check inputs; verdicts are reset before and after."""
    from kernels import selfcheck

    monkeypatch.setattr(kernels, "AUTO_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(
        selfcheck, "SHAPES", {"random": (1, 45, 20, 12, 16), "tie-heavy": (1, 45, 20, 12, 20)}
    )
    selfcheck.reset()
    yield selfcheck
    selfcheck.reset()


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _forgetful_merge_fwd(
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
        # deliberately broken: copies each output row's own input row, drops the merged-in rows
        b = tl.program_id(0).to(tl.int64)
        o = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        m2 = (o < NOUT)[:, None] & (c < C)[None, :]
        pos = tl.load(pos_ptr + b * NOUT + o, mask=o < NOUT, other=0)
        x = tl.load(x_ptr + b * N * C + pos[:, None] * C + c[None, :], mask=m2, other=0.0)
        tl.store(out_ptr + b * NOUT * C + o[:, None] * C + c[None, :], x, mask=m2)
        tl.store(sout_ptr + b * NOUT + o, tl.full([BLOCK_R], 1.0, tl.float32), mask=o < NOUT)
        tl.store(wsum_ptr + b * NOUT + o, tl.full([BLOCK_R], 1.0, tl.float32), mask=o < NOUT)


@needs_triton
def test_auto_uses_triton_once_verified(auto_on_cpu, monkeypatch):
    tt = kernels._triton()
    calls = []
    real = tt.merge_apply
    monkeypatch.setattr(tt, "merge_apply", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, metric, size = make(2, 21, 8, 6, seed=1)
    with warnings_recorded() as w:
        x2, s2 = kernels.merge_tokens(x, metric, size, 5)  # backend="auto"
    assert not w and calls  # no warning, Triton used
    assert auto_on_cpu.known()[("cpu", torch.float32, "wavg")].ok
    assert auto_on_cpu.known()[("cpu", torch.float32, None)].ok
    want = kernels.merge_tokens(x, metric, size, 5, backend="eager")
    torch.testing.assert_close(x2, want[0])


@needs_triton
def test_auto_falls_back_from_a_broken_kernel(auto_on_cpu, monkeypatch):
    tt = kernels._triton()
    monkeypatch.setattr(tt, "_merge_fwd_kernel", _forgetful_merge_fwd)
    x, metric, size = make(2, 21, 8, 6, seed=1)
    with pytest.warns(RuntimeWarning, match=r"self-check failed for cpu torch.float32 mode=wavg: .*merged x"):
        x2, s2 = kernels.merge_tokens(x, metric, size, 5)
    want = kernels.merge_tokens(x, metric, size, 5, backend="eager")
    assert torch.equal(x2, want[0]) and torch.equal(s2, want[1])  # eager's result, bit for bit
    with warnings_recorded() as w:  # warned once per key; other modes are checked on their own
        kernels.merge_tokens(x, metric, size, 5)
    assert not w
    assert not auto_on_cpu.known()[("cpu", torch.float32, "wavg")].ok
    assert auto_on_cpu.known()[("cpu", torch.float32, None)].ok  # matching kernels still trusted


@needs_triton
def test_auto_falls_back_when_kernels_fail_to_launch(auto_on_cpu, monkeypatch):
    tt = kernels._triton()

    def no_driver(*a, **k):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(tt, "match_scores", no_driver)
    x, metric, size = make(1, 15, 4, 4, seed=2)
    with pytest.warns(RuntimeWarning, match="RuntimeError: 0 active drivers"):
        match = kernels.bipartite_match(metric, 3)
    assert match.plan is None  # the eager match
    v = auto_on_cpu.verdict("cpu", torch.float32, None)
    assert not v.ok and "0 active drivers" in v.reason


@contextlib.contextmanager
def warnings_recorded():
    import warnings

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        yield w


# ----------------------------------------------------------------------------- recompiles
@needs_triton
def test_tomeformer_forward_compiles_each_kernel_once():
    # SimVLG's shape: 257 tokens, 12 layers, r = 19 (small channels: the interpreter is slow)
    from kernels.jit_check import record_variants

    tf = tiny_tomeformer("triton", n_tokens=257, layers=12, r=19, hidden=16)
    x = torch.randn(1, 257, 16)
    with torch.no_grad(), record_variants() as variants, record_variants(True) as without_dns:
        tf(x)
    names = sorted(k[0] for k in variants)
    # match 1, plan 1, merge 2 (first layer has no sizes yet)
    assert names == ["_match_kernel", "_merge_fwd_kernel", "_merge_fwd_kernel", "_plan_kernel"], names
    assert len(without_dns) > 2 * len(variants)  # specialising on the shrinking sizes


@needs_triton
def test_plan_beyond_the_lane_limit_uses_torch(monkeypatch):
    kernels._triton()
    from kernels import tome_plan

    monkeypatch.setattr(tome_plan, "MAX_PLAN_LANES", 128)  # as if N were beyond 8193
    x, metric, size = make(1, 301, 8, 6, seed=5)
    mt = kernels.bipartite_match(metric, 60, backend="triton")
    me = kernels.bipartite_match(metric, 60, backend="eager")
    assert torch.equal(mt.src_idx, me.src_idx) and torch.equal(mt.dst_idx, me.dst_idx)
    check_plan(mt.plan, me)
    xt, st_ = kernels.merge_apply(mt, x, size, backend="triton")
    xe, se = kernels.merge_apply(me, x, size, backend="eager")
    torch.testing.assert_close(xt, xe) and torch.testing.assert_close(st_, se)
    match = tome.Match(me.src_idx, me.dst_idx, 301)  # a plan for an eager match, too
    torch.testing.assert_close(kernels.merge_apply(match, x, size, backend="triton")[0], xe)


# ----------------------------------------------------------------------------- offline GPU compile
def _ptxas_available():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas"))


@needs_triton
@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton's bundled ptxas is missing")
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    # The variants one bf16 TomeFormer pass launches, recorded here in the interpreter, compiled for
    # A100 (sm_80) and H100 (sm_90) down to cubin in a process without TRITON_INTERPRET: no GPU needed.
    import json

    from kernels import jit_check

    with jit_check.record_variants() as seen:
        jit_check.tomeformer_pass(N=41, layers=3, r=5)
    assert len(seen) == 6
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(list(seen.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # really compile
    res = subprocess.run(
        [sys.executable, "-m", "kernels.jit_check", str(specs), "--arch", "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert res.returncode == 0 and len(rows) == 12 and all(r["ok"] for r in rows), res.stdout + res.stderr
    for r in rows:
        ins = " ".join(r["instructions"])
        assert "approx" not in ins and "div.full" not in ins  # exact sqrt and division only
        if r["kernel"] == "_match_kernel":  # 16-bit tensor cores
            assert "sqrt.rn.f32" in ins and "div.rn.f32" in ins
            assert (
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in ins
                if r["arch"] == 80
                else "wgmma.mma_async" in ins and "bf16" in ins
            ), ins
        if r["kernel"] == "_merge_fwd_kernel":  # the one-hot member tiles on tensor cores
            assert "bf16" in ins


@needs_triton
def test_no_self_check_while_tracing(auto_on_cpu, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    v = auto_on_cpu.verdict("cpu", torch.float32, "wavg")
    assert not v.ok and "torch.compile" in v.reason and not auto_on_cpu.known()  # not cached
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert auto_on_cpu.verdict("cpu", torch.float32, "wavg").ok
