"""Evaluation tasks: which files each task reads (annotations in the datasets' public formats, read by
pipeline/data/formats/annotations.py), and its media from local folders or shards (media.py).

Expected files (defaults relative to `eval.data_root`; override any, absolute or relative to
data_root, with `--set eval.datasets.TASK.ROLE=PATH`):

caption tasks (kind caption)
  coco_karpathy_test / coco_karpathy_val
    annotations  coco/annotations/coco_karpathy_{test,val}.json: LAVIS/BLIP list of
                 {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": [...]}, or Karpathy's
                 dataset_coco.json (its test / val split is read)
    images       coco/images (holding val2014/)
  nocaps_val
    annotations  nocaps/annotations/nocaps_val_4500_captions.json: official COCO-style
                 {"images": [{id, file_name, domain}], "annotations": [{image_id, caption}]}
                 (or a LAVIS list); per-domain CIDEr/SPICE when images carry a domain
    images       nocaps/images (file_name inside)
  flickr30k_test
    annotations  flickr30k/annotations/flickr30k_test.json: BLIP list of
                 {"image": "flickr30k-images/1007129816.jpg", "caption": [5 captions]}, or
                 Karpathy's dataset_flickr30k.json (its test split; names without the folder)
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
                 sentences: [{video_id, caption}]} (split "test"), or a LAVIS list of {video, caption};
                 either way only the standard test ids (video7010-9999) are kept
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

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.formats.annotations import (
    AnnotationError,
    Sample,
    read_captions,
    read_gqa,
    read_video_captions,
    read_vqa,
)

from .media import EvalDataError, FolderMedia, ShardMedia

KINDS = ("caption", "vqa", "gqa", "video_caption")
ROLES = ("annotations", "questions", "images", "videos", "shards", "image_template", "mapping", "kind")
COCO_VAL_TEMPLATE = "val2014/COCO_val2014_{image_id:012d}.jpg"
__all__ = [
    "KINDS",
    "TASKS",
    "EvalDataError",
    "Sample",
    "TaskData",
    "TaskSpec",
    "check_task_files",
    "load_task",
    "task_spec",
]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    files: dict[str, str]  # role -> default path relative to data_root
    expects: dict[str, str] = field(default_factory=dict)  # role -> what the file should be
    split: str = "test"  # the standard split read from files that hold several (Karpathy, MSR-VTT, MSVD)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "coco_karpathy_test",
            "caption",
            {"annotations": "coco/annotations/coco_karpathy_test.json", "images": "coco/images"},
            {"annotations": "LAVIS/BLIP coco_karpathy_test.json", "images": "COCO 2014 images (val2014/)"},
        ),
        TaskSpec(
            "coco_karpathy_val",
            "caption",
            {"annotations": "coco/annotations/coco_karpathy_val.json", "images": "coco/images"},
            {"annotations": "LAVIS/BLIP coco_karpathy_val.json", "images": "COCO 2014 images (val2014/)"},
            split="val",
        ),
        TaskSpec(
            "nocaps_val",
            "caption",
            {"annotations": "nocaps/annotations/nocaps_val_4500_captions.json", "images": "nocaps/images"},
            {
                "annotations": "nocaps_val_4500_captions.json (COCO-style images + annotations)",
                "images": "NoCaps val images (Open Images)",
            },
            split="val",
        ),
        TaskSpec(
            "flickr30k_test",
            "caption",
            {"annotations": "flickr30k/annotations/flickr30k_test.json", "images": "flickr30k/images"},
            {"annotations": "BLIP flickr30k_test.json", "images": "flickr30k-images/"},
        ),
        TaskSpec(
            "vqav2_val",
            "vqa",
            {
                "questions": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
                "annotations": "vqav2/v2_mscoco_val2014_annotations.json",
                "images": "coco/images",
                "image_template": COCO_VAL_TEMPLATE,
            },
            {
                "questions": "official VQAv2 val questions",
                "annotations": "official VQAv2 val annotations",
                "images": "COCO 2014 images (val2014/)",
            },
        ),
        TaskSpec(
            "okvqa_test",
            "vqa",
            {
                "questions": "okvqa/OpenEnded_mscoco_val2014_questions.json",
                "annotations": "okvqa/mscoco_val2014_annotations.json",
                "images": "coco/images",
                "image_template": COCO_VAL_TEMPLATE,
            },
            {
                "questions": "OK-VQA OpenEnded_mscoco_val2014_questions.json",
                "annotations": "OK-VQA mscoco_val2014_annotations.json",
                "images": "COCO 2014 images (val2014/)",
            },
        ),
        TaskSpec(
            "gqa_testdev",
            "gqa",
            {
                "questions": "gqa/testdev_balanced_questions.json",
                "images": "gqa/images",
                "image_template": "{image_id}.jpg",
            },
            {"questions": "GQA testdev_balanced_questions.json", "images": "GQA images/"},
        ),
        TaskSpec(
            "msrvtt_test",
            "video_caption",
            {"annotations": "msrvtt/test_videodatainfo.json", "videos": "msrvtt/videos"},
            {
                "annotations": "MSR-VTT test_videodatainfo.json (or a LAVIS list)",
                "videos": "MSR-VTT videos (videoNNNN.mp4)",
            },
        ),
        TaskSpec(
            "msvd_test",
            "video_caption",
            {
                "annotations": "msvd/AllVideoDescriptions.txt",
                "mapping": "msvd/youtube_mapping.txt",
                "videos": "msvd/YouTubeClips",
            },
            {
                "annotations": "MSVD AllVideoDescriptions.txt (or a LAVIS list json)",
                "mapping": "MSVD youtube_mapping.txt (clip name -> vidN)",
                "videos": "MSVD YouTubeClips/*.avi",
            },
        ),
    ]
}


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
        raise EvalDataError(
            f"eval.datasets.{task}: unknown key(s) {sorted(bad)}; expected some of {list(ROLES)}"
        )
    if task in TASKS:
        spec = TASKS[task]
        if "kind" in over and over["kind"] != spec.kind:
            raise EvalDataError(
                f"eval.datasets.{task}.kind: {task} is a {spec.kind} task, got {over['kind']!r}"
            )
    elif "kind" in over:
        if over["kind"] not in KINDS:
            raise EvalDataError(
                f"eval.datasets.{task}.kind: expected one of {list(KINDS)}, got {over['kind']!r}"
            )
        spec = TaskSpec(
            task, over["kind"], {"image_template": "{image_id}"} if over["kind"] in ("vqa", "gqa") else {}
        )
    else:
        raise EvalDataError(
            f"unknown eval task {task!r}: expected one of {sorted(TASKS)}, or a custom task "
            f"with eval.datasets.{task}.kind set"
        )
    files = {**spec.files, **{k: v for k, v in over.items() if k != "kind"}}
    if "shards" in over:  # shards replace the default folders
        files.pop("images", None)
        files.pop("videos", None)
    root = Path(eval_cfg.data_root)
    for role, value in list(files.items()):
        if role == "image_template":
            continue
        if role == "shards":
            files[role] = "::".join(
                str(root / p.strip()) if not Path(p.strip()).is_absolute() else p.strip()
                for p in value.split("::")
                if p.strip()
            )
        else:
            files[role] = str(Path(value) if Path(value).is_absolute() else root / value)
    return spec, files


def _need_file(files: dict, role: str, spec: TaskSpec) -> Path:
    if role not in files:
        raise EvalDataError(
            f"{spec.name}: no {role} file configured; set eval.datasets.{spec.name}.{role}=PATH"
        )
    p = Path(files[role])
    if not p.is_file():
        what = spec.expects.get(role, role)
        raise EvalDataError(
            f"{spec.name}: {role} file not found: {p} (expected {what}; set "
            f"eval.datasets.{spec.name}.{role}=PATH or eval.data_root)"
        )
    return p


REQUIRED = {
    "caption": ("annotations",),
    "vqa": ("questions", "annotations"),
    "gqa": ("questions",),
    "video_caption": ("annotations",),
}


def check_task_files(task: str, eval_cfg) -> dict[str, str]:
    """Cheap pre-flight (no parsing): the task is known, its annotation files and media folder or
    shard spec exist. Raises EvalDataError; returns the resolved files."""
    spec, files = task_spec(task, eval_cfg)
    for role in REQUIRED[spec.kind]:
        _need_file(files, role, spec)
    role = "videos" if spec.kind == "video_caption" else "images"
    if "shards" not in files:
        if role not in files:
            raise EvalDataError(
                f"{task}: no media configured; set eval.datasets.{task}.{role}=DIR or .shards=SPEC"
            )
        if not Path(files[role]).is_dir():
            raise EvalDataError(
                f"{task}: {role} folder not found: {files[role]} (expected "
                f"{spec.expects.get(role, role)}; set eval.datasets.{task}.{role}=DIR)"
            )
    return files


def _read_annotations(spec: TaskSpec, files: dict[str, str]) -> list[Sample]:
    template = files.get("image_template", "{image_id}")
    try:
        if spec.kind == "caption":
            return read_captions(_need_file(files, "annotations", spec), spec.split)
        if spec.kind == "vqa":
            return read_vqa(
                _need_file(files, "questions", spec), _need_file(files, "annotations", spec), template
            )
        if spec.kind == "gqa":
            return read_gqa(_need_file(files, "questions", spec), template)
        mapping = Path(files["mapping"]) if "mapping" in files else None
        return read_video_captions(_need_file(files, "annotations", spec), spec.split, mapping)
    except AnnotationError as e:
        raise EvalDataError(f"{spec.name}: {e}") from None


def load_task(task: str, eval_cfg, *, check_media: bool = True) -> TaskData:
    """Read a task's annotations and open its media; every sample's media is checked to exist."""
    spec, files = task_spec(task, eval_cfg)
    samples = _read_annotations(spec, files)
    kind = spec.kind
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
            raise EvalDataError(
                f"{task}: no media configured; set eval.datasets.{task}.{role}=DIR or .shards=SPEC"
            )
        root = Path(files[role])
        if not root.is_dir():
            raise EvalDataError(
                f"{task}: {role} folder not found: {root} (expected "
                f"{spec.expects.get(role, role)}; set eval.datasets.{task}.{role}=DIR)"
            )
        media = FolderMedia(root, media_kind)
    if check_media:
        missing = [s for s in samples if media.locate(s.media) is None]
        if missing:
            raise EvalDataError(
                f"{task}: {len(missing)} of {len(samples)} {media_kind}s not found in "
                f"{media.describe()} (e.g. {missing[0].media!r} for id {missing[0].id!r})"
            )
    return TaskData(task, kind, samples, media, files, partial)
