"""The datasets' published annotation files, read in one place for both sides: the prep recipes (the
training shards hold only --split) and the evaluation tasks (val or test). Standard splits: splits.py.

    read_captions(path, split)        COCO / Flickr30K / NoCaps captions, three layouts:
        LAVIS/BLIP list     [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": str | [str]}]
                            (one split per file: coco_karpathy_test.json, flickr30k_test.json)
        Karpathy            dataset_{coco,flickr30k}.json: {"images": [{filepath?, filename, split,
                            sentences: [{raw}]}]} holding every split; `split` picks one (restval: train)
        COCO-style          {"images": [{id, file_name, domain?}], "annotations": [{image_id, caption}]}
                            (NoCaps val)
    read_msrvtt(path, split)          train_val_videodatainfo.json / test_videodatainfo.json ({videos:
                                      [{video_id, split}], sentences: [{video_id, caption}]}) or a LAVIS
                                      list of {video, caption}; standard id ranges decide the split
    read_msvd(path, split, mapping)   AllVideoDescriptions.txt ("clip caption" lines) with the
                                      youtube_mapping.txt ("clip vidN") the split needs, or a LAVIS list
    read_video_captions(path, split, mapping)  whichever of the two a file is (eval's video tasks)
    read_vqa(questions, annotations, image_template)   official VQAv2 / OK-VQA files
    read_gqa(questions, image_template)                official GQA {qid: {imageId, question, answer}}
                                                       or a LAVIS list

Every reader returns Samples (id, media: the file name as the annotation gives it, references:
captions or human answers, question, meta). A file that cannot be used raises AnnotationError naming
the file and what was expected; prep and eval pass it on in their own words.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .splits import karpathy_split, msrvtt_split, msvd_split

LAVIS_CAPTIONS = "a LAVIS/BLIP list of {image, caption} or COCO-style {images, annotations}"


class AnnotationError(ValueError):
    """An annotation file that cannot be used: the one-line message names the file and why."""


@dataclass
class Sample:
    id: int | str
    media: str  # image/video file name as the annotation gives it (relative to the media folder)
    references: list[str]  # reference captions, or the human answers
    question: str | None = None
    meta: dict = field(default_factory=dict)  # domain, answer_type, question_type, image_id


def load_json(path: Path, role: str = "annotations"):
    try:
        if Path(path).suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise AnnotationError(f"{role} file {path}: not valid JSON ({e})") from None
    except OSError as e:
        raise AnnotationError(f"{role} file {path}: cannot read ({e.strerror})") from None


def id_from_filename(name: str) -> int | str:
    """COCO_val2014_000000391895.jpg -> 391895, 1007129816.jpg -> 1007129816, else the stem."""
    stem = Path(name).stem
    m = re.fullmatch(r"(?:.*_)?(\d+)", stem)
    return int(m.group(1)) if m else stem


def _caption_list(value, where: str) -> list[str]:
    caps = value if isinstance(value, list) else [value]
    if not all(isinstance(c, str) for c in caps):
        raise AnnotationError(f"{where}: captions must be strings, got {caps!r:.80}")
    return caps


# ------------------------------------------------------------------------------- image captions
def read_captions(path: Path, split: str | None = None, folder: str = "") -> list[Sample]:
    """Captions per image in any of the three layouts (module docstring). `split` selects the images
    of a Karpathy file (required there); `folder` is their folder when the file names none
    (Flickr30K: flickr30k-images)."""
    data = load_json(path)
    if isinstance(data, list):
        return _lavis_captions(data, path)
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return _coco_style_captions(data, path)
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and (not images or "split" in images[0]):
        return _karpathy_captions(images, path, split, folder)
    raise AnnotationError(
        f"{path}: expected {LAVIS_CAPTIONS}, or Karpathy's dataset_*.json "
        f"({{'images': [{{filename, split, sentences}}]}}), got a {type(data).__name__}"
    )


def _lavis_captions(rows: list, path: Path) -> list[Sample]:
    grouped: dict[str, Sample] = {}
    ids: dict = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            got = sorted(row) if isinstance(row, dict) else row
            raise AnnotationError(
                f"{path}: entry {i} lacks 'image' or 'caption' (expected {LAVIS_CAPTIONS}), got {got!r:.80}"
            )
        image = str(row["image"])
        if image not in grouped:
            sid = row.get("image_id", row.get("img_id", id_from_filename(image)))
            if sid in ids and ids[sid] != image:
                raise AnnotationError(f"{path}: images {ids[sid]} and {image} both have id {sid!r}")
            ids[sid] = image
            grouped[image] = Sample(sid, image, [])
        grouped[image].references += _caption_list(row["caption"], f"{path}: entry {i}")
    return list(grouped.values())


def _coco_style_captions(data: dict, path: Path) -> list[Sample]:
    images = {im["id"]: im for im in data["images"]}
    caps: dict = {}
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or "caption" not in ann:
            raise AnnotationError(f"{path}: annotations[{i}] lacks image_id or caption")
        if ann["image_id"] not in images:
            raise AnnotationError(
                f"{path}: annotations[{i}] names image_id {ann['image_id']!r}, which is "
                "not in 'images' (mismatched ids)"
            )
        caps.setdefault(ann["image_id"], []).append(str(ann["caption"]))
    out = []
    for iid, im in images.items():
        if iid not in caps:
            raise AnnotationError(f"{path}: image id {iid!r} ({im.get('file_name')}) has no captions")
        meta = {"domain": im["domain"]} if "domain" in im else {}
        out.append(Sample(iid, im.get("file_name") or str(iid), caps[iid], meta=meta))
    return out


def _karpathy_captions(images: list, path: Path, split: str | None, folder: str) -> list[Sample]:
    if split is None:
        raise AnnotationError(f"{path}: Karpathy's file holds every split; name the one to read")
    out = []
    for im in images:
        if karpathy_split(im.get("split", "")) != split:
            continue
        name = "/".join(p for p in (im.get("filepath") or folder, im["filename"]) if p)
        out.append(Sample(id_from_filename(name), name, [s.get("raw", "") for s in im.get("sentences", [])]))
    if not out:
        raise AnnotationError(f"{path}: no images with split {split!r}")
    return out


# ------------------------------------------------------------------------------- video captions
def _keep_split(samples: list[Sample], split: str, split_of, path: Path, what: str) -> list[Sample]:
    """Samples of `split` by the standard rule (ids the rule does not know are kept); an error if a
    file held samples but none of that split."""
    kept = [s for s in samples if split_of(s) in (split, None)]
    if samples and not kept:
        found = sorted({str(split_of(s)) for s in samples})
        raise AnnotationError(f"{path}: no {what} of split {split!r} (it holds {', '.join(found)})")
    return kept


def _lavis_videos(rows: list, path: Path) -> list[Sample]:
    grouped: dict[str, Sample] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "video" not in row or "caption" not in row:
            raise AnnotationError(f"{path}: entry {i} lacks 'video' or 'caption'")
        video = str(row["video"])
        grouped.setdefault(video, Sample(row.get("video_id", Path(video).stem), video, []))
        grouped[video].references += _caption_list(row["caption"], f"{path}: entry {i}")
    return list(grouped.values())


def read_msrvtt(path: Path, split: str) -> list[Sample]:
    """MSR-VTT's videodatainfo or a LAVIS list, only `split` (the videos' split field when present, and
    the standard id ranges: video0-6512 train, 6513-7009 val, 7010-9999 test)."""
    data = load_json(path)
    if isinstance(data, dict) and "sentences" in data:
        videos = data.get("videos") or [
            {"video_id": v} for v in dict.fromkeys(s.get("video_id") for s in data["sentences"])
        ]
        want = {"val": "validate"}.get(split, split)
        keep = [v["video_id"] for v in videos if v.get("split", want) == want]
        if not keep:
            raise AnnotationError(f"{path}: no videos with split {want!r}")
        caps: dict[str, list[str]] = {v: [] for v in keep}
        for s in data["sentences"]:
            if s.get("video_id") in caps:
                caps[s["video_id"]].append(str(s.get("caption", "")))
        empty = [v for v, c in caps.items() if not c]
        if empty:
            raise AnnotationError(f"{path}: {len(empty)} videos have no sentences (e.g. {empty[:3]})")
        samples = [Sample(v, v, c) for v, c in caps.items()]
    elif isinstance(data, list):
        samples = _lavis_videos(data, path)
    else:
        raise AnnotationError(
            f"{path}: expected MSR-VTT videodatainfo (videos + sentences) or a LAVIS list "
            "of {video, caption}"
        )
    return _keep_split(samples, split, lambda s: msrvtt_split(s.media), path, "videos")


def read_msvd_mapping(path: Path | None) -> dict[str, str]:
    """youtube_mapping.txt ("-4wsuPCjDBc_5_15 vid1" lines) -> {clip name: "vidN"}."""
    if path is None or not Path(path).is_file():
        raise AnnotationError(
            f"MSVD needs the clip -> vidN mapping file (youtube_mapping.txt) for the "
            f"standard split; not found: {path}"
        )
    out = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    if not out:
        raise AnnotationError(f"{path}: no 'clip vidN' lines (expected MSVD youtube_mapping.txt)")
    return out


def read_msvd(path: Path, split: str, mapping: Path | None) -> list[Sample]:
    """AllVideoDescriptions.txt (every split: the mapping is required) or a LAVIS msvd list (filtered by
    the mapping when given; otherwise taken to be of `split`, which the caller vouches for). Samples are
    named by vidN (id) and the clip (media); vid1-1200 train, 1201-1300 val, 1301-1970 test."""
    if Path(path).suffix == ".txt":
        if mapping is None or not Path(mapping).is_file():
            raise AnnotationError(
                f"MSVD {Path(path).name} needs the clip -> vidN mapping file "
                f"(youtube_mapping.txt) for the standard split; not found: {mapping}"
            )
        clips: dict[str, list[str]] = {}
        for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                clip, _, cap = line.partition(" ")
                clips.setdefault(clip, []).append(cap.strip())
        samples = [Sample(clip, clip, caps) for clip, caps in clips.items()]
    else:
        data = load_json(path)
        if not isinstance(data, list):
            raise AnnotationError(
                f"{path}: expected MSVD AllVideoDescriptions.txt or a LAVIS list of {{video, caption}}"
            )
        samples = [Sample(Path(s.media).stem, s.media, s.references) for s in _lavis_videos(data, path)]
        if mapping is None:
            return samples
    clip2vid = read_msvd_mapping(mapping)
    unknown = [s.id for s in samples if s.id not in clip2vid]
    if unknown:
        raise AnnotationError(
            f"{path}: {len(unknown)} clip(s) are not in {mapping} (mismatched ids; e.g. {unknown[0]})"
        )
    for s in samples:
        s.id = clip2vid[s.id]
    return _keep_split(samples, split, lambda s: msvd_split(s.id), path, "clips")


def read_video_captions(path: Path, split: str = "test", mapping: Path | None = None) -> list[Sample]:
    """An MSVD .txt (with its mapping), MSR-VTT videodatainfo, or a LAVIS list of {video, caption}."""
    if Path(path).suffix == ".txt":
        return read_msvd(path, split, mapping)
    return read_msrvtt(path, split)


# ------------------------------------------------------------------------------------------ VQA
def _format_template(template: str, image_id) -> str:
    try:
        return template.format(image_id=image_id)
    except (ValueError, KeyError, IndexError) as e:
        raise AnnotationError(
            f"image_template {template!r} cannot format image_id {image_id!r} "
            f"({type(e).__name__}: {e}); use {{image_id}}"
        ) from None


def read_vqa(questions: Path, annotations: Path, image_template: str) -> list[Sample]:
    """Official VQA files: `{"questions": [{question_id, image_id, question}]}` and
    `{"annotations": [{question_id, image_id, answers: [{answer}], answer_type, question_type}]}`."""
    q = load_json(questions, "questions")
    a = load_json(annotations, "annotations")
    if not isinstance(q, dict) or "questions" not in q:
        raise AnnotationError(
            f"{questions}: expected the official VQA questions file "
            "({'questions': [{question_id, image_id, question}]})"
        )
    if not isinstance(a, dict) or "annotations" not in a:
        raise AnnotationError(
            f"{annotations}: expected the official VQA annotations file "
            "({'annotations': [{question_id, answers, ...}]})"
        )
    amap = {ann["question_id"]: ann for ann in a["annotations"]}
    qids = [qq["question_id"] for qq in q["questions"]]
    missing = [i for i in qids if i not in amap]
    extra = set(amap) - set(qids)
    if missing or extra:
        raise AnnotationError(
            f"{questions} and {annotations} do not match (mismatched ids): "
            f"{len(missing)} questions without annotation (e.g. {missing[:3]}), "
            f"{len(extra)} annotations without question (e.g. {sorted(extra)[:3]})"
        )
    if len(set(qids)) != len(qids):
        raise AnnotationError(f"{questions}: duplicate question ids")
    out = []
    for qq in q["questions"]:
        ann = amap[qq["question_id"]]
        if ann.get("image_id", qq["image_id"]) != qq["image_id"]:
            raise AnnotationError(
                f"{questions}: question {qq['question_id']}: image_id {qq['image_id']} in "
                f"questions, {ann['image_id']} in annotations"
            )
        answers = [str(x["answer"]) for x in ann.get("answers", [])]
        if not answers:
            raise AnnotationError(f"{annotations}: question {qq['question_id']} has no answers")
        out.append(
            Sample(
                qq["question_id"],
                _format_template(image_template, qq["image_id"]),
                answers,
                question=qq["question"],
                meta={
                    "image_id": qq["image_id"],
                    "answer_type": ann.get("answer_type"),
                    "question_type": ann.get("question_type"),
                },
            )
        )
    return out


def read_gqa(questions: Path, image_template: str) -> list[Sample]:
    """Official GQA `{qid: {imageId, question, answer, ...}}` or a LAVIS list of
    `{question_id, image, question, answer}`."""
    q = load_json(questions, "questions")
    out = []
    if isinstance(q, dict):
        for qid, row in q.items():
            if not isinstance(row, dict) or not {"imageId", "question", "answer"} <= set(row):
                raise AnnotationError(
                    f"{questions}: question {qid} lacks imageId, question or answer "
                    "(expected the official GQA *_questions.json)"
                )
            out.append(
                Sample(
                    qid,
                    _format_template(image_template, row["imageId"]),
                    [str(row["answer"])],
                    question=row["question"],
                    meta={"image_id": row["imageId"]},
                )
            )
    elif isinstance(q, list):
        for i, row in enumerate(q):
            if not isinstance(row, dict) or not {"question_id", "image", "question", "answer"} <= set(row):
                raise AnnotationError(f"{questions}: entry {i} lacks question_id, image, question or answer")
            ans = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
            out.append(Sample(row["question_id"], str(row["image"]), [str(ans)], question=row["question"]))
    else:
        raise AnnotationError(f"{questions}: expected GQA questions (a dict by question id or a list)")
    if len({s.id for s in out}) != len(out):
        raise AnnotationError(f"{questions}: duplicate question ids")
    return out
