"""manifest.json: what a folder of shards holds, written by `simvlg prep` (prep/counts.py) and by the
merge of a SLURM array run (prep/slurm.py), read by the loader (shards.resolve_spec), preflight,
evaluation (media from shards) and the demo. Its one definition is the Manifest model below: strict
(a string is not a number) and closed (an unknown key is an error), as the config schema.

    m = read_manifest("data/cc3m/manifest.json")    # -> Manifest; ValueError naming the file and key
    m.num_samples, m.counts.by_category, m.pattern(next_to="data/cc3m/manifest.json")

Versions. 2 (written now): the fields below. 1 (written before): the same keys, except that the merge
of a SLURM run wrote its per-part unfinished shards as `incomplete_shards: {part: [ids]}`; a version-1
file is read by moving that to `incomplete_parts` and validating the rest as version 2, so manifests
already on disk keep working and are rewritten as version 2 by the next `prep` or `prep merge`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .jsonfile import write_json_atomic

MANIFEST_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Counts(_Strict):
    """What happened to the rows of the list, summed over finished shards (merge: over the parts)."""

    input_rows: int | None = None  # rows of the validated list; None if unknown
    dropped_rows: dict[str, int] = Field(default_factory=dict)  # by problem (--drop-invalid)
    duplicate_urls: int = 0  # rows repeating an earlier URL (kept unless --drop-duplicates)
    dropped_duplicates: int = 0
    attempted: int = 0  # URLs img2dataset tried
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    by_category: dict[str, int] = Field(default_factory=dict)  # failures by cause in plain words
    by_cause: dict[str, int] = Field(default_factory=dict)  # img2dataset's raw messages (top 50)


class ShardEntry(_Strict):
    """One shard with samples. A prep run also records the tar's size and mtime (a re-run reuses the
    scan while they are unchanged) and what img2dataset says it wrote; a merge, where it came from."""

    id: int
    file: str  # name inside the manifest's shards/ folder
    samples: int
    size: int | None = None
    mtime: int | None = None
    ok: bool = True
    error: str | None = None
    stats_successes: int | None = None
    part: str | None = None  # merge: the part folder and its shard file
    part_file: str | None = None


class Manifest(_Strict):
    version: Literal[2] = MANIFEST_VERSION
    recipe: str  # the recipe, or "merge" for a merged SLURM run
    kind: Literal["image", "video", "text"]  # text: sentences only (the `sentences` recipe)
    created: str  # local time, ISO 8601
    complete: bool  # every expected shard (every part) is finished
    shards: str  # brace pattern of the shards with samples, absolute ("" if there are none)
    shards_relative: str  # the same, relative to the manifest's folder (what readers use)
    num_shards: int
    num_samples: int
    counts: Counts = Field(default_factory=Counts)
    expected_shards: int | None = None  # from the converted input (None: unknown)
    incomplete_shards: list[int] = Field(default_factory=list)  # not finished: re-run to retry
    empty_shards: list[int] = Field(default_factory=list)  # finished, no sample (left out of `shards`)
    mismatched_shards: list[int] = Field(default_factory=list)  # fewer samples than img2dataset wrote
    shard_seconds: float = 0.0
    settings: dict[str, Any] = Field(default_factory=dict)  # what img2dataset was run with
    timing: dict[str, Any] = Field(default_factory=dict)  # of the last run
    input: dict[str, Any] = Field(default_factory=dict)  # the conversion's fingerprint (input/_SOURCE.json)
    parts: list[str] = Field(default_factory=list)  # merge: the part folders merged
    missing_parts: list[str] = Field(default_factory=list)  # merge: parts without a manifest yet
    incomplete_parts: dict[str, list[int]] = Field(default_factory=dict)  # merge: unfinished shards by part
    shard_list: list[ShardEntry] = Field(default_factory=list)

    def pattern(self, next_to: str | Path) -> str:
        """The shard pattern for a manifest stored at `next_to` (relative, so the folder can move)."""
        return str(Path(next_to).parent / self.shards_relative) if self.shards_relative else self.shards

    def to_json(self) -> dict:
        out = self.model_dump(mode="json")
        out["shard_list"] = [e.model_dump(mode="json", exclude_none=True) for e in self.shard_list]
        return out


def _from_version_1(data: dict) -> dict:
    data = {**data, "version": MANIFEST_VERSION}
    if isinstance(data.get("incomplete_shards"), dict):  # a version-1 merge
        data["incomplete_parts"] = data.pop("incomplete_shards")
    return data


def parse_manifest(data, source: str | Path) -> Manifest:
    """A manifest from its JSON value; ValueError naming `source`, the key and what was expected."""
    if not isinstance(data, dict) or "version" not in data:
        raise ValueError(f"{source}: not a simvlg manifest (no 'version' key)")
    if data["version"] == 1:
        data = _from_version_1(data)
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        got = "" if err["type"] in ("missing", "extra_forbidden") else f", got {err.get('input')!r:.60}"
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].lower()
        raise ValueError(f"{source}: not a valid simvlg manifest: {key}: {what}{got}{more}") from None


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read shard manifest ({e})") from None
    return parse_manifest(data, path)


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """folder/manifest.json, atomically."""
    return write_json_atomic(Path(folder) / "manifest.json", manifest.to_json())
