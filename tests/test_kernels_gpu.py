"""The compiled Triton kernels on a real GPU, against eager: `make test-gpu`. Skipped without CUDA.

The kernels must be compiled, not interpreted, so these tests run without TRITON_INTERPRET: `make
test-gpu` sets TRITON_INTERPRET=0; inside the normal suite (conftest.py sets TRITON_INTERPRET=1)
the single test_compiled_suite_in_subprocess re-runs this module in a fresh process instead.
N = 5, 257, 577, 4097; float32 and bfloat16; random and tie-heavy inputs: the plan bitwise (from
the same scores), match scores, outputs and gradients within tolerance.
"""

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
compiled = pytest.mark.skipif(
    not CUDA or INTERPRET,
    reason="needs a CUDA GPU" if not CUDA else "runs in a subprocess without TRITON_INTERPRET",
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.skipif(not INTERPRET, reason="this process runs the compiled tests itself")
def test_compiled_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def _inputs(B, N, C, Cm, dtype, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float()
    if ties:  # small integers (exact dot products) with long runs of one token
        metric = torch.randint(-2, 3, (B, N, Cm), generator=g).float()
        metric[..., 0] = 3.0
        metric[:, N // 6 : N * 5 // 6] = metric[:, 3:4]
    else:
        metric = torch.randn(B, N, Cm, generator=g)
    return x.cuda().to(dtype), metric.cuda().to(dtype), size.cuda()


@compiled
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("N", [5, 257, 577, 4097])
def test_compiled_kernels_match_eager(N, dtype, ties):
    from kernels import tome, tome_plan
    from kernels import tome_triton as tt

    B, C, Cm = (2, 256, 64) if N > 1000 else (4, 384, 64)
    r = max(1, N // 3)
    x, metric, size = _inputs(B, N, C, Cm, dtype, ties)
    ve, ie = tome.match_scores(metric)
    vt, it = tt.match_scores(metric)
    if ties:  # exact dot products: both backends score bitwise alike, ties resolve alike
        assert torch.equal(vt, ve) and torch.equal(it, ie)
    else:
        torch.testing.assert_close(vt, ve, atol=1e-5, rtol=1e-5)
        s = torch.nn.functional.normalize(metric.double(), dim=-1)
        top2 = (s[:, 0::2] @ s[:, 1::2].transpose(1, 2)).topk(min(2, N // 2), dim=-1).values
        clear = top2[..., 0] - top2[..., -1] > 1e-4  # winners not within float32 rounding
        assert torch.equal(it[clear], ie[clear])
    r = tome.clamp_r(N, r)
    me, mt = tome.select_top_r(ve, ie, r, N), tt.select_top_r(ve, ie, r, N)  # the same scores
    for k in ("src_idx", "dst_idx", "out_pos"):
        assert torch.equal(getattr(mt, k), getattr(me, k)), k
    for k, v in tome_plan.plan_torch(me).items():
        assert torch.equal(mt.plan[k], v), k
    for mode in ("wavg", "mean"):
        for sized in (False, True):
            res = []
            for impl, match in ((tome.merge_apply, me), (tt.merge_apply, mt)):
                xx = x.clone().requires_grad_()
                ss = size.clone().requires_grad_() if sized else None
                out, s_out = impl(match, xx, ss, mode)
                assert s_out.requires_grad == sized
                (out.float().square().sum() + (s_out.square().sum() if sized else 0)).backward()
                res.append((out, s_out, xx.grad, ss.grad if sized else None))
            (oe, se, gxe, gse), (ot, st, gxt, gst) = res
            tol = TOL[dtype]
            torch.testing.assert_close(ot.float(), oe.float(), atol=tol, rtol=tol)
            assert torch.equal(st, se)
            torch.testing.assert_close(gxt.float(), gxe.float(), atol=4 * tol, rtol=4 * tol)
            if sized:  # d(size) sums C products: compare against the gradient's scale
                scale = gse.abs().max().item()
                torch.testing.assert_close(gst, gse, atol=4 * tol * scale, rtol=4 * tol)


@compiled
def test_selfcheck_passes_on_this_gpu():
    from kernels import selfcheck

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode in (None, "wavg", "mean", "sum"):
            v = selfcheck.check("cuda", dtype, mode)
            assert v.ok, (dtype, mode, v.reason)


@compiled
def test_tomeformer_pass_compiles_six_variants():
    from kernels import jit_check
    from kernels import tome_triton as tt

    dev = torch.cuda.current_device()
    before = sum(len(k.device_caches[dev][0]) for k in tt.KERNELS if dev in k.device_caches)
    with jit_check.record_variants() as seen:
        jit_check.tomeformer_pass(device="cuda", C=256)
    after = sum(len(k.device_caches[dev][0]) for k in tt.KERNELS)
    assert len(seen) == 6
    assert after - before <= 6  # Triton's own cache: nothing compiled per layer


@compiled
def test_cuda_graph_replay_and_determinism():
    import kernels

    x, metric, size = _inputs(8, 257, 768, 64, torch.bfloat16, False)
    out = kernels.merge_tokens(x, metric, size, 19, backend="triton")
    again = kernels.merge_tokens(x, metric, size, 19, backend="triton")
    assert torch.equal(out[0], again[0]) and torch.equal(out[1], again[1])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = kernels.merge_tokens(x, metric, size, 19, backend="triton")
    x.copy_(torch.randn_like(x))
    g.replay()
    want = kernels.merge_tokens(x, metric, size, 19, backend="triton")
    assert torch.equal(captured[0], want[0])
