"""SimVLG: frozen ViT -> connector (trainable) -> soft prompt -> frozen LLM -> caption.

    model = build_model(cfg.model, device="cuda")
    out = model(pixel_values, **tok(captions))     # loss, per_sample_loss [B], num_tokens
    model.generate(pixel_values)                   # ["a dog on a beach", ...]

Shapes (paper config): pixels [B, 3, 224, 224] -> ViT-g block 39 [B, 257, 1408] -> ln_vision, proj1
[B, 257, 768] -> TomeFormer (12 layers, r = 19) [B, 29, 768] -> proj2 [B, 29, 2560] -> prepended to
the text embeddings [B, L, 2560] of OPT-2.7b. Video [B, T, 3, H, W]: temporal merging inside the ViT,
then frame features averaged over T (or each frame's soft prompt concatenated, temporal_pool: concat).

Only `model.connector` trains (ln_vision, proj1, TomeFormer, proj2; + temporal modules for video;
the Q-Former and its queries for the baseline; the joint connector, which also reads the row's text
input: models/joint.py). The ViT and LLM have requires_grad=False and stay in
eval mode through model.train(). Dtypes: ViT and LLM in their configured precision and exactly the
loaded weights (a trainer must keep them out of any engine cast), the connector in fp32 (or whatever
an engine casts it to: inputs are cast to the connector's dtype, the soft prompt to the LLM's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.config import ModelConfig

from .align import alignment_loss
from .joint import JointConnector, text_input_mask
from .llm import (
    CaptionTokenizer,
    attn_implementation,
    build_llm,
    flash_attn_available,
    keeps_logits,
    prefix_inputs,
    prefix_lm_loss,
)
from .qformer import build_qformer
from .temporal import build_temporal
from .tomeformer import build_tomeformer
from .vision import VisionTower, build_vision

CONNECTOR_WEIGHTS, CONNECTOR_CONFIG = "model.safetensors", "config.json"


class TomeConnector(nn.Module):
    """[B, N, Dv] visual tokens -> [B, N', D_llm] soft prompt."""

    def __init__(self, vision_width: int, tomeformer, llm_width: int, temporal=None):
        super().__init__()
        self.ln_vision = nn.LayerNorm(vision_width)  # BLIP-2's ln_vision (trainable there too)
        self.proj1 = nn.Linear(vision_width, tomeformer.hidden_size)
        self.tomeformer = tomeformer
        self.proj2 = nn.Linear(tomeformer.hidden_size, llm_width)
        self.temporal = temporal  # nn.ModuleList, one per ViT block, or None

    def forward(self, feats):
        return self.proj2(self.tomeformer(self.proj1(self.ln_vision(feats))))  # [B, N', D_llm]

    def forward_with_sources(self, feats):
        """(soft prompt, per TomeFormer layer [B, N_l, N] 0/1: which visual tokens each token holds)."""
        x, sources = self.tomeformer.forward_with_sources(self.proj1(self.ln_vision(feats)))
        return self.proj2(x), sources


class QFormerConnector(nn.Module):
    """[B, N, Dv] -> [B, Q, D_llm] through BLIP-2's Q-Former with Q learned queries."""

    def __init__(self, vision_width: int, qformer, query_tokens, llm_width: int, temporal=None):
        super().__init__()
        self.ln_vision = nn.LayerNorm(vision_width)
        self.query_tokens = query_tokens  # [1, Q, C]
        self.qformer = qformer
        self.proj2 = nn.Linear(qformer.config.hidden_size, llm_width)
        self.temporal = temporal

    def forward_with_sources(self, feats):
        raise ValueError("the Q-Former connector does not merge tokens: no merge sources")

    def forward(self, feats):
        q = self.query_tokens.expand(feats.shape[0], -1, -1)  # [B, Q, C]
        out = self.qformer(query_embeds=q, encoder_hidden_states=self.ln_vision(feats)).last_hidden_state
        return self.proj2(out.to(self.proj2.weight.dtype))  # [B, Q, D_llm]


class SimVLG(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        vision: VisionTower,
        connector: nn.Module,
        llm: nn.Module,
        tokenizer: CaptionTokenizer | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.vision, self.connector, self.llm = vision, connector, llm
        self.tokenizer = tokenizer  # None on the meta device (no files)
        self._logits_to_keep = keeps_logits(llm)
        for p in self.vision.parameters():
            p.requires_grad_(False)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        self.pformer, self.align_weight, self.align_match = None, 0.0, "position"  # see align_to
        self.train(True)

    # ---------------------------------------------------------------------------- parameters
    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen parts never train (no dropout, no drop-path)
        self.llm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> dict[str, int]:
        count = lambda m, t: sum(p.numel() for p in m.parameters() if p.requires_grad == t)
        return {
            "trainable": count(self, True),
            "frozen": count(self, False),
            "vision": count(self.vision, False),
            "llm": count(self.llm, False),
            "connector": sum(p.numel() for p in self.connector.parameters()),
        }

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def soft_prompt_length(self, num_frames: int = 1) -> int:
        """Soft tokens per sample (x num_frames for video with temporal_pool: concat)."""
        tf = getattr(self.connector, "tomeformer", None)
        if tf is not None:
            per_frame = tf.token_counts(self.vision.num_tokens)[-1]
        elif isinstance(self.connector, JointConnector):
            per_frame = self.connector.num_latents
        else:
            per_frame = self.connector.query_tokens.shape[1]
        concat = self.cfg.video.enabled and self.cfg.video.temporal_pool == "concat"
        return per_frame * (num_frames if concat else 1)

    # ------------------------------------------------------------------------------- vision side
    def visual_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, Dv]; [B, T, 3, H, W] -> [B, T, N, Dv] (frozen ViT, + temporal)."""
        temporal = self.connector.temporal
        return self.vision(pixel_values, temporal=temporal if pixel_values.dim() == 5 else None)

    def soft_prompt(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pixels -> soft prompt [B, P, D_llm] in the LLM's dtype. The joint connector also reads the
        text input: input_ids [B, L] with text_mask [B, L] marking its tokens (others ignore both)."""
        return self._soft_prompt(pixel_values, self._connect(input_ids, text_mask))[0]

    def _connect(self, input_ids, text_mask):
        """connector features -> (soft prompt, None); the joint connector gets the LLM's input
        embeddings of the text input (repeated per frame for concat video)."""
        if input_ids is None or not isinstance(self.connector, JointConnector):
            return lambda feats: (self.connector(feats), None)
        embeds = self.llm.get_input_embeddings()(input_ids)  # [B, L, D_llm]
        mask = torch.ones_like(input_ids, dtype=torch.bool) if text_mask is None else text_mask.bool()

        def connect(feats):
            k = feats.shape[0] // embeds.shape[0]  # frames per sample with concat video, else 1
            return self.connector(
                feats, text_embeds=embeds.repeat_interleave(k, 0), text_mask=mask.repeat_interleave(k, 0)
            ), None

        return connect

    def soft_prompt_with_sources(self, pixel_values: torch.Tensor):
        """(soft prompt, per TomeFormer layer which visual tokens each soft token holds)."""
        return self._soft_prompt(pixel_values, self.connector.forward_with_sources)

    def _soft_prompt(self, pixel_values: torch.Tensor, connect):
        """connect: connector features -> (soft prompt, merge sources or None)."""
        feats = self.visual_features(pixel_values).to(self.connector_dtype)
        if feats.dim() == 4 and self.cfg.video.temporal_pool == "concat":  # [B, T, N, D]
            B, T = feats.shape[:2]
            soft, sources = connect(feats.flatten(0, 1))  # per frame [B*T, P, D]
            soft = soft.reshape(B, T * soft.shape[1], soft.shape[2])  # [B, T*P, D_llm]
        else:
            if feats.dim() == 4:  # [B, T, N, D] -> [B, N, D]: mean over time, as the official code;
                # written as frame 0 + mean offset so identical frames give frame 0 bit for bit
                feats = feats[:, 0] + (feats - feats[:, :1]).mean(1)
            soft, sources = connect(feats)
        return soft.to(self.llm_dtype), sources

    @torch.no_grad()
    def merge_info(
        self, pixel_values: torch.Tensor, layers: list[int] | None = None
    ) -> dict[int, torch.Tensor]:
        """Which soft token each image patch ends up in: {layer: [B, gh, gw] long} (0-based layers;
        token 0 is the protected CLS, so patch ids are >= 1). For concat video: [B*T, gh, gw]."""
        was = self.training
        self.eval()
        try:
            _, sources = self.soft_prompt_with_sources(pixel_values)
        finally:
            self.train(was)
        layers = list(range(len(sources))) if layers is None else layers
        gh, gw = self.vision.grid
        p = self.vision.num_prefix_tokens
        out = {}
        for i in layers:
            src = sources[i]  # [B, N_i, N0]
            out[i] = src.argmax(1)[:, p:].reshape(src.shape[0], gh, gw)
        return out

    # -------------------------------------------------------------------------------- LLM side
    def _select_attention(self, device: torch.device) -> None:
        """flash-attn for CUDA tensors when installed, SDPA otherwise (chosen on the first call)."""
        if not flash_attn_available():
            return
        want = attn_implementation(device)
        if getattr(self.llm.config, "_attn_implementation", want) != want:
            self.llm.set_attn_implementation(want)

    def forward(
        self, pixel_values, input_ids, attention_mask, labels, bert_input_ids=None, bert_attention_mask=None
    ) -> dict:
        """Next-token cross-entropy on caption tokens only (labels: -100 on prompt and padding).
        pixel_values [B, 3, H, W] or [B, T, 3, H, W]; input_ids, attention_mask, labels [B, L]
        (attention_mask None: no padding). -> loss (mean over caption tokens of the batch),
        per_sample_loss [B] (mean over each sample's caption tokens), per_sample_tokens [B], num_tokens
        (llm.prefix_lm_loss). With a P-Former
        (align_to): bert_input_ids, bert_attention_mask [B, Lb] are the captions' P-Former tokens, and
        loss = LM + align_weight * alignment, both in losses {lm, align}."""
        self._select_attention(input_ids.device)
        given = text_input_mask(torch.ones_like(labels) if attention_mask is None else attention_mask, labels)
        soft = self.soft_prompt(pixel_values, input_ids, given)  # [B, P, D]; given: the text input
        out = prefix_lm_loss(
            self.llm, soft, input_ids, attention_mask, labels, logits_to_keep=self._logits_to_keep
        )
        if self.pformer is not None:
            out = self._with_alignment(out, soft, bert_input_ids, bert_attention_mask)
        return out

    # --------------------------------------------------------------------- P-Former alignment
    def align_to(self, pformer: nn.Module, weight: float, match: str = "position", num_frames: int = 1):
        """Train with L_LM + weight * L_align (align.py) against a frozen P-Former, held as a child whose
        parameters are all frozen (so a trainer keeps it out of its engine and its checkpoints) and which
        stays in eval mode through .train(). Its N prompts must match the soft prompt's length."""
        P, width = self.soft_prompt_length(num_frames), self.llm.get_input_embeddings().weight.shape[1]
        if pformer.num_prompts != P or pformer.llm_width != width:
            raise ValueError(
                f"model.pformer_checkpoint: the P-Former makes {pformer.num_prompts} prompts of "
                f"width {pformer.llm_width}, this {self.cfg.connector} model's soft prompt is "
                f"{P} x {width}; pre-train a P-Former with model.pformer.num_prompts={P} "
                "against this LLM"
            )
        self.pformer = pformer.freeze()
        self.align_weight, self.align_match = float(weight), match

    def _with_alignment(self, out: dict, soft, bert_input_ids, bert_attention_mask) -> dict:
        if bert_input_ids is None:
            raise ValueError(
                "P-Former alignment: the batch has no bert_input_ids (the captions' P-Former "
                "tokens); build the collate with pipeline.models.training_tokenizer"
            )
        target = self.pformer(bert_input_ids, bert_attention_mask)  # [B, N, D], frozen: no autograd
        align = alignment_loss(soft, target, self.align_match)
        return {
            **out,
            "loss": out["loss"] + self.align_weight * align,
            "losses": {"lm": out["loss"], "align": align},
        }

    @torch.no_grad()
    def generate(
        self,
        pixel_values,
        prompt: str | list[str] | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        min_new_tokens: int = 8,
        **kw,
    ) -> list[str]:
        """Captions (prompt None: the config's prompt) or answers (prompt = "Question: ... Short
        answer:" per image). num_beams=1 is greedy. Extra kwargs go to the LLM's generate()."""
        if self.tokenizer is None:
            raise RuntimeError("generate() needs a tokenizer (a model built with meta=False)")
        was = self.training
        self.eval()
        try:
            self._select_attention(pixel_values.device)
            B = pixel_values.shape[0]
            prompt = self.cfg.llm.prompt if prompt is None else prompt
            prompts = [prompt] * B if isinstance(prompt, str) else list(prompt)
            if len(prompts) != B:
                raise ValueError(f"{len(prompts)} prompts for {B} images")
            enc = {k: v.to(pixel_values.device) for k, v in self.tokenizer.prompts(prompts).items()}
            # the text input as training saw it (text_input_mask): a BOS that is a target (bos_target
            # with an empty prompt) is not part of it
            given = enc["attention_mask"].clone()
            if self.tokenizer.bos_target:
                given[[i for i, p in enumerate(prompts) if not p]] = 0
            soft = self.soft_prompt(pixel_values, enc["input_ids"], given)  # [B, P, D]
            embeds, mask = prefix_inputs(self.llm, soft, enc["input_ids"], enc["attention_mask"])
            out = self.llm.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                num_beams=num_beams,
                do_sample=kw.pop("do_sample", False),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                eos_token_id=self.tokenizer.stop_ids,
                pad_token_id=self.tokenizer.pad_id,
                **kw,
            )
        finally:
            self.train(was)
        return self.tokenizer.decode(out)

    # ------------------------------------------------------------------------- connector files
    def save_trained(self, run_dir: str | Path, step: int | None = None) -> Path:
        """What a finished training run leaves: RUN_DIR/connector/ (save_connector)."""
        return self.save_connector(Path(run_dir) / "connector", step=step)

    def connector_state_dict(self) -> dict[str, torch.Tensor]:
        return self.connector.state_dict()

    def save_connector(self, path: str | Path, step: int | None = None) -> Path:
        """An HF-style folder: model.safetensors (the connector's weights) + config.json, written to a
        temporary folder and renamed into place (a reader never sees half a connector)."""
        import os
        import shutil

        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        sd = {k: v.detach().cpu().contiguous() for k, v in self.connector_state_dict().items()}
        save_file(sd, str(tmp / CONNECTOR_WEIGHTS), metadata={"format": "pt"})
        meta = {
            "format": "simvlg-connector",
            "version": 1,
            "connector": self.cfg.connector,
            "step": step,
            "model": self.cfg.model_dump(mode="json"),
            "parameters": sum(v.numel() for v in sd.values()),
        }
        (tmp / CONNECTOR_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path

    def load_connector(self, path: str | Path) -> list[str]:
        """Load a save_connector folder. An image-pretrained connector loads into a video model: its
        temporal modules keep their initialisation (gate 0); their names are returned."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / CONNECTOR_CONFIG).read_text())
        if meta.get("connector") != self.cfg.connector:
            raise ValueError(
                f"{path}: a {meta.get('connector')} connector, this model has {self.cfg.connector}"
            )
        sd = load_file(str(path / CONNECTOR_WEIGHTS))
        own = self.connector.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        if unexpected or any(not k.startswith("temporal.") for k in missing):
            raise ValueError(
                f"{path}: connector weights do not match this model (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]})"
            )
        self.connector.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)
        return missing


def connector_config(path: str | Path) -> ModelConfig:
    """The ModelConfig a saved connector was trained with (to rebuild the model around it)."""
    meta = json.loads((Path(path) / CONNECTOR_CONFIG).read_text())
    return ModelConfig.model_validate(meta["model"])


def build_connector(cfg: ModelConfig, vision: VisionTower, llm_width: int, *, meta: bool = False):
    temporal = None
    if cfg.video.enabled:
        with torch.device("meta" if meta else "cpu"):
            temporal = build_temporal(
                vision.num_blocks, vision.width, cfg.video.temporal_dim, cfg.video.temporal_heads
            )
    if cfg.connector == "joint":  # random init (no checkpoint): built on the meta device directly
        with torch.device("meta" if meta else "cpu"):
            return JointConnector(vision.width, llm_width, **cfg.joint.model_dump(), temporal=temporal)
    if cfg.connector == "qformer":
        qformer, queries = build_qformer(cfg.qformer, vision.width, meta=meta)
        with torch.device("meta" if meta else "cpu"):
            return QFormerConnector(vision.width, qformer, queries, llm_width, temporal)
    tf = build_tomeformer(cfg.tomeformer, meta=meta)
    with torch.device("meta" if meta else "cpu"):
        return TomeConnector(vision.width, tf, llm_width, temporal)


def build_model(model_cfg: ModelConfig, *, device="cpu", meta: bool = False) -> SimVLG:
    """The whole model from a ModelConfig. meta=True: full size on the meta device from the
    arch_config JSONs (no weights, no files besides the JSONs, no tokenizer)."""
    vision = build_vision(model_cfg.vision, device=device, meta=meta)
    llm = build_llm(model_cfg.llm, device=device, meta=meta)
    connector = build_connector(model_cfg, vision, llm.get_input_embeddings().weight.shape[1], meta=meta)
    connector.float()
    tokenizer = None if meta else CaptionTokenizer.from_config(model_cfg.llm)
    model = SimVLG(model_cfg, vision, connector, llm, tokenizer)
    if not meta and model_cfg.init_connector:
        model.load_connector(model_cfg.init_connector)  # e.g. image-pretrained, for the video run
    if not meta:
        model.connector.to(device)
    return model
