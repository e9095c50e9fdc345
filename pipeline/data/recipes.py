"""Recipes: what each dataset's published list looks like, read as rows of url + caption.

Every reader yields plain dicts `{"url": str, "caption": str, ...}` (image recipes) or
`{"video": path, "caption": str, "captions": [...], "video_id": str}` (video recipes), streaming, so
lists of 10^8 rows never sit in memory. `validate_rows` checks them before anything is downloaded.

| recipe            | --input (as published)                                                   |
|-------------------|---------------------------------------------------------------------------|
| coco_karpathy     | coco_karpathy_{train,val,test}.json (LAVIS/BLIP: image, caption(s));      |
|                   | images from --image-root (local COCO 2014 folders) or --base-url          |
| cc3m              | Train_GCC-training.tsv / Validation_GCC-1.1.0-Validation.tsv: caption<TAB>url |
| cc12m             | cc12m.tsv: url<TAB>caption                                                |
| sbu               | SBU_captioned_photo_dataset_urls.txt + ..._captions.txt (two --input), or |
|                   | BLIP's sbu.json (list of url + caption)                                    |
| laion115m_capfilt | BLIP's laion_synthetic_filtered_large.json (JSON list of url + caption)   |
| ccs_capfilt       | BLIP's ccs_synthetic_filtered_large.json (JSON list of url + caption)     |
| msrvtt            | train_val_videodatainfo.json / test_videodatainfo.json (videos+sentences),|
|                   | or LAVIS msrvtt_{split}.json; videos from --video-root (videoNNNN.mp4)     |
| msvd              | AllVideoDescriptions.txt ("clip_id caption" lines), or LAVIS msvd_{split}.json; |
|                   | videos from --video-root (YouTubeClips/*.avi)                             |
| urls              | any parquet/csv/tsv/json/jsonl list with --url-col and --caption-col      |
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


class PrepInputError(ValueError):
    """An input list that cannot be used; raised before any download starts."""


# ------------------------------------------------------------------------------------ readers
def _open_text(path: str | Path):
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
        return open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as e:
        raise PrepInputError(f"{path}: cannot read input ({e.strerror or e})") from None


def _check_readable(path: str | Path) -> Path:
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
    f = _open_text(path)
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
    path = _check_readable(path)
    name = path.name.lower().removesuffix(".gz")
    fmt = fmt or name.rsplit(".", 1)[-1]
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_rows):
                yield from batch.to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
            raise PrepInputError(f"{path}: cannot read parquet ({e})") from None
    elif fmt in ("csv", "tsv"):
        with _open_text(path) as f:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            try:
                yield from reader
            except csv.Error as e:
                raise PrepInputError(f"{path}: bad {fmt} at line {reader.line_num} ({e})") from None
    elif fmt == "jsonl":
        with _open_text(path) as f:
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


def _iter_tsv_pairs(path: str | Path, order: tuple[str, str]) -> Iterator[dict]:
    """Headerless two-column TSV (a header line naming the columns is tolerated)."""
    path = _check_readable(path)
    with _open_text(path) as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise PrepInputError(f"{path}: line {i} has {len(parts)} tab-separated fields, expected 2 "
                                     f"({order[0]}<TAB>{order[1]})")
            if i == 1 and [p.strip().lower() for p in parts] == list(order):
                continue
            yield {order[0]: parts[0], order[1]: parts[1]}


def _rename(rows: Iterator[dict], url_col: str, caption_col: str, path) -> Iterator[dict]:
    first = True
    for row in rows:
        if not isinstance(row, dict):
            raise PrepInputError(f"{path}: rows must be objects with {url_col!r} and {caption_col!r}, "
                                 f"got {type(row).__name__}")
        if first:
            missing = [c for c in (url_col, caption_col) if c not in row]
            if missing:
                raise PrepInputError(f"{path}: missing column(s) {missing}; columns are {sorted(row)} "
                                     "(pass --url-col / --caption-col)")
            first = False
        out = {"url": row.get(url_col), "caption": row.get(caption_col)}
        if isinstance(row.get("captions"), list):
            out["captions"] = row["captions"]
        yield out


@dataclass
class Args:
    """The subset of `simvlg prep` flags the readers use."""

    inputs: list[str] = field(default_factory=list)
    url_col: str = "url"
    caption_col: str = "caption"
    image_root: str | None = None
    video_root: str | None = None
    base_url: str = "http://images.cocodataset.org/"
    split: str = "train"


def _need_inputs(args: Args, n: int, recipe: str, what: str) -> list[Path]:
    if len(args.inputs) != n:
        raise PrepInputError(f"recipe {recipe} needs {n} --input file(s): {what}; got {len(args.inputs)}")
    return [_check_readable(p) for p in args.inputs]


def read_urls(args: Args) -> Iterator[dict]:
    if not args.inputs:
        raise PrepInputError("recipe urls needs --input FILE (parquet/csv/tsv/json/jsonl with url + caption)")
    for p in args.inputs:
        yield from _rename(iter_table(p), args.url_col, args.caption_col, p)


def _read_tsv_or_table(args: Args, recipe: str, expected: str, tsv_columns: tuple) -> Iterator[dict]:
    """The published TSV (no header, `tsv_columns` order), or the same list as a table."""
    (p,) = _need_inputs(args, 1, recipe, expected)
    if p.suffix in (".parquet", ".json", ".jsonl", ".csv"):
        yield from _rename(iter_table(p), args.url_col, args.caption_col, p)
        return
    yield from _iter_tsv_pairs(p, tsv_columns)


def read_cc3m(args: Args) -> Iterator[dict]:
    return _read_tsv_or_table(args, "cc3m", "Train_GCC-training.tsv (caption<TAB>url)",
                              ("caption", "url"))


def read_cc12m(args: Args) -> Iterator[dict]:
    return _read_tsv_or_table(args, "cc12m", "cc12m.tsv (url<TAB>caption)", ("url", "caption"))


def read_sbu(args: Args) -> Iterator[dict]:
    if len(args.inputs) == 1:
        p = _check_readable(args.inputs[0])
        yield from _rename(iter_table(p), args.url_col, args.caption_col, p)
        return
    urls_p, caps_p = _need_inputs(args, 2, "sbu", "SBU_captioned_photo_dataset_urls.txt and "
                                  "SBU_captioned_photo_dataset_captions.txt (or one sbu.json)")
    with _open_text(urls_p) as fu, _open_text(caps_p) as fc:
        n = 0
        while True:
            u, c = fu.readline(), fc.readline()
            if not u or not c:
                break
            n += 1
            yield {"url": u.strip(), "caption": c.strip()}
        if u or c:
            longer = urls_p if u else caps_p
            raise PrepInputError(f"{urls_p} and {caps_p} have different line counts ({longer} is longer "
                                 f"than {n} lines)")


def _read_capfilt(name: str, expected: str):
    def read(args: Args) -> Iterator[dict]:
        (p,) = _need_inputs(args, 1, name, expected)
        yield from _rename(iter_table(p), args.url_col, args.caption_col, p)
    return read


def read_coco_karpathy(args: Args) -> Iterator[dict]:
    (p,) = _need_inputs(args, 1, "coco_karpathy", "coco_karpathy_{train,val,test}.json from LAVIS/BLIP")
    root = Path(args.image_root).resolve() if args.image_root else None
    if root is not None and not root.is_dir():
        raise PrepInputError(f"--image-root {root}: not a folder (expected the COCO 2014 images: "
                             "train2014/, val2014/)")
    grouped: dict[str, list[str]] = {}
    for i, row in enumerate(iter_json_list(p)):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise PrepInputError(f"{p}: entry {i} lacks 'image' or 'caption' (expected LAVIS coco_karpathy "
                                 f"entries), got {sorted(row) if isinstance(row, dict) else row!r}")
        caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        grouped.setdefault(row["image"], []).extend(c if isinstance(c, str) else "" for c in caps)
    missing = 0
    for n, (image, caps) in enumerate(grouped.items()):
        if root is not None:
            f = root / image
            if n < 200 and not f.is_file():
                missing += 1
            url = f.as_uri()
        else:
            url = args.base_url.rstrip("/") + "/" + image.lstrip("/")
        if n == 199 and missing > 100:
            raise PrepInputError(f"--image-root {root}: {missing} of the first 200 images are missing "
                                 f"(e.g. {root / image}); point it at the folder holding train2014/ val2014/")
        yield {"url": url, "caption": caps[0] if caps else "", "captions": caps}


# ------------------------------------------------------------------------------------ video
def _video_root(args: Args, recipe: str) -> Path:
    if not args.video_root:
        raise PrepInputError(f"recipe {recipe} needs --video-root (the folder holding the video files)")
    root = Path(args.video_root)
    if not root.is_dir():
        raise PrepInputError(f"--video-root {root}: not a folder")
    return root


def _find_video(root: Path, vid: str, exts=(".mp4", ".webm", ".avi", ".mkv", ".mov")) -> Path:
    p = root / vid
    if p.suffix.lower() in exts:
        return p
    for e in exts:
        if (root / (vid + e)).exists():
            return root / (vid + e)
    return root / (vid + exts[0])


def _group_videos(pairs, root: Path) -> Iterator[dict]:
    grouped: dict[str, list[str]] = {}
    for vid, cap in pairs:
        grouped.setdefault(vid, []).append(cap)
    for vid, caps in grouped.items():
        yield {"video": str(_find_video(root, vid)), "video_id": Path(vid).stem, "caption": caps[0],
               "captions": caps}


def read_msrvtt(args: Args) -> Iterator[dict]:
    (p,) = _need_inputs(args, 1, "msrvtt", "train_val_videodatainfo.json / test_videodatainfo.json, or "
                        "LAVIS msrvtt_{split}.json")
    root = _video_root(args, "msrvtt")
    with _open_text(p) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise PrepInputError(f"{p}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "sentences" in data:
        split = {"val": "validate"}.get(args.split, args.split)
        keep = {v["video_id"] for v in data.get("videos", []) if v.get("split", split) == split}
        if not keep:
            raise PrepInputError(f"{p}: no videos with split {split!r}")
        pairs = [(s["video_id"], s.get("caption", "")) for s in data["sentences"] if s["video_id"] in keep]
    elif isinstance(data, list):
        pairs = []
        for i, row in enumerate(data):
            if not isinstance(row, dict) or "video" not in row or "caption" not in row:
                raise PrepInputError(f"{p}: entry {i} lacks 'video' or 'caption'")
            caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            pairs += [(row["video"], c) for c in caps]
    else:
        raise PrepInputError(f"{p}: expected MSR-VTT videodatainfo (videos + sentences) or a LAVIS list")
    yield from _group_videos(pairs, root)


def read_msvd(args: Args) -> Iterator[dict]:
    (p,) = _need_inputs(args, 1, "msvd", "AllVideoDescriptions.txt or LAVIS msvd_{split}.json")
    root = _video_root(args, "msvd")
    pairs = []
    if p.suffix == ".json":
        for i, row in enumerate(iter_json_list(p)):
            if not isinstance(row, dict) or "video" not in row or "caption" not in row:
                raise PrepInputError(f"{p}: entry {i} lacks 'video' or 'caption'")
            caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
            pairs += [(row["video"], c) for c in caps]
    else:
        with _open_text(p) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                vid, _, cap = line.partition(" ")
                pairs.append((vid, cap))
    yield from _group_videos(pairs, root)


@dataclass
class Recipe:
    name: str
    kind: str  # image | video
    read: Callable[[Args], Iterator[dict]]
    inputs: str
    samples_per_shard: int = 10_000


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("coco_karpathy", "image", read_coco_karpathy,
           "--input coco_karpathy_train.json [--image-root COCO2014 | --base-url URL]", 5_000),
    Recipe("cc3m", "image", read_cc3m, "--input Train_GCC-training.tsv (caption<TAB>url)"),
    Recipe("cc12m", "image", read_cc12m, "--input cc12m.tsv (url<TAB>caption)"),
    Recipe("sbu", "image", read_sbu,
           "--input SBU_captioned_photo_dataset_urls.txt --input SBU_captioned_photo_dataset_captions.txt"),
    Recipe("laion115m_capfilt", "image",
           _read_capfilt("laion115m_capfilt", "laion_synthetic_filtered_large.json"),
           "--input laion_synthetic_filtered_large.json (BLIP CapFilt: list of url + caption)"),
    Recipe("ccs_capfilt", "image", _read_capfilt("ccs_capfilt", "ccs_synthetic_filtered_large.json"),
           "--input ccs_synthetic_filtered_large.json (BLIP CapFilt: list of url + caption)"),
    Recipe("msrvtt", "video", read_msrvtt,
           "--input train_val_videodatainfo.json --video-root MSRVTT/videos/all [--split train]", 500),
    Recipe("msvd", "video", read_msvd,
           "--input AllVideoDescriptions.txt --video-root YouTubeClips [--split train]", 500),
    Recipe("urls", "image", read_urls, "--input LIST.{parquet,csv,tsv,json,jsonl} [--url-col url] "
           "[--caption-col caption]"),
]}


# -------------------------------------------------------------------------------- validation
class RowValidator:
    """Passes rows through, checking url/video and caption. Problems are collected; `finish()` (called
    after conversion, before any download) raises a PrepInputError summarising them, unless
    drop_invalid, in which case bad rows were dropped and are counted in `stats`."""

    def __init__(self, *, kind: str, drop_invalid: bool, source: str):
        self.kind, self.drop_invalid, self.source = kind, drop_invalid, source
        self.field = "video" if kind == "video" else "url"
        self.bad: dict[str, list] = {}
        self.rows = 0

    def __call__(self, rows: Iterator[dict]) -> Iterator[dict]:
        f = self.field
        for row in rows:
            self.rows += 1
            url, cap = row.get(f), row.get("caption")
            problem = None
            if not isinstance(url, str) or not url.strip():
                problem = f"empty {f}"
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
        summary = "; ".join(f"{len(v)} row(s) with {k} (first: row {v[0][0]}, {self.field}={v[0][1]!r})"
                            for k, v in self.bad.items())
        total = sum(len(v) for v in self.bad.values())
        if not self.drop_invalid:
            raise PrepInputError(f"{self.source}: {total} of {self.rows} rows are unusable: {summary}. "
                                 "Fix the list or pass --drop-invalid to skip them")
        if total == self.rows:
            raise PrepInputError(f"{self.source}: all {self.rows} rows are unusable: {summary}")
        print(f"prep: dropped {total} of {self.rows} rows: {summary}", file=log or sys.stderr)
