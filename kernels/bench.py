"""Benchmark of the token-merging implementations: `python -m kernels.bench [--out F.json]`.

Implementations
- transcription: the straightforward eager form of ToMe's algorithm (full argsort, x*size, gathers,
  scatter_reduce into a copy of B, cat, divide): the baseline.
- eager: kernels.tome (sort of [B, NA] scores only, one index_select pass over x, index_add on the
  r merged rows, a gather-shaped backward). Our fastest CPU path.
- triton: kernels.tome_triton (CUDA only here; the interpreter is a correctness tool, not a speed one).
- compile(...): torch.compile of the eager forms (CUDA by default, CPU with --compile).

For every implementation it prints an analytic count of bytes moved and kernel launches: eager forms
are counted op by op with a TorchDispatchMode (each non-view aten op = one launch; bytes = its operand
and result sizes; gathers and index_add_/scatter_add_ counted by the rows they touch); the Triton
path is four kernels (match, rank, plan, merge) counted at their DRAM lower bound.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import tome

SHAPES = {  # name: (B, N, C, Cm, r)
    "tomeformer-b32": (32, 257, 768, 64, 19),
    "tomeformer-b200": (200, 257, 768, 64, 19),
    "vit-b16": (32, 197, 768, 64, 16),
    "vit-g14": (32, 257, 1408, 88, 8),
}
TARGET = ("tomeformer-b32", "float32")  # CPU target: eager >= 2x transcription


def transcription(x, metric, size, r, protect_first=True):
    """ToMe's algorithm written out directly (the eager baseline), output [unmerged A..., B...]."""
    B, N, C = x.shape
    r = min(r, (N - int(protect_first)) // 2)
    if r <= 0:
        return x, size
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        sim = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)  # [B, NA, NB]
        if protect_first:
            sim[:, 0, :] = -math.inf
        best, partner = sim.max(dim=-1)  # [B, NA]
        ranked = best.argsort(dim=-1, descending=True)[..., None]  # [B, NA, 1]
        stay, go = ranked[:, r:], ranked[:, :r]
        if protect_first:
            stay = stay.sort(dim=1).values
        into = partner[..., None].gather(1, go)  # [B, r, 1]

    def combine(t):  # sum-merge any [B, N, c]
        even, odd = t[:, ::2], t[:, 1::2]
        c = t.shape[-1]
        kept = even.gather(1, stay.expand(B, stay.shape[1], c))
        moved = even.gather(1, go.expand(B, r, c))
        odd = odd.scatter_reduce(1, into.expand(B, r, c), moved, reduce="sum")
        return torch.cat([kept, odd], dim=1)

    if size is None:
        size = torch.ones_like(x[..., :1])
    xs = combine(x * size)
    s2 = combine(size)
    return xs / s2, s2


def _eager(x, metric, size, r):
    return tome.merge_tokens_eager(x, metric, size, r)


def _triton_impl(x, metric, size, r):
    from . import merge_tokens
    return merge_tokens(x, metric, size, r, backend="triton")


class _Counter(TorchDispatchMode):
    """Counts non-view aten ops (launches) and the bytes of their operands and results."""

    PARTIAL = ("index_add_", "scatter_add_", "index_put_", "scatter_")  # touch index rows of self
    GATHER = ("index_select", "gather")  # read only the rows they return
    FREE = ("detach", "alias", "lift_fresh", "_unsafe_view")

    def __init__(self):
        super().__init__()
        self.launches, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name.startswith("empty") or name in self.FREE:
            return out
        self.launches += 1
        ts = [t for t in tree_flatten((args, kwargs or {}, out))[0] if isinstance(t, torch.Tensor)]
        if name in self.PARTIAL:  # self is touched only where the index points: skip it
            ts = ts[1:-1] + [ts[-2]] * 2 if len(ts) >= 3 else ts
        elif name in self.GATHER:  # index and result, plus the rows read (= result size)
            ts = ts[1:] + ts[-1:]
        self.bytes += sum(t.numel() * t.element_size() for t in ts)
        return out


def count(fn, *args):
    with _Counter() as c:
        fn(*args)
    return c.launches, c.bytes


def triton_count(x, metric, size, r):
    """Four kernels (match, rank, plan, merge), each at its DRAM lower bound (analytic)."""
    B, N, C = x.shape
    Cm, NA = metric.shape[-1], (N + 1) // 2
    rr = tome.clamp_r(N, r)
    e, em, nout = x.element_size(), metric.element_size(), N - rr
    match_bytes = B * N * Cm * em + B * NA * (4 + 8)  # metric in, (score, index) out
    rank_bytes = B * NA * (12 + 4)  # scores, indices in; partner out
    plan_bytes = B * NA * 4 + B * nout * 16 + B * rr * 20 + B * N * 4  # pos/cnt/off, csr/src/dst, grp
    merge_bytes = (B * N * C + B * nout * C) * e + B * N * (4 if size is not None else 0) \
        + B * nout * (16 + 4 + 4 + 4)  # x in, x' out, sizes, plan in, s' and weights out
    return 4, match_bytes + rank_bytes + plan_bytes + merge_bytes


def bound_bytes(x, r):
    B, N, C = x.shape
    return (B * N * C + B * (N - tome.clamp_r(N, r)) * C) * x.element_size()


def _step(fn, x, metric, size, r):
    """One forward (x without grad) or forward + backward (x with grad) of an implementation."""
    if not x.requires_grad:
        with torch.no_grad():
            return fn(x, metric, size, r)
    y, _ = fn(x, metric, size, r)
    y.float().sum().backward()
    x.grad = None


def _time_cpu(calls, repeats, warmup=2):
    """(median ms, min ms) of each call, timed round-robin so all see the same machine load."""
    for _ in range(warmup):
        for fn in calls:
            fn()
    ts = [[] for _ in calls]
    for _ in range(repeats):
        for t, fn in zip(ts, calls):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [(statistics.median(t) * 1e3, min(t) * 1e3) for t in ts]


def _time_cuda(fn):
    import triton.testing
    ms = triton.testing.do_bench(fn, return_mode="median")
    return ms, ms


def _device_gbps():
    try:
        import triton.testing
        return float(triton.testing.get_dram_gbps())
    except Exception:
        return None


def _inputs(shape, dtype, device, grad=False, seed=0):
    B, N, C, Cm, r = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g).to(device, dtype).requires_grad_(grad)
    metric = torch.randn(B, N, Cm, generator=g).to(device, dtype)
    size = (torch.randint(1, 4, (B, N, 1), generator=g).float()).to(device)
    return x, metric, size, r


def _check(x, metric, size, r):
    """Our eager output equals the transcription's once both are put in original-position order."""
    B, N, _ = x.shape
    with torch.no_grad():
        a, sa = tome.merge_tokens_eager(x, metric, size, r)
        b, sb = transcription(x.float(), metric.float(), size, r)
        m = tome.bipartite_match(metric, r)
        na = (N + 1) // 2 - m.r
        # transcription order: kept A ascending, then all B: sort by original position
        pos = torch.cat([m.out_pos[m.out_pos % 2 == 0].view(B, na),
                         torch.arange(1, N, 2, device=x.device).expand(B, -1)], 1)
        order = pos.argsort(1)
        b = b.gather(1, order[..., None].expand_as(b))
        sb = sb.gather(1, order[..., None])
        tol = 1e-4 if x.dtype == torch.float32 else 5e-2
        ok = bool(torch.allclose(a.float(), b, atol=tol, rtol=tol) and torch.equal(sa, sb))
        if x.is_cuda:  # and the Triton path agrees with eager
            t, st = _triton_impl(x, metric, size, r)
            ok = ok and bool(torch.allclose(t.float(), a.float(), atol=tol, rtol=tol))
            ok = ok and bool(torch.equal(st, sa))
        return ok


def run(shapes, dtypes, device, repeats, backward, use_compile, out=None, file=sys.stdout):
    cuda = device.type == "cuda"
    impls = {"transcription": transcription, "eager": _eager}
    if cuda:
        impls["triton"] = _triton_impl
    if use_compile:
        impls["compile(transcription)"] = torch.compile(transcription)
        impls["compile(eager)"] = torch.compile(_eager)
    passes = ["fwd"] + (["fwd+bwd"] if backward else [])
    rows, checks = [], {}
    bw = _device_gbps() if cuda else None
    hdr = (f"{'shape':16} {'dtype':9} {'pass':8} {'impl':22} {'ms':>9} {'min ms':>9} {'vs transc.':>10} "
           f"{'MB moved':>9} {'launches':>8} {'GB/s':>7}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {load}", file=file)
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    for sname in shapes:
        for dname in dtypes:
            dtype = getattr(torch, dname)
            x, metric, size, r = _inputs(SHAPES[sname], dtype, device)
            checks[f"{sname}/{dname}"] = _check(x, metric, size, r)
            for p in passes:
                calls = [functools.partial(_step, fn, x.detach().requires_grad_(p != "fwd"),
                                           metric, size, r) for fn in impls.values()]
                times = [_time_cuda(c) for c in calls] if cuda else _time_cpu(calls, repeats)
                base = times[0][0 if cuda else 1]  # CPU: ratio of minima (least load noise)
                for (iname, fn), (ms, ms_min) in zip(impls.items(), times):
                    speed = base / (ms if cuda else ms_min)
                    if p == "fwd" and not iname.startswith("compile"):
                        if iname == "triton":
                            launches, nbytes = triton_count(x, metric, size, r)
                        else:
                            with torch.no_grad():
                                launches, nbytes = count(fn, x, metric, size, r)
                    else:
                        launches, nbytes = None, None
                    gbps = bound_bytes(x, r) / ms / 1e6 if p == "fwd" else None
                    row = dict(shape=sname, B=x.shape[0], N=x.shape[1], C=x.shape[2], r=r,
                               dtype=dname, pass_=p, impl=iname, ms=ms, ms_min=ms_min, speedup=speed,
                               bytes=nbytes, launches=launches, bound_gbps=gbps)
                    rows.append(row)
                    mb = f"{nbytes / 1e6:9.1f}" if nbytes is not None else f"{'-':>9}"
                    ln = f"{launches:8d}" if launches is not None else f"{'-':>8}"
                    gb = f"{gbps:7.1f}" if gbps is not None else f"{'-':>7}"
                    print(f"{sname:16} {dname:9} {p:8} {iname:22} {ms:9.3f} {ms_min:9.3f} {speed:9.2f}x "
                          f"{mb} {ln} {gb}", file=file)
    notes = [
        "GB/s = (read x once + write x' once) / time: the bandwidth bound's traffic.",
        "MB moved / launches: analytic (see kernels/bench.py docstring); fwd only.",
        "ms: median; CPU speedups compare minima of interleaved runs (robust to other load), "
        "CUDA speedups compare do_bench medians.",
        f"outputs agree (eager vs transcription up to order; triton vs eager on CUDA): {checks}",
    ]
    if not cuda:
        notes.append("CPU run: eager vs transcription only. GPU figures (triton, torch.compile, "
                     "GB/s vs device bandwidth) need a GPU: run this again on a CUDA machine.")
    elif bw:
        notes.append(f"device DRAM bandwidth ~{bw:.0f} GB/s (triton.testing.get_dram_gbps)")
    for n in notes:
        print(n, file=file)
    tgt = [rw for rw in rows if (rw["shape"], rw["dtype"]) == TARGET and rw["pass_"] == "fwd"
           and rw["impl"] == "eager"]
    result = dict(device=str(device), torch=torch.__version__, threads=torch.get_num_threads(),
                  load_average=load,
                  platform=platform.platform(), device_gbps=bw, rows=rows, checks=checks,
                  notes=notes)
    if tgt and not cuda:
        result["cpu_target"] = dict(shape=TARGET[0], dtype=TARGET[1], speedup=tgt[0]["speedup"],
                                    required=2.0, met=tgt[0]["speedup"] >= 2.0)
        print(f"CPU target (eager >= 2x transcription at {TARGET[0]} {TARGET[1]}): "
              f"{tgt[0]['speedup']:.2f}x -> {'met' if tgt[0]['speedup'] >= 2 else 'NOT met'}",
              file=file)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}", file=file)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--repeats", type=int, default=10, help="CPU timing repeats (median)")
    ap.add_argument("--no-backward", action="store_true", help="skip fwd+bwd timings")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows on CPU too")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shapes = args.shapes or (list(SHAPES) if cuda else ["tomeformer-b32", "vit-b16", "vit-g14"])
    dtypes = args.dtypes or (["bfloat16", "float32"] if cuda else ["float32", "bfloat16"])
    run(shapes, dtypes, device, args.repeats, not args.no_backward, args.compile or cuda, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
