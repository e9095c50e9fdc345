"""P-Former folders: save_pformer writes an HF-style folder (weights, config.json with all that rebuilds
the model, the BERT tokenizer), load_pformer rebuilds it strictly: a missing or unexpected key, another
shape or another LLM width is a one-line error naming the folder (the official code's strict=False would
leave a wrong path's P-Former random)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.data.formats.jsonfile import write_json_atomic
from pipeline.schema import PFormerConfig

from .pformer import PFormer, _encoder_without_pooler

PFORMER_WEIGHTS, PFORMER_CONFIG, PFORMER_TOKENIZER = "model.safetensors", "config.json", "tokenizer"
PFORMER_FORMAT = "simvlg-pformer"


def save_pformer(
    pformer: PFormer,
    path: str | Path,
    cfg: PFormerConfig,
    *,
    tokenizer=None,
    llm_name: str | None = None,
    step: int | None = None,
) -> Path:
    """An HF-style folder: model.safetensors (every P-Former weight), config.json (all that rebuilds it:
    the encoder's config, N, widths, the stage-0 config) and, if given, the BERT tokenizer in tokenizer/.
    Each file is written under a temporary name and renamed into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in pformer.state_dict().items()}
    tmp = path / f".{PFORMER_WEIGHTS}.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / PFORMER_WEIGHTS)
    meta = {
        "format": PFORMER_FORMAT,
        "version": 1,
        "num_prompts": pformer.num_prompts,
        "llm_width": pformer.llm_width,
        "contrast_dim": pformer.text_proj.out_features,
        "llm": llm_name,
        "step": step,
        "encoder": pformer.encoder.config.to_dict(),
        "pformer": cfg.model_dump(mode="json"),
        "parameters": sum(v.numel() for v in sd.values()),
    }
    write_json_atomic(path / PFORMER_CONFIG, meta, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path / PFORMER_TOKENIZER)
    return path


def read_pformer_config(path: str | Path) -> dict:
    """config.json of a save_pformer folder; a one-line error if `path` is not one."""
    path = Path(path)
    f = path / PFORMER_CONFIG
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a P-Former folder (no {PFORMER_CONFIG})")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != PFORMER_FORMAT:
        raise ValueError(
            f"{f}: format is {meta.get('format') if isinstance(meta, dict) else None!r}, "
            f"expected {PFORMER_FORMAT!r}"
        )
    return meta


def load_pformer(
    path: str | Path, *, llm_width: int | None = None, device="cpu", frozen: bool = True
) -> PFormer:
    """Rebuild a save_pformer folder and load it strictly: a missing or unexpected key, a shape that
    differs, or prompts of another LLM width are a one-line error naming the folder. frozen=True: ready
    to give alignment targets (see PFormer.freeze)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    meta = read_pformer_config(path)
    if llm_width is not None and meta["llm_width"] != llm_width:
        raise ValueError(
            f"{path}: its prompts are {meta['llm_width']} wide (LLM {meta.get('llm')}), "
            f"this LLM's embeddings are {llm_width}"
        )
    weights = path / PFORMER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {PFORMER_WEIGHTS}")
    enc_cfg = dict(meta["encoder"])
    encoder = AutoModel.from_config(AutoConfig.for_model(enc_cfg.pop("model_type"), **enc_cfg))
    pformer = PFormer(
        _encoder_without_pooler(encoder), meta["num_prompts"], meta["llm_width"], meta["contrast_dim"]
    )
    sd, own = load_file(str(weights)), pformer.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{weights}: does not match its {PFORMER_CONFIG}: missing {_few(missing)}, "
            f"unexpected {_few(unexpected)}"
        )
    for k, t in own.items():
        if sd[k].shape != t.shape:
            raise ValueError(
                f"{weights}: {k} has shape {tuple(sd[k].shape)}, {PFORMER_CONFIG} gives {tuple(t.shape)}"
            )
    pformer.load_state_dict(sd, strict=True)
    pformer.to(device)
    return pformer.freeze() if frozen else pformer


def load_pformer_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    folder = Path(path) / PFORMER_TOKENIZER
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no {PFORMER_TOKENIZER}/ folder (saved without a tokenizer)")
    return AutoTokenizer.from_pretrained(folder)


def _few(keys: list[str], n: int = 4) -> str:
    return f"{keys[:n]}{f' (+{len(keys) - n} more)' if len(keys) > n else ''}"
