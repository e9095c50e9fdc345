"""Recipes: what each dataset's published list looks like, read as rows of url + caption.

Every reader yields plain dicts `{"url": str, "caption": str, ...}` (image recipes),
`{"video": path, "caption": str, "captions": [...], "video_id": str}` (video recipes) or
`{"caption": str}` (sentences: text-only shards, pipeline/data/prep/text_shards.py), streaming, so
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
| sentences         | text only (P-Former pre-training): caption lists, one per line (.txt,     |
|                   | .txt.gz), BLIP JSON lists (objects whose --caption-col is a string or a   |
|                   | list of strings, or plain strings), parquet/csv/tsv/jsonl (--caption-col);|
|                   | any number of --input, read in order; one sentence per sample             |

The list readers are in lists.py; the datasets with standard evaluation splits (COCO, Flickr30K,
MSR-VTT, MSVD) keep every split but --split out of the shards (the rules: formats/splits.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..formats.annotations import AnnotationError, Sample, read_captions
from ..formats.annotations import read_msrvtt as read_msrvtt_annotations
from ..formats.annotations import read_msvd as read_msvd_annotations
from ..formats.shards import VIDEO_EXTS
from ..formats.splits import SPLITS, split_in_name
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

__all__ = ["RECIPES", "Args", "PrepInputError", "Recipe", "iter_json_list", "iter_table"]


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
    return _read_tsv_or_table(args, "cc3m", "Train_GCC-training.tsv (caption<TAB>url)", ("caption", "url"))


def read_cc12m(args: Args) -> Iterator[dict]:
    return _read_tsv_or_table(args, "cc12m", "cc12m.tsv (url<TAB>caption)", ("url", "caption"))


def read_sbu(args: Args) -> Iterator[dict]:
    if len(args.inputs) == 1:
        p = check_readable(args.inputs[0])
        yield from rename_columns(iter_table(p), args.url_col, args.caption_col, p)
        return
    urls_p, caps_p = need_inputs(
        args,
        2,
        "sbu",
        "SBU_captioned_photo_dataset_urls.txt and SBU_captioned_photo_dataset_captions.txt (or one sbu.json)",
    )
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
            raise PrepInputError(
                f"{urls_p} and {caps_p} have different line counts ({longer} is longer than {n} lines)"
            )


def _read_capfilt(name: str, expected: str):
    def read(args: Args) -> Iterator[dict]:
        (p,) = need_inputs(args, 1, name, expected)
        yield from rename_columns(iter_table(p), args.url_col, args.caption_col, p)

    return read


# ------------------------------------------- datasets with standard splits (formats/annotations.py)
@contextmanager
def _as_input_error():
    """An annotation file the shared readers refuse is bad input here (exit 2, nothing downloaded)."""
    try:
        yield
    except AnnotationError as e:
        raise PrepInputError(str(e)) from None


def check_split_file(path: Path, split: str, recipe: str) -> None:
    named = split_in_name(path)
    if named is not None and named != split:
        raise PrepInputError(
            f"{path}: a {named} split file, but --split is {split}; pass the {split} file "
            f"(recipe {recipe}) or --split {named}"
        )


def _check_split_arg(args: Args) -> str:
    if args.split not in SPLITS:
        raise PrepInputError(f"--split {args.split!r}: expected one of {', '.join(SPLITS)}")
    return args.split


def _image_location(args: Args, recipe: str, need_root: bool) -> Path | None:
    root = Path(args.image_root).resolve() if args.image_root else None
    if root is not None and not root.is_dir():
        raise PrepInputError(f"--image-root {root}: not a folder")
    if root is None and need_root:
        raise PrepInputError(f"recipe {recipe} needs --image-root (the folder holding the images)")
    return root


def _image_rows(samples: list[Sample], root: Path | None, base_url: str) -> Iterator[dict]:
    missing = 0
    for n, s in enumerate(samples):
        if root is not None:
            f = root / s.media
            if n < 200 and not f.is_file():
                missing += 1
            url = f.as_uri()
        else:
            url = base_url.rstrip("/") + "/" + s.media.lstrip("/")
        if n == 199 and missing > 100:
            raise PrepInputError(
                f"--image-root {root}: {missing} of the first 200 images are missing "
                f"(e.g. {root / s.media}); point it at the folder holding them"
            )
        yield {"url": url, "caption": s.references[0] if s.references else "", "captions": s.references}


def _read_image_captions(args: Args, recipe: str, expected: str, need_root: bool, folder: str = ""):
    (p,) = need_inputs(args, 1, recipe, expected)
    split = _check_split_arg(args)
    root = _image_location(args, recipe, need_root)
    check_split_file(p, split, recipe)  # a per-split file must be the split asked for
    with _as_input_error():
        samples = read_captions(p, split, folder)  # a Karpathy file holds every split: only `split`
    yield from _image_rows(samples, root, args.base_url)


def read_coco_karpathy(args: Args) -> Iterator[dict]:
    return _read_image_captions(
        args,
        "coco_karpathy",
        "dataset_coco.json (Karpathy) or coco_karpathy_{train,val,test}.json (LAVIS/BLIP)",
        need_root=False,
    )


def read_flickr30k(args: Args) -> Iterator[dict]:  # no public image URLs: --image-root
    return _read_image_captions(
        args,
        "flickr30k",
        "dataset_flickr30k.json (Karpathy) or flickr30k_{train,val,test}.json (BLIP)",
        need_root=True,
        folder="flickr30k-images",
    )


def _video_root(args: Args, recipe: str) -> Path:
    if not args.video_root:
        raise PrepInputError(f"recipe {recipe} needs --video-root (the folder holding the video files)")
    root = Path(args.video_root)
    if not root.is_dir():
        raise PrepInputError(f"--video-root {root}: not a folder")
    return root


def _find_video(root: Path, name: str) -> Path:
    """root/name if it has a video extension, else the first root/name.EXT that exists (else .mp4)."""
    exts = tuple("." + e for e in VIDEO_EXTS)
    p = root / name
    if p.suffix.lower() in exts:
        return p
    return next((root / (name + e) for e in exts if (root / (name + e)).exists()), root / (name + exts[0]))


def _video_rows(samples: list[Sample], root: Path) -> Iterator[dict]:
    for s in samples:
        yield {
            "video": str(_find_video(root, s.media)),
            "video_id": Path(s.media).stem,
            "caption": s.references[0] if s.references else "",
            "captions": s.references,
        }


def read_msrvtt(args: Args) -> Iterator[dict]:
    (p,) = need_inputs(
        args,
        1,
        "msrvtt",
        "train_val_videodatainfo.json / test_videodatainfo.json, or "
        "LAVIS msrvtt_{split}.json / cap_{split}.json",
    )
    split = _check_split_arg(args)
    root = _video_root(args, "msrvtt")
    with _as_input_error():
        samples = read_msrvtt_annotations(p, split)
    yield from _video_rows(samples, root)


def read_msvd(args: Args) -> Iterator[dict]:
    """AllVideoDescriptions.txt + youtube_mapping.txt (the standard split needs the clip -> vidN map),
    or a LAVIS msvd_{split}.json (+ the mapping, or checked by its file name)."""
    what = "AllVideoDescriptions.txt (or LAVIS msvd_{split}.json) and youtube_mapping.txt"
    if len(args.inputs) not in (1, 2):
        raise PrepInputError(f"recipe msvd needs 1 or 2 --input files: {what}; got {len(args.inputs)}")
    paths = need_inputs(args, len(args.inputs), "msvd", what)
    split = _check_split_arg(args)
    root = _video_root(args, "msvd")
    p, mapping = paths[0], (paths[1] if len(paths) == 2 else None)
    if mapping is None and p.suffix != ".json":
        raise PrepInputError(
            f"recipe msvd: {p.name} holds every split; pass youtube_mapping.txt as a "
            "second --input so only the --split clips are read"
        )
    if mapping is None:  # a LAVIS list without the map: its name must say which split it holds
        if split_in_name(p) is None:
            raise PrepInputError(
                f"{p}: cannot tell which MSVD split it holds; pass youtube_mapping.txt "
                "as a second --input (the standard split is by vidN)"
            )
        check_split_file(p, split, "msvd")
    with _as_input_error():
        samples = read_msvd_annotations(p, split, mapping)
    yield from _video_rows(samples, root)


def read_sentences(args: Args) -> Iterator[dict]:
    """Sentences from caption lists and BLIP JSON lists (one row per sentence; a list of captions gives
    one row each). An empty or non-string caption is passed on for the validator to count."""
    if not args.inputs:
        raise PrepInputError(
            "recipe sentences needs --input FILE (.txt one sentence per line, a BLIP "
            ".json list, or parquet/csv/tsv/jsonl with --caption-col)"
        )
    for p in args.inputs:
        path = check_readable(p)
        if path.name.lower().removesuffix(".gz").endswith(".txt"):
            with open_text(path) as f:
                for line in f:
                    if line.strip():
                        yield {"caption": line.strip()}
            continue
        rows = iter_json_list(path) if path.name.lower().endswith(".json") else iter_table(path)
        for i, row in enumerate(rows):
            if isinstance(row, str):
                yield {"caption": row}
                continue
            if not isinstance(row, dict) or args.caption_col not in row:
                raise PrepInputError(
                    f"{path}: row {i + 1} has no {args.caption_col!r} "
                    f"({type(row).__name__}); pass --caption-col"
                )
            caption = row[args.caption_col]
            for c in caption if isinstance(caption, list) else [caption]:
                yield {"caption": c}


@dataclass
class Recipe:
    name: str
    kind: str  # image | video | text
    read: Callable[[Args], Iterator[dict]]
    inputs: str
    samples_per_shard: int = 10_000


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe(
            "coco_karpathy",
            "image",
            read_coco_karpathy,
            "--input dataset_coco.json | coco_karpathy_train.json [--image-root COCO2014 | --base-url URL] "
            "[--split train]",
            5_000,
        ),
        Recipe(
            "flickr30k",
            "image",
            read_flickr30k,
            "--input dataset_flickr30k.json --image-root flickr30k-images [--split train]",
            5_000,
        ),
        Recipe("cc3m", "image", read_cc3m, "--input Train_GCC-training.tsv (caption<TAB>url)"),
        Recipe("cc12m", "image", read_cc12m, "--input cc12m.tsv (url<TAB>caption)"),
        Recipe(
            "sbu",
            "image",
            read_sbu,
            "--input SBU_captioned_photo_dataset_urls.txt --input SBU_captioned_photo_dataset_captions.txt",
        ),
        Recipe(
            "laion115m_capfilt",
            "image",
            _read_capfilt("laion115m_capfilt", "laion_synthetic_filtered_large.json"),
            "--input laion_synthetic_filtered_large.json (BLIP CapFilt: list of url + caption)",
        ),
        Recipe(
            "ccs_capfilt",
            "image",
            _read_capfilt("ccs_capfilt", "ccs_synthetic_filtered_large.json"),
            "--input ccs_synthetic_filtered_large.json (BLIP CapFilt: list of url + caption)",
        ),
        Recipe(
            "msrvtt",
            "video",
            read_msrvtt,
            "--input train_val_videodatainfo.json --video-root MSRVTT/videos/all [--split train]",
            500,
        ),
        Recipe(
            "msvd",
            "video",
            read_msvd,
            "--input AllVideoDescriptions.txt --input youtube_mapping.txt --video-root YouTubeClips "
            "[--split train]",
            500,
        ),
        Recipe(
            "urls",
            "image",
            read_urls,
            "--input LIST.{parquet,csv,tsv,json,jsonl} [--url-col url] [--caption-col caption]",
        ),
        Recipe(
            "sentences",
            "text",
            read_sentences,
            "--input captions.txt | BLIP.json | LIST.{parquet,csv,"
            "tsv,jsonl} [--input ...] [--caption-col caption]",
            50_000,
        ),
    ]
}
