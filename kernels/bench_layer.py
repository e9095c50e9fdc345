"""What a size gradient costs a TomeFormer layer: `simvlg bench kernels --layer`.

The layer is the TomeFormer's (pipeline/models/tomeformer.py; kernels imports nothing of ours, so
it is rebuilt here from the same torch ops): q, k, v projections, SDPA with log(size) as the
attention bias, output projection + LayerNorm, ToMe merge (metric = keys averaged over heads), FFN
+ LayerNorm. It is timed fwd+bwd, interleaved, on the sizes a third layer receives, in two states:
  - "size carries grad": the sizes require grad, as they did from the third merging layer on before
    sizes were made non-differentiable: the merge saves x and x' and computes d(size), SDPA
    computes the gradient of its bias;
  - "size without grad": the same sizes, constant (what a chain started with size=None gives now).
Peak memory: CUDA max_memory_allocated, or on CPU the rise of the peak RSS (VmHWM, reset
through /proc/self/clear_refs) during one step, in a fresh process per state, with glibc mapping
every large allocation on its own (Linux only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import merge_tokens

STATES = ("size carries grad", "size without grad")


class Layer(nn.Module):
    def __init__(self, C=768, heads=12, r=19, backend="auto"):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.ff1, self.ff2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.heads, self.r, self.backend = heads, r, backend

    def forward(self, x, size):  # x [B, N, C], size [B, N, 1]
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        bias = size[..., 0].log()[:, None, None, :].to(q.dtype)  # [B, 1, 1, N]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(B, N, C)))
        x, size = merge_tokens(x, k.mean(1).detach(), size, self.r, backend=self.backend)
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x)))), size


def _setup(device, batch, seed=0):
    """The layer and what a third layer receives: 257 tokens after two merges of r = 19."""
    torch.manual_seed(seed)
    layer = Layer().to(device)
    x = torch.randn(batch, 257, 768, device=device)
    size = None
    with torch.no_grad():
        for _ in range(2):
            x, size = layer(x, size if size is not None else torch.ones_like(x[..., :1]))
    return layer, x, size


def _step(layer, x, size, state):
    xi = x.detach().requires_grad_()
    si = size.detach().requires_grad_(state == STATES[0])
    y, s2 = layer(xi, si)
    y.sum().backward()
    return s2


def _saved_mb(layer, x, size, state):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(layer, x, size, state)
    return sum(seen.values()) / 1e6


def _peak_mb(device, batch, state):
    if device.type == "cuda":
        layer, x, size = _setup(device, batch)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(layer, x, size, state)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 1e6
    code = (
        "import sys, json; from kernels import bench_layer as b; "
        f"print(json.dumps(b._child({batch}, {state!r})))"
    )
    # glibc: every allocation above 64 KB its own mmap, unmapped when freed, so RSS follows the live
    # tensors instead of the allocator's free lists
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(batch, state):
    """Peak RSS of one fwd+bwd above what this fresh process holds before it (MB, Linux)."""
    torch.set_num_threads(1)
    layer, x, size = _setup(torch.device("cpu"), batch)
    _step(layer, x, size, state)  # warm-up: allocator pools, lazy inits
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    _step(layer, x, size, state)
    return (_status_kb("VmHWM") - base) / 1e3


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def layer(device, batch=None, repeats=5, out=None, file=sys.stdout):
    from .bench import _time_cpu, _time_cuda

    batch = batch or (256 if device.type == "cuda" else 8)
    lay, x, size = _setup(device, batch)
    grads = [_step(lay, x, size, s).requires_grad for s in STATES]
    calls = [lambda s=s: _step(lay, x, size, s) for s in STATES]
    times = [_time_cuda(c) for c in calls] if device.type == "cuda" else _time_cpu(calls, repeats)
    print(
        f"TomeFormer layer 3 (B={batch}, N={x.shape[1]}, C=768, 12 heads, r=19, fp32) fwd+bwd on "
        f"{device}, {torch.get_num_threads()} threads",
        file=file,
    )
    print(
        f"{'state':20} {'ms':>9} {'min ms':>9} {'saved MB':>9} {'peak MB':>9}  returned size requires grad",
        file=file,
    )
    rows = []
    for s, (ms, mn), g in zip(STATES, times, grads):
        row = dict(
            state=s,
            ms=ms,
            ms_min=mn,
            saved_mb=_saved_mb(lay, x, size, s),
            peak_mb=_peak_mb(device, batch, s),
            size_requires_grad=g,
        )
        rows.append(row)
        print(f"{s:20} {ms:9.1f} {mn:9.1f} {row['saved_mb']:9.1f} {row['peak_mb']:9.1f}  {g}", file=file)
    if out:
        with open(out, "w") as f:
            json.dump(dict(device=str(device), batch=batch, rows=rows), f, indent=2)
    return 0
