"""Bytes, launches and FLOPs of one merge step, and the GPU time they imply (an HBM roofline).

One counting rule for every implementation: each kernel (or eager aten op) costs the bytes of the
tensors it reads and writes; a gather counts the rows it touches, not the whole source. The eager
paths are counted op by op while they run (kernels/bench.py, a TorchDispatchMode); the Triton
kernels are counted here, by the same rule, from their loads and stores (kernels/tome_triton.py).

Expected GPU time = sum over kernels of max(bytes / HBM bandwidth, FLOPs / tensor-core peak)
+ launches x launch overhead. These are estimates for GPUs we have not run on, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GPUS = {  # name: (HBM bytes/s, dense 16-bit tensor-core FLOP/s, fp32 FMA FLOP/s), data sheets
    "A100-40GB": (1.555e12, 312e12, 19.5e12),
    "A100-80GB": (2.039e12, 312e12, 19.5e12),
    "H100-SXM": (3.35e12, 989e12, 67e12),
}
LAUNCH_S = 4e-6  # per kernel launch without CUDA graphs (typical 3-6 us incl. Python dispatch)


@dataclass(frozen=True)
class Shape:
    B: int
    N: int
    C: int
    Cm: int
    r: int
    e: int = 2  # bytes per element of x and metric (bf16)
    sized: bool = True  # sizes enter (every layer but the first)
    size_grad: bool = False  # the caller's size requires grad

    @property
    def r_(self) -> int:
        return max(0, min(self.r, (self.N - 1) // 2))

    @property
    def n_out(self) -> int:
        return self.N - self.r_


def triton_kernels(s: Shape) -> list[tuple[str, float, float]]:
    """[(kernel, bytes, FLOPs)] of one forward and one backward through kernels/tome_triton.py."""
    B, N, C, Cm, r, e, no = s.B, s.N, s.C, s.Cm, s.r_, s.e, s.n_out
    NA, NB = (N + 1) // 2, N // 2
    sz = 4 if s.sized else 0
    match = (B * N * Cm * e + B * NA * 12, 2.0 * B * NA * NB * Cm)  # metric in; score, index out
    plan = (B * NA * 12 + B * (16 * no + 4 * N + 20 * r), 0.0)  # pos, cnt, off, grp, csr, src, dst
    fwd = (
        B * N * C * e
        + B * no * C * e  # every input row read once, every output row written
        + B * N * sz
        + B * no * 8  # sizes in; sizes and weights out
        + B * (16 * no + 8 * r),
        0.0,
    )  # pos, cnt, off; csr and grp of the members
    bwd_bytes = B * N * C * e * 2 + B * N * (8 + sz)  # g gathered per input row, dx; grp, W, s
    if s.size_grad:  # d(size) reads x and the gathered x' too
        bwd_bytes += B * N * C * e * 2 + B * N * 8
    return [("match", *match), ("plan", *plan), ("merge fwd", *fwd), ("merge bwd", bwd_bytes, 0.0)]


def min_bytes(s: Shape) -> float:
    """Read x once, write x' once: the traffic no implementation can avoid."""
    return (s.B * s.N * s.C + s.B * s.n_out * s.C) * s.e


def expected_seconds(kernels, launches: int, gpu: str, fp32: bool = False, efficiency: float = 0.5):
    """Roofline time of [(name, bytes, flops)] on `gpu`, plus launch overhead. FLOPs run on 16-bit
    tensor cores (our match kernel), or on fp32 FMA units (eager's float32 matmul, TF32 off)."""
    bw, tc, fma = GPUS[gpu]
    peak = (fma if fp32 else tc) * efficiency
    return sum(max(b / bw, f / peak) for _, b, f in kernels) + launches * LAUNCH_S


def table(shapes: dict[str, Shape], eager_counts: dict | None = None) -> list[dict]:
    """Per shape and GPU: expected fwd and fwd+bwd time of the Triton path (and of eager, from its
    counted bytes and launches when given: {shape: (fwd (launches, bytes), fwd+bwd (...))})."""
    rows = []
    for name, s in shapes.items():
        ks = triton_kernels(s)
        for gpu in GPUS:
            row = dict(
                shape=name,
                gpu=gpu,
                fwd_MB=sum(b for _, b, _ in ks[:3]) / 1e6,
                bwd_MB=ks[3][1] / 1e6,
                match_GFLOP=ks[0][2] / 1e9,
                triton_fwd_us=expected_seconds(ks[:3], 3, gpu) * 1e6,
                triton_fwdbwd_us=expected_seconds(ks, 4, gpu) * 1e6,
                floor_us=min_bytes(s) / GPUS[gpu][0] * 1e6,
            )
            if eager_counts and name in eager_counts:
                (lf, bf), (lb, bb) = eager_counts[name]
                ek = [("eager match", 0.0, ks[0][2])]  # its bytes are in the counted total
                row.update(
                    eager_fwd_us=expected_seconds(ek + [("eager", bf, 0.0)], lf, gpu, True) * 1e6,
                    eager_fwdbwd_us=expected_seconds(ek + [("eager", bb, 0.0)], lb, gpu, True) * 1e6,
                    eager_fwd_launches=lf,
                    eager_fwdbwd_launches=lb,
                    eager_fwd_MB=bf / 1e6,
                    eager_fwdbwd_MB=bb / 1e6,
                )
            rows.append(row)
    return rows
