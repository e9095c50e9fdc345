"""One config schema for every stage: YAML in, validated typed objects out.

    cfg = load_config("pipeline/configs/demo.yaml", overrides=["train.lr=2e-4"])

A config file may start with `inherit: other.yaml` (resolved next to it, then in the packaged
configs), or a list of files merged left to right (`inherit: [paper.yaml, variant.yaml]`); its own
keys are deep-merged over the parents. Overrides (`--set a.b.0.c=value`) are applied
to the merged YAML before validation, their values parsed as YAML scalars. Every error is one
line: `<file>: <dotted.key>: <what was expected>` (ConfigError).
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGED_CONFIGS = Path(str(resources.files("pipeline") / "configs"))


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, the dotted key and the problem."""


class Section(BaseModel):
    # strict: a string is not silently a number; forbid: a typo is an error, not a default.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Precision = Literal["bf16", "fp16", "fp32"]


# ---------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "simvlg"
    seed: NonNegInt = 42
    run_dir: str = "runs/${name}"  # ${name} is replaced by run.name


# --------------------------------------------------------------------------------------- data
class SourceConfig(Section):
    name: str
    shards: str  # brace pattern, e.g. /data/laion/{00000..11500}.tar
    weight: PositiveFloat = 1.0
    kind: Literal["image", "video"] = "image"
    num_samples: PositiveInt | None = None  # from the manifest; needed for epoch sizing


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    # sample: each sample draws its source (simvlg); batch: each rank's batch is one source (official)
    mixing: Literal["sample", "batch", "adaptive"] = "sample"
    adaptive_floor: Annotated[float, Field(ge=0, lt=1)] = 0.1  # min share per source
    adaptive_window: PositiveInt = 200  # steps of loss history per source
    resampled: bool = True
    shard_shuffle: bool = True
    shuffle_buffer: NonNegInt = 1000
    num_workers: NonNegInt = 4
    image_size: PositiveInt = 224
    min_scale: Annotated[float, Field(gt=0, le=1)] = 0.5
    hflip: bool = False  # captions say left/right; the official run flips (images and video)
    max_words: PositiveInt = 50
    num_frames: PositiveInt = 8
    # training frame choice (evaluation is always uniform): headtail as the official video run
    frame_sampling: Literal["uniform", "headtail", "random"] = "random"

    @model_validator(mode="after")
    def _unique_names(self):
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        return self


# -------------------------------------------------------------------------------------- model
class VisionConfig(Section):
    name: str = "eva_giant_patch14_224"  # timm model name, or a path/HF id with loader: hf
    loader: Literal["timm", "hf"] = "timm"
    checkpoint: str | None = None  # weights file/folder; None = architecture only (meta/tests)
    arch_config: str | None = None  # JSON of architecture kwargs, for offline construction
    image_size: PositiveInt = 224
    feature_layer: int = -2  # penultimate block, as BLIP-2
    precision: Precision = "fp16"
    # recompute each ViT block in backward instead of keeping its activations; only matters when
    # gradients flow through the ViT (video: trainable temporal modules); same numbers, less memory
    grad_checkpointing: bool = False


class MergeSchedule(Section):
    start: NonNegInt
    end: NonNegInt  # linearly interpolated over layers


# What `model.tomeformer.official: true` fixes: the official EVLGen code (modeling_bert.py) merges
# with a plain mean of the group (scatter_reduce "mean"), ignores sizes in attention, and returns
# ToMe's order [kept A tokens, then all B tokens].
OFFICIAL_TOMEFORMER = {"merge_mode": "mean", "prop_attn": False, "token_order": "tome"}


class TomeFormerConfig(Section):
    init: str = "bert-base-uncased"  # HF id or folder of a BERT checkpoint
    arch_config: str | None = None  # BERT config.json for offline/meta construction
    num_layers: PositiveInt = 12
    r: NonNegInt | list[NonNegInt] | MergeSchedule = 19
    # official: true sets the three below to the official code's values (OFFICIAL_TOMEFORMER) when
    # the config loads; an explicit different value beside it is an error. The model reads only them.
    official: bool = False
    merge_mode: Literal["wavg", "mean"] = "wavg"  # wavg: size-weighted average; mean: plain mean
    prop_attn: bool = True  # proportional attention: + log(size) on the keys
    token_order: Literal["original", "tome"] = "original"  # tome: [kept A, then all B] per layer
    kernel_backend: Literal["auto", "eager", "triton"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _resolve_official(cls, data):
        if not isinstance(data, dict) or data.get("official") is not True:
            return data
        data = dict(data)
        for key, value in OFFICIAL_TOMEFORMER.items():
            if key in data and data[key] != value:
                raise ValueError(f"official: true fixes {key} to {value!r} but it is set to {data[key]!r}; "
                                 f"remove {key} or set official: false")
            data[key] = value
        return data

    @model_validator(mode="after")
    def _r_list_matches_layers(self):
        if isinstance(self.r, list) and len(self.r) != self.num_layers:
            raise ValueError(f"r has {len(self.r)} entries but num_layers is {self.num_layers}")
        return self


class QFormerConfig(Section):
    init: str | None = "bert-base-uncased"
    arch_config: str | None = None
    num_queries: PositiveInt = 32
    num_layers: PositiveInt = 12
    cross_attention_freq: PositiveInt = 2


class LLMConfig(Section):
    name: str = "facebook/opt-2.7b"  # HF id or folder
    arch_config: str | None = None
    precision: Precision = "bf16"
    prompt: str = "a photo of"  # training prompt (no loss on it); the official run: ""
    max_text_tokens: PositiveInt = 32
    # caption: the caption is cut to max_text_tokens - 1 tokens and the end token always follows;
    # sequence: BOS + prompt + caption + end is cut to max_text_tokens (the official code's tokenizer
    # call, so a long caption loses its end token)
    truncation: Literal["caption", "sequence"] = "caption"
    # with an empty prompt the BOS after the soft prompt is a target too (the official OPT code masks
    # prompt tokens only `if self.prompt`); false: BOS and prompt never carry loss
    bos_target: bool = False
    bos_token: str | None = None  # replaces the tokenizer's BOS (official Vicuna code: "</s>")
    # token appended to every caption (and generation stop): "\n" if it is one token (OPT, as the
    # official code), else the tokenizer's EOS (LLaMA/Vicuna); or force one
    caption_end: Literal["auto", "newline", "eos"] = "auto"


class VideoConfig(Section):
    enabled: bool = False
    temporal_pool: Literal["mean", "concat"] = "mean"
    temporal_dim: PositiveInt = 256  # q/k width of the temporal attentive merge (official: 256)
    temporal_heads: PositiveInt = 8  # must divide temporal_dim and the ViT width (official: 8)


class ModelConfig(Section):
    connector: Literal["tomeformer", "qformer"] = "tomeformer"
    # a connector folder (SimVLG.save_connector) to start from, e.g. the image-pretrained connector
    # the video run fine-tunes; its temporal modules start at gate 0
    init_connector: str | None = None
    vision: VisionConfig = Field(default_factory=VisionConfig)
    tomeformer: TomeFormerConfig = Field(default_factory=TomeFormerConfig)
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)


# -------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    steps: PositiveInt = 250_000
    global_batch: PositiveInt = 1600
    micro_batch: PositiveInt = 100
    grad_accum: PositiveInt = 2
    lr: PositiveFloat = 1e-4
    min_lr: NonNegFloat = 1e-5
    warmup_steps: NonNegInt = 5000
    warmup_start_lr: NonNegFloat = 1e-6
    weight_decay: NonNegFloat = 0.05
    betas: Annotated[list[float], Field(min_length=2, max_length=2)] = [0.9, 0.999]
    grad_clip: NonNegFloat = 1.0  # 0: no clipping (the official run)
    # the DeepSpeed engine: bf16, or fp16 with dynamic loss scaling (the official run: fp16 + GradScaler);
    # the frozen ViT/LLM keep their own precision and their loaded weights either way
    precision: Precision = "bf16"
    zero_stage: Literal[0, 1, 2] = 2
    ds_config: str = "ds_configs/zero2_bf16.json"
    log_every: PositiveInt = 50
    ckpt_every: PositiveInt = 5000
    keep_ckpts: PositiveInt = 3
    max_nan_in_row: PositiveInt = 20

    @model_validator(mode="after")
    def _lr_order(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        return self


# --------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    tasks: list[str] = Field(default_factory=lambda: ["coco_karpathy_val"])  # Table 1: Karpathy val
    data_root: str = "data"
    batch_size: PositiveInt = 32
    num_beams: PositiveInt = 5
    # captions (COCO, NoCaps, Flickr30K): official 30 / 8 new tokens
    max_new_tokens: PositiveInt = 30
    min_new_tokens: NonNegInt = 8
    # video captions (MSR-VTT, MSVD): official 20 / 5
    video_max_new_tokens: PositiveInt = 20
    video_min_new_tokens: NonNegInt = 5
    repetition_penalty: PositiveFloat = 1.0  # every task (official Vicuna code: 1.5, OPT: 1.0)
    caption_prompt: str = "a photo of"  # official: ""
    vqa_prompt: str = "Question: {q} Short answer:"
    # VQA accuracy: the LAVIS copy of the 2017 VQA script (published BLIP-2-era numbers) or its 2021
    # revision (both sides normalised, nothing when the ten answers agree), for comparison
    vqa_eval: Literal["2017", "2021"] = "2017"
    # tasks whose predicted answers are lemmatised before scoring (official: OK-VQA only)
    lemmatize_tasks: list[str] = Field(default_factory=lambda: ["okvqa_test"])
    gallery_size: NonNegInt = 16
    visualize_layers: list[NonNegInt] = Field(default_factory=lambda: [3, 7, 11])
    # VQA / GQA answer generation (BLIP-2 zero-shot VQA: beam num_beams, max 10, min 1)
    vqa_max_new_tokens: PositiveInt = 10
    vqa_min_new_tokens: NonNegInt = 1
    vqa_length_penalty: float = 0.0
    visualize_count: NonNegInt = 4  # images with merged-token PNGs per task (0: none)
    max_samples: PositiveInt | None = None  # first N samples only (a partial, flagged result)
    # per task: file overrides ({annotations, questions, images, videos, shards, image_template,
    # mapping}: paths relative to data_root or absolute), or a custom task with `kind` (caption,
    # vqa, gqa, video_caption); see pipeline/eval/datasets.py
    datasets: dict[str, dict[str, str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens is above max_new_tokens")
        if self.video_min_new_tokens > self.video_max_new_tokens:
            raise ValueError("video_min_new_tokens is above video_max_new_tokens")
        if self.vqa_min_new_tokens > self.vqa_max_new_tokens:
            raise ValueError("vqa_min_new_tokens is above vqa_max_new_tokens")
        if "{q}" not in self.vqa_prompt:
            raise ValueError("vqa_prompt must contain {q}")
        return self


# ----------------------------------------------------------------------------------- tracking
class TrackingConfig(Section):
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the run dir
    experiment: str = "simvlg"


# ------------------------------------------------------------------------------------- launch
class LaunchConfig(Section):
    nodes: PositiveInt = 1
    gpus_per_node: PositiveInt = 8
    partition: str | None = None
    time: str = "72:00:00"
    cpus_per_task: PositiveInt = 8


# ------------------------------------------------------------------------------------ the root
class Config(Section):
    inherit: str | list[str] | None = None  # consumed at load time; kept for `config show`
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir.replace("${name}", self.run.name))

    @property
    def world_size(self) -> int:
        return self.launch.nodes * self.launch.gpus_per_node


# Fields that name files which must exist when set; relative paths resolve against the config file's
# folder, then the packaged configs, then the working directory (repo-relative ds_configs/...).
FILE_FIELDS = ["model.init_connector", "model.vision.arch_config", "model.tomeformer.arch_config",
               "model.qformer.arch_config", "model.llm.arch_config", "train.ds_config"]


# ------------------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float (plain YAML 1.1 needs `1.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def resolve_config_path(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config by path, or by name among the packaged configs (`demo`, `demo.yaml`)."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates += [PACKAGED_CONFIGS / name, PACKAGED_CONFIGS / f"{name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    return Path(name)  # reported as unreadable by _read_yaml


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_raw(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: inherit: cycle through {' -> '.join(str(s) for s in seen)}")
    raw = _read_yaml(path)
    parents = raw.get("inherit")
    if parents is None:
        return raw
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not parents or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"{path}: inherit: expected a config file name or a list of them, got "
                          f"{raw.get('inherit')!r}")
    merged: dict = {}
    for parent in parents:  # left to right: a later parent's keys win
        merged = _deep_merge(merged, _load_raw(resolve_config_path(parent, path.parent),
                                               seen + (path.resolve(),)))
    return _deep_merge(merged, raw)


def apply_override(raw: dict, override: str, source: str = "--set") -> None:
    """Apply `a.b.0.c=value` to the raw dict in place; value is parsed as a YAML scalar/list."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source} {override!r}: expected KEY=VALUE, e.g. train.lr=2e-4")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node: Any = raw
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{source} {override!r}: {where}: expected a list index below "
                                  f"{len(node)}")
            part = int(part)
        elif isinstance(node, dict):
            if not last and part not in node:
                node[part] = {}  # the schema decides whether the key exists
        else:
            raise ConfigError(f"{source} {override!r}: {where}: cannot index into a "
                              f"{type(node).__name__}")
        if last:
            node[part] = value
        else:
            node = node[part]


def _lower(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    return msg[0].lower() + msg[1:] if msg else msg


def _format_error(err: dict, loc: tuple | None = None) -> str:
    loc = err["loc"] if loc is None else loc
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: required key is missing"
    got = err.get("input")
    if kind == "value_error" and isinstance(got, dict):  # a section's own check: its message says it
        return f"{key}: {_lower(msg)}"
    if isinstance(got, (dict, list)):
        got = type(got).__name__
    return f"{key}: {_lower(msg)}, got {got!r}"


def _branch_shape(tag: str) -> str:
    """The value shape a union branch accepts, from pydantic's tag: list[...], a model, a scalar."""
    if tag.startswith(("list[", "tuple[")):
        return "list"
    if tag.startswith("dict[") or tag[:1].isupper():
        return "dict"
    return "scalar"


def _union_error(errors: list[dict]) -> str | None:
    """A union field (r: int | list | schedule) fails once per form it accepts: report the form that
    matches the value's shape, naming the entry at fault, or the accepted forms if none matches."""
    common = errors[0]["loc"]
    for e in errors[1:]:
        n = 0
        while n < min(len(common), len(e["loc"])) and common[n] == e["loc"][n]:
            n += 1
        common = common[:n]
    if len(errors) < 2 or any(len(e["loc"]) <= len(common) for e in errors):
        return None
    branches: dict[str, list[dict]] = {}
    for e in errors:
        branches.setdefault(str(e["loc"][len(common)]), []).append(e)
    if len(branches) < 2:
        return None
    field = ".".join(map(str, common))
    value = next((e["input"] for e in errors if len(e["loc"]) == len(common) + 1), None)
    shape = "list" if isinstance(value, list) else "dict" if isinstance(value, dict) else "scalar"
    for tag, errs in branches.items():
        e = errs[0]
        rest = tuple(e["loc"][len(common) + 1:])
        if _branch_shape(tag) != shape or (not rest and e["type"].endswith(("_type", "_parsing"))):
            continue
        if shape == "list" and rest and isinstance(rest[0], int):
            what = _lower(e["msg"]).removeprefix("input ")
            return f"{field}: entries {what}, got {e['input']!r} at index {rest[0]}"
        return _format_error(e, tuple(common) + rest)
    forms = " | ".join(t.replace("constrained-", "") for t in branches)
    return f"{field}: expected one of {forms}, got {value!r}"


def validate(raw: dict, source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
    message = _union_error(errors)
    if message is None:
        message = _format_error(errors[0]) + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else "")
    raise ConfigError(f"{source}: {message}") from None


def resolve_file(value: str, config_dir: Path | None) -> Path | None:
    for base in ([config_dir] if config_dir else []) + [PACKAGED_CONFIGS, Path.cwd()]:
        p = (base / value) if not Path(value).is_absolute() else Path(value)
        if p.exists():
            return p.resolve()
    repo_root = PACKAGED_CONFIGS.parent.parent  # editable install: the checkout
    p = repo_root / value
    return p.resolve() if p.exists() else None


def _check_files(cfg: Config, source: str, config_dir: Path | None) -> None:
    for dotted in FILE_FIELDS:
        section, *rest = dotted.split(".")
        obj = getattr(cfg, section)
        for attr in rest[:-1]:
            obj = getattr(obj, attr)
        value = getattr(obj, rest[-1])
        if value is None:
            continue
        found = resolve_file(value, config_dir)
        if found is None:
            raise ConfigError(f"{source}: {dotted}: file not found: {value}")
        setattr(obj, rest[-1], str(found))


def _check_batch(cfg: Config, source: str) -> None:
    t, launch = cfg.train, cfg.launch
    if t.micro_batch * t.grad_accum * cfg.world_size != t.global_batch:
        raise ConfigError(
            f"{source}: train.global_batch: expected train.micro_batch ({t.micro_batch}) x "
            f"train.grad_accum ({t.grad_accum}) x ranks ({launch.nodes} nodes x {launch.gpus_per_node}"
            f" per node) = {t.micro_batch * t.grad_accum * cfg.world_size}, got {t.global_batch}")


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    path = resolve_config_path(path)
    raw = _load_raw(path)
    for ov in overrides:
        apply_override(raw, ov)
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    cfg = validate(raw, source)
    _check_batch(cfg, source)
    _check_files(cfg, source, path.parent)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: for MLflow params."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out
