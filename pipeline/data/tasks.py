"""Pre-training tasks as data (compact-representations paper §4, A.3); sampling them: mixing.py.

A task turns one image-text sample into (text input, target text); every task is then trained with the
same per-token cross-entropy on the target. Randomness comes only from the `random.Random` passed in
(the loader's exact resume replays it), never from the global RNG.

    ex = make_example("masked", "two small red circles on the left", None, rng)
    ex.text_input   'Fill in the blanks: two small ___ circles on the left. Answer:'
    ex.target       'red'

The LLM reads [soft prompt] [text input] [target]: the text input takes the place the caption prompt
has today (no loss on it), the target the caption's. The joint connector's text side reads the text
input too.

    task         text input                                           target
    captioning   the prompt ("a photo of")                            the caption
    completion   prompt + the caption's first k words (1 <= k < n)    the other n - k words
    masked       the caption with ~15% of its words as ___            the masked words, in order, ", "
    matching     Question: does the caption "<c>" describe the image?  yes (own caption) / no (another
                 Short answer:                                         sample's, or its own words shuffled)
    objects      Question: is there a red triangle? Short answer:     yes / no / a number / a list

Masked reconstruction predicts the masked words only, as MLM does (the loss falls on masked positions):
a full-caption target would be mostly words the LLM can copy from its input, which makes the task look
easy to the adaptive sampler without being so. A task that cannot be made from a sample (a one-word
caption cannot be split or masked without masking all; a sample without object labels) falls back to
captioning, and the Example says so (ex.task), so per-task losses stay honest.

Object labels (a sample's json "labels"): {"objects": [{"name": "circle", "attributes": ["small", "red"],
"count": 2}, ...]}; a plain string stands for {"name": "..."}; count is optional (no "how many" question
without it). Question kinds (A.3: "Does object X exist", "X and Y", "X or Y", "List all objects", plus
"how many" where counts are known): a phrase is a name and some of its attributes ("red triangle",
"triangle"); it is true when an object has that name and all those attributes. Negatives mix names and
attributes seen in the sample and the pool (the rest of the batch) and keep only false ones, so "is
there a blue triangle?" is asked of an image with a red triangle. "and" is asked only where two
different objects are present, so that its answer is not always no.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

TASKS = ("captioning", "completion", "masked", "matching", "objects")
QUESTION_KINDS = ("exists", "and", "or", "count", "list")
QUESTION = "Question: {q} Short answer:"  # as eval.vqa_prompt
MASKED = "Fill in the blanks: {text}. Answer:"
MASK = "___"
NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


@dataclass(frozen=True)
class Example:
    task: str  # the task that made it (captioning when the asked task could not be made)
    text_input: str
    target: str
    kind: str = ""  # objects: the question kind (exists, and, or, count, list)


@dataclass(frozen=True)
class LabeledObject:
    name: str
    attributes: tuple[str, ...] = ()
    count: int | None = None


# ----------------------------------------------------------------------------------- the tasks
def captioning(caption: str, prompt: str = "") -> Example:
    return Example("captioning", prompt, caption)


def completion(caption: str, rng: random.Random, prompt: str = "") -> Example:
    words = caption.split()
    if len(words) < 2:
        return captioning(caption, prompt)
    k = rng.randint(1, len(words) - 1)  # words given
    return Example("completion", _join(prompt, " ".join(words[:k])), " ".join(words[k:]))


def masked(
    caption: str, rng: random.Random, rate: float = 0.15, template: str = MASKED, prompt: str = ""
) -> Example:
    """rate of the words masked in expectation (stochastic rounding), at least one, never all."""
    words = caption.split()
    if len(words) < 2:
        return captioning(caption, prompt)
    k = min(max(int(rate * len(words) + rng.random()), 1), len(words) - 1)
    hidden = sorted(rng.sample(range(len(words)), k))
    shown = [MASK if i in hidden else w for i, w in enumerate(words)]
    return Example("masked", template.format(text=" ".join(shown)), ", ".join(words[i] for i in hidden))


def matching(
    caption: str, rng: random.Random, negatives: Sequence[str] = (), template: str = QUESTION
) -> Example:
    """Yes/no with even odds. The no-caption is another sample's (one that differs from this one), else
    this caption's words shuffled; a one-word caption with no other caption can only be a yes."""
    shown, answer = caption, "yes"
    if rng.random() < 0.5:
        others = _unique(c for c in negatives if _norm(c) != _norm(caption))
        if others:
            shown, answer = rng.choice(others), "no"
        else:
            words = caption.split()
            rng.shuffle(words)
            if _norm(" ".join(words)) != _norm(caption):
                shown, answer = " ".join(words), "no"
    return Example("matching", template.format(q=f'does the caption "{shown}" describe the image?'), answer)


def object_question(
    objects: Sequence[LabeledObject],
    rng: random.Random,
    others: Sequence[LabeledObject] = (),
    kinds: Sequence[str] = QUESTION_KINDS,
    template: str = QUESTION,
) -> Example | None:
    """A question about `objects` (what the image holds); `others` lend names and attributes for
    negatives. None when no kind in `kinds` can be asked (no objects)."""
    if not objects:
        return None
    names = _unique(o.name for o in objects)
    usable = [k for k in kinds if k != "and" or len(names) >= 2]
    if any(o.count is None for o in objects):
        usable = [k for k in usable if k != "count"]
    if not usable:
        return None
    kind = rng.choice(usable)
    pool = list(objects) + list(others)
    if kind == "list":
        return Example(
            "objects",
            template.format(q="list all objects"),
            ", ".join(_unique(_phrase(o.name, o.attributes) for o in objects)),
            kind,
        )
    if kind == "count":
        name, attrs = _true_phrase(objects, rng) if rng.random() < 0.75 else _false_phrase(objects, pool, rng)
        n = sum(o.count for o in objects if _matches(o, name, attrs))
        q = f"how many {_phrase(_plural(name), attrs)} are there?"
        return Example("objects", template.format(q=q), NUMBERS[n] if n < len(NUMBERS) else str(n), kind)
    if kind == "exists":
        name, attrs = _true_phrase(objects, rng) if rng.random() < 0.5 else _false_phrase(objects, pool, rng)
        q = f"is there {_article(_phrase(name, attrs))}?"
        return Example("objects", template.format(q=q), _yes_no(objects, [(name, attrs)], any), kind)
    a = _true_phrase(objects, rng)
    if kind == "and":  # both present, or one present and one absent
        other = [o for o in objects if o.name != a[0]]
        b = _true_phrase(other, rng) if rng.random() < 0.5 else _false_phrase(objects, pool, rng)
        test = all
    else:  # "or": one present and one absent, or both absent
        b = _false_phrase(objects, pool, rng)
        if rng.random() < 0.5:
            a = _false_phrase(objects, pool, rng)
        test = any
    pair = [a, b] if rng.random() < 0.5 else [b, a]
    q = f"is there {_article(_phrase(*pair[0]))} {kind} {_article(_phrase(*pair[1]))}?"
    return Example("objects", template.format(q=q), _yes_no(objects, pair, test), kind)


def make_example(
    task: str,
    caption: str,
    labels: dict | None,
    rng: random.Random,
    *,
    pool: Sequence[tuple[str, dict | None]] = (),
    prompt: str = "",
    question_template: str = QUESTION,
    kinds: Sequence[str] = QUESTION_KINDS,
    mask_rate: float = 0.15,
) -> Example:
    """One sample's (text input, target) for `task`; `pool` holds the (caption, labels) of the other
    samples of the batch: matching's negative captions and the object questions' negatives."""
    if task == "captioning":
        return captioning(caption, prompt)
    if task == "completion":
        return completion(caption, rng, prompt)
    if task == "masked":
        return masked(caption, rng, mask_rate, prompt=prompt)
    if task == "matching":
        return matching(caption, rng, [c for c, _ in pool], question_template)
    if task == "objects":
        others = [o for _, lab in pool for o in objects_from_labels(lab)]
        ex = object_question(objects_from_labels(labels), rng, others, kinds, question_template)
        return ex if ex is not None else captioning(caption, prompt)
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")


def objects_from_labels(labels: dict | None) -> list[LabeledObject]:
    """A sample's labels -> its objects ([] without labels); a malformed entry is a one-line error."""
    if not labels:
        return []
    objects = labels.get("objects") or []
    if not isinstance(objects, list):
        raise ValueError(f"labels.objects {objects!r}: expected a list of objects")
    out = []
    for entry in objects:
        if isinstance(entry, str):
            entry = {"name": entry}
        name = entry.get("name") if isinstance(entry, dict) else None
        count = entry.get("count") if isinstance(entry, dict) else None
        attrs = (entry.get("attributes") or []) if isinstance(entry, dict) else []
        # bool is an int to Python: `"count": true` is malformed, not 1
        count_ok = count is None or (isinstance(count, int) and not isinstance(count, bool) and count >= 0)
        if not isinstance(name, str) or not name.strip() or not count_ok or not isinstance(attrs, list):
            raise ValueError(
                f"object label {entry!r}: needs a name (str), an optional count (an integer >= 0) and "
                "optional attributes (a list)"
            )
        out.append(LabeledObject(name.strip(), tuple(str(a) for a in attrs), count))
    return out


# --------------------------------------------------------------------------------- phrase helpers
def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _unique(items) -> list:
    """First occurrences, in order (never a set: string hashing differs between processes)."""
    return list(dict.fromkeys(items))


def _phrase(name: str, attrs: Sequence[str]) -> str:
    return " ".join([*attrs, name])


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _plural(name: str) -> str:
    if name.endswith(("s", "x", "z", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in tuple("aeiou"):
        return name[:-1] + "ies"
    return name + "s"


def _subset(attrs: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    return tuple(a for a in attrs if rng.random() < 0.5)


def _matches(o: LabeledObject, name: str, attrs: Sequence[str]) -> bool:
    return o.name == name and all(a in o.attributes for a in attrs)


def _true_phrase(objects: Sequence[LabeledObject], rng: random.Random) -> tuple[str, tuple[str, ...]]:
    o = rng.choice(list(objects))
    return o.name, _subset(o.attributes, rng)


def _false_phrase(
    objects: Sequence[LabeledObject], pool: Sequence[LabeledObject], rng: random.Random, tries: int = 20
) -> tuple[str, tuple[str, ...]]:
    """A name and attributes drawn from the pool that no object of the image matches; a true phrase if
    20 draws find none (the answer is computed from the labels either way)."""
    names = _unique(o.name for o in pool)
    for _ in range(tries):
        name, attrs = rng.choice(names), _subset(rng.choice(list(pool)).attributes, rng)
        if not any(_matches(o, name, attrs) for o in objects):
            return name, attrs
    return _true_phrase(objects, rng)


def _yes_no(objects, phrases, test) -> str:
    return "yes" if test(any(_matches(o, n, a) for o in objects) for n, a in phrases) else "no"


# -------------------------------------------------------------------------------------- arms
def pair_name(source: str, task: str) -> str:
    """The name of a (source, task) mixing arm, as losses are logged: "coco/captioning"."""
    return f"{source}/{task}"
