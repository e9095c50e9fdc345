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
MSR-VTT, MSVD) keep every split but --split out of the shards (the rules: formats/splits.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..formats.splits import SPLITS, karpathy_split, msrvtt_split, msvd_split, split_in_name
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


# ------------------------------------------------- datasets with standard splits (formats/splits.py)
def read_msvd_mapping(path: str | Path) -> dict[str, str]:
    """youtube_mapping.txt ("-4wsuPCjDBc_5_15 vid1" lines) -> {clip name: "vidN"}."""
    out = {}
    with open_text(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
    if not out:
        raise PrepInputError(f"{path}: no 'clip vidN' lines (expected MSVD youtube_mapping.txt)")
    return out


def check_split_file(path: Path, split: str, recipe: str) -> None:
    named = split_in_name(path)
    if named is not None and named != split:
        raise PrepInputError(f"{path}: a {named} split file, but --split is {split}; pass the {split} file "
                             f"(recipe {recipe}) or --split {named}")


def _check_split_arg(args: Args) -> str:
    if args.split not in SPLITS:
        raise PrepInputError(f"--split {args.split!r}: expected one of {', '.join(SPLITS)}")
    return args.split


def _starts_with_brace(path: Path) -> bool:
    with open_text(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("{")


# -------------------------------------------------------------------------------- images
def _image_location(args: Args, recipe: str, need_root: bool) -> Path | None:
    root = Path(args.image_root).resolve() if args.image_root else None
    if root is not None and not root.is_dir():
        raise PrepInputError(f"--image-root {root}: not a folder")
    if root is None and need_root:
        raise PrepInputError(f"recipe {recipe} needs --image-root (the folder holding the images)")
    return root


def _image_rows(grouped: dict[str, list[str]], root: Path | None, base_url: str) -> Iterator[dict]:
    missing = 0
    for n, (image, caps) in enumerate(grouped.items()):
        if root is not None:
            f = root / image
            if n < 200 and not f.is_file():
                missing += 1
            url = f.as_uri()
        else:
            url = base_url.rstrip("/") + "/" + image.lstrip("/")
        if n == 199 and missing > 100:
            raise PrepInputError(f"--image-root {root}: {missing} of the first 200 images are missing "
                                 f"(e.g. {root / image}); point it at the folder holding them")
        yield {"url": url, "caption": caps[0] if caps else "", "captions": caps}


def _karpathy_dataset(path: Path, split: str, folder: str = "") -> dict[str, list[str]]:
    """Karpathy's dataset_{coco,flickr30k}.json: {"images": [{filepath?, filename, split,
    sentences: [{raw}]}]} -> {image path: captions} of one split."""
    with open_text(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise PrepInputError(f"{path}: not valid JSON ({e})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or (images and "split" not in images[0]):
        raise PrepInputError(f"{path}: expected Karpathy's dataset_*.json ({{'images': [{{filename, split, "
                             "sentences}}]}}) or a LAVIS/BLIP per-split list")
    grouped: dict[str, list[str]] = {}
    for im in images:
        if karpathy_split(im.get("split", "")) != split:
            continue
        name = "/".join(p for p in (im.get("filepath") or folder, im["filename"]) if p)
        grouped[name] = [s.get("raw", "") for s in im.get("sentences", [])]
    if not grouped:
        raise PrepInputError(f"{path}: no images with split {split!r}")
    return grouped


def _lavis_image_list(path: Path, recipe: str) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for i, row in enumerate(iter_json_list(path)):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            got = sorted(row) if isinstance(row, dict) else row
            raise PrepInputError(f"{path}: entry {i} lacks 'image' or 'caption' (expected {recipe} entries "
                                 f"as LAVIS/BLIP write them), got {got!r}")
        caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        grouped.setdefault(row["image"], []).extend(c if isinstance(c, str) else "" for c in caps)
    return grouped


def read_coco_karpathy(args: Args) -> Iterator[dict]:
    (p,) = need_inputs(args, 1, "coco_karpathy", "dataset_coco.json (Karpathy) or "
                       "coco_karpathy_{train,val,test}.json (LAVIS/BLIP)")
    split = _check_split_arg(args)
    root = _image_location(args, "coco_karpathy", need_root=False)
    if _starts_with_brace(p):
        grouped = _karpathy_dataset(p, split)
    else:
        check_split_file(p, split, "coco_karpathy")
        grouped = _lavis_image_list(p, "coco_karpathy")
    yield from _image_rows(grouped, root, args.base_url)


def read_flickr30k(args: Args) -> Iterator[dict]:
    (p,) = need_inputs(args, 1, "flickr30k", "dataset_flickr30k.json (Karpathy) or "
                       "flickr30k_{train,val,test}.json (BLIP)")
    split = _check_split_arg(args)
    root = _image_location(args, "flickr30k", need_root=True)  # no public image URLs
    if _starts_with_brace(p):
        grouped = _karpathy_dataset(p, split, folder="flickr30k-images")
    else:
        check_split_file(p, split, "flickr30k")
        grouped = _lavis_image_list(p, "flickr30k")
    yield from _image_rows(grouped, root, args.base_url)


# --------------------------------------------------------------------------------- video
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


def _lavis_video_pairs(path: Path, data: list) -> list[tuple[str, str]]:
    pairs = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or "video" not in row or "caption" not in row:
            raise PrepInputError(f"{path}: entry {i} lacks 'video' or 'caption'")
        caps = row["caption"] if isinstance(row["caption"], list) else [row["caption"]]
        pairs += [(str(row["video"]), c) for c in caps]
    return pairs


def _keep_split(pairs, split_of, split: str, path: Path, what: str) -> list[tuple[str, str]]:
    kept = [(v, c) for v, c in pairs if split_of(v) == split]
    if not kept:
        found = sorted({str(split_of(v)) for v, _ in pairs})
        raise PrepInputError(f"{path}: no {what} of split {split!r} (it holds {', '.join(found)})")
    return kept


def read_msrvtt(args: Args) -> Iterator[dict]:
    (p,) = need_inputs(args, 1, "msrvtt", "train_val_videodatainfo.json / test_videodatainfo.json, or "
                       "LAVIS msrvtt_{split}.json / cap_{split}.json")
    split = _check_split_arg(args)
    root = _video_root(args, "msrvtt")
    with open_text(p) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise PrepInputError(f"{p}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "sentences" in data:
        want = {"val": "validate"}.get(split, split)
        keep = {v["video_id"] for v in data.get("videos", []) if v.get("split", want) == want}
        if not keep:
            raise PrepInputError(f"{p}: no videos with split {want!r}")
        pairs = [(s["video_id"], s.get("caption", "")) for s in data["sentences"] if s["video_id"] in keep]
    elif isinstance(data, list):
        pairs = _lavis_video_pairs(p, data)
    else:
        raise PrepInputError(f"{p}: expected MSR-VTT videodatainfo (videos + sentences) or a LAVIS list")
    yield from _group_videos(_keep_split(pairs, msrvtt_split, split, p, "videos"), root)


def read_msvd(args: Args) -> Iterator[dict]:
    """AllVideoDescriptions.txt + youtube_mapping.txt (the standard split needs the clip -> vidN map),
    or a LAVIS msvd_{split}.json (+ the mapping, or checked by its file name)."""
    what = "AllVideoDescriptions.txt (or LAVIS msvd_{split}.json) and youtube_mapping.txt"
    if len(args.inputs) not in (1, 2):
        raise PrepInputError(f"recipe msvd needs 1 or 2 --input files: {what}; got {len(args.inputs)}")
    paths = need_inputs(args, len(args.inputs), "msvd", what)
    split = _check_split_arg(args)
    root = _video_root(args, "msvd")
    p = paths[0]
    mapping = read_msvd_mapping(paths[1]) if len(paths) == 2 else None
    if p.suffix == ".json":
        pairs = [(Path(v).stem, c) for v, c in _lavis_video_pairs(p, list(iter_json_list(p)))]
        if mapping is None:
            if split_in_name(p) is None:
                raise PrepInputError(f"{p}: cannot tell which MSVD split it holds; pass youtube_mapping.txt "
                                     "as a second --input (the standard split is by vidN)")
            check_split_file(p, split, "msvd")
            yield from _group_videos(pairs, root)
            return
    else:
        if mapping is None:
            raise PrepInputError(f"recipe msvd: {p.name} holds every split; pass youtube_mapping.txt as a "
                                 "second --input so only the --split clips are read")
        pairs = []
        with open_text(p) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    vid, _, cap = line.partition(" ")
                    pairs.append((vid, cap))
    unknown = sorted({v for v, _ in pairs if v not in mapping})
    if unknown:
        raise PrepInputError(f"{p}: {len(unknown)} clips are not in {paths[1]} (e.g. {unknown[0]})")
    yield from _group_videos(_keep_split(pairs, lambda v: msvd_split(mapping[v]), split, p, "clips"), root)


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
