"""The config schema: every section of a simvlg config, its fields, types, defaults and checks.

Plain data: pydantic models, strict (a string is not silently a number) and closed (an unknown key is
an error). pipeline/config.py reads YAML files into them (inheritance, --set overrides, one-line
errors naming the file and the dotted key); the rest of the code receives these objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    # text: sentences only (P-Former pre-training): the txt/json members of each sample, never its media
    kind: Literal["image", "video", "text"] = "image"
    num_samples: PositiveInt | None = None  # from the manifest; needed for epoch sizing
    # pre-training tasks made from this source's samples, with their weights within the source
    # (names: pipeline/data/tasks.py TASKS; objects needs "labels" in the samples' json)
    tasks: dict[str, PositiveFloat] = Field(default_factory=lambda: {"captioning": 1.0}, min_length=1)


class TasksConfig(Section):
    """How tasks are made and drawn (which tasks: data.sources[].tasks; adaptive: data.mixing)."""

    minimum_per_batch: NonNegInt = 0  # samples of every (source, task) arm in every batch (paper §4.1)
    mask_rate: Annotated[float, Field(gt=0, lt=1)] = 0.15  # masked: share of the words hidden (A.3)
    question_kinds: list[str] = Field(
        default_factory=lambda: ["exists", "and", "or", "count", "list"], min_length=1
    )  # objects: the kinds of question asked


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list)
    # sample: each sample draws its source (simvlg); batch: each rank's batch is one source (official)
    mixing: Literal["sample", "batch", "adaptive"] = "sample"
    adaptive_floor: Annotated[float, Field(ge=0, lt=1)] = 0.1  # min share per arm (source or source/task)
    adaptive_window: PositiveInt = 200  # steps of loss history per arm
    tasks: TasksConfig = Field(default_factory=TasksConfig)
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
                raise ValueError(
                    f"official: true fixes {key} to {value!r} but it is set to {data[key]!r}; "
                    f"remove {key} or set official: false"
                )
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


class JointConfig(Section):
    """model.connector: joint (compact-representations paper §3.1; pipeline/models/joint.py)."""

    width: PositiveInt = 768
    heads: PositiveInt = 12
    num_latents: PositiveInt = 32  # N: soft-prompt length
    iterations: PositiveInt = 4  # fusion iterations (Eq. 3)
    mlp_ratio: PositiveFloat = 4.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    gate_init: float = 1.0  # α, β start here (tanh 0.76; why not 0: joint.py)
    max_text_len: PositiveInt = 128  # text-input tokens the connector reads (learned positions)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        return self


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


class PFormerConfig(Section):
    """The P-Former (pipeline/models/pformer.py). Defaults are the official stage-0 run (BLIText)."""

    init: str = "bert-base-uncased"  # HF id or folder of a BERT-family encoder (and its tokenizer)
    arch_config: str | None = None  # its config.json, for meta-device construction
    num_prompts: PositiveInt = 32  # N soft prompts (official: 32 = BLIP-2's queries; SimVLG: 29)
    max_text_tokens: PositiveInt = 32  # BERT input length cap, [CLS] and [SEP] included
    mask_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.25
    views: Literal[1, 2] = 1  # contrastive views: 1 = official (the sentence with itself), 2 = ours
    contrast_dim: PositiveInt = 256
    temp_init: PositiveFloat = 0.07
    temp_min: PositiveFloat = 1e-3
    temp_max: PositiveFloat = 0.5
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    lm_weight: NonNegFloat = 1.0
    contrastive_weight: NonNegFloat = 1.0
    vq_weight: NonNegFloat = 1.0
    vq_chunk: PositiveInt = 8192  # codebook rows per distance block (8192 x B*N fp32 at a time)

    @model_validator(mode="after")
    def _temperature_range(self):
        if not self.temp_min <= self.temp_init <= self.temp_max:
            raise ValueError(
                f"temp_init {self.temp_init} is outside [temp_min {self.temp_min}, temp_max {self.temp_max}]"
            )
        if self.lm_weight == self.contrastive_weight == self.vq_weight == 0:
            raise ValueError(
                "lm_weight, contrastive_weight and vq_weight are all 0: stage 0 would train nothing"
            )
        return self


class ModelConfig(Section):
    # what `simvlg train` trains: simvlg = the connector of a ViT -> connector -> LLM model; pformer = a
    # P-Former, from sentences alone (data.sources of kind text), against the frozen LLM
    kind: Literal["simvlg", "pformer"] = "simvlg"
    connector: Literal["tomeformer", "qformer", "joint"] = "tomeformer"
    # a connector folder (SimVLG.save_connector) to start from, e.g. the image-pretrained connector
    # the video run fine-tunes; its temporal modules start at gate 0
    init_connector: str | None = None
    vision: VisionConfig = Field(default_factory=VisionConfig)
    tomeformer: TomeFormerConfig = Field(default_factory=TomeFormerConfig)
    qformer: QFormerConfig = Field(default_factory=QFormerConfig)
    joint: JointConfig = Field(default_factory=JointConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    pformer: PFormerConfig = Field(default_factory=PFormerConfig)
    # a P-Former folder (a `kind: pformer` run's pformer/): the frozen targets of train.align_weight
    pformer_checkpoint: str | None = None


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
    # 1 or 2: ZeRO's optimizer is what detects non-finite gradients and skips that step on every rank
    zero_stage: Literal[1, 2] = 2
    # cosine: warm-up then a cosine over every step; lavis: the official LAVIS schedule, warm-up inside
    # the first inner epoch, then the cosine evaluated once per inner epoch of iters_per_inner_epoch
    lr_schedule: Literal["cosine", "lavis"] = "cosine"
    iters_per_inner_epoch: PositiveInt | None = None
    ds_config: str = "ds_configs/zero2_bf16.json"
    log_every: PositiveInt = 50
    ckpt_every: PositiveInt = 5000
    keep_ckpts: PositiveInt = 3
    max_nan_in_row: PositiveInt = 20
    # P-Former alignment (issue 15): loss = LM + align_weight * MSE(soft prompt, the frozen P-Former's
    # prompts for the caption); 0 = SimVLG as published. position: slot i to prompt i (official);
    # assignment: each soft token to one prompt by an optimal one-to-one match per sample (ours)
    align_weight: NonNegFloat = 0.0
    align_match: Literal["position", "assignment"] = "position"

    @model_validator(mode="after")
    def _lr_order(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        if self.lr_schedule == "lavis":
            ipe = self.iters_per_inner_epoch
            if ipe is None:
                raise ValueError("lr_schedule: lavis needs iters_per_inner_epoch (official: 5000)")
            if self.warmup_steps > ipe:
                raise ValueError(
                    f"lr_schedule: lavis warms up inside the first inner epoch: "
                    f"warmup_steps ({self.warmup_steps}) is above iters_per_inner_epoch ({ipe})"
                )
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
    # vqa, gqa, video_caption); see pipeline/eval/tasks.py
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
