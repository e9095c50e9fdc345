"""Reading published dataset lists: streaming JSON lists, tables (parquet/csv/tsv/json/jsonl), headerless
TSV pairs, and the `simvlg prep` flags the readers take. Every problem is a PrepInputError raised
before anything is downloaded. The recipes (recipes.py, splits.py) are built from these.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class PrepInputError(ValueError):
    """An input list that cannot be used; raised before any download starts."""


# ------------------------------------------------------------------------------------ readers
def open_text(path: str | Path):
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise PrepInputError(f"{path}: cannot read input ({e.strerror or e})") from None


def check_readable(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise PrepInputError(f"{path}: input file does not exist")
    if path.is_dir():
        raise PrepInputError(f"{path}: is a folder; expected a file")
    if not os.access(path, os.R_OK):
        raise PrepInputError(f"{path}: input file is not readable")
    if path.stat().st_size == 0:
        raise PrepInputError(f"{path}: input file is empty")
    return path


def iter_json_list(path: str | Path, chunk: int = 1 << 22) -> Iterator:
    """Stream the elements of a top-level JSON list without loading the file whole."""
    dec = json.JSONDecoder()
    f = open_text(path)
    buf, pos, eof, consumed = "", 0, False, 0

    def more() -> bool:
        nonlocal buf, pos, eof, consumed
        if eof:
            return False
        data = f.read(chunk)
        if not data:
            eof = True
            return False
        consumed += pos
        buf, pos = buf[pos:] + data, 0
        return True

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    def bad(what: str):
        raise PrepInputError(f"{path}: not a valid JSON list ({what} at character {consumed + pos})")

    try:
        more()
        if skip_ws() != "[":
            bad("expected '['")
        pos += 1
        if skip_ws() == "]":
            return
        while True:
            skip_ws()
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        bad(e.msg)
            pos = end
            yield obj
            c = skip_ws()
            if c == ",":
                pos += 1
            elif c == "]":
                return
            else:
                bad("expected ',' or ']'")
    finally:
        f.close()


def iter_table(path: str | Path, fmt: str | None = None, batch_rows: int = 65536) -> Iterator[dict]:
    """Rows of a parquet/csv/tsv/json/jsonl file (optionally .gz) as dicts."""
    path = check_readable(path)
    name = path.name.lower().removesuffix(".gz")
    fmt = fmt or name.rsplit(".", 1)[-1]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()
        except Exception as e:  # pyarrow raises many kinds
            raise PrepInputError(f"{path}: cannot read parquet ({e})") from None
    elif fmt in ("csv", "tsv"):
        with open_text(path) as f:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            try:
                yield from reader
            except csv.Error as e:
                raise PrepInputError(f"{path}: bad {fmt} at line {reader.line_num} ({e})") from None
    elif fmt == "jsonl":
        with open_text(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as e:
                        raise PrepInputError(f"{path}: line {i} is not valid JSON ({e})") from None
    elif fmt == "json":
        yield from iter_json_list(path)
    else:
        raise PrepInputError(f"{path}: unknown input format {fmt!r} (parquet, csv, tsv, json, jsonl)")


def iter_tsv_pairs(path: str | Path, order: tuple[str, str]) -> Iterator[dict]:
    """Headerless two-column TSV (a header line naming the columns is tolerated)."""
    path = check_readable(path)
    with open_text(path) as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise PrepInputError(
                    f"{path}: line {i} has {len(parts)} tab-separated fields, expected 2 "
                    f"({order[0]}<TAB>{order[1]})"
                )
            if i == 1 and [p.strip().lower() for p in parts] == list(order):
                continue
            yield {order[0]: parts[0], order[1]: parts[1]}


def rename_columns(rows: Iterator[dict], url_col: str, caption_col: str, path) -> Iterator[dict]:
    first = True
    for row in rows:
        if not isinstance(row, dict):
            raise PrepInputError(
                f"{path}: rows must be objects with {url_col!r} and {caption_col!r}, got {type(row).__name__}"
            )
        if first:
            missing = [c for c in (url_col, caption_col) if c not in row]
            if missing:
                raise PrepInputError(
                    f"{path}: missing column(s) {missing}; columns are {sorted(row)} "
                    "(pass --url-col / --caption-col)"
                )
            first = False
        out = {"url": row.get(url_col), "caption": row.get(caption_col)}
        if isinstance(row.get("captions"), list):
            out["captions"] = row["captions"]
        yield out


@dataclass
class Args:
    """The `simvlg prep` flags the readers use (cli.py makes one flag per field, with this help)."""

    inputs: list[str] = field(
        default_factory=list,
        metadata=dict(
            flag="--input",
            action="append",
            metavar="FILE",
            help="input list(s) as published; repeat for recipes with two files (sbu)",
        ),
    )
    image_root: str | None = field(
        default=None, metadata=dict(help="coco_karpathy: local COCO 2014 image folder (else --base-url)")
    )
    base_url: str = field(
        default="http://images.cocodataset.org/", metadata=dict(help="coco_karpathy image host")
    )
    video_root: str | None = field(
        default=None, metadata=dict(help="msrvtt/msvd: folder holding the video files")
    )
    split: str = field(
        default="train",
        metadata=dict(
            help="the standard split to read (coco_karpathy, flickr30k, msrvtt, msvd): train, val or test"
        ),
    )
    url_col: str = "url"
    caption_col: str = "caption"


def need_inputs(args: Args, n: int, recipe: str, what: str) -> list[Path]:
    if len(args.inputs) != n:
        raise PrepInputError(f"recipe {recipe} needs {n} --input file(s): {what}; got {len(args.inputs)}")
    return [check_readable(p) for p in args.inputs]
