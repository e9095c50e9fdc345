"""Preflight: everything `simvlg train` / `simvlg eval` would refuse, checked before a GPU-hour is spent.

    report = check_for_training(cfg, "my.yaml")           # raises ConfigError with one line
    report = check_for_training(cfg, "my.yaml", files=False)   # a config written for another machine

`load_config` has already checked the schema and the files named by *.arch_config / train.ds_config.
Here: data sources exist (non-empty, every local shard of every pattern or manifest is a file), the
weights each model part loads from exist (a local folder/file, or a hub id that can be fetched), and
the TomeFormer's `r` leaves the number of tokens it promises: ToMe merges at most half of a layer's
tokens (CLS kept), and a larger r would be clamped silently to a shorter soft prompt; the mixing arms
(sources, or (source, task) pairs) are ones the loader can draw: known tasks and question kinds, an
adaptive floor that leaves the losses a say (floor x arms < 1), a micro-batch that holds the
per-batch minimum of every arm. A P-Former run
(`model.kind: pformer`) needs its BERT, the LLM and text sources; SimVLG with `train.align_weight > 0`
needs a P-Former folder that loads strictly, with its tokenizer, and N prompts of the soft prompt's
length and the LLM's width.
`files=False` skips the file-system checks and keeps the ones that need only the config.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import Config, ConfigError

HUB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _looks_like_hub_id(value: str) -> bool:
    """`bert-base-uncased` or `facebook/opt-2.7b`; not `runs/demo/opt`, `./x`, `/abs` or `~/x`."""
    parts = value.split("/")
    if len(parts) > 2 or not all(parts) or value.startswith((".", "~")):
        return False
    if len(parts) == 2 and Path(parts[0]).is_dir():
        return False  # a local folder that is missing its last component
    return all(set(p) <= HUB_ID_CHARS for p in parts)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an old or missing huggingface_hub: cannot tell
        return True


def check_weights(value: str | None, key: str, source: str, *, what: str) -> None:
    """A folder/file to load `what` from, or a hub id (only refused offline when not cached)."""
    if value is None:
        raise ConfigError(f"{source}: {key}: not set; name the {what}")
    if Path(value).expanduser().exists():
        return
    if _looks_like_hub_id(value):
        if _offline() and not _hub_cached(value):
            raise ConfigError(
                f"{source}: {key}: {value!r} is not a local folder and not in the Hugging "
                "Face cache, and HF_HUB_OFFLINE is set; download it first or name a folder"
            )
        return
    raise ConfigError(
        f"{source}: {key}: not found: {value} (relative paths are taken from {Path.cwd()}); name the {what}"
    )


def check_model_files(cfg: Config, source: str) -> None:
    m = cfg.model
    if m.kind == "pformer":  # stage 0: BERT + the frozen LLM, no vision
        check_weights(m.pformer.init, "model.pformer.init", source, what="BERT checkpoint and tokenizer")
        check_weights(m.llm.name, "model.llm.name", source, what="language model (an HF folder or id)")
        return
    v = m.vision
    if v.loader == "timm":
        if v.checkpoint is None:
            raise ConfigError(
                f"{source}: model.vision.checkpoint: not set, so the frozen ViT would keep random "
                f"weights; set it to the weights file of {v.name}, e.g. --set "
                "model.vision.checkpoint=/models/eva_vit_g.pth (BLIP-2's EVA-ViT-g, or a "
                "timm/safetensors state dict)"
            )
        if not Path(v.checkpoint).expanduser().is_file():
            raise ConfigError(
                f"{source}: model.vision.checkpoint: file not found: {v.checkpoint} "
                f"(relative paths are taken from {Path.cwd()})"
            )
    else:
        key = "model.vision.checkpoint" if v.checkpoint else "model.vision.name"
        check_weights(v.checkpoint or v.name, key, source, what="vision tower (an HF folder or id)")
    if m.connector == "qformer":
        if m.qformer.init is not None:
            check_weights(m.qformer.init, "model.qformer.init", source, what="BERT checkpoint")
    elif m.connector == "tomeformer":  # the joint connector starts from random weights
        check_weights(m.tomeformer.init, "model.tomeformer.init", source, what="BERT checkpoint")
    check_weights(m.llm.name, "model.llm.name", source, what="language model (an HF folder or id)")
    if m.video.enabled and m.init_connector is None:  # the paper fine-tunes an image-trained connector
        raise ConfigError(
            f"{source}: model.init_connector: not set; video training starts from an "
            "image-pretrained connector (a `simvlg train` run dir's saved connector "
            "folder), e.g. --set model.init_connector=runs/simvlg_opt2.7b/connector"
        )


def check_sources(cfg: Config, source: str, *, files: bool = True) -> list[dict]:
    """[{name, shards, samples}] per source; raises on an empty list or shards that do not exist."""
    from pipeline.data.formats.shards import local_path, resolve_spec

    if not cfg.data.sources:
        raise ConfigError(f"{source}: data.sources: empty; name at least one shard source")
    out = []
    for i, s in enumerate(cfg.data.sources):
        key = f"data.sources.{i}.shards"
        try:
            urls, total = resolve_spec(s.shards)
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
        if files:
            local = [p for p in map(local_path, urls) if p is not None]  # pipe:/http shards: not checked
            missing = [u for u in local if not Path(u).is_file()]
            if local and len(missing) == len(local):
                raise ConfigError(
                    f"{source}: {key}: {s.shards!r} matches no files ({len(local)} names, "
                    f"none exists; relative paths are taken from {Path.cwd()})"
                )
            if missing:
                raise ConfigError(
                    f"{source}: {key}: {len(missing)} of {len(local)} shards of "
                    f"{s.shards!r} do not exist (first: {missing[0]}); point it at the "
                    "manifest.json `simvlg prep` wrote, or fix the pattern"
                )
        out.append({"name": s.name, "shards": len(urls), "samples": s.num_samples or total})
    return out


def check_arms(cfg: Config, source: str) -> list[str]:
    """The mixing arms training would draw from; raises what the loader would refuse."""
    from pipeline.data.loader import check_arms as loader_check
    from pipeline.data.mixing import make_arms

    d = cfg.data
    try:
        arms = [
            a.name
            for a in make_arms(
                [s.name for s in d.sources], [s.weight for s in d.sources], [dict(s.tasks) for s in d.sources]
            )
        ]
        loader_check(d, arms, cfg.train.micro_batch)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return arms


def vision_tokens(cfg: Config, *, files: bool = True) -> int | None:
    """Tokens the frozen ViT hands the connector per frame (CLS included), or None if unknown
    without files."""
    v = cfg.model.vision
    if v.loader == "timm" or v.arch_config:
        from pipeline.models.vision import build_vision

        return build_vision(v, meta=True).num_tokens
    folder = v.checkpoint or v.name
    if not files or not Path(folder).is_dir():
        return None
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(folder)
    c = getattr(c, "vision_config", c)
    return (c.image_size // c.patch_size) ** 2 + 1


def token_plan(cfg: Config, *, files: bool = True, source: str = "config") -> list[int] | None:
    """Visual tokens entering the TomeFormer, then after each layer; raises if an r would be clamped."""
    if cfg.model.connector != "tomeformer" or cfg.model.kind != "simvlg":
        return None
    from pipeline.models.tomeformer import layer_r

    n = vision_tokens(cfg, files=files)
    if n is None:
        return None
    tf = cfg.model.tomeformer
    counts = [n]
    for i, r in enumerate(layer_r(tf.r, tf.num_layers)):
        most = (n - 1) // 2  # CLS is kept; each merge removes one of the other tokens' halves
        if r > most:
            raise ConfigError(
                f"{source}: model.tomeformer.r: layer {i} would merge {r} of its {n} tokens, but at most "
                f"{most} can merge there (half the tokens besides CLS); tokens so far: "
                f"{' -> '.join(map(str, counts))}"
            )
        n -= r
        counts.append(n)
    return counts


def check_source_kinds(cfg: Config, source: str) -> None:
    """A P-Former reads sentences (kind text); SimVLG reads images or video."""
    for i, s in enumerate(cfg.data.sources):
        if cfg.model.kind == "pformer" and s.kind != "text":
            raise ConfigError(
                f"{source}: data.sources.{i}.kind: a P-Former trains on sentences, got "
                f"{s.kind!r}; set kind: text (an image shard's captions are read, its "
                "images never)"
            )
        if cfg.model.kind == "pformer" and set(s.tasks) != {"captioning"}:
            raise ConfigError(
                f"{source}: data.sources.{i}.tasks: a P-Former reconstructs sentences; tasks other than "
                "captioning are for SimVLG runs (remove them here)"
            )
        if cfg.model.kind == "simvlg" and s.kind == "text":
            raise ConfigError(
                f"{source}: data.sources.{i}.kind: text sources have no images to train "
                "SimVLG on; use them with model.kind: pformer"
            )


def check_alignment(cfg: Config, source: str, tokens: list[int] | None, *, files: bool = True) -> dict | None:
    """train.align_weight > 0: the P-Former folder exists, loads strictly (every key, every shape, its
    tokenizer) and makes N prompts of the soft prompt's length; None when the weight is 0."""
    t, m = cfg.train, cfg.model
    if t.align_weight == 0:
        return None
    key = "model.pformer_checkpoint"
    if m.kind == "pformer":
        raise ConfigError(
            f"{source}: train.align_weight: {t.align_weight} applies to SimVLG training; a "
            "model.kind: pformer run trains the P-Former itself (set it to 0)"
        )
    tasked = [s.name for s in cfg.data.sources if set(s.tasks) != {"captioning"}]
    if tasked:  # the P-Former's targets are made from captions; a task row's target is not one
        raise ConfigError(
            f"{source}: data.sources ({', '.join(tasked)}): tasks other than captioning "
            f"cannot be trained with train.align_weight: {t.align_weight} (the alignment "
            "targets are the P-Former's reading of captions); use one or the other"
        )
    if m.pformer_checkpoint is None:
        raise ConfigError(
            f"{source}: {key}: not set, but train.align_weight is {t.align_weight}; "
            "name the pformer/ folder of a model.kind: pformer run "
            "(e.g. runs/pformer_opt2.7b/pformer)"
        )
    if not files:
        return {"folder": m.pformer_checkpoint}
    from pipeline.models.pformer_files import load_pformer, load_pformer_tokenizer, read_pformer_config

    folder = Path(m.pformer_checkpoint).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"{source}: {key}: not found: {folder} (relative paths are taken from {Path.cwd()})"
        )
    try:
        meta = read_pformer_config(folder)
        load_pformer(folder)  # strict: a wrong folder never leaves the targets random
        load_pformer_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: {key}: {e}") from None
    prompt = (
        tokens[-1]
        if tokens
        else {"qformer": m.qformer.num_queries, "joint": m.joint.num_latents}.get(m.connector)
    )
    if m.video.enabled and m.video.temporal_pool == "concat" and prompt is not None:
        images = [s.name for s in cfg.data.sources if s.kind == "image"]
        if images:  # an image's soft prompt is 1/num_frames of a video's: one P-Former cannot match both
            raise ConfigError(
                f"{source}: {key}: with video.temporal_pool: concat the soft prompt of an image "
                f"({prompt} tokens) and of a video ({prompt * cfg.data.num_frames}) differ, and a "
                "P-Former has one length; train the alignment on the video sources only (image "
                f"sources: {', '.join(images)})"
            )
        prompt *= cfg.data.num_frames
    if prompt is not None and meta["num_prompts"] != prompt:
        raise ConfigError(
            f"{source}: {key}: the P-Former makes {meta['num_prompts']} prompts, the "
            f"{m.connector} connector's soft prompt has {prompt} tokens; pre-train a P-Former "
            f"with model.pformer.num_prompts={prompt}"
        )
    width = _llm_width(m.llm.arch_config or m.llm.name)
    if width is not None and meta["llm_width"] != width:
        raise ConfigError(
            f"{source}: {key}: the P-Former's prompts are {meta['llm_width']} wide (LLM "
            f"{meta.get('llm')}), model.llm {m.llm.name} takes {width}; pre-train it against "
            "this LLM"
        )
    return {
        "folder": str(folder),
        "num_prompts": meta["num_prompts"],
        "llm_width": meta["llm_width"],
        "llm": meta.get("llm"),
        "match": t.align_match,
        "weight": t.align_weight,
    }


def _llm_width(name: str) -> int | None:
    """The LLM's input-embedding width from its config (a folder, an arch JSON or a cached hub id)."""
    try:
        if name.endswith(".json"):
            from pipeline.models.llm import hf_config_from_json

            c = hf_config_from_json(name)
        else:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(name)
    except (OSError, ValueError):
        return None  # unknown here; the trainer checks again when it loads the model
    return getattr(c, "word_embed_proj_dim", None) or c.hidden_size


def check_for_training(cfg: Config, source: str, *, files: bool = True) -> dict:
    """Raises ConfigError (one line) on anything training would refuse; returns what it found."""
    if files:
        check_model_files(cfg, source)
    check_source_kinds(cfg, source)
    report = {"sources": check_sources(cfg, source, files=files)}
    report["arms"] = check_arms(cfg, source)
    report["tokens"] = token_plan(cfg, files=files, source=source)
    report["alignment"] = check_alignment(cfg, source, report["tokens"], files=files)
    return report


def check_for_eval(cfg: Config, source: str) -> dict:
    if cfg.model.kind == "pformer":
        raise ConfigError(
            f"{source}: model.kind: pformer: a P-Former has no image to caption; its pformer/ "
            "folder is what model.pformer_checkpoint of a SimVLG config takes"
        )
    check_model_files(cfg, source)
    return {"tokens": token_plan(cfg, source=source)}


def describe(report: dict) -> list[str]:
    lines = []
    for s in report.get("sources", []):
        samples = f", {s['samples']} samples" if s.get("samples") else ""
        lines.append(f"  data source {s['name']}: {s['shards']} shards{samples}")
    if report.get("arms") and report["arms"] != [s["name"] for s in report.get("sources", [])]:
        lines.append(f"  mixing arms (source/task): {', '.join(report['arms'])}")
    if report.get("tokens"):
        t = report["tokens"]
        lines.append(f"  tomeformer tokens: {' -> '.join(map(str, t))} (soft prompt of {t[-1]})")
    a = report.get("alignment")
    if a and "num_prompts" in a:
        lines.append(
            f"  p-former alignment: {a['folder']} ({a['num_prompts']} prompts x {a['llm_width']}, "
            f"LLM {a['llm']}), weight {a['weight']}, match {a['match']}"
        )
    return lines
