"""Metrics as the papers compute them.

Captions (`caption_metrics`): pycocoevalcap's BLEU-1..4, METEOR, ROUGE-L, CIDEr(-D) (+ SPICE when its
Stanford CoreNLP jars are installed) after the standard PTB tokenisation (Stanford PTBTokenizer,
lower-cased, punctuation tokens removed), exactly what the COCO caption server runs. The PTB step is
the same Java command as `pycocoevalcap.tokenizer.PTBTokenizer`, but its temp file goes to the system
temp dir (pycocoevalcap writes into site-packages, often read-only) and line counts are checked.
METEOR's JVM (slow to start: README, "Measured here") is kept for the process and reused. Values
are pycocoevalcap's fractions (BLEU-4 of identical captions = 1.0); the eval tasks report them x100
as the paper tables.

VQA (`vqa_accuracy`): the official VQA evaluation as LAVIS copies it (lavis/common/vqa_tools/
vqa_eval.py, the 2017 script that BLIP-2-era papers report): the prediction is cleaned (newlines and
tabs to spaces, stripped) and normalised (punctuation, number words -> digits, articles dropped,
contractions restored); the human answers get the punctuation step only, only when the annotators
disagree, and are never stripped; then accuracy = mean over the 10 leave-one-annotator-out subsets of
min(#matches / 3, 1). revision="2021" is the later official script, for comparison: human answers
cleaned, and both sides fully normalised (compared lower-cased) only when the annotators disagree.
GQA (`gqa_accuracy`): LAVIS's GQA task: exact match of the normalised prediction with the raw answer.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger("simvlg.eval")


class MetricError(ValueError):
    """Inputs a metric cannot be computed on (mismatched ids, empty set, no Java)."""


# ----------------------------------------------------------------------------- VQA normalisation
# Tables copied from the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py).
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official (no-op) look-behind
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a mark touching a space (or any "1,000"-style comma in the
    text) is deleted, otherwise it becomes a space; periods not followed by a digit are deleted."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official passes re.UNICODE (= 32) as `count`: at most 32 periods are removed
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words -> digits, drop a/an/the, restore
    contractions ("dont" -> "don't")."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return str(text).replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The full normalisation the official script applies to a predicted answer."""
    return process_digit_article(process_punctuation(_clean(text)))


VQA_REVISIONS = ("2017", "2021")


def vqa_accuracy(prediction: str, gt_answers: list[str], revision: str = "2017") -> float:
    """Official VQA accuracy of one answer against the (10) human answers, in [0, 1]."""
    if not gt_answers:
        raise MetricError("vqa_accuracy: no ground-truth answers")
    if revision == "2017":  # LAVIS' copy
        pred = normalize_answer(prediction)
        gts = [str(a) for a in gt_answers]
        if len(set(gts)) > 1:
            gts = [process_punctuation(a) for a in gts]
    elif revision == "2021":
        pred, gts = _clean(prediction), [_clean(a) for a in gt_answers]
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(a)) for a in gts]
            pred = process_digit_article(process_punctuation(pred))
        pred, gts = pred.lower(), [a.lower() for a in gts]
    else:
        raise ValueError(f"revision must be one of {VQA_REVISIONS}, got {revision!r}")
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        accs.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return sum(accs) / len(accs)


def gqa_accuracy(prediction: str, answer: str) -> float:
    """LAVIS GQA: 1.0 if the prediction after the VQA punctuation and digit/article steps equals the
    annotated answer as written, else 0.0."""
    return float(process_digit_article(process_punctuation(str(prediction))) == str(answer))


# ------------------------------------------------------------------------------- caption metrics
def _cocoevalcap_dir() -> Path:
    import pycocoevalcap

    return Path(list(pycocoevalcap.__path__)[0])


PTB_PUNCTUATIONS = {
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
}


def _need_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MetricError(
            "caption metrics need Java on PATH (PTB tokenizer, METEOR): install a JRE, "
            "e.g. apt-get install openjdk-17-jre-headless"
        )
    return java


def ptb_tokenize(captions: Mapping[object, list[str]]) -> dict[object, list[str]]:
    """{key: [caption, ...]} -> the same, PTB-tokenised, lower-cased, punctuation tokens removed."""
    java = _need_java()
    jar = _cocoevalcap_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    keys = [k for k, caps in captions.items() for _ in caps]
    # an empty line would be dropped by the tokenizer and shift every later caption: "." instead
    # (tokenised to "." and removed as punctuation, so it still scores as empty)
    lines = [" ".join(c.split()) or "." for caps in captions.values() for c in caps]
    if not lines:
        return {k: [] for k in captions}
    fd, tmp = tempfile.mkstemp(prefix="simvlg-ptb-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        proc = subprocess.run(
            [
                java,
                "-cp",
                str(jar),
                "edu.stanford.nlp.process.PTBTokenizer",
                "-preserveLines",
                "-lowerCase",
                tmp,
            ],
            capture_output=True,
        )
    finally:
        os.unlink(tmp)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise MetricError(f"PTB tokenizer failed (exit {proc.returncode}): {err[-1] if err else ''}")
    out = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(out) < len(lines) or any(o.strip() for o in out[len(lines) :]):
        raise MetricError(f"PTB tokenizer returned {len(out)} lines for {len(lines)} captions")
    result: dict[object, list[str]] = {k: [] for k in captions}
    for k, line in zip(keys, out):
        result[k].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATIONS))
    return result


_METEOR = None
_METEOR_LOCK = threading.Lock()
_WARNED: set[str] = set()


def _close_meteor() -> None:
    global _METEOR
    m, _METEOR = _METEOR, None
    if m is not None:
        try:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait(timeout=10)
        except Exception:  # best effort at exit
            pass


def _meteor_score(gts: dict, res: dict) -> float:
    """pycocoevalcap METEOR 1.5 on a JVM kept for the life of the process."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    _need_java()
    with _METEOR_LOCK:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            _METEOR = Meteor()
            atexit.register(_close_meteor)
        try:
            score, _ = _METEOR.compute_score(gts, res)
        except (ValueError, BrokenPipeError, OSError) as e:
            err = b""
            if _METEOR.meteor_p.poll() is not None:
                err = _METEOR.meteor_p.stderr.read() or b""
            _METEOR = None
            last = err.decode("utf-8", "replace").strip().splitlines()
            raise MetricError(
                f"METEOR (java -jar meteor-1.5.jar) failed: {type(e).__name__}: {e}"
                + (f"; {last[-1]}" if last else "")
            ) from None
    return float(score)


def spice_status() -> tuple[bool, str]:
    """(usable, reason). SPICE needs Stanford CoreNLP 3.6.0 jars that pycocoevalcap downloads on
    first use; we never download, so offline it is skipped."""
    lib = _cocoevalcap_dir() / "spice" / "lib"
    missing = [
        n
        for n in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
        if not (lib / n).is_file()
    ]
    if missing:
        return False, (
            f"SPICE skipped: {', '.join(missing)} not in {lib} (pycocoevalcap downloads them "
            "from nlp.stanford.edu on first use; run pycocoevalcap/spice/get_stanford_models.py "
            "once with network access to enable SPICE)"
        )
    if shutil.which("java") is None:
        return False, "SPICE skipped: no java on PATH"
    return True, "ok"


def _check_pairs(preds: Mapping, refs: Mapping) -> None:
    if not preds:
        raise MetricError("empty prediction set: nothing to score")
    p, r = set(preds), set(refs)
    if p != r:
        only_p, only_r = sorted(map(str, p - r))[:3], sorted(map(str, r - p))[:3]
        raise MetricError(
            f"prediction and reference ids differ: {len(p - r)} predicted ids have no "
            f"references (e.g. {only_p}), {len(r - p)} reference ids have no prediction "
            f"(e.g. {only_r})"
        )
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise MetricError(f"{len(empty)} ids have no reference captions (e.g. {empty[:3]})")


def caption_metrics(
    preds: Mapping[object, str],
    refs: Mapping[object, Iterable[str]],
    *,
    spice: bool | str = "auto",
    meteor: bool = True,
    notes: list | None = None,
) -> dict[str, float]:
    """COCO caption metrics of {id: prediction} against {id: [reference, ...]}.

    Returns BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE) as pycocoevalcap fractions. spice="auto"
    runs SPICE only if its jars are installed (skipping with a logged message, appended to `notes`,
    otherwise); True requires it. Raises MetricError on mismatched ids or an empty set.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = {k: [str(c) for c in v] for k, v in refs.items()}
    preds = {k: str(v) for k, v in preds.items()}
    _check_pairs(preds, refs)
    # one JVM for both sides: keys tagged so a prediction and its references stay apart
    tok = ptb_tokenize(
        {**{("r", k): v for k, v in refs.items()}, **{("p", k): [v] for k, v in preds.items()}}
    )
    gts = {k: tok[("r", k)] for k in refs}
    res = {k: tok[("p", k)] for k in preds}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = float(b)
    if meteor:
        out["METEOR"] = _meteor_score(gts, res)
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice:
        ok, why = spice_status()
        if not ok and spice is True:
            raise MetricError(why)
        if ok:
            try:
                from pycocoevalcap.spice.spice import Spice

                out["SPICE"] = float(Spice().compute_score(gts, res)[0])
            except Exception as e:  # SPICE's Java side fails in many ways
                why = f"SPICE skipped: it failed ({type(e).__name__}: {str(e)[:200]})"
                if spice is True:
                    raise MetricError(why) from None
                ok = False
        if not ok:
            if why not in _WARNED:
                _WARNED.add(why)
                log.warning(why)
            if notes is not None:
                notes.append(why)
    return out
