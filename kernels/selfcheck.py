"""First-use self-check of the Triton kernels that backend="auto" would use.

    verdict(device, dtype, mode) -> Verdict(ok, reason)    cached; warns once when not ok

The first time `auto` meets a tensor of a (device, dtype, mode) it runs the Triton path next to the
eager one on two inputs, a random one and a tie-heavy one (whole runs of identical tokens, small
integer values so every dot product is exact and both backends must produce bitwise-equal scores):
  - match: scores within 1e-5; partner indices equal wherever the winner is clear (tie-heavy: all);
  - plan: src/dst/out_pos and the fused plan (cnt, off, csr, grp) bitwise equal to the torch plan,
    from the same scores, and the Triton top-r equal to eager's on the tie-heavy input;
  - merge (mode given): outputs within tolerance and sizes exact, with size=None and with sizes;
    grads of x and of size within tolerance.
Any mismatch or exception gives Verdict(False, "<first failure>"): `auto` then uses eager for that
key and one RuntimeWarning names the cause. mode=None checks matching + plan only (what
bipartite_match needs). A check takes well under a second on a GPU (compiles aside). It does not
run inside torch.compile tracing or CUDA graph capture: such a first call uses eager, uncached,
and the first call outside decides.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

import torch

from . import tome

_VERDICTS: dict = {}
_LOCK = threading.Lock()
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""


class CheckFailed(Exception):
    pass


def _key(device: torch.device, dtype: torch.dtype, mode: str | None):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device), dtype, mode


def verdict(device, dtype: torch.dtype, mode: str | None = None) -> Verdict:
    """Cached result of check(); the first failing call per key warns once."""
    key = _key(device, dtype, mode)
    v = _VERDICTS.get(key)
    if v is None and (
        torch.compiler.is_compiling()
        or (key[0].startswith("cuda") and torch.cuda.is_current_stream_capturing())
    ):
        # the check syncs and launches kernels: not inside torch.compile tracing or CUDA graph
        # capture. Eager for now (not cached): the first call outside decides.
        return Verdict(False, "first use inside torch.compile or CUDA graph capture")
    if v is None:
        with _LOCK:
            v = _VERDICTS.get(key)
            if v is None:
                v = check(*key)
                _VERDICTS[key] = v
                if not v.ok:
                    warnings.warn(
                        f"kernels: Triton self-check failed for {key[0]} {key[1]} "
                        f"mode={mode}: {v.reason}; using the eager path for it",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return v


def known() -> dict:
    """The verdicts reached so far, {(device, dtype, mode): Verdict}."""
    return dict(_VERDICTS)


def reset():
    _VERDICTS.clear()


def check(device, dtype: torch.dtype, mode: str | None = None) -> Verdict:
    """Run the Triton kernels against eager (uncached). Never raises: failures become the reason."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the eager reference in full fp32, whatever the
    try:  # caller's matmul precision
        from . import tome_triton as tt

        for name in SHAPES:
            inputs = _inputs(name, device, dtype)
            _check_match(tt, name, *inputs)
            if mode is not None:
                _check_merge(tt, name, mode, *inputs)
    except CheckFailed as e:
        return Verdict(False, str(e))
    except Exception as e:  # compile errors, launch failures, missing drivers
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return Verdict(False, f"{type(e).__name__}: {first}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return Verdict(True, "")


SHAPES = {  # (B, N, C, Cm, r): several match tiles, C blocks and member tiles, odd sizes; the
    "random": (2, 133, 80, 40, 50),  # whole metric row in one tile (Cm <= 128) ...
    "tie-heavy": (2, 133, 80, 136, 60),  # ... and in chunks
}


def _inputs(name, device, dtype):
    B, N, C, Cm, r = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g)
    size = torch.randint(1, 5, (B, N, 1), generator=g).float()
    if name == "random":
        metric = torch.randn(B, N, Cm, generator=g)
    else:  # letterbox / black frames: long runs of one token; small integers: exact dot products
        metric = torch.randint(-2, 3, (B, N, Cm), generator=g).float()
        metric[..., 0] = 3.0  # no zero vectors
        metric[:, N // 6 : N * 5 // 6] = metric[:, 3:4]  # ~N/3 A tokens merge into one B token
        metric[1:, 1::3] = metric[1:, 5:6]
    return x.to(device, dtype), metric.to(device, dtype), size.to(device), r


def _same(name, what, a, b):
    if not torch.equal(a, b):
        bad = (a != b).nonzero()[:1].tolist()
        raise CheckFailed(f"{name} input: {what} differs from eager (first at {bad})")


def _close(name, what, got, want, tol):
    got, want = got.float(), want.float()
    bad = ~torch.isclose(got, want, rtol=tol, atol=tol)  # infinities must match exactly; NaN fails
    if bad.any():
        err = (got - want).abs()[bad].max().item()
        raise CheckFailed(
            f"{name} input: {what} off by {err:.3g} at {int(bad.sum())} places (tolerance {tol:g} abs + rel)"
        )


def _check_match(tt, name, x, metric, size, r):
    N = metric.shape[1]
    ve, ie = tome.match_scores(metric)
    vt, it = tt.match_scores(metric)
    if name == "tie-heavy":  # exact dot products: the scores and the winners must agree bitwise
        _same(name, "match scores", vt, ve)
        _same(name, "match partners", it, ie)
        mt, me = tt.bipartite_match(metric, r), tome.bipartite_match(metric, r)
        _same(name, "top-r (src_idx)", mt.src_idx, me.src_idx)
    else:
        _close(name, "match scores", vt, ve, 1e-5)
        s = torch.nn.functional.normalize(metric.double(), dim=-1)
        top2 = (s[:, 0::2] @ s[:, 1::2].transpose(1, 2)).topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1]) > 1e-4
        _same(name, "match partners (clear winners)", it[clear], ie[clear])
    me, mt = tome.select_top_r(ve, ie, r, N), tt.select_top_r(ve, ie, r, N)  # same scores
    for k in ("src_idx", "dst_idx", "out_pos"):
        _same(name, f"plan {k}", getattr(mt, k), getattr(me, k))
    from . import tome_plan  # imported with tt: triton is there

    want = tome_plan.plan_torch(me)
    for k, v in want.items():
        _same(name, f"plan {k}", mt.plan[k], v)


def _check_merge(tt, name, mode, x, metric, size, r):
    tol = TOL[x.dtype]
    match = tome.bipartite_match(metric, r)
    g = torch.Generator().manual_seed(2)
    gx = torch.randn(x.shape[0], match.n_out, x.shape[2], generator=g).to(x.device, x.dtype)
    gs = torch.randn(x.shape[0], match.n_out, 1, generator=g).to(x.device)
    for sized in (False, True):
        res = []
        for impl in (tome.merge_apply, tt.merge_apply):
            xx = x.detach().clone().requires_grad_()
            ss = size.detach().clone().requires_grad_() if sized else None
            m = tome.Match(match.src_idx, match.dst_idx, match.n)  # a fresh plan per backend
            out, s_out = impl(m, xx, ss, mode)
            loss = (out.float() * gx.float()).sum() + ((s_out * gs).sum() if sized else 0)
            loss.backward()
            res.append((out, s_out, xx.grad, ss.grad if sized else None))
        (oe, se, gxe, gse), (ot, st, gxt, gst) = res
        what = f"mode={mode} size={'given' if sized else 'None'}"
        _close(name, f"merged x ({what})", ot, oe, tol * (4 if mode == "sum" else 1))
        _same(name, f"merged sizes ({what})", st, se)
        _close(name, f"grad of x ({what})", gxt, gxe, tol)
        if sized:
            _close(name, f"grad of size ({what})", gst, gse, 10 * tol)


def report(device, dtypes=(torch.float32, torch.bfloat16, torch.float16), file=None) -> int:
    """`simvlg bench kernels --check`: run the check for every dtype and mode and print verdicts."""
    import sys
    import time

    file = file or sys.stdout
    device = torch.device(device)
    how = (
        "compiled kernels"
        if device.type == "cuda"
        else "Triton interpreter: the check's logic, not compiled code"
    )
    print(f"self-check on {device} ({how})", file=file)
    bad = 0
    for dtype in dtypes:
        for mode in (None, *tome.MODES):
            t0 = time.perf_counter()
            v = check(device, dtype, mode)
            bad += not v.ok
            what = "matching + plan" if mode is None else f"merge mode={mode}"
            print(
                f"  {str(dtype):15} {what:18} {'ok' if v.ok else 'FAILED: ' + v.reason} "
                f"({time.perf_counter() - t0:.1f} s)",
                file=file,
            )
    print(
        "backend='auto' uses Triton for the keys marked ok, eager (with one warning) for the others",
        file=file,
    )
    return 1 if bad else 0
