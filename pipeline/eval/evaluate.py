"""One evaluation task end to end: read, predict on every rank, gather, score, write, log.

    report = evaluate_task(model, cfg, "coco_karpathy_test", run_dir / "eval" / "coco_karpathy_test",
                           rank=r, world_size=w, device=dev, tracker=tracker, step=step)

`model` is anything with `generate(pixel_values, prompt=list[str], num_beams, max_new_tokens,
min_new_tokens, **kw) -> list[str]` (SimVLG), and optionally `merge_info(pixel_values, layers=None)
-> {layer: LongTensor [B, gh, gw]}` for the merged-token figures. Rank 0 writes into `out_dir`:

    predictions.json   [{id, prediction, references, (question, accuracy, domain)}], dataset order
    metrics.json       {task, kind, num_samples, partial, metrics, generation, notes, files, ...}
    gallery.html       eval.gallery_size samples: image, prediction, references (+ merge figures)
    merge/<id>.png     eval.visualize_count images x eval.visualize_layers (0-based TomeFormer layers)

and logs metrics as `eval/<task>/<name>` plus those files as artifacts under `eval/<task>/`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from pipeline.data.formats.jsonfile import write_json_atomic
from pipeline.failfast import one_line

from . import captioning, video, vqa
from .dist import gather_by_id, shard_indices
from .gallery import save_merge_figure, write_gallery
from .media import EvalDataError, EvalDataset, collate
from .tasks import TaskData, load_task

log = logging.getLogger("simvlg.eval")


@dataclass(frozen=True)
class Kind:
    prompts: Callable
    generation_kwargs: Callable
    record: Callable
    score: Callable


KINDS: dict[str, Kind] = {
    "caption": Kind(captioning.prompts, captioning.generation_kwargs, captioning.record, captioning.score),
    "video_caption": Kind(video.prompts, video.generation_kwargs, video.record, video.score),
    "vqa": Kind(vqa.prompts, vqa.generation_kwargs, vqa.record, vqa.score_vqa),
    "gqa": Kind(vqa.prompts, vqa.generation_kwargs, vqa.record, vqa.score_gqa),
}


def _one_line(e: Exception) -> str:
    """A DataLoader worker re-raises with the whole traceback in the message: keep the last line."""
    return re.sub(r"^[\w.]*EvalDataError: ", "", one_line(e))


def first_line(text: str) -> str:
    """A prediction as scored, for every task: its first non-empty line, stripped."""
    lines = [ln.strip() for ln in str(text).strip().split("\n") if ln.strip()]
    return lines[0] if lines else ""


def predict(
    model,
    data: TaskData,
    cfg,
    *,
    rank: int = 0,
    world_size: int = 1,
    device="cpu",
    num_workers: int | None = None,
) -> dict:
    """This rank's share (samples rank, rank + W, ...) -> {id: cleaned prediction}."""
    kind = KINDS[data.kind]
    ds = EvalDataset(data, cfg.model.vision.image_size, cfg.data.num_frames)
    idx = shard_indices(len(ds), rank, world_size)
    nw = cfg.data.num_workers if num_workers is None else num_workers
    loader = DataLoader(
        Subset(ds, idx),
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        num_workers=min(nw, max(1, len(idx) // cfg.eval.batch_size)) if idx else 0,
        collate_fn=collate,
    )
    gen = kind.generation_kwargs(cfg.eval)
    out: dict = {}
    t0, n_batches = time.time(), max(1, -(-len(idx) // cfg.eval.batch_size))
    try:
        for b, (ids, pixels) in enumerate(loader):
            samples = [data.samples[i] for i in ids]
            texts = model.generate(
                pixels.to(device),
                prompt=kind.prompts(samples, cfg.eval),  # uint8
                **gen,
            )
            if len(texts) != len(samples):
                raise EvalDataError(
                    f"{data.task}: the model returned {len(texts)} texts for {len(samples)} inputs"
                )
            for s, t in zip(samples, texts):
                out[s.id] = first_line(t)
            if rank == 0 and (b + 1) % 20 == 0:
                log.info("%s: batch %d/%d (%.1f s)", data.task, b + 1, n_batches, time.time() - t0)
    except EvalDataError as e:
        raise EvalDataError(_one_line(e)) from None
    return out


def _safe(name) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:100]


def merge_figures(model, data: TaskData, cfg, out_dir: Path, notes: list, device="cpu") -> dict:
    """{sample index: PNG path} for the first eval.visualize_count samples (image tasks)."""
    n = min(cfg.eval.visualize_count, len(data.samples))
    if n == 0 or not cfg.eval.visualize_layers:
        return {}
    if data.kind == "video_caption":
        notes.append("merge figures: not drawn for video tasks")
        return {}
    if not hasattr(model, "merge_info"):
        notes.append("merge figures skipped: the model has no merge_info()")
        return {}
    ds = EvalDataset(data, cfg.model.vision.image_size, cfg.data.num_frames)
    pixels = torch.stack([ds[i][1] for i in range(n)])  # uint8 [n, 3, H, W]
    try:
        info = model.merge_info(pixels.to(device), layers=None)  # uint8: the tower normalises
    except ValueError as e:  # e.g. the Q-Former connector: no merging
        notes.append(f"merge figures skipped: {e}")
        return {}
    want = list(cfg.eval.visualize_layers)
    layers = [layer for layer in want if layer in info]
    if len(layers) < len(want):
        notes.append(
            f"merge figures: layers {[x for x in want if x not in info]} do not exist "
            f"(TomeFormer layers are 0..{max(info) if info else -1}, 0-based)"
        )
    if not layers:
        return {}
    out = {}
    for i in range(n):
        s = data.samples[i]
        out[i] = save_merge_figure(
            pixels[i], {layer: info[layer][i] for layer in layers}, out_dir / "merge" / f"{_safe(s.id)}.png"
        )
    return out


def evaluate_task(
    model,
    cfg,
    task: str,
    out_dir: str | Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    device="cpu",
    tracker=None,
    step: int = 0,
    checkpoint: str | None = None,
    num_workers: int | None = None,
) -> dict | None:
    """Collective over ranks; returns the report on rank 0 (None elsewhere)."""
    t0 = time.time()
    data = load_task(task, cfg.eval)  # on every rank: the same check fails everywhere, nobody hangs
    try:
        local, error = (
            predict(
                model, data, cfg, rank=rank, world_size=world_size, device=device, num_workers=num_workers
            ),
            None,
        )
    except EvalDataError as e:
        local, error = {}, str(e)
    except Exception as e:  # e.g. generate() crashed: the peers must hear of it, not
        # wait in the gather below forever; the traceback goes to the log, the cause to every rank
        log.error("%s: prediction failed on rank %d", task, rank, exc_info=True)
        local, error = {}, f"prediction failed on rank {rank}: {_one_line(e)}"
    merged = gather_by_id(local, data.ids, error=error)
    if rank != 0:
        return None
    kind = KINDS[data.kind]
    records = [kind.record(s, merged[s.id]) for s in data.samples]
    notes: list[str] = []
    if data.partial:
        notes.append(
            f"partial result: first {len(data.samples)} samples only (eval.max_samples); "
            "not comparable to the paper's numbers"
        )
    metrics = kind.score(records, notes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"predictions": write_json_atomic(out_dir / "predictions.json", records)}
    figs = merge_figures(model, data, cfg, out_dir, notes, device)
    if cfg.eval.gallery_size:
        ds = EvalDataset(data, cfg.model.vision.image_size, cfg.data.num_frames)
        items = []
        for i in range(min(cfg.eval.gallery_size, len(records))):
            it = dict(records[i], image=video.middle_frame(ds[i][1]))
            if i in figs:
                it["figures"] = [("merged tokens (0-based layers)", figs[i])]
            items.append(it)
        files["gallery"] = write_gallery(
            items, out_dir / "gallery.html", title=f"{task}: {checkpoint or ''}", notes=notes
        )
    report = {
        "task": task,
        "kind": data.kind,
        "num_samples": len(records),
        "partial": data.partial,
        "metrics": metrics,
        "scale": "x100 (as the paper tables)",
        "step": step,
        "checkpoint": checkpoint,
        "generation": KINDS[data.kind].generation_kwargs(cfg.eval),
        "prompt": (
            cfg.eval.caption_prompt if data.kind in ("caption", "video_caption") else cfg.eval.vqa_prompt
        ),
        "world_size": world_size,
        "seconds": round(time.time() - t0, 1),
        "notes": notes,
        "annotations": data.files,
        "files": {k: str(v) for k, v in files.items()} | {"merge": [str(p) for p in figs.values()]},
    }
    files["metrics"] = write_json_atomic(out_dir / "metrics.json", report)
    if tracker is not None:
        tracker.log(
            step,
            {f"eval/{task}/{k}": float(v) for k, v in metrics.items()}
            | {f"eval/{task}/num_samples": float(len(records))},
        )
        for p in files.values():
            tracker.artifact(p, f"eval/{task}")
        for p in figs.values():
            tracker.artifact(p, f"eval/{task}/merge")
    summary = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if "/" not in k)
    print(
        f"{task} ({len(records)} samples{', PARTIAL' if data.partial else ''}): {summary}  -> {out_dir}",
        file=sys.stdout,
        flush=True,
    )
    for n in notes:
        print(f"  note: {n}", file=sys.stdout, flush=True)
    return report
