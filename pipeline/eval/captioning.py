"""Zero-shot captioning (COCO Karpathy, NoCaps, Flickr30K): prompt, generation settings, scoring.

Generation (official caption_coco eval config): beam eval.num_beams (5), max eval.max_new_tokens
(30), min eval.min_new_tokens (8) new tokens after the prompt eval.caption_prompt (official: "", the
BOS alone), eval.repetition_penalty; the prediction is the generated continuation (the prompt is not
part of it), first line, stripped (evaluate.first_line, for every task).
Scores: pycocoevalcap after PTB tokenisation, x100 as in the paper tables; NoCaps also per domain
(CIDEr, SPICE) when the annotations give each image's domain.
"""

from __future__ import annotations

from pipeline.data.formats.annotations import Sample

from .metrics import caption_metrics


def prompts(samples: list[Sample], eval_cfg) -> list[str]:
    return [eval_cfg.caption_prompt] * len(samples)


def generation_kwargs(eval_cfg) -> dict:
    return {
        "num_beams": eval_cfg.num_beams,
        "max_new_tokens": eval_cfg.max_new_tokens,
        "min_new_tokens": eval_cfg.min_new_tokens,
        "repetition_penalty": eval_cfg.repetition_penalty,
    }


def record(sample: Sample, prediction: str) -> dict:
    r = {"id": sample.id, "prediction": prediction, "references": list(sample.references)}
    if "domain" in sample.meta:
        r["domain"] = sample.meta["domain"]
    return r


def score(records: list[dict], notes: list | None = None) -> dict[str, float]:
    preds = {r["id"]: r["prediction"] for r in records}
    refs = {r["id"]: r["references"] for r in records}
    out = {k: 100.0 * v for k, v in caption_metrics(preds, refs, notes=notes).items()}
    domains = sorted({r["domain"] for r in records if r.get("domain")})
    if len(domains) > 1:
        for d in domains:
            sub = [r for r in records if r.get("domain") == d]
            m = caption_metrics(
                {r["id"]: r["prediction"] for r in sub}, {r["id"]: r["references"] for r in sub}, meteor=False
            )
            for k in ("CIDEr", "SPICE"):
                if k in m:
                    out[f"{d}/{k}"] = 100.0 * m[k]
    return out
