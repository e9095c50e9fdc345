"""Atomic JSON files: written to `NAME.tmp`, flushed to disk, renamed over NAME. A reader (or a run
killed mid-write) sees the old file or the new one, never half of one. Used for manifests, checkpoint
metadata, evaluation results and img2dataset-style stats files."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, obj, *, indent: int | None = 1) -> Path:
    """Write obj as UTF-8 JSON (+ a final newline) to path, atomically; returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
