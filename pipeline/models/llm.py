"""The frozen language model and the caption tokenizer.

    llm = build_llm(cfg.llm, device="cpu")          # any AutoModelForCausalLM, frozen, cfg.llm.precision
    tok = CaptionTokenizer.from_config(cfg.llm)     # data-loader collate: captions -> ids, mask, labels

Text layout (BLIP-2 / official EVLGen code), one row per caption, right padded:

    [BOS] prompt tokens | caption tokens (<= max_text_tokens - 1) | end | pad ...
    labels: -100        | caption ids                             | end | -100 ...

Pre-training tasks (`pairs`, pipeline/data/tasks.py) put the task's text input where the prompt is
and its target where the caption is.

`end` is "\\n" when it is a single token (OPT; the official code appends "\\n" and stops on it),
else the tokenizer's EOS (LLaMA / Vicuna); `caption_end` in the config forces one.
The model prepends the soft prompt to these embeddings; its positions get no loss either.
Two config switches reproduce the official code's tokenizer call exactly:
- truncation "sequence": the whole row [BOS, prompt, caption, end] is cut to max_text_tokens (the
  official `max_length=max_txt_len`, so a caption that long loses its end token); "caption" (default)
  cuts the caption alone and always ends it;
- bos_target: with an empty prompt the BOS is a target as well (the official OPT code masks the
  prompt only `if self.prompt`, so the last soft token learns to predict BOS).
`bos_token` replaces the tokenizer's BOS (the official Vicuna code makes it "</s>").
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import LLMConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE = -100


def load_arch_json(path: str | Path) -> dict:
    """An architecture JSON from pipeline/configs/arch/ without its `_comment` keys."""
    raw = json.loads(Path(path).read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def hf_config_from_json(path: str | Path):
    """A transformers config object from a (public) config.json copy, offline."""
    from transformers import AutoConfig

    raw = load_arch_json(path)
    raw.pop("architectures", None)
    return AutoConfig.for_model(raw.pop("model_type"), **raw)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def attn_implementation(device) -> str:
    """flash-attn 2 for CUDA tensors when the package is installed, SDPA otherwise."""
    device = torch.device(device)
    return "flash_attention_2" if device.type == "cuda" and flash_attn_available() else "sdpa"


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def build_llm(cfg: LLMConfig, *, device="cpu", meta: bool = False) -> nn.Module:
    """The frozen causal LM: from_pretrained(cfg.name), or on the meta device from cfg.arch_config."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.precision]
    if meta:
        if cfg.arch_config is None:
            raise ValueError("model.llm.arch_config is needed to build the LLM on the meta device")
        # eager attention: transformers' SDPA mask path reads mask values (.item()), which the meta
        # device cannot do; the matmul FLOPs are the same
        with torch.device("meta"):
            llm = AutoModelForCausalLM.from_config(
                hf_config_from_json(cfg.arch_config), dtype=dtype, attn_implementation="eager"
            )
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            cfg.name, dtype=dtype, attn_implementation=attn_implementation(device)
        )
        llm.to(device)
    return freeze(llm)


def end_token_id(tokenizer, mode: str = "auto") -> int:
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    if mode == "newline" or (mode == "auto" and len(newline) == 1):
        if len(newline) != 1:
            raise ValueError(f"caption_end=newline, but '\\n' is {len(newline)} tokens for this tokenizer")
        return newline[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token and '\\n' is not a single token")
    return tokenizer.eos_token_id


class CaptionTokenizer:
    """Captions -> dict(input_ids, attention_mask, labels), each [B, L] long. Picklable (collate_fn)."""

    def __init__(
        self,
        tokenizer,
        prompt: str = "",
        max_text_tokens: int = 32,
        caption_end: str = "auto",
        truncation: str = "caption",
        bos_target: bool = False,
        bos_token: str | None = None,
    ):
        if truncation not in ("caption", "sequence"):
            raise ValueError(f"truncation must be 'caption' or 'sequence', got {truncation!r}")
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_text_tokens = max_text_tokens
        self.truncation, self.bos_target = truncation, bos_target
        self.bos_id = None
        if bos_token is not None:
            ids = tokenizer(bos_token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(
                    f"llm.bos_token {bos_token!r} is {len(ids)} tokens for this tokenizer, not one"
                )
            self.bos_id = ids[0]
        self.end_id = end_token_id(tokenizer, caption_end)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.prompt_ids = self._ids(prompt)  # BOS (if the tokenizer adds one) + prompt

    @classmethod
    def from_config(cls, cfg: LLMConfig) -> CaptionTokenizer:
        from transformers import AutoTokenizer

        return cls(
            AutoTokenizer.from_pretrained(cfg.name),
            cfg.prompt,
            cfg.max_text_tokens,
            cfg.caption_end,
            cfg.truncation,
            cfg.bos_target,
            cfg.bos_token,
        )

    def _ids(self, text: str) -> list[int]:
        """Token ids with the tokenizer's special tokens, BOS replaced by bos_token when set."""
        ids = list(self.tokenizer(text).input_ids)
        if self.bos_id is None:
            return ids
        if ids and ids[0] == self.tokenizer.bos_token_id:
            return [self.bos_id] + ids[1:]
        return [self.bos_id] + ids

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops on the caption end token (and on EOS)."""
        eos = self.tokenizer.eos_token_id
        return [self.end_id] + ([eos] if eos is not None and eos != self.end_id else [])

    def _with_prompt(self, prompt_ids: list[int], prompt: str, caption: str) -> list[int]:
        """Token ids of the caption as they follow the prompt (tokenised jointly when that keeps the
        prompt's tokens intact, as the official code does; else separately)."""
        sep = " " if prompt and not prompt.endswith(" ") else ""
        full = self._ids(prompt + sep + caption)
        if full[: len(prompt_ids)] == prompt_ids:
            return full[len(prompt_ids) :]
        return self.tokenizer(sep + caption, add_special_tokens=False).input_ids

    def encode(self, caption: str) -> tuple[list[int], int]:
        """One caption -> (token ids, number of leading ids without loss)."""
        return self.encode_pair(self.prompt, caption)

    def encode_pair(self, text_input: str, target: str) -> tuple[list[int], int]:
        """[BOS, text input | target (cut as a caption), end] -> (token ids, leading ids without loss).
        Captioning is the pair (prompt, caption)."""
        given = self.prompt_ids if text_input == self.prompt else self._ids(text_input)
        tgt = self._with_prompt(given, text_input, target.strip())
        if self.truncation == "caption":
            ids = given + tgt[: self.max_text_tokens - 1] + [self.end_id]
        else:
            ids = (given + tgt + [self.end_id])[: self.max_text_tokens]
        no_loss = 0 if (self.bos_target and not text_input) else len(given)
        return ids, min(no_loss, len(ids))

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self._rows([self.encode(c) for c in captions])

    def pairs(self, text_inputs: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
        """Task rows (pipeline/data/tasks.py): loss on each target (+ end), none on its text input."""
        return self._rows([self.encode_pair(t, y) for t, y in zip(text_inputs, targets, strict=True)])

    def _rows(self, rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        B, L = len(rows), max(len(ids) for ids, _ in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(B, L, dtype=torch.long)  # [B, L]
        labels = torch.full((B, L), IGNORE, dtype=torch.long)  # [B, L]
        for i, (ids, n_prompt) in enumerate(rows):
            t = torch.tensor(ids, dtype=torch.long)
            input_ids[i, : len(ids)] = t
            attention_mask[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = t[n_prompt:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Generation prompts (BOS + prompt), left padded so every row ends where generation starts."""
        rows = [self._ids(p) for p in prompts]
        B, L = len(rows), max(len(r) for r in rows)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                input_ids[i, L - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[i, L - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


# ------------------------------------------------------------- a frozen LM read after a soft prompt
def prefix_inputs(
    llm: nn.Module, soft: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
):
    """[soft | text] for the LLM: soft [B, P, D]; input_ids, attention_mask [B, L] (mask None: no
    padding) -> inputs_embeds [B, P+L, D] in the LLM's dtype, attention mask [B, P+L] or None."""
    emb = llm.get_input_embeddings()
    soft = soft.to(emb.weight.dtype)
    embeds = torch.cat([soft, emb(input_ids).to(soft.dtype)], dim=1)  # [B, P+L, D]
    if attention_mask is None:
        return embeds, None
    return embeds, torch.cat([attention_mask.new_ones(soft.shape[:2]), attention_mask], dim=1)


def keeps_logits(llm: nn.Module) -> bool:
    """Whether llm.forward takes logits_to_keep (then the soft prompt's logits are never computed)."""
    return "logits_to_keep" in inspect.signature(llm.forward).parameters


def prefix_lm_loss(
    llm: nn.Module,
    soft: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    logits_to_keep: bool | None = None,
) -> dict:
    """Next-token cross-entropy of a frozen causal LM on [soft | text], loss on labelled text tokens
    only. soft [B, P, D]; input_ids, attention_mask, labels [B, L] (labels -100 where no loss).
    logits_to_keep: keeps_logits(llm), passed by callers that ask once.
    -> loss (mean over the batch's labelled tokens), per_sample_loss [B] (mean over each row's),
    per_sample_tokens [B], num_tokens (0-d tensor: reading it is the caller's choice, so a training
    step never has to wait for the device)."""
    embeds, mask = prefix_inputs(llm, soft, input_ids, attention_mask)
    L = input_ids.shape[1]
    if keeps_logits(llm) if logits_to_keep is None else logits_to_keep:  # positions P-1 .. P+L-1 only
        logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=L + 1).logits
    else:
        logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -L - 1 :]
    logits = logits[:, :-1].float()  # [B, L, V]: position P-1+j predicts text token j
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view_as(labels)  # [B, L]
    n = (labels != IGNORE).sum(1)  # [B]
    return {
        "loss": tok.sum() / n.sum().clamp(min=1),
        "per_sample_loss": tok.sum(1) / n.clamp(min=1),
        "per_sample_tokens": n,
        "num_tokens": n.sum(),
    }
