"""Evaluation sets: annotations in the datasets' public formats, media from local folders or shards.

Expected files (defaults relative to `eval.data_root`; override any, absolute or relative to
data_root, with `--set eval.datasets.TASK.ROLE=PATH`):

caption tasks (kind caption)
  coco_karpathy_test / coco_karpathy_val
    annotations  coco/annotations/coco_karpathy_{test,val}.json: LAVIS/BLIP list of
                 {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}
    images       coco/images (holding val2014/)
  nocaps_val
    annotations  nocaps/annotations/nocaps_val_4500_captions.json: official COCO-style
                 {"images": [{id, file_name, domain}], "annotations": [{image_id, caption}]}
                 (or a LAVIS list); per-domain CIDEr/SPICE when images carry a domain
    images       nocaps/images (file_name inside)
  flickr30k_test
    annotations  flickr30k/annotations/flickr30k_test.json: BLIP list of
                 {"image": "flickr30k-images/1007129816.jpg", "caption": [5 captions]}
    images       flickr30k/images
VQA tasks (kind vqa; official VQA json files)
  vqav2_val
    questions    vqav2/v2_OpenEnded_mscoco_val2014_questions.json
    annotations  vqav2/v2_mscoco_val2014_annotations.json
    images       coco/images, image_template val2014/COCO_val2014_{image_id:012d}.jpg
  okvqa_test (OK-VQA's test split is COCO val2014)
    questions    okvqa/OpenEnded_mscoco_val2014_questions.json
    annotations  okvqa/mscoco_val2014_annotations.json
    images       as vqav2_val
  gqa_testdev (kind gqa)
    questions    gqa/testdev_balanced_questions.json: official {qid: {imageId, question, answer}}
                 (or a LAVIS list of {question_id, image, question, answer})
    images       gqa/images, image_template {image_id}.jpg
video tasks (kind video_caption)
  msrvtt_test
    annotations  msrvtt/test_videodatainfo.json: official {videos: [{video_id, split}],
                 sentences: [{video_id, caption}]} (split "test"), or a LAVIS list of {video, caption}
    videos       msrvtt/videos (video7010.mp4, ...)
  msvd_test
    annotations  msvd/AllVideoDescriptions.txt ("clip caption" lines), or a LAVIS list json
    mapping      msvd/youtube_mapping.txt ("clip vidN"): test = vid1301..vid1970 (standard split)
    videos       msvd/YouTubeClips (*.avi)

Instead of `images`/`videos` a task may name `shards` (brace pattern, `::`-joined patterns or a
manifest.json of local .tar shards, e.g. written by `simvlg prep`): a media file is found by the
sample key or the basename/stem of the `url`/`image`/`file_name`/`video`/`video_id` in its .json.

A custom task is any name with `eval.datasets.NAME.kind` set (caption, vqa, gqa, video_caption) and
its files, e.g. `--set eval.datasets.heldout.kind=caption --set eval.datasets.heldout.annotations=
a.json --set eval.datasets.heldout.images=imgs`. Every problem is one EvalDataError line naming the
task, the file and what was expected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline.data.formats.splits import msvd_split

KINDS = ("caption", "vqa", "gqa", "video_caption")
ROLES = ("annotations", "questions", "images", "videos", "shards", "image_template", "mapping", "kind")
VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")
COCO_VAL_TEMPLATE = "val2014/COCO_val2014_{image_id:012d}.jpg"


class EvalDataError(ValueError):
    """An evaluation set that cannot be used: the one-line message says which file and why."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    files: dict[str, str]  # role -> default path relative to data_root
    expects: dict[str, str] = field(default_factory=dict)  # role -> what the file should be


_LAVIS_CAPS = "a LAVIS/BLIP list of {image, caption} or COCO-style {images, annotations}"
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("coco_karpathy_test", "caption",
             {"annotations": "coco/annotations/coco_karpathy_test.json", "images": "coco/images"},
             {"annotations": "LAVIS/BLIP coco_karpathy_test.json", "images": "COCO 2014 images (val2014/)"}),
    TaskSpec("coco_karpathy_val", "caption",
             {"annotations": "coco/annotations/coco_karpathy_val.json", "images": "coco/images"},
             {"annotations": "LAVIS/BLIP coco_karpathy_val.json", "images": "COCO 2014 images (val2014/)"}),
    TaskSpec("nocaps_val", "caption",
             {"annotations": "nocaps/annotations/nocaps_val_4500_captions.json", "images": "nocaps/images"},
             {"annotations": "nocaps_val_4500_captions.json (COCO-style images + annotations)",
              "images": "NoCaps val images (Open Images)"}),
    TaskSpec("flickr30k_test", "caption",
             {"annotations": "flickr30k/annotations/flickr30k_test.json", "images": "flickr30k/images"},
             {"annotations": "BLIP flickr30k_test.json", "images": "flickr30k-images/"}),
    TaskSpec("vqav2_val", "vqa",
             {"questions": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
              "annotations": "vqav2/v2_mscoco_val2014_annotations.json", "images": "coco/images",
              "image_template": COCO_VAL_TEMPLATE},
             {"questions": "official VQAv2 val questions", "annotations": "official VQAv2 val annotations",
              "images": "COCO 2014 images (val2014/)"}),
    TaskSpec("okvqa_test", "vqa",
             {"questions": "okvqa/OpenEnded_mscoco_val2014_questions.json",
              "annotations": "okvqa/mscoco_val2014_annotations.json", "images": "coco/images",
              "image_template": COCO_VAL_TEMPLATE},
             {"questions": "OK-VQA OpenEnded_mscoco_val2014_questions.json",
              "annotations": "OK-VQA mscoco_val2014_annotations.json",
              "images": "COCO 2014 images (val2014/)"}),
    TaskSpec("gqa_testdev", "gqa",
             {"questions": "gqa/testdev_balanced_questions.json", "images": "gqa/images",
              "image_template": "{image_id}.jpg"},
             {"questions": "GQA testdev_balanced_questions.json", "images": "GQA images/"}),
    TaskSpec("msrvtt_test", "video_caption",
             {"annotations": "msrvtt/test_videodatainfo.json", "videos": "msrvtt/videos"},
             {"annotations": "MSR-VTT test_videodatainfo.json (or a LAVIS list)",
              "videos": "MSR-VTT videos (videoNNNN.mp4)"}),
    TaskSpec("msvd_test", "video_caption",
             {"annotations": "msvd/AllVideoDescriptions.txt", "mapping": "msvd/youtube_mapping.txt",
              "videos": "msvd/YouTubeClips"},
             {"annotations": "MSVD AllVideoDescriptions.txt (or a LAVIS list json)",
              "mapping": "MSVD youtube_mapping.txt (clip name -> vidN)",
              "videos": "MSVD YouTubeClips/*.avi"}),
]}


@dataclass
class Sample:
    id: int | str
    media: str  # file name (relative to the media root) or shard lookup name
    references: list[str]  # reference captions, or the human answers
    question: str | None = None
    meta: dict = field(default_factory=dict)  # domain, answer_type, question_type, image_id


# ------------------------------------------------------------------------------------ reading
def _load_json(path: Path, task: str, role: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise EvalDataError(f"{task}: {role} file {path}: not valid JSON ({e})") from None
    except OSError as e:
        raise EvalDataError(f"{task}: {role} file {path}: cannot read ({e.strerror})") from None


def _id_from_filename(name: str) -> int | str:
    """COCO_val2014_000000391895.jpg -> 391895, 1007129816.jpg -> 1007129816, else the stem."""
    stem = Path(name).stem
    m = re.fullmatch(r"(?:.*_)?(\d+)", stem)
    return int(m.group(1)) if m else stem


def _as_caption_list(value, where: str) -> list[str]:
    caps = value if isinstance(value, list) else [value]
    if not all(isinstance(c, str) for c in caps):
        raise EvalDataError(f"{where}: captions must be strings, got {caps!r:.80}")
    return caps


def read_caption_annotations(path: Path, task: str = "captions") -> list[Sample]:
    """LAVIS/BLIP list (`[{"image", "caption": str | [str]}, ...]`, grouped by image) or a COCO-style
    caption file (`{"images": [{id, file_name}], "annotations": [{image_id, caption}]}`)."""
    data = _load_json(path, task, "annotations")
    where = f"{task}: {path}"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        images = {im["id"]: im for im in data["images"]}
        caps: dict = {}
        for i, ann in enumerate(data["annotations"]):
            if "image_id" not in ann or "caption" not in ann:
                raise EvalDataError(f"{where}: annotations[{i}] lacks image_id or caption")
            if ann["image_id"] not in images:
                raise EvalDataError(f"{where}: annotations[{i}] names image_id {ann['image_id']!r}, which is "
                                    "not in 'images' (mismatched ids)")
            caps.setdefault(ann["image_id"], []).append(str(ann["caption"]))
        out = []
        for iid, im in images.items():
            if iid not in caps:
                raise EvalDataError(f"{where}: image id {iid!r} ({im.get('file_name')}) has no captions")
            meta = {"domain": im["domain"]} if "domain" in im else {}
            out.append(Sample(iid, im.get("file_name") or str(iid), caps[iid], meta=meta))
        return out
    if not isinstance(data, list):
        raise EvalDataError(f"{where}: expected {_LAVIS_CAPS}, got a {type(data).__name__}")
    grouped: dict[str, Sample] = {}
    ids: dict = {}
    for i, row in enumerate(data):
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise EvalDataError(f"{where}: entry {i} lacks 'image' or 'caption' (expected {_LAVIS_CAPS})")
        image = str(row["image"])
        if image not in grouped:
            sid = row.get("image_id", row.get("img_id", _id_from_filename(image)))
            if sid in ids and ids[sid] != image:
                raise EvalDataError(f"{where}: images {ids[sid]} and {image} both have id {sid!r}")
            ids[sid] = image
            grouped[image] = Sample(sid, image, [])
        grouped[image].references += _as_caption_list(row["caption"], f"{where}: entry {i}")
    return list(grouped.values())


def read_vqa(questions: Path, annotations: Path, image_template: str, task: str = "vqa") -> list[Sample]:
    """Official VQA files: `{"questions": [{question_id, image_id, question}]}` and
    `{"annotations": [{question_id, image_id, answers: [{answer}], answer_type, question_type}]}`."""
    q = _load_json(questions, task, "questions")
    a = _load_json(annotations, task, "annotations")
    if not isinstance(q, dict) or "questions" not in q:
        raise EvalDataError(f"{task}: {questions}: expected the official VQA questions file "
                            "({'questions': [{question_id, image_id, question}]})")
    if not isinstance(a, dict) or "annotations" not in a:
        raise EvalDataError(f"{task}: {annotations}: expected the official VQA annotations file "
                            "({'annotations': [{question_id, answers, ...}]})")
    amap = {ann["question_id"]: ann for ann in a["annotations"]}
    qids = [qq["question_id"] for qq in q["questions"]]
    missing = [i for i in qids if i not in amap]
    extra = set(amap) - set(qids)
    if missing or extra:
        raise EvalDataError(f"{task}: questions and annotations do not match (mismatched ids): "
                            f"{len(missing)} questions without annotation (e.g. {missing[:3]}), "
                            f"{len(extra)} annotations without question (e.g. {sorted(extra)[:3]})")
    if len(set(qids)) != len(qids):
        raise EvalDataError(f"{task}: {questions}: duplicate question ids")
    out = []
    for qq in q["questions"]:
        ann = amap[qq["question_id"]]
        if ann.get("image_id", qq["image_id"]) != qq["image_id"]:
            raise EvalDataError(f"{task}: question {qq['question_id']}: image_id {qq['image_id']} in "
                                f"questions, {ann['image_id']} in annotations")
        answers = [str(x["answer"]) for x in ann.get("answers", [])]
        if not answers:
            raise EvalDataError(f"{task}: question {qq['question_id']} has no answers in {annotations}")
        out.append(Sample(qq["question_id"], _format_template(image_template, qq["image_id"], task),
                          answers, question=qq["question"],
                          meta={"image_id": qq["image_id"], "answer_type": ann.get("answer_type"),
                                "question_type": ann.get("question_type")}))
    return out


def _format_template(template: str, image_id, task: str) -> str:
    try:
        return template.format(image_id=image_id)
    except (ValueError, KeyError, IndexError) as e:
        raise EvalDataError(f"{task}: image_template {template!r} cannot format image_id {image_id!r} "
                            f"({type(e).__name__}: {e}); use {{image_id}}") from None


def read_gqa(questions: Path, image_template: str, task: str = "gqa") -> list[Sample]:
    """Official GQA `{qid: {imageId, question, answer, ...}}` or a LAVIS list of
    `{question_id, image, question, answer}`."""
    q = _load_json(questions, task, "questions")
    out = []
    if isinstance(q, dict):
        for qid, row in q.items():
            if not isinstance(row, dict) or not {"imageId", "question", "answer"} <= set(row):
                raise EvalDataError(f"{task}: {questions}: question {qid} lacks imageId, question or answer "
                                    "(expected the official GQA *_questions.json)")
            out.append(Sample(qid, _format_template(image_template, row["imageId"], task),
                              [str(row["answer"])], question=row["question"],
                              meta={"image_id": row["imageId"]}))
    elif isinstance(q, list):
        for i, row in enumerate(q):
            if not isinstance(row, dict) or not {"question_id", "image", "question", "answer"} <= set(row):
                raise EvalDataError(f"{task}: {questions}: entry {i} lacks question_id, image, question "
                                    "or answer")
            ans = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
            out.append(Sample(row["question_id"], str(row["image"]), [str(ans)], question=row["question"]))
    else:
        raise EvalDataError(f"{task}: {questions}: expected GQA questions (a dict by question id or a list)")
    if len({s.id for s in out}) != len(out):
        raise EvalDataError(f"{task}: {questions}: duplicate question ids")
    return out


def read_video_captions(path: Path, task: str = "video", mapping: Path | None = None,
                        split: str = "test") -> list[Sample]:
    """MSR-VTT videodatainfo (videos + sentences, filtered by split), a LAVIS list of
    {video, caption}, or MSVD AllVideoDescriptions.txt with youtube_mapping.txt (standard split)."""
    where = f"{task}: {path}"
    if path.suffix == ".txt":
        if mapping is None or not mapping.is_file():
            raise EvalDataError(f"{task}: MSVD {path.name} needs the clip -> vidN mapping file "
                                f"(youtube_mapping.txt) for the standard split; not found: {mapping}")
        clip2vid = {}
        for line in mapping.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 2:
                clip2vid[parts[0]] = parts[1]
        grouped: dict[str, Sample] = {}
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            clip, _, cap = line.partition(" ")
            vid = clip2vid.get(clip)
            if vid is None:
                raise EvalDataError(f"{where}: clip {clip} is not in {mapping} (mismatched ids)")
            if msvd_split(vid) != split:
                continue
            grouped.setdefault(vid, Sample(vid, clip, [])).references.append(cap.strip())
        return list(grouped.values())
    data = _load_json(path, task, "annotations")
    if isinstance(data, dict) and "sentences" in data:
        videos = data.get("videos", [])
        has_split = any("split" in v for v in videos)
        want = {"val": "validate"}.get(split, split)
        keep = [v["video_id"] for v in videos if not has_split or v.get("split") == want]
        if not keep:
            keep = sorted({s["video_id"] for s in data["sentences"]}) if not videos else []
        if not keep:
            raise EvalDataError(f"{where}: no videos with split {want!r}")
        caps: dict[str, list[str]] = {v: [] for v in keep}
        for s in data["sentences"]:
            if s.get("video_id") in caps:
                caps[s["video_id"]].append(str(s.get("caption", "")))
        empty = [v for v, c in caps.items() if not c]
        if empty:
            raise EvalDataError(f"{where}: {len(empty)} videos have no sentences (e.g. {empty[:3]})")
        return [Sample(v, v, c) for v, c in caps.items()]
    if isinstance(data, list):
        grouped = {}
        for i, row in enumerate(data):
            if not isinstance(row, dict) or "video" not in row or "caption" not in row:
                raise EvalDataError(f"{where}: entry {i} lacks 'video' or 'caption'")
            video = str(row["video"])
            grouped.setdefault(video, Sample(row.get("video_id", Path(video).stem), video, []))
            grouped[video].references += _as_caption_list(row["caption"], f"{where}: entry {i}")
        return list(grouped.values())
    raise EvalDataError(f"{where}: expected MSR-VTT videodatainfo (videos + sentences), a LAVIS list of "
                        "{video, caption}, or MSVD AllVideoDescriptions.txt")


# -------------------------------------------------------------------------------------- media
class FolderMedia:
    """Media files under a local folder: `root/name`, else `root/basename(name)` (+ video suffixes)."""

    def __init__(self, root: Path, kind: str):
        self.root, self.kind = Path(root), kind
        self._cache: dict[str, Path | None] = {}

    def describe(self) -> str:
        return str(self.root)

    def locate(self, name: str) -> Path | None:
        if name in self._cache:
            return self._cache[name]
        cands = [self.root / name, self.root / os.path.basename(name)]
        if self.kind == "video" and Path(name).suffix.lower() not in VIDEO_SUFFIXES:
            cands += [c.with_name(c.name + s) for c in cands[:2] for s in VIDEO_SUFFIXES]
        found = next((c for c in cands if c.is_file()), None)
        self._cache[name] = found
        return found

    def read(self, name: str) -> bytes:
        p = self.locate(name)
        if p is None:
            raise FileNotFoundError(f"{self.root / name}")
        return p.read_bytes()


class ShardMedia:
    """Media inside local WebDataset .tar shards, found by sample key or the file names in its json."""

    NAME_FIELDS = ("url", "image", "file_name", "video", "video_id", "key", "image_id", "id")

    def __init__(self, spec: str, kind: str):
        from pipeline.data.formats.shards import IMAGE_EXTS, VIDEO_EXTS, iter_tar_samples, resolve_spec

        self.spec, self.kind = spec, kind
        try:
            urls, _ = resolve_spec(spec)
        except ValueError as e:
            raise EvalDataError(f"shards {spec!r}: {e}") from None
        exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
        self.index: dict[str, object] = {}
        ambiguous: set[str] = set()
        errors: list[str] = []
        for url in urls:
            path = url[len("file://"):] if url.startswith("file://") else url
            if "://" in path or path.startswith("pipe:"):
                raise EvalDataError(f"shards {spec!r}: {url} is not a local file (eval shards must be local)")
            if not os.path.isfile(path):
                raise EvalDataError(f"shards {spec!r}: shard not found: {path}")
            for s in iter_tar_samples(path, lazy=lambda: True,
                                      on_error=lambda kind, u, e: errors.append(f"{u}: {kind} ({e})")):
                member = next((s[e] for e in exts if e in s), None)
                if member is None:
                    continue
                names = {s["__key__"], os.path.basename(s["__key__"])}
                if "json" in s:
                    try:
                        js = s["json"]
                        meta = json.loads(js.read() if hasattr(js, "read") else js)
                    except (ValueError, OSError):
                        meta = {}
                    for f in self.NAME_FIELDS:
                        v = meta.get(f) if isinstance(meta, dict) else None
                        if isinstance(v, (str, int)) and str(v):
                            v = str(v)
                            names |= {v, os.path.basename(v), Path(os.path.basename(v)).stem}
                for n in names:
                    if n in self.index and self.index[n] != member:
                        ambiguous.add(n)
                    self.index[n] = member
        for n in ambiguous:
            self.index.pop(n, None)
        if errors:
            raise EvalDataError(f"shards {spec!r}: unreadable shard {errors[0]}")

    def describe(self) -> str:
        return f"shards {self.spec}"

    def locate(self, name: str):
        base = os.path.basename(name)
        for n in (name, base, Path(base).stem):
            if n in self.index:
                return self.index[n]
        return None

    def read(self, name: str) -> bytes:
        m = self.locate(name)
        if m is None:
            raise FileNotFoundError(f"{name} in {self.describe()}")
        return m.read() if hasattr(m, "read") else m


# ------------------------------------------------------------------------------------ a task
@dataclass
class TaskData:
    task: str
    kind: str
    samples: list[Sample]
    media: FolderMedia | ShardMedia
    files: dict[str, str]
    partial: bool = False  # eval.max_samples cut the set

    @property
    def ids(self) -> list:
        return [s.id for s in self.samples]


def task_spec(task: str, eval_cfg) -> tuple[TaskSpec, dict[str, str]]:
    """The task's spec and its files (defaults overlaid by eval.datasets.TASK), paths resolved."""
    over = dict(eval_cfg.datasets.get(task, {}))
    bad = set(over) - set(ROLES)
    if bad:
        raise EvalDataError(f"eval.datasets.{task}: unknown key(s) {sorted(bad)}; expected some of "
                            f"{list(ROLES)}")
    if task in TASKS:
        spec = TASKS[task]
        if "kind" in over and over["kind"] != spec.kind:
            raise EvalDataError(f"eval.datasets.{task}.kind: {task} is a {spec.kind} task, "
                                f"got {over['kind']!r}")
    elif "kind" in over:
        if over["kind"] not in KINDS:
            raise EvalDataError(f"eval.datasets.{task}.kind: expected one of {list(KINDS)}, "
                                f"got {over['kind']!r}")
        spec = TaskSpec(task, over["kind"], {"image_template": "{image_id}"} if over["kind"] in ("vqa", "gqa")
                        else {})
    else:
        raise EvalDataError(f"unknown eval task {task!r}: expected one of {sorted(TASKS)}, or a custom task "
                            f"with eval.datasets.{task}.kind set")
    files = {**spec.files, **{k: v for k, v in over.items() if k != "kind"}}
    if "shards" in over:  # shards replace the default folders
        files.pop("images", None)
        files.pop("videos", None)
    root = Path(eval_cfg.data_root)
    for role, value in list(files.items()):
        if role == "image_template":
            continue
        if role == "shards":
            files[role] = "::".join(str(root / p.strip()) if not Path(p.strip()).is_absolute() else p.strip()
                                    for p in value.split("::") if p.strip())
        else:
            files[role] = str(Path(value) if Path(value).is_absolute() else root / value)
    return spec, files


def _need_file(files: dict, role: str, spec: TaskSpec) -> Path:
    if role not in files:
        raise EvalDataError(f"{spec.name}: no {role} file configured; set "
                            f"eval.datasets.{spec.name}.{role}=PATH")
    p = Path(files[role])
    if not p.is_file():
        what = spec.expects.get(role, role)
        raise EvalDataError(f"{spec.name}: {role} file not found: {p} (expected {what}; set "
                            f"eval.datasets.{spec.name}.{role}=PATH or eval.data_root)")
    return p


REQUIRED = {"caption": ("annotations",), "vqa": ("questions", "annotations"), "gqa": ("questions",),
            "video_caption": ("annotations",)}


def check_task_files(task: str, eval_cfg) -> dict[str, str]:
    """Cheap pre-flight (no parsing): the task is known, its annotation files and media folder or
    shard spec exist. Raises EvalDataError; returns the resolved files."""
    spec, files = task_spec(task, eval_cfg)
    for role in REQUIRED[spec.kind]:
        _need_file(files, role, spec)
    role = "videos" if spec.kind == "video_caption" else "images"
    if "shards" not in files:
        if role not in files:
            raise EvalDataError(f"{task}: no media configured; set eval.datasets.{task}.{role}=DIR or "
                                ".shards=SPEC")
        if not Path(files[role]).is_dir():
            raise EvalDataError(f"{task}: {role} folder not found: {files[role]} (expected "
                                f"{spec.expects.get(role, role)}; set eval.datasets.{task}.{role}=DIR)")
    return files


def load_task(task: str, eval_cfg, *, check_media: bool = True) -> TaskData:
    """Read a task's annotations and open its media; every sample's media is checked to exist."""
    spec, files = task_spec(task, eval_cfg)
    kind = spec.kind
    if kind == "caption":
        samples = read_caption_annotations(_need_file(files, "annotations", spec), task)
    elif kind == "vqa":
        samples = read_vqa(_need_file(files, "questions", spec), _need_file(files, "annotations", spec),
                           files.get("image_template", "{image_id}"), task)
    elif kind == "gqa":
        samples = read_gqa(_need_file(files, "questions", spec), files.get("image_template", "{image_id}"),
                           task)
    else:
        mapping = Path(files["mapping"]) if "mapping" in files else None
        samples = read_video_captions(_need_file(files, "annotations", spec), task, mapping)
    if not samples:
        raise EvalDataError(f"{task}: no samples in {files.get('annotations') or files.get('questions')}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise EvalDataError(f"{task}: duplicate sample ids in the annotations")
    if kind in ("vqa", "gqa"):  # scoring settings travel with the samples into the prediction records
        for s in samples:
            s.meta["vqa_eval"] = eval_cfg.vqa_eval
            if task in eval_cfg.lemmatize_tasks:
                s.meta["lemmatize"] = True
    partial = eval_cfg.max_samples is not None and eval_cfg.max_samples < len(samples)
    if partial:
        samples = samples[: eval_cfg.max_samples]
    media_kind = "video" if kind == "video_caption" else "image"
    if "shards" in files:
        media: FolderMedia | ShardMedia = ShardMedia(files["shards"], media_kind)
    else:
        role = "videos" if media_kind == "video" else "images"
        if role not in files:
            raise EvalDataError(f"{task}: no media configured; set eval.datasets.{task}.{role}=DIR or "
                                ".shards=SPEC")
        root = Path(files[role])
        if not root.is_dir():
            raise EvalDataError(f"{task}: {role} folder not found: {root} (expected "
                                f"{spec.expects.get(role, role)}; set eval.datasets.{task}.{role}=DIR)")
        media = FolderMedia(root, media_kind)
    if check_media:
        missing = [s for s in samples if media.locate(s.media) is None]
        if missing:
            raise EvalDataError(f"{task}: {len(missing)} of {len(samples)} {media_kind}s not found in "
                                f"{media.describe()} (e.g. {missing[0].media!r} for id {missing[0].id!r})")
    return TaskData(task, kind, samples, media, files, partial)


# ------------------------------------------------------------------------------- torch dataset
class EvalDataset(Dataset):
    """Item i -> (i, uint8 pixels): images [3, S, S] (resize shorter side + center crop), videos
    [T, 3, S, S] (T frames, uniformly spaced, one crop for all)."""

    def __init__(self, data: TaskData, image_size: int, num_frames: int = 8):
        from pipeline.data.transforms import EvalTransform

        self.data = data
        self.transform = EvalTransform(image_size)
        self.num_frames = num_frames

    def __len__(self) -> int:
        return len(self.data.samples)

    def __getitem__(self, i: int):
        import io

        from PIL import Image

        s = self.data.samples[i]
        try:
            raw = self.data.media.read(s.media)
            if self.data.kind == "video_caption":
                from pipeline.data.video import decode_frames

                frames = decode_frames(raw, self.num_frames, "uniform")
                pixels = torch.stack([self.transform(f) for f in frames])
            else:
                with Image.open(io.BytesIO(raw)) as im:
                    pixels = self.transform(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any unreadable medium fails the run, by name
            raise EvalDataError(f"{self.data.task}: cannot read {s.media!r} (id {s.id!r}) from "
                                f"{self.data.media.describe()}: {type(e).__name__}: {e}") from None
        return i, pixels


def collate(items):
    idx, pixels = zip(*items)
    return list(idx), torch.stack(pixels)
