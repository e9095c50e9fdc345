"""Atomic, verifiable checkpoints of a DeepSpeed run.

    <run_dir>/checkpoints/step_00001200/ds/...        DeepSpeed: connector weights, ZeRO-2 optimizer
                                                       partitions (one per rank), no frozen params
                         step_00001200/rank0.json     per-rank state: RNGs, data-loader position, step
                         step_00001200/COMPLETE.json  written last: every file with its size
    <run_dir>/checkpoints/latest                      name of the newest complete checkpoint

All ranks write into `.tmp-step_...`; rank 0 renames it into place only after every rank is done and
the file list is recorded, then moves `latest`. A folder without a matching COMPLETE.json (killed
mid-write, truncated file) is never resumed from: we fall back to the previous one with a warning.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline.data.formats.jsonfile import write_json_atomic

PREFIX = "step_"


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, tuple) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _file_sizes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "COMPLETE.json"
    }


def save(
    engine, root: Path, step: int, rank_state: dict, *, rank: int, world_size: int, keep: int, barrier
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / _name(step), root / f".tmp-{_name(step)}"
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    engine.save_checkpoint(str(tmp), tag="ds", exclude_frozen_parameters=True)
    write_json_atomic(tmp / f"rank{rank}.json", {"step": step, **rank_state}, indent=None)  # RNG states
    barrier()
    if rank == 0:
        write_json_atomic(
            tmp / "COMPLETE.json", {"step": step, "world_size": world_size, "files": _file_sizes(tmp)}
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None if it is complete."""
    marker = folder / "COMPLETE.json"
    if not marker.is_file():
        return "no COMPLETE.json (write did not finish)"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable COMPLETE.json ({e})"
    actual = _file_sizes(folder)
    for name, size in recorded.items():
        if name not in actual:
            return f"missing file {name}"
        if actual[name] != size:
            return f"file {name} is {actual[name]} bytes, expected {size} (truncated?)"
    return None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    found = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return [p for p in found if problem(p) is None]


def find_resumable(root: Path) -> Path | None:
    """The newest complete checkpoint; warns about every newer one that is skipped."""
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob(f"{PREFIX}*") if p.is_dir()), reverse=True)
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_text().strip()
        if named not in candidates:
            warnings.warn(
                f"checkpoint {named} named by {latest} is missing; looking for older ones", stacklevel=2
            )
    for folder in candidates:
        why = problem(folder)
        if why is None:
            return folder
        warnings.warn(f"not resuming from {folder}: {why}; trying the previous checkpoint", stacklevel=2)
    return None


def load(engine, folder: Path, *, rank: int, world_size: int) -> dict:
    """Collective. Restores the engine (weights, optimizer partitions) and returns this rank's state."""
    meta = json.loads((folder / "COMPLETE.json").read_text())
    if meta["world_size"] != world_size:
        raise RuntimeError(
            f"{folder} was written by {meta['world_size']} ranks, this run has "
            f"{world_size}: ZeRO-2 optimizer partitions cannot be re-split"
        )
    engine.load_checkpoint(str(folder), tag="ds", load_module_strict=False)
    return json.loads((folder / f"rank{rank}.json").read_text())
