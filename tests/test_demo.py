"""A shortened `simvlg demo` end to end (few images, few steps): every stage runs for real and
leaves its outputs; the report has the fields users and CI read."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_short_demo_runs_every_stage(tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [str(Path(sys.executable).parent / "simvlg"), "demo", "--run-dir", str(run_dir),
           "--train-images", "120", "--heldout-images", "12", "--lm-steps", "20",
           "--set", "train.steps=4", "--set", "train.log_every=1", "--set", "train.ckpt_every=2",
           "--set", "train.warmup_steps=1", "--set", "eval.num_beams=1", "--set", "eval.gallery_size=4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["timings"]) >= {"corpus", "shards", "backbones", "train[tomeformer]",
                                      "eval[tomeformer]"}
    # 1 corpus: images on disk, held-out annotations, broken URLs in the list
    assert len(list((run_dir / "corpus" / "train").glob("*.png"))) == 120
    assert len(json.loads((run_dir / "corpus" / "heldout.json").read_text())) == 12
    # 2 shards: img2dataset downloaded the good URLs and counted the broken ones
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["num_samples"] == 120, manifest
    assert list((run_dir / "data" / "shards").glob("*.tar"))
    assert manifest["counts"]["by_category"] == {"http_404": 2, "undecodable_image": 2}, manifest
    # 3 backbones saved with save_pretrained
    for name in ("vit", "opt", "tomeformer"):
        assert (run_dir / "backbones" / name / "config.json").is_file()
    # 4 training through the launcher: checkpoints, metrics, MLflow
    train_dir = run_dir / "train" / "tomeformer"
    assert (train_dir / "checkpoints" / "step_00000004" / "COMPLETE.json").is_file()
    steps = [json.loads(x)["step"] for x in (train_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in x and "eval/" not in x]
    assert steps[:4] == [1, 2, 3, 4]
    assert report["mlflow_run_id"] and (train_dir / "mlflow.db").is_file()
    # 5 evaluation on the held-out split
    ev = report["runs"]["tomeformer"]["eval"]
    assert ev["n"] == 12
    assert set(report["attribute_accuracy"]) == {"shape", "color", "count", "position", "size"}
    assert all(0.0 <= v <= 1.0 for v in report["attribute_accuracy"].values())
    assert {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L"} <= set(ev["metrics"])
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
