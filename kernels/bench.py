"""Benchmark of the token-merging implementations: `simvlg bench kernels [options]`.

    simvlg bench kernels                 time per shape: transcription, eager, compile(eager), triton
    simvlg bench kernels --check         self-check verdict per dtype and mode (what `auto` will do)
    simvlg bench kernels --layer         a TomeFormer layer fwd+bwd with and without a size gradient
    simvlg bench kernels --variants      kernel variants a 12-layer TomeFormer pass compiles
    simvlg bench kernels --compile-for 80 90   compile those variants for sm_80 / sm_90 (no GPU)

Implementations
- transcription: ToMe's algorithm written out directly (full argsort, x*size, gathers,
  scatter_reduce into a copy of B, cat, divide): the baseline.
- eager: kernels.tome (sort of the [B, NA] scores only, one index_select pass over x, index_add on
  the r merged rows, a gather-shaped backward).
- compile(eager): torch.compile of eager, where it compiles (CUDA by default, CPU with --compile).
- triton, and on CUDA triton+graph / eager+graph: the forward replayed as a CUDA graph.
On CPU the interpreter is a correctness tool, not a speed one: no triton timings.

Bytes and launches follow one rule for every implementation (kernels/roofline.py): eager forms are
counted op by op as they run, the Triton kernels by the same rule from their loads and stores.
"GB/s" is the unavoidable traffic (read x once, write x' once) over the time, for every row.
The roofline table is an estimate for GPUs we have not run on.
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

from . import roofline, tome

SHAPES = {  # name: (N, C, Cm, r, tie-heavy, GPU batch, CPU batch)
    "n257": (257, 768, 64, 19, False, 256, 32),  # TomeFormer layer 1 (ViT-g/14 at 224 + CLS)
    "n577": (577, 1024, 64, 48, False, 128, 8),  # ViT-L/14 at 336
    "n4097": (4097, 1024, 64, 512, False, 16, 1),  # video: 16 frames x 256 tokens + CLS
    "n577-ties": (577, 1024, 64, 192, True, 128, 8),  # letterbox: two thirds identical tokens
}


def transcription(x, metric, size, r, protect_first=True):
    """ToMe's algorithm written out directly (the baseline), output [unmerged A..., B...]."""
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


def _triton(x, metric, size, r):
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


def count(fn, x, metric, size, r, backward=False):
    """(launches, bytes) of one forward (and backward) of an eager implementation."""
    x = x.detach().requires_grad_(backward)
    with _Counter() as c, torch.set_grad_enabled(backward):
        y, _ = fn(x, metric, size, r)
        if backward:
            y.backward(torch.ones_like(y))
    return c.launches, c.bytes


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


def _cuda_graph(fn):
    """fn (a no-grad forward) captured once as a CUDA graph; returns its replay. Warm-up on a side
    stream first: the first calls compile kernels and run the self-check, which capture forbids."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def inputs(name, dtype, device, batch=None, seed=0):
    N, C, Cm, r, ties, b_gpu, b_cpu = SHAPES[name]
    B = batch or (b_gpu if device.type == "cuda" else b_cpu)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    metric = torch.randn(B, N, Cm, generator=g)
    if ties:  # letterbox / padding: a long run of one token
        metric[:, N // 6 : N * 5 // 6] = metric[:, 3:4]
    size = torch.randint(1, 4, (B, N, 1), generator=g).float()
    return x.to(device, dtype), metric.to(device, dtype), size.to(device), r


def check(x, metric, size, r, ties):
    """Eager == transcription once both are put in original-position order. Tie-heavy inputs: the
    transcription's unstable argsort may pick other, equally good merges; compare what every valid
    merge conserves there: per row the total size and the size-weighted sum of x."""
    B, N, _ = x.shape
    with torch.no_grad():
        a, sa = tome.merge_tokens_eager(x, metric, size, r)
        b, sb = transcription(x.float(), metric.float(), size, r)
        tol = 1e-4 if x.dtype == torch.float32 else 5e-2
        if ties:
            mass = [(t.float() * s).sum(1) / s.sum(1) for t, s in ((a, sa), (b, sb))]
            return bool(torch.equal(sa.sum(1), sb.sum(1)) and torch.allclose(*mass, atol=tol, rtol=tol))
        m = tome.bipartite_match(metric, r)
        na = (N + 1) // 2 - m.r
        pos = torch.cat(
            [m.out_pos[m.out_pos % 2 == 0].view(B, na), torch.arange(1, N, 2, device=x.device).expand(B, -1)],
            1,
        )
        order = pos.argsort(1)  # transcription order -> original-position order
        b, sb = b.gather(1, order[..., None].expand_as(b)), sb.gather(1, order[..., None])
        ok = bool(torch.allclose(a.float(), b, atol=tol, rtol=tol) and torch.equal(sa, sb))
        if x.is_cuda:
            t, st = _triton(x, metric, size, r)
            ok = ok and bool(torch.allclose(t.float(), a.float(), atol=tol, rtol=tol) and torch.equal(st, sa))
        return ok


def _impls(device, use_compile):
    impls = {"transcription": transcription, "eager": _eager}
    if use_compile:
        impls["compile(eager)"] = torch.compile(_eager)
    if device.type == "cuda":
        impls["triton"] = _triton
    return impls


def run(shapes, dtypes, device, repeats, backward, use_compile, out=None, file=sys.stdout, batch=None):
    cuda = device.type == "cuda"
    impls = _impls(device, use_compile)
    passes = ["fwd"] + (["fwd+bwd"] if backward else [])
    rows, checks, failed = [], {}, {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"load average {load}",
        file=file,
    )
    hdr = (
        f"{'shape':10} {'B':>4} {'dtype':9} {'pass':8} {'impl':16} {'ms':>9} {'min ms':>9} "
        f"{'vs transc.':>10} {'MB moved':>9} {'launches':>8} {'GB/s':>7}"
    )
    print(hdr + "\n" + "-" * len(hdr), file=file)
    for sname in shapes:
        for dname in dtypes:
            x, metric, size, r = inputs(sname, getattr(torch, dname), device, batch)
            B, N, C = x.shape
            checks[f"{sname}/{dname}"] = check(x, metric, size, r, SHAPES[sname][4])
            for p in passes:
                bw = p != "fwd"
                calls, names = [], []
                for iname, fn in impls.items():
                    call = functools.partial(_step, fn, x.detach().requires_grad_(bw), metric, size, r)
                    try:
                        call()  # first call: compiles; a failure drops the row, with its reason
                    except Exception as e:
                        failed[f"{iname} {sname}/{dname}/{p}"] = f"{type(e).__name__}: {str(e)[:120]}"
                        continue
                    calls.append(call)
                    names.append(iname)
                    if cuda and not bw:
                        try:
                            calls.append(_cuda_graph(call))
                            names.append(iname + "+graph")
                        except Exception as e:  # e.g. torch.compile'd code under capture
                            failed[f"{iname}+graph {sname}/{dname}"] = f"{type(e).__name__}: {str(e)[:120]}"
                times = [_time_cuda(c) for c in calls] if cuda else _time_cpu(calls, repeats)
                base = times[0][0 if cuda else 1]  # CPU: ratio of minima (least load noise)
                for iname, (ms, ms_min) in zip(names, times):
                    plain = iname.removesuffix("+graph")
                    if plain.startswith("triton"):
                        ks = roofline.triton_kernels(
                            roofline.Shape(B, N, C, metric.shape[-1], r, x.element_size())
                        )
                        ks = ks if bw else ks[:3]
                        launches, nbytes = len(ks), sum(k[1] for k in ks)
                    elif plain in ("transcription", "eager"):
                        launches, nbytes = count(impls[plain], x, metric, size, r, bw)
                    else:
                        launches, nbytes = None, None
                    gbps = roofline.min_bytes(roofline.Shape(B, N, C, 0, r, x.element_size())) / ms / 1e6
                    row = dict(
                        shape=sname,
                        B=B,
                        N=N,
                        C=C,
                        r=r,
                        dtype=dname,
                        pass_=p,
                        impl=iname,
                        ms=ms,
                        ms_min=ms_min,
                        speedup=base / (ms if cuda else ms_min),
                        bytes=nbytes,
                        launches=launches,
                        gbps=gbps,
                    )
                    rows.append(row)
                    mb = f"{nbytes / 1e6:9.1f}" if nbytes is not None else f"{'-':>9}"
                    ln = f"{launches:8d}" if launches is not None else f"{'-':>8}"
                    print(
                        f"{sname:10} {B:4d} {dname:9} {p:8} {iname:16} {ms:9.3f} {ms_min:9.3f} "
                        f"{row['speedup']:9.2f}x {mb} {ln} {gbps:7.1f}",
                        file=file,
                    )
    notes = [
        "GB/s = (read x once + write x' once) / time, for every row; MB moved and launches: one "
        "counting rule for all (kernels/roofline.py).",
        "ms: median; CPU speedups compare minima of interleaved runs, CUDA ones do_bench medians.",
        f"outputs agree (eager vs transcription; triton vs eager on CUDA): {checks}",
    ]
    if failed:
        notes.append(f"did not run: {failed}")
    if not cuda:
        notes.append(
            "CPU run: no Triton timings (the interpreter is a correctness tool). GPU rows "
            "below are roofline estimates, not measurements."
        )
    for n in notes:
        print(n, file=file)
    est = roofline.table(_gpu_shapes(shapes), _eager_counts(shapes, device, batch))
    _print_roofline(est, file)
    result = dict(
        device=str(device),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        load_average=load,
        platform=platform.platform(),
        rows=rows,
        checks=checks,
        failed=failed,
        roofline=est,
        notes=notes,
    )
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}", file=file)
    return result


def _gpu_shapes(shapes):
    out = {}
    for s in shapes:
        N, C, Cm, r, _, b_gpu, _ = SHAPES[s]
        out[s] = roofline.Shape(b_gpu, N, C, Cm, r)
    return out


def _eager_counts(shapes, device, batch):
    """Eager's launches and bytes in bf16 (the GPU case), counted at the measured batch and scaled
    to the GPU batch (bytes grow with the batch, launches do not)."""
    res = {}
    for s in shapes:
        x, metric, size, r = inputs(s, torch.bfloat16, device, batch)
        scale = SHAPES[s][5] / x.shape[0]
        counted = [count(_eager, x, metric, size, r, bw) for bw in (False, True)]
        res[s] = tuple((launches, nbytes * scale) for launches, nbytes in counted)
    return res


def _print_roofline(est, file):
    print(
        "\nExpected GPU time per merge step (bf16, GPU batch; HBM roofline + "
        f"{roofline.LAUNCH_S * 1e6:.0f} us per launch; estimates, not measurements):",
        file=file,
    )
    print(
        f"{'shape':10} {'gpu':10} {'fwd MB':>8} {'bwd MB':>8} {'match GF':>8} {'floor us':>8} "
        f"{'triton fwd':>10} {'fwd+bwd':>8} {'eager fwd':>9} {'fwd+bwd':>8} {'launches':>9}",
        file=file,
    )
    for e in est:
        eg = (
            (
                f"{e['eager_fwd_us']:9.0f} {e['eager_fwdbwd_us']:8.0f} "
                f"{e['eager_fwd_launches']:4d}/{e['eager_fwdbwd_launches']:<4d}"
            )
            if "eager_fwd_us" in e
            else ""
        )
        print(
            f"{e['shape']:10} {e['gpu']:10} {e['fwd_MB']:8.0f} {e['bwd_MB']:8.0f} {e['match_GFLOP']:8.1f} "
            f"{e['floor_us']:8.0f} {e['triton_fwd_us']:10.0f} {e['triton_fwdbwd_us']:8.0f} {eg}",
            file=file,
        )
    print(
        "floor: read x + write x' at full HBM bandwidth. triton: 3 launches fwd, 1 bwd; match on "
        "16-bit tensor cores at 50% of peak; eager match: fp32 matmul (TF32 off) at 50% of fp32 peak.",
        file=file,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(prog="simvlg bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=None)
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--batch", type=int, default=None, help="batch for every shape (default: per shape)")
    ap.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (median)")
    ap.add_argument("--no-backward", action="store_true", help="skip fwd+bwd timings")
    ap.add_argument("--compile", action="store_true", help="add torch.compile rows on CPU too")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--check", action="store_true", help="print the self-check verdicts and exit")
    ap.add_argument("--layer", action="store_true", help="TomeFormer layer: size gradient or not")
    ap.add_argument("--variants", action="store_true", help="kernel variants per TomeFormer pass")
    ap.add_argument("--compile-for", type=int, nargs="+", metavar="SM", help="compile them for sm_SM")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and (args.check or args.variants or args.compile_for):
        _use_interpreter()
    if args.check:
        from . import selfcheck

        return selfcheck.report(device)
    if args.variants or args.compile_for:
        from . import jit_check

        return jit_check.print_variants(device, args.compile_for)
    if args.layer:
        from . import bench_layer

        return bench_layer.layer(device, args.batch, args.repeats, args.out)
    cuda = device.type == "cuda"
    shapes = args.shapes or list(SHAPES)
    dtypes = args.dtypes or (["bfloat16", "float32"] if cuda else ["float32"])
    run(
        shapes,
        dtypes,
        device,
        args.repeats,
        not args.no_backward,
        args.compile or cuda,
        args.out,
        batch=args.batch,
    )
    return 0


def _use_interpreter():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit(
            "triton was imported before TRITON_INTERPRET=1 could be set: "
            "run `TRITON_INTERPRET=1 simvlg bench kernels ...` for a CPU run"
        )
    os.environ["TRITON_INTERPRET"] = "1"


if __name__ == "__main__":
    sys.exit(main())
