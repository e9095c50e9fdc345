"""Zero-shot VQA (VQAv2 val, OK-VQA test) and GQA test-dev: prompt, generation settings, scoring.

Prompt: eval.vqa_prompt with {q} = the question cleaned as LAVIS's `blip_question` processor does
(lower-cased, .!"()*#:;~ removed, at most 50 words). Generation: beam eval.num_beams, at most
eval.vqa_max_new_tokens (10), at least eval.vqa_min_new_tokens (1), eval.vqa_length_penalty.
Scores (x100): the official VQA accuracy averaged over questions, and per answer type
(yes/no, number, other); GQA: exact match after the VQA normalisation.
"""

from __future__ import annotations

import re
from collections import defaultdict

from .datasets import Sample
from .metrics import MetricError, gqa_accuracy, vqa_accuracy


def pre_question(question: str, max_words: int = 50) -> str:
    q = re.sub(r"([.!\"()*#:;~])", "", str(question).lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def prompts(samples: list[Sample], eval_cfg) -> list[str]:
    return [eval_cfg.vqa_prompt.replace("{q}", pre_question(s.question or "")) for s in samples]


def generation_kwargs(eval_cfg) -> dict:
    return {"num_beams": eval_cfg.num_beams, "max_new_tokens": eval_cfg.vqa_max_new_tokens,
            "min_new_tokens": eval_cfg.vqa_min_new_tokens, "length_penalty": eval_cfg.vqa_length_penalty}


def clean(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().split("\n") if ln.strip()]
    return lines[0] if lines else ""


def record(sample: Sample, prediction: str) -> dict:
    r = {"id": sample.id, "prediction": prediction, "references": list(sample.references),
         "question": sample.question}
    if sample.meta.get("answer_type"):
        r["answer_type"] = sample.meta["answer_type"]
    return r


def _check(records: list[dict]) -> None:
    if not records:
        raise MetricError("empty prediction set: nothing to score")


def score_vqa(records: list[dict], notes: list | None = None) -> dict[str, float]:
    """Adds "accuracy" (0..1) to each record; returns overall and per-answer-type accuracy x100."""
    _check(records)
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in records:
        r["accuracy"] = vqa_accuracy(r["prediction"], r["references"])
        if r.get("answer_type"):
            by_type[r["answer_type"]].append(r["accuracy"])
    out = {"accuracy": 100.0 * sum(r["accuracy"] for r in records) / len(records)}
    for t, accs in sorted(by_type.items()):
        out[f"accuracy/{t.replace('/', '_')}"] = 100.0 * sum(accs) / len(accs)
    return out


def score_gqa(records: list[dict], notes: list | None = None) -> dict[str, float]:
    _check(records)
    for r in records:
        r["accuracy"] = gqa_accuracy(r["prediction"], r["references"][0])
    return {"accuracy": 100.0 * sum(r["accuracy"] for r in records) / len(records)}
