"""P-Former (Jian, Gao, Vosoughi, NeurIPS 2023): the soft prompt a frozen LLM needs to say a sentence,
learned from text alone; later the target a vision-language connector is aligned to (align.py).

    pformer = build_pformer(cfg, llm_width=2560)          # BERT weights from cfg.init, new heads random
    prompts = pformer(bert_ids, bert_mask)                # [B, L] -> [B, N, D_llm]; N = cfg.num_prompts
    stage0 = PFormerStage0(cfg, pformer, llm)             # the text-only pre-training model
    out = stage0(**SentenceBatcher(bert_tok, caption_tok, cfg)(sentences))   # loss, losses{lm, ...}
    save_pformer(pformer, folder, cfg); pformer = load_pformer(folder)     # pformer_files.py: strict, frozen

`simvlg train` runs stage 0 when `model.kind: pformer` (pipeline/models/training.py builds the model and
the collate) and ends by writing RUN_DIR/pformer/ (save_pformer, tokenizer included), the folder that
`model.pformer_checkpoint` names for the alignment loss.

Shapes (official run: bert-base-uncased, OPT-2.7b, N = 32):
    [CLS] of BERT [B, H=768] -> Linear(H, N*H) -> [B, N, H] -> Linear(H, H), tanh -> Linear(H, D=2560)

Stage 0 (text only; each loss weighted by cfg, default 1):
  (a) lm: the frozen LLM reads [prompts | BOS prompt-text sentence end] and predicts the sentence and its
      end token (CaptionTokenizer's layout from model.llm; the official run: prompt "", cut at 32 tokens,
      BOS a target as well, as in the official code: llm.truncation sequence, llm.bos_target true).
  (b) contrastive: [CLS] -> Linear(H, 256), L2-normalised; similarities against the batch gathered
      over ranks (the local batch on one process) / a learnable temperature (0.07 at start, kept in
      [temp_min, temp_max]); cross-entropy with label smoothing 0.1, the positive being the sentence itself.
  (c) vq: MSE between every prompt vector and its nearest row of the LLM's input embeddings (that row
      detached), searched in chunks of codebook rows.
  BERT sees the sentence with 25 % of its tokens (never [CLS], [SEP] or padding) replaced by [MASK].

What the official code (yiren-jian/BLIText, pformer_opt.py) does, and where this module differs:
- The contrastive term has ONE view: the masked sentence's feature is compared with the gathered features
  of the same masked batch, so the positive logit is the feature with itself (cosine 1, the largest
  possible) and gives no gradient through the normalised feature; the term only pushes sentences apart
  (and tunes the temperature). `views: 1` reproduces that. `views: 2` (ours, a labelled variant) masks
  the sentence twice and makes the other view the positive (SimCSE-like), at the cost of a second BERT pass.
- Across ranks it gathers without gradient (BLIP-2's concat_all_gather: the keys get none, only the
  queries) and crashes on one process (dist.get_rank()); here the other ranks' rows are detached and this
  rank's rows keep their gradient (open_clip's way), which on one process is exactly the official code's
  single-GPU computation.
- Its temperature is never clamped; here the value used is clamped to [temp_min, temp_max] (BLIP-2's
  range), with a straight-through gradient so that the parameter can come back from a bound.
- N is taken from BERT's padded length (32 = max_txt_len); here from the config, and BERT pads to the
  longest sentence (the [CLS] output does not depend on padding).
- [SEP] may be masked there; not here. Its masks come from the global RNG; here from a generator seeded
  by the run seed and the batch's sentences (SentenceBatcher), so a batch is the same batch wherever and
  whenever it is built: a resumed run masks exactly as the uninterrupted one.
- The frozen P-Former of stages 1-2 is put in eval() once, then the trainer's model.train() turns its
  dropout back on, and its checkpoint loads with strict=False. Here freeze() holds through any parent's
  .train(), forward runs under no_grad, and load_pformer refuses missing or unexpected keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.schema import LLMConfig, PFormerConfig

from .llm import CaptionTokenizer, build_llm, freeze, hf_config_from_json, keeps_logits, prefix_lm_loss


# ------------------------------------------------------------------------------------- the model
class PFormer(nn.Module):
    """BERT-family encoder -> [CLS] -> N soft prompts of the LLM's width (see the module docstring)."""

    def __init__(
        self,
        encoder: nn.Module,
        num_prompts: int,
        llm_width: int,
        contrast_dim: int = 256,
        temp_init: float = 0.07,
    ):
        super().__init__()
        H = encoder.config.hidden_size
        self.encoder = encoder  # pooler removed: [CLS] is read from the last hidden state
        self.cls_proj = nn.Linear(H, num_prompts * H)
        self.prompt_head = nn.Sequential(nn.Linear(H, H), nn.Tanh())  # official name: Pformer.pooler
        self.llm_proj = nn.Linear(H, llm_width)
        self.text_proj = nn.Linear(H, contrast_dim)  # stage 0's contrastive head only
        # [1], not 0-d: DeepSpeed broadcasts every parameter as bytes, which a 0-d tensor cannot be viewed as
        self.temp = nn.Parameter(torch.full((1,), float(temp_init)))
        self.num_prompts, self.llm_width, self.hidden_size = num_prompts, llm_width, H
        self.frozen = False

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] token ids (mask None: no padding) -> [CLS] output [B, H]."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def prompts_from_cls(self, cls: torch.Tensor) -> torch.Tensor:
        B, H = cls.shape  # [B, H]
        x = self.cls_proj(cls).view(B, self.num_prompts, H)  # [B, N, H]: N from the config
        return self.llm_proj(self.prompt_head(x))  # [B, N, D_llm]

    def text_features(self, cls: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls), dim=-1)  # [B, contrast_dim], unit length

    def temperature(self, lo: float, hi: float) -> torch.Tensor:
        """The temperature clamped to [lo, hi], its gradient passed straight through."""
        return (self.temp + (self.temp.clamp(lo, hi) - self.temp).detach()).squeeze(0)  # 0-d

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] -> soft prompts [B, N, D_llm] (without autograd once frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.prompts_from_cls(self.encode(input_ids, attention_mask))

    # ------------------------------------------------------------------------------ frozen use
    def freeze(self) -> PFormer:
        """Target mode for connector training: no gradients, no dropout, and it stays so through any
        parent's .train() (the official code's trainer undid its eval())."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> PFormer:
        return super().train(mode and not self.frozen)


def _encoder_without_pooler(encoder: nn.Module) -> nn.Module:
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # BertModel skips a None pooler; the official code overwrote it
    return encoder


def build_pformer(cfg: PFormerConfig, llm_width: int, *, meta: bool = False) -> PFormer:
    """Encoder weights from cfg.init (HF id or folder), new heads initialised by torch's defaults; on the
    meta device from cfg.arch_config (no files but the JSON)."""
    from transformers import AutoModel

    if meta:
        if cfg.arch_config is None:
            raise ValueError("model.pformer.arch_config is needed to build the P-Former on the meta device")
        with torch.device("meta"):
            encoder = AutoModel.from_config(hf_config_from_json(cfg.arch_config), attn_implementation="eager")
            return PFormer(
                _encoder_without_pooler(encoder), cfg.num_prompts, llm_width, cfg.contrast_dim, cfg.temp_init
            )
    encoder = AutoModel.from_pretrained(cfg.init, dtype=torch.float32)
    return PFormer(
        _encoder_without_pooler(encoder), cfg.num_prompts, llm_width, cfg.contrast_dim, cfg.temp_init
    )


# ------------------------------------------------------------------------------------ the losses
def gather_with_local_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, C] on each of W ranks -> ([W*B, C], first row of this rank). The other ranks' rows carry no
    gradient, this rank's rows keep theirs. One process (or no process group): (x, 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    W, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(W)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"contrastive loss: per-rank batch sizes differ {sizes}; every rank needs the same "
            "micro-batch (drop the last partial batch)"
        )
    parts = [torch.empty_like(x) for _ in range(W)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts), rank * x.shape[0]


def contrastive_loss(
    query: torch.Tensor, keys: torch.Tensor, temp: torch.Tensor, label_smoothing: float = 0.1
) -> torch.Tensor:
    """query, keys [B, C] unit vectors, keys[i] the positive of query[i]; the negatives are every other
    key of the batch gathered over ranks. Official P-Former: keys is query itself."""
    all_keys, first = gather_with_local_grad(keys)  # [W*B, C]
    logits = query.float() @ all_keys.float().T / temp  # [B, W*B]
    targets = torch.arange(query.shape[0], device=query.device) + first  # [B]
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


@torch.no_grad()
def nearest_rows(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """x [M, D], codebook [V, D] -> index of the nearest (L2) codebook row per x row [M], in fp32,
    chunk codebook rows at a time (OPT-2.7b: 50272 x 2560 never meets all of x at once)."""
    x = x.float()
    best = torch.full((x.shape[0],), float("inf"), device=x.device)
    index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for start in range(0, codebook.shape[0], chunk):
        c = codebook[start : start + chunk].to(device=x.device, dtype=torch.float32)  # [v, D]
        d = (c * c).sum(1) - 2 * x @ c.T  # [M, v]: ||x - c||^2 - ||x||^2 (the same for every row)
        val, j = d.min(1)
        better = val < best  # ties keep the earlier row, as argmin does
        best = torch.where(better, val, best)
        index = torch.where(better, j + start, index)
    return index


def vq_loss(prompts: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """MSE between each prompt vector [B, N, D] and its nearest codebook row [V, D] (detached); mean over
    all B*N*D elements, as F.mse_loss in the official code."""
    flat = prompts.reshape(-1, prompts.shape[-1])  # [B*N, D]
    quantized = codebook[nearest_rows(flat.detach(), codebook, chunk)].detach()  # [B*N, D]
    return F.mse_loss(flat.float(), quantized.float())


# --------------------------------------------------------------------------- stage-0 training model
class PFormerStage0(nn.Module):
    """P-Former (trainable) + frozen LLM: the model `simvlg train` runs on text-only batches."""

    def __init__(
        self,
        cfg: PFormerConfig,
        pformer: PFormer,
        llm: nn.Module,
        *,
        tokenizer=None,
        llm_name: str | None = None,
    ):
        super().__init__()
        width = llm.get_input_embeddings().weight.shape[1]
        if pformer.llm_width != width:
            raise ValueError(
                f"the P-Former makes prompts of width {pformer.llm_width}, the LLM is {width} wide"
            )
        self.cfg, self.pformer, self.llm = cfg, pformer, freeze(llm)
        self._logits_to_keep = keeps_logits(self.llm)
        self.tokenizer, self.llm_name = tokenizer, llm_name  # saved with the P-Former (save_trained)
        self.train(True)

    def train(self, mode: bool = True) -> PFormerStage0:
        super().train(mode)
        self.llm.eval()  # frozen: no dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self, bert_input_ids, bert_attention_mask, input_ids, attention_mask, labels, bert_input_ids_2=None
    ) -> dict:
        """bert_input_ids [B, Lb] (masked), bert_attention_mask [B, Lb], bert_input_ids_2 [B, Lb] (the second
        masked view, views=2 only); input_ids, attention_mask, labels [B, L] for the LLM (CaptionTokenizer).
        -> loss (the weighted sum), losses {lm, contrastive, vq} (those with weight > 0, unweighted),
        per_sample_loss [B] and num_tokens (0-d tensor) of the LM term."""
        c = self.cfg
        if (bert_input_ids_2 is not None) != (c.views == 2):
            raise ValueError(
                f"model.pformer.views is {c.views} but the batch has "
                f"{'two' if bert_input_ids_2 is not None else 'one'} masked view(s)"
            )
        cls = self.pformer.encode(bert_input_ids, bert_attention_mask)  # [B, H]
        prompts = self.pformer.prompts_from_cls(cls)  # [B, N, D]
        lm = prefix_lm_loss(
            self.llm, prompts, input_ids, attention_mask, labels, logits_to_keep=self._logits_to_keep
        )
        out = {k: lm[k] for k in ("per_sample_loss", "per_sample_tokens", "num_tokens")}
        terms = {}
        if c.lm_weight > 0:
            terms["lm"] = (c.lm_weight, lm["loss"])
        if c.contrastive_weight > 0:
            temp = self.pformer.temperature(c.temp_min, c.temp_max)
            f1 = self.pformer.text_features(cls)  # [B, 256]
            if bert_input_ids_2 is None:
                loss_c = contrastive_loss(f1, f1, temp, c.label_smoothing)
            else:
                f2 = self.pformer.text_features(self.pformer.encode(bert_input_ids_2, bert_attention_mask))
                loss_c = (
                    contrastive_loss(f1, f2, temp, c.label_smoothing)
                    + contrastive_loss(f2, f1, temp, c.label_smoothing)
                ) / 2
            terms["contrastive"] = (c.contrastive_weight, loss_c)
        if c.vq_weight > 0:
            codebook = self.llm.get_input_embeddings().weight  # [V, D]
            terms["vq"] = (c.vq_weight, vq_loss(prompts, codebook, c.vq_chunk))
        if not terms:
            raise ValueError("model.pformer: every loss weight is 0")
        out["loss"] = sum(w * v for w, v in terms.values())
        out["losses"] = {k: v for k, (_, v) in terms.items()}
        return out

    def save_trained(self, run_dir: str | Path, step: int | None = None) -> Path:
        """What a finished run leaves: RUN_DIR/pformer/ (save_pformer, with the BERT tokenizer), written
        beside and renamed into place."""
        import shutil

        from .pformer_files import save_pformer  # it imports this module

        path = Path(run_dir) / "pformer"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pformer(self.pformer, tmp, self.cfg, tokenizer=self.tokenizer, llm_name=self.llm_name, step=step)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        return path


def build_stage0(
    cfg: PFormerConfig, llm_cfg: LLMConfig, *, device="cpu", meta: bool = False
) -> PFormerStage0:
    """The stage-0 model; meta=True builds both at full size on the meta device from cfg.arch_config and
    llm_cfg.arch_config (for FLOP counts: inputs on meta, BERT attention_mask None)."""
    llm = build_llm(llm_cfg, device=device, meta=meta)
    pformer = build_pformer(cfg, llm.get_input_embeddings().weight.shape[1], meta=meta)
    if not meta:
        pformer.to(device)
    return PFormerStage0(cfg, pformer, llm)


# ------------------------------------------------------------------------------------ text side
def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mask_id: int,
    keep_ids: list[int],
    ratio: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each maskable token by [MASK] with probability `ratio` (Bernoulli per token, as the
    official code). Never masked: padding (attention_mask 0) and keep_ids ([CLS], [SEP], [PAD]).
    -> (masked ids [B, L], which positions were masked [B, L] bool)."""
    maskable = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(keep_ids, dtype=input_ids.dtype))
    hit = (torch.rand(input_ids.shape, generator=generator) < ratio) & maskable  # [B, L]
    return input_ids.masked_fill(hit, mask_id), hit


class SentenceBatcher:
    """Sentences -> one stage-0 batch (a picklable collate, run in the loader's workers). The masks come
    from a generator seeded by `seed` when given, else by the batcher's seed (the run seed) and the
    sentences themselves: a batch is a function of its data and the seed, never of the process or of
    how many batches came before, so a resumed run masks exactly as the uninterrupted one."""

    def __init__(
        self, bert_tokenizer, caption_tokenizer: CaptionTokenizer, cfg: PFormerConfig, seed: int = 0
    ):
        self.bert_tokenizer, self.caption_tokenizer, self.cfg = bert_tokenizer, caption_tokenizer, cfg
        self.seed = seed
        t = bert_tokenizer
        if t.mask_token_id is None:
            raise ValueError(f"the P-Former tokenizer ({type(t).__name__}) has no [MASK] token")
        self.keep_ids = [i for i in (t.cls_token_id, t.sep_token_id, t.pad_token_id) if i is not None]

    def bert_inputs(self, sentences: list[str]) -> dict[str, torch.Tensor]:
        """Unmasked P-Former inputs (also the alignment targets' inputs): [CLS] words [SEP], padded to the
        longest, at most cfg.max_text_tokens -> bert_input_ids, bert_attention_mask [B, Lb]."""
        return pformer_inputs(self.bert_tokenizer, sentences, self.cfg.max_text_tokens)

    def __call__(self, sentences: list[str], seed: int | None = None) -> dict[str, torch.Tensor]:
        if seed is None:
            seed = sentence_seed(self.seed, sentences)
        g = torch.Generator().manual_seed(seed)
        out = self.bert_inputs(sentences)
        ids, att = out["bert_input_ids"], out["bert_attention_mask"]
        kw = dict(
            mask_id=self.bert_tokenizer.mask_token_id,
            keep_ids=self.keep_ids,
            ratio=self.cfg.mask_ratio,
            generator=g,
        )
        out["bert_input_ids"] = mask_tokens(ids, att, **kw)[0]
        if self.cfg.views == 2:
            out["bert_input_ids_2"] = mask_tokens(ids, att, **kw)[0]
        return out | self.caption_tokenizer(sentences)


def pformer_inputs(bert_tokenizer, sentences: list[str], max_text_tokens: int) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP], padded to the longest, at most max_text_tokens -> bert_input_ids,
    bert_attention_mask [B, Lb] (unmasked: stage 0 masks them; the alignment targets read them as is)."""
    enc = bert_tokenizer(
        [s.strip() for s in sentences],
        padding="longest",
        truncation=True,
        max_length=max_text_tokens,
        return_tensors="pt",
    )
    return {"bert_input_ids": enc["input_ids"], "bert_attention_mask": enc["attention_mask"]}


def sentence_seed(seed: int, sentences: list[str]) -> int:
    """A 63-bit seed from a seed and a batch of sentences, the same in every process."""
    h = hashlib.blake2b(repr((int(seed), list(sentences))).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1
