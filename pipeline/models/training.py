"""What `simvlg train` trains, as the config says, and the collate its batches need.

    model = build_training_model(cfg, device="cuda")   # SimVLG (+ frozen P-Former) or PFormerStage0
    tokenize = training_tokenizer(cfg)                 # captions -> the tensors that model's forward names

- `model.kind: simvlg` (default): build_model(cfg.model); with `train.align_weight > 0` the frozen
  P-Former of `model.pformer_checkpoint` joins it (SimVLG.align_to) and the collate adds each caption's
  P-Former tokens (align.CaptionsWithTargets).
- `model.kind: pformer`: the P-Former's stage 0 (pformer.PFormerStage0) on sentences (data sources of
  kind text); the collate masks the sentences for BERT and tokenises them for the LLM
  (pformer.SentenceBatcher, masks seeded by the run seed and the batch's sentences).

Every model here has forward(**batch) -> {loss, per_sample_loss, num_tokens, losses} and
save_trained(run_dir, step) for the end of a finished run (SimVLG: connector/, P-Former: pformer/).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pipeline.schema import Config

from .align import CaptionsWithTargets
from .llm import CaptionTokenizer
from .pformer import SentenceBatcher, build_stage0
from .pformer_files import load_pformer, load_pformer_tokenizer, read_pformer_config
from .simvlg import build_model


def build_training_model(cfg: Config, *, device="cpu") -> nn.Module:
    if cfg.model.kind == "pformer":
        from transformers import AutoTokenizer

        if cfg.train.align_weight > 0:
            raise ValueError(
                "train.align_weight applies to SimVLG training; a model.kind: pformer run "
                "trains the P-Former itself (set train.align_weight=0)"
            )
        stage0 = build_stage0(cfg.model.pformer, cfg.model.llm, device=device)
        stage0.tokenizer = AutoTokenizer.from_pretrained(cfg.model.pformer.init)
        stage0.llm_name = cfg.model.llm.name
        return stage0
    model = build_model(cfg.model, device=device)
    if cfg.train.align_weight > 0:
        if cfg.model.pformer_checkpoint is None:
            raise ValueError(
                f"train.align_weight is {cfg.train.align_weight} but model.pformer_checkpoint "
                "is not set; name the P-Former folder a model.kind: pformer run wrote"
            )
        frames = cfg.data.num_frames if cfg.model.video.enabled else 1
        model.align_to(
            load_pformer(cfg.model.pformer_checkpoint, device=device),
            cfg.train.align_weight,
            cfg.train.align_match,
            num_frames=frames,
        )
    return model


def training_tokenizer(cfg: Config) -> Callable:
    """The loader's collate for the model build_training_model makes (picklable, run in its workers)."""
    captions = CaptionTokenizer.from_config(cfg.model.llm)
    if cfg.model.kind == "pformer":
        from transformers import AutoTokenizer

        return SentenceBatcher(
            AutoTokenizer.from_pretrained(cfg.model.pformer.init),
            captions,
            cfg.model.pformer,
            seed=cfg.run.seed,
        )
    if cfg.train.align_weight > 0:
        folder = cfg.model.pformer_checkpoint
        return CaptionsWithTargets(
            captions,
            load_pformer_tokenizer(folder),
            read_pformer_config(folder)["pformer"]["max_text_tokens"],
        )
    return captions
