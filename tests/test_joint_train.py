"""The joint connector on the task mixture for real: `simvlg train` (2 CPU ranks, ZeRO-2, bf16, adaptive
task sampling over (source, task) arms, a DataLoader worker) on labelled shards, a restart from the
middle checkpoint reproducing the per-step losses bit for bit, then `simvlg eval` on a held-out caption
task and held-out object questions from the saved connector."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import make_tiny_run

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.data.formats.shards import write_shard
    from pipeline.demo import compact, corpus

    root = tmp_path_factory.mktemp("joint_train")
    base = make_tiny_run(root, steps=STEPS)
    samples = list(corpus.generate(48, 6, seed=7))
    (root / "labelled").mkdir()
    for s in range(2):
        rows = []
        for _split, i, attrs, caption, img in samples[s * 24 : (s + 1) * 24]:
            path = root / "labelled" / f"{s}_{i}.png"
            img.save(path)
            rows.append(
                {
                    "__key__": f"{s:05d}{i:04d}",
                    "png": path.read_bytes(),
                    "txt": caption,
                    "json": json.dumps({"labels": compact.labels(attrs)}),
                }
            )
        write_shard(root / "labelled" / f"{s:05d}.tar", rows)
    heldout = []
    for _split, i, attrs, caption, img in samples[48:]:
        img.save(root / f"heldout_{i}.png")
        heldout.append({"image": f"heldout_{i}.png", "caption": [caption], "attributes": attrs})
    (root / "heldout.json").write_text(json.dumps(heldout))
    kinds = compact.heldout_questions(root, root / "questions.json")
    assert kinds == dict.fromkeys(compact.ONE_GROUP_KINDS, 6)
    compact.build_task_llm(root / "opt_tasks", "a photo of", steps=20)
    config = root / "joint.yaml"
    config.write_text(f"""inherit: {base}
data:
  sources: [{{name: shapes, shards: "{root}/labelled/{{00000..00001}}.tar", weight: 1,
              tasks: {{captioning: 1, matching: 1, objects: 1}}}}]
  mixing: adaptive
  adaptive_floor: 0.05
  tasks: {{minimum_per_batch: 1}}
model:
  connector: joint
  joint: {{width: 32, heads: 4, num_latents: 6, iterations: 1, mlp_ratio: 2.0, dropout: 0.0,
           max_text_len: 32}}
  llm: {{name: "{root}/opt_tasks"}}
eval:
  tasks: [heldout, questions]
  batch_size: 4
  gallery_size: 2
  datasets:
    heldout: {{kind: caption, annotations: "{root}/heldout.json", images: "{root}"}}
    questions: {{kind: gqa, questions: "{root}/questions.json", images: "{root}",
                 image_template: "{{image_id}}"}}
""")
    return {"root": root, "config": config}


def simvlg(*args):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
    }
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "simvlg"), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    return proc.returncode, proc.stdout


def rows(run_dir) -> dict[int, dict]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row  # a step logged twice (resumed) keeps its last row
    return out


@pytest.fixture(scope="module")
def reference(setup):
    run_dir = setup["root"] / "reference"
    code, out = simvlg("train", setup["config"], "--run-dir", run_dir)
    assert code == 0, out[-4000:]
    return run_dir


def test_joint_connector_trains_on_the_task_mixture(reference):
    got = rows(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    arms = {k for r in got.values() for k in r if k.startswith("loss/")}
    assert arms == {"loss/shapes/captioning", "loss/shapes/matching", "loss/shapes/objects"}
    meta = json.loads((reference / "connector" / "config.json").read_text())
    assert meta["connector"] == "joint" and meta["step"] == STEPS
    state = reference / "checkpoints" / f"step_{STEPS:08d}" / "rank0.json"
    loader = json.loads(state.read_text())["loader"]
    assert loader["arms"] == ["shapes/captioning", "shapes/matching", "shapes/objects"]
    # the shares already fixed for the next batches: 1 worker x prefetch 2 + 1
    assert len(loader["adaptive_published"]) == loader["share_delay"] == 3
    assert all(len(v) == STEPS for v in loader["adaptive"].values())  # a loss per arm per step


def test_restart_from_the_middle_checkpoint_is_bit_identical(setup, reference):
    run_dir = setup["root"] / "resumed"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(run_dir / "connector")
    code, out = simvlg("train", setup["config"], "--run-dir", run_dir)
    assert code == 0, out[-4000:]
    assert f"step_{STEPS - 2:08d}" in out and "resumed from" in out
    ref, got = rows(reference), rows(run_dir)
    for step in (STEPS - 1, STEPS):  # the loss and every arm's, bit for bit
        keys = [k for k in ref[step] if k == "loss" or k.startswith("loss/")]
        assert {k: got[step][k] for k in keys} == {k: ref[step][k] for k in keys}, step


def test_simvlg_eval_scores_captions_and_questions_from_the_joint_connector(setup, reference):
    code, out = simvlg(
        "eval", setup["config"], "--checkpoint", reference / "connector", "--run-dir", reference
    )
    assert code == 0, out[-4000:]
    caps = json.loads((reference / "eval" / "heldout" / "metrics.json").read_text())
    assert caps["num_samples"] == 6 and "CIDEr" in caps["metrics"]
    qs = json.loads((reference / "eval" / "questions" / "metrics.json").read_text())
    assert qs["num_samples"] == 24 and 0 <= qs["metrics"]["accuracy"] <= 100
    preds = json.loads((reference / "eval" / "questions" / "predictions.json").read_text())
    assert all(isinstance(p["prediction"], str) for p in preds)
    assert "merge figures skipped: the joint connector does not merge tokens" in out
