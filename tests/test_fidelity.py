"""The paper configs are the official EVLGen run, value for value; simvlg's improvements are labelled
variants that change only their own fields.

The official values are written out here, each with where the official code sets it (the EVLGen fork
of LAVIS: lavis/projects/EVLGen/train/pretrain_opt2.7b.yaml, the eval configs, liptome_opt.py,
modeling_bert.py, eva_vit_g.py, LAVIS' processors, runner and VQA tools), so an edit that drifts from
the paper run fails here and has to say why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, flatten, load_config

# dotted key -> (official value, where the official code sets it)
OFFICIAL_IMAGE = {
    "run.seed": (42, "pretrain_opt2.7b.yaml run.seed"),
    "data.mixing": ("batch", "runner_iter: MultiIterLoader(ratios=train_dataset_ratios)"),
    "data.resampled": (True, "LaionDataset: wds.ResampledShards"),
    "data.shuffle_buffer": (1000, "LaionDataset: wds.shuffle(1000)"),
    "data.num_workers": (4, "run.num_workers"),
    "data.image_size": (224, "blip2_image_train image_size"),
    "data.min_scale": (0.5, "Blip2ImageTrainProcessor min_scale"),
    "data.hflip": (True, "Blip2ImageTrainProcessor: RandomHorizontalFlip()"),
    "data.max_words": (50, "blip_caption max_words"),
    "model.connector": ("tomeformer", "liptome_opt: VLconnector = modeling_bert.BertModel"),
    "model.vision.name": ("eva_giant_patch14_224", "vit_model eva_clip_g"),
    "model.vision.image_size": (224, "image_size"),
    "model.vision.feature_layer": (-2, "create_eva_vit_g: depth 39 of EVA-g's 40"),
    "model.vision.precision": ("fp16", "vit_precision fp16"),
    "model.tomeformer.init": ("bert-base-uncased", "BertModel.from_pretrained('bert-base-uncased')"),
    "model.tomeformer.num_layers": (12, "num_layers"),
    "model.tomeformer.official": (True, "modeling_bert.BertLayer + bipartite_soft_matching"),
    "model.tomeformer.merge_mode": ("mean", "merge(mode='mean'): scatter_reduce mean, no sizes"),
    "model.tomeformer.prop_attn": (False, "BertSelfAttention: no size bias (attention_mask ignored)"),
    "model.tomeformer.token_order": ("tome", "merge: torch.cat([unm, dst])"),
    "model.llm.precision": ("fp16", "from_pretrained(torch_dtype=torch.float16)"),
    "model.llm.prompt": ("", "model config prompt: ''"),
    "model.llm.max_text_tokens": (32, "max_txt_len 32"),
    "model.llm.truncation": ("sequence", "opt_tokenizer(..., truncation=True, max_length=max_txt_len)"),
    "train.global_batch": (1600, "batch_size_train 200 x 8 GPUs"),
    "train.lr": (1e-4, "init_lr"),
    "train.weight_decay": (0.05, "weight_decay"),
    "train.betas": ([0.9, 0.999], "AdamW betas=(0.9, beta2 0.999)"),
    "train.grad_clip": (0.0, "LAVIS base task: no clip_grad_norm"),
    "train.precision": ("fp16", "amp: True (autocast + GradScaler)"),
    "eval.num_beams": (5, "num_beams 5"),
    "eval.max_new_tokens": (30, "caption_coco eval: max_len 30"),
    "eval.min_new_tokens": (8, "caption_coco eval: min_len 8"),
    "eval.caption_prompt": ("", "generate(): prompt = self.prompt ('')"),
    "eval.vqa_prompt": ("Question: {q} Short answer:", "vqa eval configs: prompt"),
    "eval.vqa_max_new_tokens": (10, "vqa/gqa eval: max_len 10"),
    "eval.vqa_min_new_tokens": (1, "vqa/gqa eval: min_len 1"),
    "eval.vqa_length_penalty": (0.0, "predict_answers(length_penalty=0)"),
    "eval.vqa_eval": ("2017", "lavis/common/vqa_tools/vqa_eval.py"),
    "eval.lemmatize_tasks": (["okvqa_test"], "okvqa eval config: apply_lemmatizer: True"),
}
OPT = {
    "model.llm.name": ("facebook/opt-2.7b", "opt_model"),
    "model.llm.bos_target": (True, "liptome_opt.forward: prompt tokens masked only `if self.prompt`"),
    "model.llm.caption_end": ("newline", "text = t + '\\n'; eos_token_id = '\\n'"),
    "train.micro_batch": (200, "batch_size_train 200"),
    "train.grad_accum": (1, "accum_grad_iters default 1"),
    "train.min_lr": (1e-5, "min_lr"),
    "train.warmup_steps": (5000, "warmup_steps"),
    "train.warmup_start_lr": (1e-6, "warmup_lr"),
    "train.lr_schedule": ("lavis", "lr_sched: linear_warmup_cosine_lr, runner_iter"),
    "train.iters_per_inner_epoch": (5000, "iters_per_inner_epoch: 5000"),
    "eval.repetition_penalty": (1.0, "liptome_opt.generate repetition_penalty=1.0"),
    "eval.tasks": (
        ["coco_karpathy_val", "vqav2_val", "gqa_testdev", "okvqa_test"],
        "Table 1 columns; caption_coco eval test_splits: ['val']",
    ),
    "data.sources": ([("laion115m", 15), ("ccs14m", 4), ("coco", 1)], "train_dataset_ratios"),
}
PAPER = {  # config -> its own values on top of the shared ones
    "simvlg_opt2.7b": {**OPT, "train.steps": (250_000, "max_iters"), "model.tomeformer.r": (19, "tome_r")},
    "simvlg_opt2.7b_150k": {**OPT, "train.steps": (150_000, "Table 1"), "model.tomeformer.r": (19, "tome_r")},
    "simvlg_opt2.7b_11m_150k": {
        **OPT,
        "train.steps": (150_000, "Table 1"),
        "data.sources": ([("ccs14m", 4), ("coco", 1)], "Table 1: 11M (no LAION)"),
        "model.tomeformer.r": (19, "tome_r"),
    },
    "simvlg_opt2.7b_55m_90k": {
        **OPT,
        "train.steps": (90_000, "Table 1"),
        "model.tomeformer.num_layers": (6, "Table 1: 55M"),
        "model.tomeformer.r": ([38, 38, 38, 43, 43, 28], "29 tokens in 6 layers"),
    },
    "simvlg_vicuna7b": {
        "model.llm.name": ("lmsys/vicuna-7b-v1.3", "pretrain_vicuna7b.yaml llm_model"),
        "model.llm.bos_token": ("</s>", "liptome_vicuna: add_special_tokens({'bos_token': '</s>'})"),
        "model.llm.bos_target": (False, "liptome_vicuna: the input part is masked"),
        "model.llm.caption_end": ("eos", "text_output + eos_token"),
        "eval.repetition_penalty": (1.5, "liptome_vicuna.generate repetition_penalty=1.5"),
        "train.steps": (250_000, "Table 1"),
        "model.tomeformer.r": (19, "tome_r"),
    },
}
OFFICIAL_VIDEO = {  # caption_msrvtt_opt2.7b_ft.yaml / _eval.yaml, liptome_video_opt.py, alpro processors
    "model.video.enabled": (True, "liptome_video_opt + eva_vit_g TemporalTokenMerge"),
    "model.video.temporal_pool": ("mean", "visual_encoder(image).mean(dim=1)"),
    "model.video.temporal_dim": (256, "TemporalTokenMerge(hidden_dim=256)"),
    "model.video.temporal_heads": (8, "TemporalTokenMerge(num_heads=8)"),
    "model.vision.precision": ("fp32", "vit_precision: fp32"),
    "model.tomeformer.official": (True, "modeling_bert"),
    "model.tomeformer.r": (19, "tome_r"),
    "data.num_frames": (4, "n_frms: 4"),
    "data.frame_sampling": ("headtail", "alpro_video_train: sampling='headtail'"),
    "data.hflip": (True, "RandomHorizontalFlipVideo()"),
    "data.min_scale": (0.5, "RandomResizedCropVideo scale (0.5, 1.0)"),
    "train.steps": (50_000, "max_iters"),
    "train.global_batch": (32, "batch_size_train 4 x 8 GPUs"),
    "train.micro_batch": (4, "batch_size_train 4"),
    "train.lr": (1e-5, "init_lr"),
    "train.min_lr": (1e-6, "min_lr"),
    "train.warmup_steps": (1000, "warmup_steps"),
    "train.warmup_start_lr": (1e-8, "warmup_lr"),
    "train.lr_schedule": ("lavis", "lr_sched: linear_warmup_cosine_lr, runner_iter"),
    "train.iters_per_inner_epoch": (1000, "iters_per_inner_epoch: 1000"),
    "train.weight_decay": (0.05, "weight_decay"),
    "train.precision": ("fp16", "amp: True"),
    "train.grad_clip": (0.0, "no clipping"),
    "model.llm.prompt": ("", "prompt ''"),
    "eval.tasks": (["msrvtt_test"], "test_splits: ['test']"),
    "eval.num_beams": (5, "num_beams 5"),
    "eval.video_max_new_tokens": (20, "max_len 20"),
    "eval.video_min_new_tokens": (5, "min_len 5"),
    "eval.caption_prompt": ("", "prompt ''"),
}
# what the variant overlay changes, and nothing else
VARIANT = {
    "data.mixing": "sample",
    "model.tomeformer.official": False,
    "model.tomeformer.merge_mode": "wavg",
    "model.tomeformer.prop_attn": True,
    "model.tomeformer.token_order": "original",
    "model.llm.precision": "bf16",
    "model.llm.prompt": "a photo of",
    "model.llm.truncation": "caption",
    "model.llm.bos_target": False,
    "train.precision": "bf16",
    "train.grad_clip": 1.0,
    "train.lr_schedule": "cosine",
    "eval.caption_prompt": "a photo of",
}


def value(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if dotted == "data.sources":
        return [(s.name, s.weight) for s in obj]
    return obj


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_hold_the_official_values(name):
    cfg = load_config(name)
    table = {**OFFICIAL_IMAGE, **PAPER[name]}
    wrong = {k: (value(cfg, k), want, where) for k, (want, where) in table.items() if value(cfg, k) != want}
    assert not wrong, wrong
    t = cfg.train
    assert t.micro_batch * t.grad_accum * cfg.world_size == t.global_batch == 1600
    assert cfg.model.vision.checkpoint is None  # to be given: the official code always loads eva_vit_g.pth


def test_video_config_holds_the_official_values():
    cfg = load_config("simvlg_video_msrvtt")
    wrong = {
        k: (value(cfg, k), want, where)
        for k, (want, where) in OFFICIAL_VIDEO.items()
        if value(cfg, k) != want
    }
    assert not wrong, wrong
    assert [s.kind for s in cfg.data.sources] == ["video"]
    assert cfg.model.vision.grad_checkpointing  # ours, and numerically the same (tests/test_models.py)


@pytest.mark.parametrize("name", sorted(PAPER) + ["simvlg_video_msrvtt"])
def test_each_variant_changes_only_the_variant_fields(name):
    paper, variant = load_config(name), load_config(f"{name}_variant")
    a, b = flatten(paper.to_dict()), flatten(variant.to_dict())
    changed = {k for k in a if a[k] != b[k]} - {"run.name", "train.ds_config", "inherit"}
    want = {k for k in VARIANT if str(value(paper, k)) != str(VARIANT[k])}
    assert changed == want, changed ^ want
    for k, v in VARIANT.items():
        assert value(variant, k) == v, k
    assert variant.run.name == f"{name}_variant"
    assert Path(variant.train.ds_config).name == "zero2_bf16.json"


def test_official_is_resolved_in_the_config_and_conflicts_are_refused():
    cfg = load_config("simvlg_opt2.7b", ["model.tomeformer.merge_mode=mean"])  # agreeing is fine
    assert cfg.model.tomeformer.merge_mode == "mean"
    with pytest.raises(ConfigError, match="official: true fixes merge_mode to 'mean'"):
        load_config("simvlg_opt2.7b", ["model.tomeformer.merge_mode=wavg"])
    off = load_config("simvlg_opt2.7b", ["model.tomeformer.official=false"])  # plain defaults then
    assert (off.model.tomeformer.merge_mode, off.model.tomeformer.token_order) == ("wavg", "original")


def _show(name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "config", "show", name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_config_show_prints_the_effective_official_values():
    """`simvlg config show` prints what the model reads: official: true resolved into its fields."""
    shown = yaml.safe_load(_show("simvlg_opt2.7b"))
    tf, llm = shown["model"]["tomeformer"], shown["model"]["llm"]
    assert (tf["official"], tf["merge_mode"], tf["prop_attn"], tf["token_order"]) == (
        True,
        "mean",
        False,
        "tome",
    )
    assert (llm["prompt"], llm["precision"], llm["truncation"], llm["bos_target"]) == (
        "",
        "fp16",
        "sequence",
        True,
    )
    assert (shown["data"]["hflip"], shown["data"]["mixing"]) == (True, "batch")
    assert (shown["train"]["precision"], shown["train"]["grad_clip"]) == ("fp16", 0.0)
    assert shown["eval"]["caption_prompt"] == "" and "coco_karpathy_val" in shown["eval"]["tasks"]
    video = yaml.safe_load(_show("simvlg_video_msrvtt"))
    assert (video["data"]["num_frames"], video["data"]["frame_sampling"]) == (4, "headtail")
    assert video["model"]["vision"]["grad_checkpointing"] is True
