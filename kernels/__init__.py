"""Token merging for the TomeFormer: ToMe bipartite soft matching + size-weighted merge.

    from kernels import merge_tokens
    x2, s2 = merge_tokens(x, metric, size, r, protect_first=True, mode="wavg", backend="auto")

x [B, N, C], metric [B, N, Cm], size [B, N, 1] or None (all ones, float32) -> x2 [B, N - r', C],
s2 [B, N - r', 1] with r' = clamp(r, 0, (N - protect_first) // 2). Modes: "wavg" (size-weighted
average), "mean" (plain mean of the group, sizes still summed), "sum". Backends: "eager" (PyTorch),
"triton" (fused kernels; CPU tensors only under TRITON_INTERPRET=1), "auto" (triton for CUDA tensors
once the self-check in kernels/selfcheck.py has passed for that device, dtype and mode; eager
otherwise, with one warning naming the cause if the check failed).

Output order: kept tokens in ascending original position; a merged group sits at its B (odd) token's
position, so a protected CLS stays first. r' = 0 returns the inputs unchanged.
Ties: lowest B index wins the argmax, lowest A index wins equal scores in the top-r selection.
See kernels/tome.py for the algorithm and kernels/tome_triton.py for the kernels.

Sizes: s2 requires grad only if the size passed in does (size=None never builds a size-gradient
path, and x is then not saved for backward).

merge_tokens_with_source also returns which original tokens each output token holds (the merge
figures). Lower-level pieces: bipartite_match -> Match; merge_apply(match, any [B, N, ...] tensor);
merge_source; unmerge; prop_attn_bias (log size).
This package imports nothing from `pipeline`; triton is optional (imported on first use).
"""

from __future__ import annotations

import torch

from . import tome
from .tome import Match, clamp_r, merge_source, prop_attn_bias, unmerge

__all__ = [
    "Match",
    "bipartite_match",
    "clamp_r",
    "merge_apply",
    "merge_source",
    "merge_tokens",
    "merge_tokens_with_source",
    "prop_attn_bias",
    "triton_available",
    "unmerge",
]

_BACKENDS = ("auto", "eager", "triton")
AUTO_DEVICES = ("cuda",)  # device types `auto` may send to Triton (tests add "cpu": the interpreter)


def _triton():
    from . import tome_triton  # imports triton; TRITON_INTERPRET must be set before for CPU use

    return tome_triton


def triton_available() -> bool:
    """True if the Triton kernels import (not whether a GPU is present)."""
    try:
        _triton()
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def _resolve(backend: str, t: torch.Tensor, mode: str | None = None) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = t.device.type in AUTO_DEVICES and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if not (ok and triton_available()):
            return "eager"
        from . import selfcheck

        return "triton" if selfcheck.verdict(t.device, t.dtype, mode).ok else "eager"
    if backend == "triton":
        try:
            _triton()
        except Exception as e:
            raise RuntimeError(f"backend='triton' but the Triton kernels do not import: {e}") from e
    return backend


def bipartite_match(metric: torch.Tensor, r: int, protect_first: bool = True, backend: str = "auto") -> Match:
    """metric [B, N, Cm] -> Match (src_idx, dst_idx [B, r'], out_pos [B, N'], group [B, N])."""
    if _resolve(backend, metric) == "triton":
        return _triton().bipartite_match(metric, r, protect_first)
    return tome.bipartite_match(metric, r, protect_first)


def merge_apply(
    match: Match, x: torch.Tensor, size: torch.Tensor | None = None, mode: str = "wavg", backend: str = "auto"
):
    """Apply a match to any x [B, N, ...] -> (x' [B, N', ...], s' [B, N', 1])."""
    if mode not in tome.MODES:
        raise ValueError(f"mode must be one of {tome.MODES}, got {mode!r}")
    if _resolve(backend, x, mode) == "triton":
        return _triton().merge_apply(match, x, size, mode)
    return tome.merge_apply(match, x, size, mode)


def merge_tokens(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    protect_first: bool = True,
    mode: str = "wavg",
    backend: str = "auto",
):
    """One ToMe merge step: (x2 [B, N', C], s2 [B, N', 1])."""
    match = bipartite_match(metric, r, protect_first, backend)
    return merge_apply(match, x, size, mode, backend)


def merge_tokens_with_source(
    x: torch.Tensor,
    metric: torch.Tensor,
    size: torch.Tensor | None,
    r: int,
    source: torch.Tensor | None = None,
    protect_first: bool = True,
    mode: str = "wavg",
    backend: str = "auto",
):
    """merge_tokens that also carries which original tokens each output holds: (x2, s2, source2).

    source: a [B, N, N0] 0/1 matrix from the previous step, or None to start from the identity
    (N0 = N); source2 [B, N', N0].
    """
    match = bipartite_match(metric, r, protect_first, backend)
    x2, s2 = merge_apply(match, x, size, mode, backend)
    return x2, s2, merge_source(match, source)
