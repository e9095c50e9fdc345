"""Recipes: what each dataset's published list looks like, read as rows of url + caption.

Every reader yields plain dicts `{"url": str, "caption": str, ...}` (image recipes) or
`{"video": path, "caption": str, "captions": [...], "video_id": str}` (video recipes), streaming, so
lists of 10^8 rows never sit in memory. `validate_rows` checks them before anything is downloaded.

| recipe            | --input (as published)                                                   |
|-------------------|---------------------------------------------------------------------------|
| coco_karpathy     | Karpathy's dataset_coco.json (split field), or LAVIS/BLIP                 |
|                   | coco_karpathy_{train,val,test}.json; images from --image-root (local COCO |
|                   | 2014 folders) or --base-url; only --split (train = train + restval)       |
| flickr30k         | Karpathy's dataset_flickr30k.json, or BLIP flickr30k_{split}.json;        |
|                   | images from --image-root (flickr30k-images); only --split                 |
| cc3m              | Train_GCC-training.tsv / Validation_GCC-1.1.0-Validation.tsv: caption<TAB>url |
| cc12m             | cc12m.tsv: url<TAB>caption                                                |
| sbu               | SBU_captioned_photo_dataset_urls.txt + ..._captions.txt (two --input), or |
|                   | BLIP's sbu.json (list of url + caption)                                    |
| laion115m_capfilt | BLIP's laion_synthetic_filtered_large.json (JSON list of url + caption)   |
| ccs_capfilt       | BLIP's ccs_synthetic_filtered_large.json (JSON list of url + caption)     |
| msrvtt            | train_val_videodatainfo.json / test_videodatainfo.json (videos+sentences),|
|                   | or LAVIS msrvtt_{split}.json; videos from --video-root (videoNNNN.mp4);   |
|                   | only --split (standard id ranges)                                          |
| msvd              | AllVideoDescriptions.txt ("clip_id caption" lines) + youtube_mapping.txt, |
|                   | or LAVIS msvd_{split}.json; videos from --video-root (YouTubeClips/*.avi);|
|                   | only --split (vid1-1200 / 1201-1300 / 1301-1970)                           |
| urls              | any parquet/csv/tsv/json/jsonl list with --url-col and --caption-col      |

The list readers are in lists.py; the datasets with standard evaluation splits (COCO, Flickr30K,
MSR-VTT, MSVD) are read in splits.py, which keeps every split but --split out of the shards.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .lists import (
    Args,
    PrepInputError,
    check_readable,
    iter_json_list,
    iter_table,
    iter_tsv_pairs,
    need_inputs,
    open_text,
    rename_columns,
)
from .splits import read_coco_karpathy, read_flickr30k, read_msrvtt, read_msvd

_check_readable = check_readable  # the name prep.py imports
__all__ = ["RECIPES", "Args", "PrepInputError", "Recipe", "RowValidator", "iter_json_list", "iter_table"]



def read_urls(args: Args) -> Iterator[dict]:
    if not args.inputs:
        raise PrepInputError("recipe urls needs --input FILE (parquet/csv/tsv/json/jsonl with url + caption)")
    for p in args.inputs:
        yield from rename_columns(iter_table(p), args.url_col, args.caption_col, p)


def _read_tsv_or_table(args: Args, recipe: str, expected: str, tsv_columns: tuple) -> Iterator[dict]:
    """The published TSV (no header, `tsv_columns` order), or the same list as a table."""
    (p,) = need_inputs(args, 1, recipe, expected)
    if p.suffix in (".parquet", ".json", ".jsonl", ".csv"):
        yield from rename_columns(iter_table(p), args.url_col, args.caption_col, p)
        return
    yield from iter_tsv_pairs(p, tsv_columns)


def read_cc3m(args: Args) -> Iterator[dict]:
    return _read_tsv_or_table(args, "cc3m", "Train_GCC-training.tsv (caption<TAB>url)",
                              ("caption", "url"))


def read_cc12m(args: Args) -> Iterator[dict]:
    return _read_tsv_or_table(args, "cc12m", "cc12m.tsv (url<TAB>caption)", ("url", "caption"))


def read_sbu(args: Args) -> Iterator[dict]:
    if len(args.inputs) == 1:
        p = check_readable(args.inputs[0])
        yield from rename_columns(iter_table(p), args.url_col, args.caption_col, p)
        return
    urls_p, caps_p = need_inputs(args, 2, "sbu", "SBU_captioned_photo_dataset_urls.txt and "
                                  "SBU_captioned_photo_dataset_captions.txt (or one sbu.json)")
    with open_text(urls_p) as fu, open_text(caps_p) as fc:
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
        (p,) = need_inputs(args, 1, name, expected)
        yield from rename_columns(iter_table(p), args.url_col, args.caption_col, p)
    return read


@dataclass
class Recipe:
    name: str
    kind: str  # image | video
    read: Callable[[Args], Iterator[dict]]
    inputs: str
    samples_per_shard: int = 10_000


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("coco_karpathy", "image", read_coco_karpathy,
           "--input dataset_coco.json | coco_karpathy_train.json [--image-root COCO2014 | --base-url URL] "
           "[--split train]", 5_000),
    Recipe("flickr30k", "image", read_flickr30k,
           "--input dataset_flickr30k.json --image-root flickr30k-images [--split train]", 5_000),
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
           "--input AllVideoDescriptions.txt --input youtube_mapping.txt --video-root YouTubeClips "
           "[--split train]", 500),
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
