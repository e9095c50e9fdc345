"""pipeline.data.tasks: each pre-training task's (text input, target) from fixed samples and seeded
RNGs (drawing tasks: tests/test_mixing.py)."""

from __future__ import annotations

import random
import re

import pytest

from pipeline.data.tasks import MASK, TASKS, make_example, objects_from_labels

CAPTION = "two small red triangles on the right"
PROMPT = "a photo of"


def shapes_labels(count: int, size: str, color: str, shape: str) -> dict:
    """The demo corpus's attributes as object labels (what its shards would carry)."""
    return {"objects": [{"name": shape, "attributes": [size, color], "count": count}]}


LABELS = shapes_labels(2, "small", "red", "triangle")
POOL = [
    ("one large blue square on the top", shapes_labels(1, "large", "blue", "square")),
    ("three small green circles on the left", shapes_labels(3, "small", "green", "circle")),
    ("one large red circle on the bottom", shapes_labels(1, "large", "red", "circle")),
]


def examples(task, seed, n=50, caption=CAPTION, labels=LABELS, pool=POOL):
    rng = random.Random(seed)
    return [make_example(task, caption, labels, rng, pool=pool, prompt=PROMPT) for _ in range(n)]


# ------------------------------------------------------------------------------ each task
def test_captioning_gives_the_prompt_and_the_caption():
    ex = make_example("captioning", CAPTION, None, random.Random(0), prompt=PROMPT)
    assert (ex.task, ex.text_input, ex.target) == ("captioning", PROMPT, CAPTION)


def test_completion_splits_the_caption_between_input_and_target():
    seen = set()
    for ex in examples("completion", 0, n=200):
        assert ex.task == "completion" and ex.text_input.startswith(PROMPT + " ")
        given = ex.text_input[len(PROMPT) + 1 :].split()
        assert given and ex.target and given + ex.target.split() == CAPTION.split()
        seen.add(len(given))
    assert seen == set(range(1, len(CAPTION.split())))  # every split point, never all or nothing
    assert make_example("completion", "dogs", None, random.Random(0), prompt=PROMPT).task == "captioning"


def test_masked_hides_about_15_percent_never_all_and_the_target_fills_the_blanks():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(20)]
    fractions = []
    for _ in range(3000):
        n = rng.randint(2, 20)
        ex = make_example("masked", " ".join(words[:n]), None, rng)
        shown = re.fullmatch(r"Fill in the blanks: (.*)\. Answer:", ex.text_input).group(1).split()
        answers = ex.target.split(", ")
        assert ex.task == "masked" and len(shown) == n
        assert 1 <= shown.count(MASK) == len(answers) < n
        it = iter(answers)
        assert [next(it) if w == MASK else w for w in shown] == words[:n]
        if n == 20:
            fractions.append(len(answers) / n)
    assert abs(sum(fractions) / len(fractions) - 0.15) < 0.01
    assert make_example("masked", "dogs", None, random.Random(0)).task == "captioning"  # cannot mask


def test_matching_says_yes_to_its_caption_and_no_to_another():
    exs = examples("matching", 2, n=200)
    shown = [re.search(r'"(.*)"', ex.text_input).group(1) for ex in exs]
    assert {ex.target for ex in exs} == {"yes", "no"}
    for ex, c in zip(exs, shown):
        assert ex.task == "matching" and ex.text_input.startswith("Question: ")
        assert (ex.target == "yes") == (c == CAPTION)
        assert ex.target == "yes" or c in [p for p, _ in POOL]
    assert 0.4 < sum(ex.target == "yes" for ex in exs) / len(exs) < 0.6
    # a pool of copies of this caption is no negative: the words are shuffled instead
    alone = examples("matching", 3, n=100, pool=[(CAPTION, None)])
    for ex in alone:
        c = re.search(r'"(.*)"', ex.text_input).group(1)
        assert (ex.target == "no") == (c != CAPTION) and sorted(c.split()) == sorted(CAPTION.split())
    assert {ex.target for ex in alone} == {"yes", "no"}
    assert {ex.target for ex in examples("matching", 4, n=40, caption="dogs", pool=())} == {"yes"}


def oracle(question: str, labels: dict) -> str:
    """Answer a generated question from the labels, independently of the task code."""
    objs = labels["objects"]

    def present(phrase: str) -> bool:
        *attrs, name = phrase.split()
        return any(o["name"] == name and set(attrs) <= set(o["attributes"]) for o in objs)

    q = re.fullmatch(r"Question: (.*) Short answer:", question).group(1)
    if q == "list all objects":
        return ", ".join(" ".join([*o["attributes"], o["name"]]) for o in objs)
    if m := re.fullmatch(r"how many (.*?)s are there\?", q):
        *attrs, name = m.group(1).split()
        n = sum(o["count"] for o in objs if o["name"] == name and set(attrs) <= set(o["attributes"]))
        return ["zero", "one", "two", "three"][n]
    parts = re.split(r" (and|or) ", re.fullmatch(r"is there (.*)\?", q).group(1))
    found = [present(re.sub(r"^an? ", "", p)) for p in parts[::2]]
    op = parts[1] if len(parts) > 1 else "or"
    return "yes" if (all(found) if op == "and" else any(found)) else "no"


@pytest.mark.parametrize(
    "labels",
    [
        LABELS,
        shapes_labels(1, "large", "green", "circle"),
        {
            "objects": [
                {"name": "dog", "attributes": ["brown"], "count": 2},
                {"name": "frisbee", "attributes": ["red"], "count": 1},
            ]
        },
    ],
)
def test_object_questions_are_answerable_from_the_labels(labels):
    exs = examples("objects", 5, n=400, labels=labels)
    kinds = {ex.kind for ex in exs}
    for ex in exs:
        assert ex.task == "objects" and ex.target == oracle(ex.text_input, labels), ex
    two_names = len(labels["objects"]) > 1
    assert kinds == {"exists", "or", "count", "list"} | ({"and"} if two_names else set())
    for kind in ("exists", "or") + (("and",) if two_names else ()):
        assert {ex.target for ex in exs if ex.kind == kind} == {"yes", "no"}, kind


def test_demo_questions_read_as_asked():
    exs = examples("objects", 6, n=400)
    texts = {ex.text_input: ex.target for ex in exs}
    assert texts["Question: is there a red triangle? Short answer:"] == "yes"
    assert texts["Question: how many triangles are there? Short answer:"] == "two"
    assert texts["Question: how many circles are there? Short answer:"] == "zero"
    assert texts["Question: list all objects Short answer:"] == "small red triangle"
    # hard negatives: the colour of another sample on this image's shape
    assert texts.get("Question: is there a green triangle? Short answer:", "no") == "no"
    assert any(re.search(r"is there an? (blue|green) triangle\?", t) for t in texts)


def test_labels_are_read_strictly_and_missing_labels_fall_back_to_captioning():
    assert objects_from_labels({"objects": ["dog", {"name": "cat", "count": 2}]})[1].count == 2
    with pytest.raises(ValueError, match="object label"):
        objects_from_labels({"objects": [{"attributes": ["red"]}]})
    with pytest.raises(ValueError, match="object label"):
        objects_from_labels({"objects": [{"name": "dog", "count": "two"}]})
    for bad in (
        {"name": "dog", "count": -1},
        {"name": "dog", "count": True},
        {"name": "dog", "attributes": "red"},
        3,
    ):
        with pytest.raises(ValueError, match="object label"):
            objects_from_labels({"objects": [bad]})
    with pytest.raises(ValueError, match="labels.objects 'dog': expected a list"):
        objects_from_labels({"objects": "dog"})
    ex = make_example("objects", CAPTION, None, random.Random(0), prompt=PROMPT)
    assert (ex.task, ex.text_input, ex.target) == ("captioning", PROMPT, CAPTION)
    with pytest.raises(ValueError, match="unknown task 'vqa'; tasks: captioning, completion"):
        make_example("vqa", CAPTION, None, random.Random(0))


def test_same_seed_same_examples_and_the_global_rng_is_not_used():
    random.seed(1)
    state = random.getstate()
    a = [examples(t, 7) for t in TASKS]
    assert random.getstate() == state
    random.seed(2)
    assert [examples(t, 7) for t in TASKS] == a
    assert [examples(t, 8) for t in TASKS] != a
