"""pipeline/demo/compact.py: `simvlg demo --compare joint` and `--tasks adaptive` (labelled shards, the
task LM's tokenizer, held-out questions, and a shortened `--tasks adaptive` run end to end)."""

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.demo import compact, corpus


def test_joint_variant_is_a_valid_demo_config():
    from pipeline.config import load_config

    m = load_config("demo", compact.JOINT).model
    assert m.connector == "joint"  # the demo BERT's width, the TomeFormer's soft-prompt length
    assert (m.joint.width, m.joint.heads, m.joint.num_latents, m.joint.iterations) == (128, 4, 29, 2)


def test_label_shards_adds_each_captions_labels_and_keeps_the_rest(tmp_path):
    from pipeline.data.formats.manifest import Manifest, write_manifest
    from pipeline.data.formats.shards import iter_tar_samples, resolve_spec, write_shard

    attrs = [a for _, _, a, _, _ in corpus.generate(3, 0, seed=1)]
    src = tmp_path / "data"
    (src / "shards").mkdir(parents=True)
    write_shard(
        src / "shards" / "00000.tar",
        [
            {
                "__key__": f"0000000{i}",
                "jpg": b"x" * (i + 1),
                "txt": corpus.caption(a),
                "json": json.dumps({"url": f"http://h/{i}.png", "status": "success"}),
            }
            for i, a in enumerate(attrs)
        ],
    )
    write_manifest(
        src,
        Manifest(
            recipe="urls",
            kind="image",
            created="",
            complete=True,
            shards=str(src / "shards" / "{00000..00000}.tar"),
            shards_relative="shards/{00000..00000}.tar",
            num_shards=1,
            num_samples=3,
        ),
    )
    out = compact.label_shards(src / "manifest.json", tmp_path / "labelled")
    urls, n = resolve_spec(str(out))
    assert n == 3 and urls == [str(tmp_path / "labelled" / "shards" / "00000.tar")]
    for i, (s, a) in enumerate(zip(iter_tar_samples(urls[0]), attrs)):
        meta = json.loads(s["json"])
        assert meta["url"] == f"http://h/{i}.png" and s["jpg"] == b"x" * (i + 1)
        assert meta["labels"] == {
            "objects": [
                {
                    "name": a["shape"],
                    "attributes": [a["size"], a["color"]],
                    "count": corpus.COUNTS.index(a["count"]) + 1,
                }
            ]
        }
    with tarfile.open(urls[0]) as tar:
        assert len(tar.getnames()) == 9


def test_task_tokenizer_splits_punctuation_off_words():
    tok = compact.build_tokenizer(["Question: is there a red triangle? Short answer: yes"])
    ids = tok("Question: is there a red triangle? Short answer:").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "</s>",
        "Question",
        ":",
        "is",
        "there",
        "a",
        "red",
        "triangle",
        "?",
        "Short",
        "answer",
        ":",
    ]
    assert tok.unk_token_id not in ids


def test_heldout_questions_are_answered_by_the_labels(tmp_path):
    held = [a for _, _, a, _, _ in corpus.generate(0, 20, seed=3)]
    (tmp_path / "heldout.json").write_text(
        json.dumps(
            [
                {"image": f"heldout/{i:06d}.png", "caption": [corpus.caption(a)], "attributes": a}
                for i, a in enumerate(held)
            ]
        )
    )
    kinds = compact.heldout_questions(tmp_path, tmp_path / "q.json")
    assert kinds == dict.fromkeys(compact.ONE_GROUP_KINDS, 20)
    qs = json.loads((tmp_path / "q.json").read_text())
    digits = {w: str(i) for i, w in enumerate(["zero", "one", "two", "three"])}
    for qid, q in qs.items():
        a = held[int(qid.split("-")[0])]
        n = corpus.COUNTS.index(a["count"]) + 1

        def there(phrase, a=a):
            *adj, name = phrase.split()
            return name.rstrip("s") == a["shape"] and set(adj) <= {a["size"], a["color"]}

        if q["kind"] == "list":
            want = f"{a['size']} {a['color']} {a['shape']}"
        elif q["kind"] == "count":
            phrase = re.fullmatch(r"how many (.*) are there\?", q["question"]).group(1)
            want = str(n) if there(phrase) else "0"
        else:
            parts = re.fullmatch(r"is there (.*)\?", q["question"]).group(1).split(" or ")
            want = "yes" if any(there(re.sub(r"^an? ", "", p)) for p in parts) else "no"
        assert q["answer"] == want, (q, a)
        assert q["imageId"] == f"heldout/{int(qid.split('-')[0]):06d}.png"
    answers = {k: {q["answer"] for q in qs.values() if q["kind"] == k} for k in ("exists", "or")}
    assert answers == {"exists": {"yes", "no"}, "or": {"yes", "no"}}
    assert {q["answer"] for q in qs.values() if q["kind"] == "count"} - set(digits.values()) == set()


@pytest.mark.slow
def test_short_tasks_demo_compares_uniform_and_adaptive_sampling(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [
        str(Path(sys.executable).parent / "simvlg"),
        "demo",
        "--run-dir",
        str(run_dir),
        "--tasks",
        "adaptive",
        "--train-images",
        "120",
        "--heldout-images",
        "12",
        "--lm-steps",
        "20",
        "--vit-steps",
        "3",
        "--task-lm-steps",
        "10",
        "--set",
        "train.steps=4",
        "--set",
        "train.log_every=1",
        "--set",
        "train.ckpt_every=4",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "eval.num_beams=1",
        "--set",
        "eval.gallery_size=2",
        "--set",
        "eval.visualize_count=0",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["runs"]) == {"tomeformer", "tasks_uniform", "tasks_adaptive"}
    for name in ("tasks_uniform", "tasks_adaptive"):
        res = report["runs"][name]
        assert set(res["questions"]["accuracy"]) == {"all", *compact.ONE_GROUP_KINDS}
        assert res["questions"]["n"] == 4 * 12 and set(res["steps_to_loss"]) == {"0.5", "0.2", "0.1"}
        assert set(res["eval"]["attribute_accuracy"]) == set(corpus.ATTRIBUTES)
        rows = [json.loads(x) for x in (run_dir / "train" / name / "metrics.jsonl").read_text().splitlines()]
        last_step = [r for r in rows if "loss" in r][-1]  # the eval rows come after the training rows
        assert {f"loss/shapes/{t}" for t in compact.TASKS} <= set(last_step), last_step
    sample = next(iter(tarfile.open(next((run_dir / "data_labelled").rglob("*.tar"))).getmembers()))
    assert sample.name  # the labelled copy exists; its labels: test_label_shards_...
    assert "[tasks_adaptive] question accuracy" in out.stdout
    assert "captioning-task loss of the task runs" in out.stdout and "tasks_uniform" in out.stdout
