"""A shortened `simvlg demo` end to end (few images, few steps): every stage runs for real and
leaves its outputs; the report has the fields users and CI read."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


def test_corpus_shapes_never_touch_and_stay_in_the_image():
    import math
    import random

    from pipeline.demo import corpus

    rng = random.Random(0)
    for a in corpus.all_attribute_sets():
        for _ in range(5):
            centres, r = corpus.layout(a, rng)
            assert len(centres) == corpus.COUNTS.index(a["count"]) + 1
            assert all(r <= v <= 64 - r for c in centres for v in c), (a, centres, r)
            assert all(math.dist(p, q) > 2.4 * r for i, p in enumerate(centres) for q in centres[i + 1 :])
            # the group stays on its side: left groups left of centre, top groups above, ...
            mx = sum(x for x, _ in centres) / len(centres)
            my = sum(y for _, y in centres) / len(centres)
            side = {"left": mx < 26, "right": mx > 38, "top": my < 26, "bottom": my > 38}
            assert side[a["position"]], (a, mx, my)


def test_corpus_is_deterministic_and_held_out_pairs_never_train():
    from pipeline.demo import corpus

    first = list(corpus.generate(30, 10, seed=4))
    again = list(corpus.generate(30, 10, seed=4))
    assert [x[3] for x in first] == [x[3] for x in again]
    assert all(x[4].tobytes() == y[4].tobytes() for x, y in zip(first, again))
    assert not any(corpus.is_held_out(a) for split, _, a, *_ in first if split == "train")
    assert all(corpus.is_held_out(a) for split, _, a, *_ in first if split == "heldout")
    assert all(corpus.parse_caption(cap) == a for _, _, a, cap, _ in first)


def test_demo_refuses_a_run_dir_made_with_other_inputs(tmp_path):
    from pipeline.demo.run import main

    old = tmp_path / "old"
    (old / "backbones").mkdir(parents=True)
    (old / "backbones" / "backbones.json").write_text("{}")  # an older demo's cache, no stamp
    with pytest.raises(SystemExit, match="not made by this version"):
        main(["--run-dir", str(old)])
    assert (old / "backbones" / "backbones.json").read_text() == "{}"

    run = tmp_path / "run"
    run.mkdir()
    stamp = {
        "corpus_version": 2,
        "train_images": 4000,
        "heldout_images": 240,
        "seed": 0,
        "vit_steps": 5,
        "lm_steps": 400,
        "tomeformer_init": "bert",
    }
    (run / "demo_inputs.json").write_text(json.dumps(stamp))
    with pytest.raises(SystemExit, match="vit_steps 5 -> 600"):
        main(["--run-dir", str(run)])
    assert json.loads((run / "demo_inputs.json").read_text()) == stamp
    assert sorted(p.name for p in run.iterdir()) == ["demo_inputs.json"]


def test_steps_to_loss_uses_a_running_mean():
    from pipeline.demo.run import steps_to_loss

    curve = [(10 * i, 1.0 / i) for i in range(1, 21)]
    # means of 5 consecutive losses: steps 10-70 -> 0.219, 20-80 -> 0.177
    assert steps_to_loss(curve, 0.2) == 80
    assert steps_to_loss(curve, 0.01) is None
    assert steps_to_loss([(1, 0.1)] * 4, 0.5) is None  # fewer points than the window


def test_side_by_side_curves_share_steps_and_end_on_the_last():
    from pipeline.demo.run import side_by_side

    a = [(25 * i, 1.0) for i in range(1, 61)]
    b = [(25 * i, 2.0) for i in range(1, 61)] + [(1525, 9.0)]  # a step only b logged: not shown
    lines = side_by_side({"tomeformer": a, "qformer": b}).splitlines()
    assert lines[0].split()[-2:] == ["tomeformer", "qformer"]
    assert lines[-1].split() == ["1500", "1.0000", "2.0000"]
    assert len(lines) == 13


def test_summary_table_after_a_rerun_that_trained_no_step(capsys):
    """`make demo` twice: training resumes at its last step, logs no loss itself, and the table
    still shows the run's curve (from metrics.jsonl, appended across resumes)."""
    from pipeline.demo.run import print_table

    run = {
        "train": {
            "summary": {"steps": 1300, "first_loss": None, "last_loss": None},
            "curve": [(25, 0.79), (1300, 0.022)],
        },
        "eval": {"attribute_accuracy": {"shape": 0.96}, "n": 240, "metrics": {"CIDEr": 971.6}},
        "steps_to_loss": {0.5: 125, 0.01: None},
    }
    report = {
        "timings": {"corpus": 3.0},
        "runs": {"tomeformer": run, "qformer": run},
        "shards": {"num_samples": 4000, "counts": {"by_category": {"http_404": 2, "undecodable_image": 2}}},
        "report": "r.json",
        "mlflow_db": "m.db",
    }
    print_table(report)
    out = capsys.readouterr().out
    assert "1300 steps, loss 0.790 -> 0.022" in out and "0.5: 125, 0.01: never" in out
    assert "4000 samples; failed URLs: http_404 2, undecodable_image 2" in out  # what the manifest counted
    assert "tomeformer       qformer" in out  # the side-by-side curves


@pytest.mark.slow
def test_short_demo_runs_every_stage(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [
        str(Path(sys.executable).parent / "simvlg"),
        "demo",
        "--run-dir",
        str(run_dir),
        "--train-images",
        "120",
        "--heldout-images",
        "12",
        "--lm-steps",
        "20",
        "--vit-steps",
        "3",
        "--set",
        "train.steps=4",
        "--set",
        "train.log_every=1",
        "--set",
        "train.ckpt_every=2",
        "--set",
        "train.warmup_steps=1",
        "--set",
        "eval.num_beams=1",
        "--set",
        "eval.gallery_size=4",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["timings"]) >= {
        "corpus",
        "shards",
        "backbones",
        "train[tomeformer]",
        "eval[tomeformer]",
    }
    # 1 corpus: images on disk, held-out annotations, broken URLs in the list
    assert len(list((run_dir / "corpus" / "train").glob("*.png"))) == 120
    assert len(json.loads((run_dir / "corpus" / "heldout.json").read_text())) == 12
    # 2 shards: img2dataset downloaded the good URLs and counted the broken ones
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["num_samples"] == 120, manifest
    assert list((run_dir / "data" / "shards").glob("*.tar"))
    assert manifest["counts"]["by_category"] == {"http_404": 2, "undecodable_image": 2}, manifest
    # 3 backbones: the pre-trained ViT's weights, the OPT and TomeFormer init saved with save_pretrained
    assert (run_dir / "backbones" / "vit" / "model.safetensors").is_file()
    assert "192 images" in report["backbones"]["vit"]
    for name in ("opt", "tomeformer"):
        assert (run_dir / "backbones" / name / "config.json").is_file()
    # 4 training through the launcher: checkpoints, metrics, MLflow
    train_dir = run_dir / "train" / "tomeformer"
    assert (train_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").is_file()
    steps = [
        json.loads(x)["step"]
        for x in (train_dir / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x and "eval/" not in x
    ]
    assert steps[:4] == [1, 2, 3, 4]
    assert report["mlflow_run_id"] and (train_dir / "mlflow.db").is_file()
    # 5 evaluation on the held-out split
    ev = report["runs"]["tomeformer"]["eval"]
    assert ev["n"] == 12
    assert set(report["attribute_accuracy"]) == {"shape", "color", "count", "position", "size"}
    assert all(0.0 <= v <= 1.0 for v in report["attribute_accuracy"].values())
    assert {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L"} <= set(ev["metrics"])
    assert set(report["runs"]["tomeformer"]["steps_to_loss"]) == {"0.5", "0.2", "0.1"}
    eval_dir = train_dir / "eval" / "shapes_heldout"
    preds = json.loads((eval_dir / "predictions.json").read_text())
    assert len(preds) == 12 and all(isinstance(p["prediction"], str) for p in preds)
    assert (eval_dir / "gallery.html").read_text().count("<img") >= 4
    figures = list((eval_dir / "merge").glob("*.png"))
    assert figures
    with Image.open(figures[0]) as im:
        im.verify()
    # 6 report in the terminal
    assert "attribute accuracy" in out.stdout and "mlflow ui" in out.stdout

    # `make demo` twice: every stage reuses what the run dir holds (the loopback server's port, part
    # of every URL, changes between runs), training resumes at its last step and evaluation re-runs
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    report2 = json.loads((run_dir / "report.json").read_text())
    assert all(report2["timings"][s] < 1.0 for s in ("corpus", "shards", "backbones")), report2["timings"]
    assert report2["shards"] == report["shards"]
    assert report2["runs"]["tomeformer"]["train"]["summary"]["steps"] == 4
    assert "4 steps, loss" in again.stdout

    # the packaged `demo` config trains by hand on what the demo wrote (README: from the repo root,
    # where runs/demo is); without a demo it refuses in one line, at once
    simvlg = str(Path(sys.executable).parent / "simvlg")
    fresh = tmp_path / "checkout"
    fresh.mkdir()
    refused = subprocess.run(
        [simvlg, "train", "demo"], capture_output=True, text=True, cwd=fresh, timeout=120
    )
    assert refused.returncode == 1 and "runs/demo/backbones/vit/model.safetensors" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    (fresh / "runs").mkdir()
    (fresh / "runs" / "demo").symlink_to(run_dir)
    ok = subprocess.run([simvlg, "config", "validate", "demo"], capture_output=True, text=True, cwd=fresh)
    assert ok.returncode == 0 and "65 -> 47 -> 29" in ok.stdout, ok.stderr
    by_hand = subprocess.run(
        [simvlg, "train", "demo", "--set", "train.steps=1", "--set", "tracking.enabled=false"],
        capture_output=True,
        text=True,
        cwd=fresh,
        timeout=900,
    )
    assert by_hand.returncode == 0, (by_hand.stdout + by_hand.stderr)[-3000:]
    assert (run_dir / "train" / "by-hand" / "checkpoints" / "step_00000001" / "COMPLETE.json").is_file()
