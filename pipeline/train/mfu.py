"""Model FLOPs utilisation: the model's training FLOPs per second over what the hardware could do.

    peak = peak_flops(device, "bf16")                    # FLOP/s of one device (None: unknown GPU)
    mfu_metrics(flops_per_sample, samples_per_s, world, peak) -> {"mfu": ..., "model_tflops": ...}

Model FLOPs are forward + backward matmul/attention FLOPs of one sample, counted by
torch.utils.flop_counter on a real micro-batch (the same counter `simvlg bench flops` runs on the
meta device); the optimizer and elementwise work are not counted, as usual for MFU. The peak is the
dense tensor-core figure of the device at the training precision (A100, H100, H200 below; fp32
training counts TF32), the `SIMVLG_PEAK_TFLOPS` environment variable or `--peak-tflops` when set, and
on a CPU the matmul throughput measured once at start-up with the rank's threads (a real ceiling for
this machine, not a datasheet number).
"""

from __future__ import annotations

import functools
import os
import time

import torch

# Dense (no sparsity) peak TFLOP/s per GPU: NVIDIA's datasheets (SXM parts; PCIe H100 listed apart).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}


def gpu_peak_tflops(name: str, precision: str) -> float | None:
    """Datasheet peak for a CUDA device name ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", ...)."""
    for key, table in GPU_PEAK_TFLOPS.items():  # the most specific key first
        if all(part in name for part in key.split()):
            return table.get(precision)
    return None


@functools.cache
def measured_cpu_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """Matmul FLOP/s this process reaches on the CPU with its current thread count."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - t0)


def peak_flops(device: torch.device, precision: str, tflops: float | None = None) -> float | None:
    """FLOP/s one device can do at `precision`; None for a GPU we have no figure for."""
    tflops = tflops or (
        float(os.environ["SIMVLG_PEAK_TFLOPS"]) if os.environ.get("SIMVLG_PEAK_TFLOPS") else None
    )
    if tflops:
        return tflops * 1e12
    if device.type == "cuda":
        found = gpu_peak_tflops(torch.cuda.get_device_name(device), precision)
        return found * 1e12 if found else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return measured_cpu_flops(dtype)


def mfu_metrics(flops_per_sample: float | None, samples_per_s: float, world: int, peak: float | None) -> dict:
    if not flops_per_sample:
        return {}
    achieved = flops_per_sample * samples_per_s  # all ranks together
    out = {"model_tflops_per_s": achieved / 1e12}
    if peak:
        out["mfu"] = achieved / (world * peak)
    return out
