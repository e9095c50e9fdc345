"""Mixing over (source, task) arms: the adaptive rule on fixed synthetic losses, the per-batch minimum,
task rows in real loader batches, and adaptive task sampling resuming bit for bit with workers."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import DataConfig, SourceConfig
from pipeline.data import build_loader
from pipeline.data.formats.shards import write_shard
from pipeline.data.mixing import AdaptiveMixer, ShareSchedule, adaptive_shares, make_arms
from pipeline.data.tasks import TASKS
from pipeline.demo import corpus

PROMPT = "a photo of"


class PairTokenizer:
    """Picklable stand-in for CaptionTokenizer: one id per character, no loss on the text input."""

    prompt = PROMPT

    def __call__(self, captions):
        return self.pairs([PROMPT] * len(captions), captions)

    def pairs(self, text_inputs, targets):
        rows = [
            ([min(ord(c), 999) for c in t + "|"], [min(ord(c), 999) for c in y + "$"])
            for t, y in zip(text_inputs, targets)
        ]
        L = max(len(a) + len(b) for a, b in rows)
        ids = torch.zeros(len(rows), L, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        for i, (a, b) in enumerate(rows):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a) : len(a) + len(b)] = torch.tensor(b)
        return {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": labels}


def shape_labels(a: dict) -> dict:
    return {
        "objects": [
            {
                "name": a["shape"],
                "attributes": [a["size"], a["color"]],
                "count": corpus.COUNTS.index(a["count"]) + 1,
            }
        ]
    }


def jpeg(seed: int) -> bytes:
    arr = (np.random.default_rng(seed).random((24, 24, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """4 shards x 25 samples of shapes captions with object labels; sample 3 of shard 1 has a
    malformed label, sample 5 of shard 2 none."""
    root = tmp_path_factory.mktemp("labelled")
    rng, sets, images = random.Random(0), corpus.all_attribute_sets(), [jpeg(i) for i in range(4)]
    for s in range(4):
        samples = []
        for i in range(25):
            a = sets[rng.randrange(len(sets))]
            meta = {"key": f"{s:03d}{i:04d}", "labels": shape_labels(a)}
            if (s, i) == (1, 3):
                meta["labels"] = {"objects": [{"name": "circle", "count": "two"}]}
            if (s, i) == (2, 5):
                del meta["labels"]
            samples.append(
                {
                    "__key__": meta["key"],
                    "jpg": images[(s + i) % 4],
                    "txt": corpus.caption(a),
                    "json": json.dumps(meta),
                }
            )
        write_shard(root / f"{s:05d}.tar", samples)
    return str(root / "{00000..00003}.tar")


def cfg(shards, source_tasks=None, **kw) -> DataConfig:
    base = dict(num_workers=0, shuffle_buffer=16, image_size=24, min_scale=0.5, max_words=20)
    src = {"name": "shapes", "shards": shards} | ({"tasks": source_tasks} if source_tasks else {})
    return DataConfig(sources=[SourceConfig(**src)], **(base | kw))


ALL = {t: 1.0 for t in TASKS}


# ---------------------------------------------------------------------------------- the rule
def test_shares_follow_fixed_losses_by_the_papers_formula():
    losses = [2.0, 1.0, 3.0, 4.0]
    assert adaptive_shares([0.25] * 4, losses, floor=0.05) == pytest.approx([0.2, 0.1, 0.3, 0.4], abs=1e-15)
    # configured weights scale the losses: equal losses give the configured mixture
    assert adaptive_shares([0.4, 0.2, 0.2, 0.2], [1.0] * 4, floor=0.0) == pytest.approx([0.4, 0.2, 0.2, 0.2])
    # below the floor: raised to it, the rest keep their ratios
    s = adaptive_shares([0.25] * 4, [0.01, 0.02, 4.0, 6.0], floor=0.1)
    assert s[:2] == [0.1, 0.1] and s[2:] == pytest.approx([0.8 * 0.4, 0.8 * 0.6])
    assert adaptive_shares([1 / 3] * 3, [1.0, 1.2, 100.0], floor=0.2) == pytest.approx([0.2, 0.2, 0.6])
    assert adaptive_shares([0.25] * 4, [None] * 4, floor=0.05) == [0.25] * 4  # no losses yet
    s = adaptive_shares([0.25] * 4, [5.0, None, float("nan"), 1.0], floor=0.05)
    assert s == pytest.approx([5 / 12, 3 / 12, 3 / 12, 1 / 12])  # unknown: the mean of the known


def test_mixer_windows_the_losses_and_its_state_round_trips():
    names = [f"shapes/{t}" for t in TASKS]
    m = AdaptiveMixer(names, [1.0] * 5, floor=0.05, window=3)
    assert m.current == [0.2] * 5
    for step in range(5):
        m.report_loss({n: (i + 1) * (1 + step) for i, n in enumerate(names)})
    m.report_loss({names[0]: float("nan")})  # not history
    assert m.mean_losses() == [4.0, 8.0, 12.0, 16.0, 20.0]  # the last 3 of 1..5 x (i + 1)
    assert m.current == pytest.approx([i / 15 for i in range(1, 6)])
    with pytest.raises(KeyError, match="unknown mixing arm"):
        m.report_loss({"shapes/vqa": 1.0})
    other = AdaptiveMixer(names, [1.0] * 5, floor=0.05, window=3)
    other.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert other.current == m.current  # bit for bit


def test_arms_are_the_sources_without_tasks_and_pairs_with_them():
    plain = make_arms(["laion", "coco"], [3.0, 1.0], [{"captioning": 1.0}, {"captioning": 1.0}])
    assert [(a.name, a.weight) for a in plain] == [("laion", 0.75), ("coco", 0.25)]
    arms = make_arms(
        ["laion", "coco"], [3.0, 1.0], [{"captioning": 1.0}, {"captioning": 1.0, "objects": 3.0}]
    )
    assert [(a.name, a.source, a.task) for a in arms] == [
        ("laion/captioning", 0, "captioning"),
        ("coco/captioning", 1, "captioning"),
        ("coco/objects", 1, "objects"),
    ]
    assert [a.weight for a in arms] == pytest.approx([0.75, 0.0625, 0.1875])
    with pytest.raises(ValueError, match="data source 'coco': unknown task.*vqa.*tasks: captioning"):
        make_arms(["coco"], [1.0], [{"vqa": 1.0}])


def test_share_schedule_fixes_each_batch_once():
    s = ShareSchedule(2, delay=3)
    s.publish(3, [0.5, 0.5])  # asked for batch 0: batches 0..3
    s.publish(4, [0.9, 0.1])  # asked for batch 1 after a report: batch 4 gets the new shares
    s.publish(4, [0.1, 0.9])  # nothing new to fix
    assert [s.get(g) for g in range(5)] == [[0.5, 0.5]] * 4 + [[0.9, 0.1]]
    rows = s.rows(2)  # a checkpoint after 2 consumed batches: batches 2, 3, 4 are fixed
    t = ShareSchedule(2, delay=3)
    t.restore(2, rows)
    t.publish(5, [0.3, 0.7])
    assert [t.get(g) for g in range(2, 6)] == [[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.3, 0.7]]


# ------------------------------------------------------------------------------ the loader
def test_task_batches_hold_the_minimum_and_rows_fit_their_samples(labelled):
    c = cfg(labelled, ALL, tasks={"minimum_per_batch": 2})
    loader = build_loader(c, tokenize=PairTokenizer(), batch_size=16, seed=1)
    assert loader.arm_names == [f"shapes/{t}" for t in TASKS]
    batches = [b for _, b in zip(range(12), loader)]
    for b in batches:
        counts = Counter(b["arm_idx"].tolist())
        assert all(counts[i] >= 2 for i in range(4)) and counts[4] >= 1  # one sample has no labels
        assert [loader.arm_names[i].split("/")[1] for i in b["arm_idx"].tolist()] == b["task"]
        for task, text, target, caption, ids, lab in zip(
            b["task"], b["text_inputs"], b["targets"], b["captions"], b["input_ids"], b["labels"]
        ):
            if task == "captioning":
                assert (text, target) == (PROMPT, caption)
            if task == "completion":
                assert f"{text} {target}" == f"{PROMPT} {caption}"
            got = "".join(chr(i) for i in lab[lab >= 0].tolist())
            assert got == target + "$"  # loss on the target (+ end) only
            assert "".join(chr(i) for i in ids[: len(text)].tolist()) == text
    answers = Counter(t for b in batches for t, k in zip(b["targets"], b["task"]) if k == "matching")
    assert set(answers) == {"yes", "no"}


def test_malformed_labels_are_a_counted_skip_only_where_objects_are_asked(labelled):
    def skipped(tasks):
        loader = build_loader(
            cfg(labelled, tasks, resampled=False),
            tokenize=PairTokenizer(),
            batch_size=4,
            seed=0,
            epoch_batches=24,
        )
        n = sum(len(b["keys"]) for b in loader)
        return n, loader.skip_counts()["shapes/bad_labels"]

    assert skipped({"captioning": 1.0, "objects": 1.0}) == (96, 1)
    assert skipped({"captioning": 1.0, "matching": 1.0}) == (96, 0)


def test_task_sampling_follows_fixed_per_task_losses(labelled):
    """Fixed synthetic losses reported every step (as the trainer does) -> the arms' frequencies
    are the minimum plus the paper's shares L_S / sum L; a fallback counts for captioning."""
    losses = {"captioning": 1.0, "completion": 2.0, "masked": 3.0, "matching": 0.5, "objects": 3.5}
    c = cfg(
        labelled, ALL, mixing="adaptive", adaptive_floor=0.02, num_workers=2, tasks={"minimum_per_batch": 1}
    )
    loader = build_loader(c, tokenize=PairTokenizer(), batch_size=16, seed=2)
    names = loader.arm_names
    counts, it = Counter(), iter(loader)
    for step in range(60):
        b = next(it)
        loader.report_loss({n: losses[n.split("/")[1]] for n in names})
        if step >= 6:  # published before the first report: 2 workers x 2 prefetched + 1
            counts.update(b["arm_idx"].tolist())
    shares = [losses[n.split("/")[1]] / 10.0 for n in names]
    assert loader.shares() == pytest.approx(dict(zip(names, shares)))
    total = sum(counts.values())
    expected = [(1 + 11 * s) / 16 for s in shares]
    assert [counts[i] / total for i in range(5)] == pytest.approx(expected, abs=0.035), counts


def _fingerprint(b: dict) -> tuple:
    return (
        b["keys"],
        b["task"],
        b["text_inputs"],
        b["targets"],
        b["arm_idx"].tolist(),
        b["input_ids"].tolist(),
        b["pixel_values"].sum().item(),
    )


def _losses(b: dict, names: list[str], step: int) -> dict:
    """A loss per arm that depends on the step and the batch, as a training loss does."""
    per = Counter(b["arm_idx"].tolist())
    return {n: 0.5 + ((i * 7 + step * 3 + per[i]) % 11) / 4 for i, n in enumerate(names) if per[i]}


@pytest.mark.parametrize("workers", [0, 2])
def test_adaptive_task_sampling_resumes_bit_identically(labelled, workers):
    c = cfg(
        labelled,
        ALL,
        mixing="adaptive",
        adaptive_floor=0.02,
        adaptive_window=3,
        num_workers=workers,
        tasks={"minimum_per_batch": 1},
    )

    def run(loader, start, steps, state_at=None):
        out, state, it = [], None, iter(loader)
        for step in range(start, start + steps):
            b = next(it)
            out.append(_fingerprint(b))
            loader.report_loss(_losses(b, loader.arm_names, step))
            if step + 1 == state_at:
                state = json.loads(json.dumps(loader.state_dict()))  # as a checkpoint stores it
        it.close()
        return out, state

    ref_loader = build_loader(c, tokenize=PairTokenizer(), batch_size=16, seed=4)
    first_shares = ref_loader.shares()
    ref, state = run(ref_loader, 0, 20, state_at=8)
    assert ref_loader.shares() != first_shares  # the shares did move: the test has something to keep
    resumed = build_loader(c, tokenize=PairTokenizer(), batch_size=16, seed=4)
    resumed.load_state_dict(state)
    got, _ = run(resumed, 8, 12)
    assert got == ref[8:]
    # without the published shares (a state from before they were saved) the next batches differ
    old = build_loader(c, tokenize=PairTokenizer(), batch_size=16, seed=4)
    old.load_state_dict(
        {k: v for k, v in state.items() if k not in ("adaptive_published", "arms", "share_delay")}
    )
    approx, _ = run(old, 8, 12)
    assert approx != ref[8:]


def test_what_mixing_over_arms_cannot_do_fails_in_one_line(labelled):
    with pytest.raises(ValueError, match=r"adaptive_floor 0.25 x 5 mixing arms >= 1"):
        build_loader(cfg(labelled, ALL, mixing="adaptive", adaptive_floor=0.25), tokenize=None, batch_size=8)
    with pytest.raises(
        ValueError, match=r"minimum_per_batch 2 x 5 mixing arms is more than a micro-batch of 8"
    ):
        build_loader(cfg(labelled, ALL, tasks={"minimum_per_batch": 2}), tokenize=None, batch_size=8)
    with pytest.raises(ValueError, match=r"question_kinds: unknown \['why'\]"):
        build_loader(cfg(labelled, ALL, tasks={"question_kinds": ["why"]}), tokenize=None, batch_size=8)


def test_preflight_names_the_arms_and_refuses_what_the_loader_would(labelled):
    from pipeline.config import ConfigError, load_config
    from pipeline.preflight import check_for_training, describe

    def check(*sets):
        cfg = load_config("demo", [f"data.sources.0.shards={labelled}", *sets])
        return check_for_training(cfg, "my.yaml", files=False)

    assert check()["arms"] == ["shapes"]
    report = check("data.sources.0.tasks={captioning: 2, objects: 1}", "data.mixing=adaptive")
    assert report["arms"] == ["shapes/captioning", "shapes/objects"]
    assert "  mixing arms (source/task): shapes/captioning, shapes/objects" in describe(report)
    with pytest.raises(ConfigError, match=r"^my.yaml: data source 'shapes': unknown task\(s\) \['vqa'\]"):
        check("data.sources.0.tasks={vqa: 1}")
    with pytest.raises(ConfigError, match=r"^my.yaml: data.tasks.minimum_per_batch 9 x 2 mixing arms"):
        check("data.sources.0.tasks={captioning: 1, masked: 1}", "data.tasks.minimum_per_batch=9")
    with pytest.raises(ConfigError, match=r"^my.yaml: data.adaptive_floor 0.5 x 2 mixing arms >= 1"):
        check(
            "data.sources.0.tasks={captioning: 1, masked: 1}",
            "data.mixing=adaptive",
            "data.adaptive_floor=0.5",
        )
