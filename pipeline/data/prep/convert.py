"""Conversion: a recipe's rows, validated, as parquet parts under OUT/input/ (+ _SOURCE.json).

Every row is checked before anything is downloaded (RowValidator); duplicate URLs are counted (and
dropped with --drop-duplicates). _SOURCE.json is the fingerprint of the conversion: which inputs (by
content) and which options. A re-run with the same fingerprint reuses the parts; any other is refused,
naming what changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from array import array
from collections.abc import Iterator
from pathlib import Path

from ..formats.jsonfile import write_json_atomic
from .lists import Args, PrepInputError, check_readable
from .recipes import RECIPES


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(recipe: str, rargs: Args, opts: dict, known: list[dict] = ()) -> dict:
    """What a conversion was made from: each input's content hash (reused from `known` while its size
    and mtime are unchanged, so a re-run does not re-read a 20 GB list) and every option."""
    inputs = []
    for i, p in enumerate(rargs.inputs):
        st = check_readable(p).stat()
        entry = {"path": str(Path(p).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}
        old = known[i] if i < len(known) else {}
        same_file = {k: old.get(k) for k in ("path", "size", "mtime")} == entry
        entry["sha256"] = old["sha256"] if same_file and old.get("sha256") else _sha256(p)
        inputs.append(entry)
    return {
        "recipe": recipe,
        "inputs": inputs,
        "options": {
            "url_col": rargs.url_col,
            "caption_col": rargs.caption_col,
            "image_root": rargs.image_root,
            "video_root": rargs.video_root,
            "base_url": rargs.base_url,
            "split": rargs.split,
            **opts,
        },
    }


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words; inputs are compared by content only."""
    out = []
    if old.get("recipe") != new["recipe"]:
        out.append(f"recipe {old.get('recipe')} -> {new['recipe']}")
    a, b = old.get("inputs", []), new["inputs"]
    if len(a) != len(b):
        out.append(f"{len(a)} input file(s) -> {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.get("sha256") != y["sha256"]:
            was = f"sha256 {x['sha256'][:12]}" if x.get("sha256") else f"{x.get('size')} bytes"
            out.append(
                f"input {i + 1} ({Path(y['path']).name}) has other content "
                f"(sha256 {y['sha256'][:12]}, was {was})"
            )
    oa, ob = old.get("options", {}), new["options"]
    for k in sorted(set(oa) | set(ob)):
        if oa.get(k) != ob.get(k):
            out.append(f"--{k.replace('_', '-')} {oa.get(k)!r} -> {ob.get(k)!r}")
    return out


def convert(
    recipe_name: str,
    rargs: Args,
    input_dir: Path,
    *,
    samples_per_shard: int,
    drop_invalid: bool = False,
    drop_duplicates: bool = False,
    limit: int | None = None,
    rows_per_file: int = 1_000_000,
    log=None,
) -> dict:
    """Validate the recipe's rows and write them as parquet parts. Reused when already done for the
    same inputs (by content) and options; anything else for the same folder is an error naming what
    changed. Duplicate URLs (or video files) are counted, and dropped with drop_duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recipe = RECIPES[recipe_name]
    marker = input_dir / "_SOURCE.json"
    done = json.loads(marker.read_text()) if marker.is_file() else None
    fp = _fingerprint(
        recipe_name,
        rargs,
        {
            "samples_per_shard": samples_per_shard,
            "drop_invalid": drop_invalid,
            "drop_duplicates": drop_duplicates,
            "limit": limit,
        },
        known=(done or {}).get("inputs", []),
    )
    if done is not None:
        if "drop_duplicates" not in done.get("options", {}):  # made before the option existed
            done["options"]["drop_duplicates"] = False
        changes = fingerprint_changes(done, fp)
        if not changes:
            if [i["mtime"] for i in done["inputs"]] != [i["mtime"] for i in fp["inputs"]]:
                done["inputs"] = fp["inputs"]  # same content, touched since: remember the new mtimes
                write_json_atomic(marker, done)
            print(f"prep: reusing converted input {input_dir} ({done['rows']} rows)", file=log or sys.stderr)
            return done
        raise PrepInputError(
            f"{input_dir.parent} was prepared from other inputs or options: "
            + "; ".join(changes)
            + "; use another --out, or delete that folder to "
            "start over"
        )
    validator = RowValidator(
        kind=recipe.kind, drop_invalid=drop_invalid, source=" + ".join(rargs.inputs) or recipe_name
    )
    rows = validator(recipe.read(rargs))
    # whole shards per parquet file so img2dataset's shard ids stay contiguous
    per_file = samples_per_shard * max(1, rows_per_file // samples_per_shard)
    tmp = input_dir.with_name(input_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, counts, buf, schema, total = [], [], [], None, 0
    key_hashes = array("Q")  # 8 bytes per row: duplicates are found after the stream (numpy)

    def flush():
        nonlocal buf, schema
        if not buf:
            return
        if schema is None:
            fields = [(k, pa.list_(pa.string()) if k == "captions" else pa.string()) for k in buf[0]]
            schema = pa.schema(fields)
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in buf], schema=schema)
        name = f"part-{len(files):05d}.parquet"
        pq.write_table(table, tmp / name)
        files.append(name)
        counts.append(len(buf))
        buf = []

    try:
        for row in rows:
            buf.append(row)
            total += 1
            key = (row.get("url") or row.get("video") or row.get("caption") or "").encode()  # text: sentence
            key_hashes.append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
            if len(buf) == per_file:
                flush()
            if limit is not None and total >= limit:
                break
        flush()
        validator.finish(log)  # raises on unusable rows (unless drop_invalid): nothing downloaded yet
        duplicates, counts = _duplicates(key_hashes, tmp, files, counts, drop=drop_duplicates)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    validation = {
        **validator.stats,
        "duplicate_urls": duplicates,
        "dropped_duplicates": duplicates if drop_duplicates else 0,
    }
    if duplicates:
        print(
            f"prep: {duplicates} rows repeat a URL seen earlier in the list"
            + (" (dropped)" if drop_duplicates else " (kept; --drop-duplicates drops them)"),
            file=log or sys.stderr,
        )
    total -= validation["dropped_duplicates"]
    info = {
        **fp,
        "rows": total,
        "files": files,
        "file_rows": counts,
        "columns": schema.names,
        "validation": validation,
        "expected_shards": sum(math.ceil(c / samples_per_shard) for c in counts),
    }
    write_json_atomic(tmp / "_SOURCE.json", info)
    shutil.rmtree(input_dir, ignore_errors=True)
    os.replace(tmp, input_dir)
    print(
        f"prep: {total} rows validated -> {input_dir} ({len(files)} parquet file(s))", file=log or sys.stderr
    )
    return info


def _duplicates(
    key_hashes: array, folder: Path, files: list[str], counts: list[int], *, drop: bool
) -> tuple[int, list[int]]:
    """Rows whose URL (64-bit hash) appeared earlier; with drop, rewrite the parts without them."""
    import numpy as np

    h = np.frombuffer(key_hashes, dtype=np.uint64)
    if not len(h):
        return 0, counts
    _, first = np.unique(h, return_index=True)
    duplicates = len(h) - len(first)
    if not drop or not duplicates:
        return duplicates, counts
    import pyarrow.parquet as pq

    keep = np.zeros(len(h), dtype=bool)
    keep[first] = True
    start, new_counts = 0, []
    for name, n in zip(files, counts):
        table = pq.read_table(folder / name).filter(keep[start : start + n])
        pq.write_table(table, folder / name)
        new_counts.append(table.num_rows)
        start += n
    return duplicates, new_counts


class RowValidator:
    """Passes rows through, checking url/video and caption. Problems are collected; `finish()` (called
    after conversion, before any download) raises a PrepInputError summarising them, unless
    drop_invalid, in which case bad rows were dropped and are counted in `stats`."""

    def __init__(self, *, kind: str, drop_invalid: bool, source: str):
        self.kind, self.drop_invalid, self.source = kind, drop_invalid, source
        self.field = {"video": "video", "text": "caption"}.get(kind, "url")
        self.bad: dict[str, list] = {}
        self.rows = 0

    def __call__(self, rows: Iterator[dict]) -> Iterator[dict]:
        f = self.field
        for row in rows:
            self.rows += 1
            url, cap = row.get(f), row.get("caption")
            problem = None
            if not isinstance(url, str) or not url.strip():
                problem = f"empty {f}"  # text: f is the caption
            elif self.kind == "video" and not Path(url).is_file():
                problem = "missing video file"
            elif not isinstance(cap, str) or not cap.strip():
                problem = "empty caption"
            if problem:
                self.bad.setdefault(problem, []).append((self.rows, url))
                continue
            row[f] = url.strip()
            row["caption"] = " ".join(cap.split())
            yield row

    @property
    def stats(self) -> dict:
        return {"rows": self.rows, "dropped": {k: len(v) for k, v in self.bad.items()}}

    def finish(self, log=None) -> None:
        if self.rows == 0:
            raise PrepInputError(f"{self.source}: no rows")
        if not self.bad:
            return
        summary = "; ".join(
            f"{len(v)} row(s) with {k} (first: row {v[0][0]}, {self.field}={v[0][1]!r})"
            for k, v in self.bad.items()
        )
        total = sum(len(v) for v in self.bad.values())
        if not self.drop_invalid:
            raise PrepInputError(
                f"{self.source}: {total} of {self.rows} rows are unusable: {summary}. "
                "Fix the list or pass --drop-invalid to skip them"
            )
        if total == self.rows:
            raise PrepInputError(f"{self.source}: all {self.rows} rows are unusable: {summary}")
        print(f"prep: dropped {total} of {self.rows} rows: {summary}", file=log or sys.stderr)
