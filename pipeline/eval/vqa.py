"""Zero-shot VQA (VQAv2 val, OK-VQA test) and GQA test-dev: prompt, generation settings, scoring.

Prompt: eval.vqa_prompt with {q} = the question cleaned as LAVIS's `blip_question` processor does
(lower-cased, .!"()*#:;~ removed, at most 50 words). Generation: beam eval.num_beams, at most
eval.vqa_max_new_tokens (10), at least eval.vqa_min_new_tokens (1), eval.vqa_length_penalty,
eval.repetition_penalty. Tasks in eval.lemmatize_tasks (official: OK-VQA) have their answers
lemmatised as the official code does: each noun and verb replaced by its lemma (spaCy
en_core_web_sm); without that model, spacy-lookups-data's English lookup table lemmatises every word
(no part-of-speech tagger), and the scores say which was used.
Scores (x100): the VQA accuracy (eval.vqa_eval: the LAVIS copy of the 2017 script, or the 2021
revision) averaged over questions, and per answer type (yes/no, number, other); GQA: LAVIS's exact
match of the normalised prediction.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict

from pipeline.data.formats.annotations import Sample

from .metrics import MetricError, gqa_accuracy, vqa_accuracy

log = logging.getLogger("simvlg.eval")


def pre_question(question: str, max_words: int = 50) -> str:
    q = re.sub(r"([.!\"()*#:;~])", "", str(question).lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def prompts(samples: list[Sample], eval_cfg) -> list[str]:
    return [eval_cfg.vqa_prompt.replace("{q}", pre_question(s.question or "")) for s in samples]


def generation_kwargs(eval_cfg) -> dict:
    return {
        "num_beams": eval_cfg.num_beams,
        "max_new_tokens": eval_cfg.vqa_max_new_tokens,
        "min_new_tokens": eval_cfg.vqa_min_new_tokens,
        "length_penalty": eval_cfg.vqa_length_penalty,
        "repetition_penalty": eval_cfg.repetition_penalty,
    }


@functools.cache
def lemmatizer():
    """(answer -> lemmatised answer, one line naming the lemmatiser)."""
    try:
        import spacy
    except ImportError:
        raise MetricError(
            "lemmatising answers (eval.lemmatize_tasks) needs spaCy: pip install spacy "
            "spacy-lookups-data (or remove the task from eval.lemmatize_tasks)"
        ) from None
    try:
        nlp = spacy.load("en_core_web_sm")
    except OSError:
        nlp = None
    if nlp is not None:

        def apply(answer: str) -> str:  # the official rule: nouns and verbs by their lemma
            return " ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(answer))

        return apply, "lemmatiser: spaCy en_core_web_sm (nouns and verbs), as the official code"
    try:
        nlp = spacy.blank("en")
        nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
        nlp.initialize()
    except Exception as e:  # spaCy raises its own kinds when the tables are missing
        raise MetricError(
            f"no spaCy lemmatiser: en_core_web_sm is not installed and the lookup tables "
            f"fail ({type(e).__name__}: {e}); pip install spacy-lookups-data"
        ) from None

    def apply(answer: str) -> str:  # no tagger: every word by its lookup lemma
        return " ".join(t.lemma_ or t.text for t in nlp(answer))

    return apply, (
        "lemmatiser: spacy-lookups-data English lookup table on every word (en_core_web_sm "
        "not installed; the official code lemmatises nouns and verbs only)"
    )


def record(sample: Sample, prediction: str) -> dict:
    """A prediction record; the task's scoring settings come with the sample (load_task puts them in
    its meta): answers of a lemmatised task are lemmatised here, the raw answer kept beside."""
    r = {
        "id": sample.id,
        "prediction": prediction,
        "references": list(sample.references),
        "question": sample.question,
    }
    if sample.meta.get("lemmatize"):
        r["raw_prediction"], r["prediction"] = prediction, lemmatizer()[0](prediction)
    if sample.meta.get("answer_type"):
        r["answer_type"] = sample.meta["answer_type"]
    if sample.meta.get("vqa_eval"):
        r["vqa_eval"] = sample.meta["vqa_eval"]
    return r


def _check(records: list[dict]) -> None:
    if not records:
        raise MetricError("empty prediction set: nothing to score")


def score_vqa(records: list[dict], notes: list | None = None) -> dict[str, float]:
    """Adds "accuracy" (0..1) to each record; returns overall and per-answer-type accuracy x100."""
    _check(records)
    revision = records[0].get("vqa_eval", "2017")
    if notes is not None:
        script = (
            "the LAVIS copy of the 2017 VQA evaluation script"
            if revision == "2017"
            else "the 2021 revision of the VQA evaluation script"
        )
        notes.append(f"VQA accuracy: {script}")
        if any("raw_prediction" in r for r in records):
            notes.append(lemmatizer()[1])
    by_type: dict[str, list[float]] = defaultdict(list)
    for r in records:
        r["accuracy"] = vqa_accuracy(r["prediction"], r["references"], r.get("vqa_eval", revision))
        if r.get("answer_type"):
            by_type[r["answer_type"]].append(r["accuracy"])
    out = {"accuracy": 100.0 * sum(r["accuracy"] for r in records) / len(records)}
    for t, accs in sorted(by_type.items()):
        out[f"accuracy/{t.replace('/', '_')}"] = 100.0 * sum(accs) / len(accs)
    return out


def score_gqa(records: list[dict], notes: list | None = None) -> dict[str, float]:
    _check(records)
    if notes is not None and any("raw_prediction" in r for r in records):
        notes.append(lemmatizer()[1])
    for r in records:
        r["accuracy"] = gqa_accuracy(r["prediction"], r["references"][0])
    return {"accuracy": 100.0 * sum(r["accuracy"] for r in records) / len(records)}
