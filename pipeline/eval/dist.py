"""Splitting an evaluation set over ranks and gathering the predictions on rank 0.

Rank r takes samples r, r + W, r + 2W, ... (no padding, so nothing is duplicated). Each rank sends
{id: prediction} to rank 0 with `gather_object`; rank 0 checks that no id came from two ranks and
that the union is exactly the dataset's id set (nothing lost, nothing extra). Works with gloo (CPU)
and NCCL; without an initialised process group it is the single-process identity.
"""

from __future__ import annotations

import torch.distributed as dist

from .media import EvalDataError


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(range(rank, n, world_size))


def merge_parts(parts: list[dict], expected_ids=None) -> dict:
    """Union of per-rank {id: value}; raises EvalDataError on an id from two ranks, a missing id or an
    unexpected id."""
    merged: dict = {}
    owner: dict = {}
    for r, part in enumerate(parts):
        for k, v in part.items():
            if k in merged:
                raise EvalDataError(
                    f"prediction for id {k!r} came from ranks {owner[k]} and {r} (counted twice)"
                )
            merged[k], owner[k] = v, r
    if expected_ids is not None:
        want = list(expected_ids)
        if len(set(want)) != len(want):
            raise EvalDataError("the expected id list has duplicates")
        missing = [k for k in want if k not in merged]
        extra = set(merged) - set(want)
        if missing or extra:
            raise EvalDataError(
                f"gathered predictions do not match the dataset: {len(missing)} ids "
                f"missing (e.g. {missing[:3]}), {len(extra)} unexpected "
                f"(e.g. {sorted(map(str, extra))[:3]})"
            )
        if not merged:
            raise EvalDataError("empty prediction set: the dataset has no samples")
    return merged


def gather_by_id(local: dict, expected_ids=None, dst: int = 0, error: str | None = None) -> dict | None:
    """Collective: every rank passes its {id: prediction} (or the one-line `error` that stopped it, so
    a failing rank never leaves the others waiting); rank `dst` gets the checked union, the others
    None. Any rank's error is raised on `dst` (and on that rank)."""
    rank, world = rank_world()
    if world == 1:
        if error is not None:
            raise EvalDataError(error)
        return merge_parts([local], expected_ids)
    parts = [None] * world if rank == dst else None
    dist.gather_object({"error": error, "predictions": local}, parts, dst=dst)
    if error is not None:
        raise EvalDataError(error)
    if rank != dst:
        return None
    for r, part in enumerate(parts):
        if part["error"] is not None:
            raise EvalDataError(f"rank {r}: {part['error']}")
    return merge_parts([p["predictions"] for p in parts], expected_ids)
