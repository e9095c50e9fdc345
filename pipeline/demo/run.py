"""`simvlg demo`: the whole pipeline in miniature on CPU, every stage real.

    1 corpus     synthetic shapes images + captions; held-out colour-shape pairs; a URL list with
                 a few broken URLs, served by a real HTTP server on 127.0.0.1
    2 shards     `simvlg prep urls` (img2dataset) downloads them into WebDataset shards
    3 backbones  small frozen ViT and OPT: the ViT first learns to see shapes (random colours, not
                 the corpus), the OPT the caption language from text; TomeFormer init (small
                 BERT, or real MiniLM weights)
    4 train      `simvlg train` through the `deepspeed` launcher: 2 CPU ranks, ZeRO-2, MLflow
    5 eval       captions for held-out images: caption metrics, attribute accuracy, gallery,
                 merged-token figures
    6 report     summary table, report.json, how to open MLflow

`--compare qformer` trains the Q-Former connector with the same budget and compares the learning
curves; `--sweep-r` trains with several r (Fig. 3 in miniature); `--pformer` pre-trains a P-Former on
text and trains the TomeFormer with its alignment loss beside the baseline (pipeline/demo/pformer.py);
`--compare joint` (the joint adaptive connector) and `--tasks adaptive` (the task mixture, adaptive
vs uniform task sampling): compact.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.data.formats.manifest import Manifest, read_manifest
from pipeline.demo import compact

log = logging.getLogger("simvlg.demo")
BROKEN = ["missing/0.png", "missing/1.png", "notanimage.png", "truncated.png"]


CORPUS_VERSION = 2  # 2: shapes of a group never touch; the ViT learns from random-colour shapes


def check_inputs(run_dir: Path, inputs: dict) -> None:
    """Stages reuse what a run dir holds, so a run dir made with other inputs (or an older demo) would
    mix old data or backbones into this run: refuse, naming the difference, and delete nothing."""
    stamp = run_dir / "demo_inputs.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        diff = {k: (old.get(k), v) for k, v in inputs.items() if old.get(k) != v}
        if diff:
            raise SystemExit(
                f"simvlg demo: {run_dir} holds a demo made with other inputs ("
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
                + "); pass another --run-dir, or delete that folder to start over"
            )
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise SystemExit(
            f"simvlg demo: {run_dir} is not empty and was not made by this version of "
            "the demo; pass another --run-dir, or delete that folder to start over"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(inputs, indent=1))


class Stages:
    """Runs named stages, timing each; a stage whose outputs exist is reused (`make demo` twice)."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kw):
        t0 = time.time()
        print(f"\n== {name} ==", file=sys.stderr, flush=True)
        out = fn(*args, **kw)
        self.timings[name] = round(time.time() - t0, 1)
        print(f"== {name}: {self.timings[name]} s", file=sys.stderr, flush=True)
        return out


# ------------------------------------------------------------------------------------- stage 1
def make_corpus(root: Path, n_train: int, n_heldout: int, seed: int) -> dict:
    from pipeline.demo import corpus

    done = root / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "heldout").mkdir(parents=True, exist_ok=True)
    rows, heldout = [], []
    for split, i, attrs, caption, img in corpus.generate(n_train, n_heldout, seed=seed):
        name = f"{split}/{i:06d}.png"
        img.save(root / name)
        if split == "train":
            rows.append({"path": name, "caption": caption})
        else:
            heldout.append({"image": name, "caption": [caption], "attributes": attrs})
    # Broken on purpose: two 404s, bytes that are not an image, a truncated PNG.
    (root / "notanimage.png").write_text("<html>not an image</html>")
    good = (root / rows[0]["path"]).read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 3])
    rows += [{"path": p, "caption": "a broken url"} for p in BROKEN]
    (root / "heldout.json").write_text(json.dumps(heldout))
    info = {"train": n_train, "heldout": n_heldout, "broken_urls": len(BROKEN), "rows": rows}
    done.write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------- stage 2
def make_shards(corpus_dir: Path, out: Path, rows: list[dict]) -> Manifest:
    from pipeline.data import prep
    from pipeline.demo.serve import LoopbackServer

    manifest = out / "manifest.json"
    if manifest.is_file():  # written last by prep: the shards are complete (and the server's port,
        return read_manifest(manifest)  # part of every URL, differs from run to run)
    with LoopbackServer(corpus_dir) as server:
        url_list = out.parent / "urls.csv"
        out.mkdir(parents=True, exist_ok=True)
        import csv

        with open(url_list, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["url", "caption"])
            for r in rows:
                w.writerow([f"{server.url}/{r['path']}", r["caption"]])
        code = prep.main(
            [
                "urls",
                "--input",
                str(url_list),
                "--out",
                str(out),
                "--image-size",
                "64",
                "--processes",
                "1",
                "--threads",
                "8",
                "--samples-per-shard",
                "1000",
                "--timeout",
                "30",
                "--retries",
                "0",
            ]
        )
    if code != 0 or not manifest.is_file():
        raise SystemExit(f"simvlg demo: the shards stage failed (prep exit {code}); see above")
    return read_manifest(manifest)


# ------------------------------------------------------------------------------------- stage 3
def make_backbones(
    out: Path, vit_arch: str, vit_steps: int, prompt: str, lm_steps: int, tomeformer_init: str, seed: int
) -> dict:
    from pipeline.demo import backbones, corpus

    info_file = out / "backbones.json"
    if info_file.is_file():
        return json.loads(info_file.read_text())
    t0 = time.time()
    vit = backbones.pretrain_vit(out / "vit", Path(vit_arch), steps=vit_steps, seed=seed)
    vit_s = time.time() - t0
    lm = backbones.build_llm(
        out / "opt", corpus.all_attribute_sets(), corpus.caption, prompt, steps=lm_steps, seed=seed
    )
    tomeformer = backbones.build_tomeformer_init(out / "tomeformer", tomeformer_init, seed=seed)
    info = {
        "vit": f"timm {backbones.DEMO_VIT} ({Path(vit_arch).name}), pre-trained on random-colour "
        f"shapes: {vit['vit_pretrain_images']} images in {vit_s:.0f} s, final loss "
        f"{vit['vit_pretrain_loss']}; frozen",
        "llm": f"OPTForCausalLM 3 x 128, word-level vocab {lm['vocab_size']}, "
        f"caption-text loss {lm['lm_text_loss']} after {lm_steps} steps",
        "tomeformer_init": tomeformer,
    }
    info_file.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------- stage 4
def write_config(run_dir: Path, base: str, overrides: list[str]) -> Path:
    """The demo config with this run's absolute paths, as a file users can re-run by hand."""
    bb, corpus_dir = run_dir / "backbones", run_dir / "corpus"
    text = f"""# written by `simvlg demo`; re-run training with: simvlg train {run_dir}/demo_config.yaml
inherit: {base}
data:
  sources: [{{name: shapes, shards: "{run_dir}/data/manifest.json", weight: 1}}]
model:
  vision: {{checkpoint: "{bb}/vit/model.safetensors"}}
  tomeformer: {{init: "{bb}/tomeformer"}}
  qformer: {{init: "{bb}/tomeformer"}}
  llm: {{name: "{bb}/opt"}}
eval:
  datasets:
    shapes_heldout: {{kind: caption, annotations: "{corpus_dir}/heldout.json",
                      images: "{corpus_dir}"}}
"""
    path = run_dir / "demo_config.yaml"
    path.write_text(text)
    load_config(path, overrides)  # fail here, with the config's own message, not in a rank
    return path


def train(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    cmd = [str(Path(sys.executable).parent / "simvlg"), "train", str(config), "--run-dir", str(run_dir)]
    for ov in overrides:
        cmd += ["--set", ov]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise SystemExit(f"simvlg demo: training failed (exit {code}); logs above, run dir {run_dir}")
    return {
        "summary": json.loads((run_dir / "train_summary.json").read_text()),
        "curve": [(r["step"], r["loss"]) for r in training_rows(run_dir)],
    }


def training_rows(run_dir: Path) -> list[dict]:
    """The logged training steps of a run's metrics.jsonl (not the eval rows that follow them)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r and "eval" not in r]


# ------------------------------------------------------------------------------------- stage 5
def evaluate(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    import torch

    from pipeline.demo import corpus
    from pipeline.eval.evaluate import evaluate_task
    from pipeline.eval.run import load_checkpoint
    from pipeline.models import build_model
    from pipeline.train.tracking import Tracker

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = load_config(config, overrides)
    model = build_model(cfg.model)
    loaded = load_checkpoint(model, run_dir)
    run_id = json.loads((run_dir / "train_summary.json").read_text())["mlflow_run_id"]
    tracker = Tracker(cfg, run_dir, run_id=run_id)
    try:
        report = evaluate_task(
            model,
            cfg,
            "shapes_heldout",
            run_dir / "eval" / "shapes_heldout",
            tracker=tracker,
            step=loaded.get("step") or 0,
        )
        records = json.loads((run_dir / "eval" / "shapes_heldout" / "predictions.json").read_text())
        heldout = json.loads(Path(cfg.eval.datasets["shapes_heldout"]["annotations"]).read_text())
        truth = {corpus.caption(h["attributes"]): h["attributes"] for h in heldout}
        correct = dict.fromkeys(corpus.ATTRIBUTES, 0)
        parsed = 0
        for rec in records:
            want = truth[rec["references"][0]]
            got = corpus.parse_caption(rec["prediction"]) or {}
            parsed += bool(got)
            for a in corpus.ATTRIBUTES:
                correct[a] += got.get(a) == want[a]
        n = len(records)
        accuracy = {a: round(correct[a] / n, 4) for a in corpus.ATTRIBUTES}
        exact = sum(corpus.parse_caption(r["prediction"]) == truth[r["references"][0]] for r in records) / n
        tracker.log(loaded.get("step") or 0, {f"eval/attr_acc/{a}": v for a, v in accuracy.items()})
    finally:
        tracker.close()
    return {
        "metrics": report["metrics"] if report else {},
        "attribute_accuracy": accuracy,
        "exact_caption_match": round(exact, 4),
        "grammatical": round(parsed / n, 4),
        "n": n,
        "checkpoint": loaded,
        "samples": records[:8],
        "files": {k: str(v) for k, v in (report or {}).get("files", {}).items()},
    }


# ------------------------------------------------------------------------------------- stage 6
def steps_to_loss(curve: list[tuple[int, float]], target: float, window: int = 5) -> int | None:
    """First step at which the mean of the last `window` logged losses is below `target`."""
    for i in range(window - 1, len(curve)):
        if sum(loss for _, loss in curve[i - window + 1 : i + 1]) / window < target:
            return curve[i][0]
    return None


def side_by_side(curves: dict[str, list[tuple[int, float]]], rows: int = 12) -> str:
    """Training loss of each run, one column per run: the mean of the logged losses since the row
    above (single logged losses are one micro-batch each, too noisy to compare)."""
    common = sorted(set.intersection(*(set(s for s, _ in c) for c in curves.values())))
    if not common:
        return ""
    shown = common[max(1, len(common) // rows) - 1 :: max(1, len(common) // rows)]
    shown = shown if shown[-1] == common[-1] else shown + [common[-1]]
    w = max(14, *(len(n) + 2 for n in curves))  # a column per run, wide enough for its name
    lines = ["mean loss to step" + "".join(f"{n:>{w}}" for n in curves)]
    prev = 0
    for st in shown:
        means = []
        for c in curves.values():
            window = [loss for s, loss in c if prev < s <= st]
            means.append(sum(window) / len(window))
        lines.append(f"{st:>17}" + "".join(f"{m:>{w}.4f}" for m in means))
        prev = st
    return "\n".join(lines)


def print_table(report: dict) -> None:
    rows = [("stage timings (s)", ", ".join(f"{k} {v}" for k, v in report["timings"].items()))]
    if "shards" in report:  # the failures prep counted, by cause (the demo's list has four on purpose)
        failed = report["shards"]["counts"]["by_category"]
        rows.append(
            (
                "shards",
                f"{report['shards']['num_samples']} samples; failed URLs: "
                + (", ".join(f"{k} {v}" for k, v in failed.items()) or "none"),
            )
        )
    for name, res in report["runs"].items():
        ev = res.get("eval", {})
        acc = ev.get("attribute_accuracy", {})
        summary, curve = res["train"]["summary"], res["train"]["curve"]
        # from the logged curve: a re-run that resumes at the last step trains no step itself
        losses = f"loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}" if curve else "no loss logged"
        rows += [
            (f"[{name}] train", f"{summary['steps']} steps, {losses}"),
            (f"[{name}] attribute accuracy", ", ".join(f"{a} {v:.1%}" for a, v in acc.items())),
            (f"[{name}] exact captions", f"{ev.get('exact_caption_match', 0):.1%} of {ev.get('n')}"),
            (
                f"[{name}] CIDEr / BLEU-4",
                f"{ev.get('metrics', {}).get('CIDEr', float('nan')):.1f} / "
                f"{ev.get('metrics', {}).get('BLEU-4', float('nan')):.1f}",
            ),
        ]
        if "steps_to_loss" in res:
            rows.append(
                (
                    f"[{name}] steps to reach loss",
                    ", ".join(
                        f"{t}: {s if s is not None else 'never'}" for t, s in res["steps_to_loss"].items()
                    ),
                )
            )
        rows += [(f"[{name}] {label}", value) for label, value in res.get("rows", [])]  # compact.py
    w = max(len(k) for k, _ in rows)
    print("\n" + "=" * (w + 60) + "\nsimvlg demo\n" + "=" * (w + 60))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if len(report["runs"]) > 1:
        print("\n" + side_by_side({n: r["train"]["curve"] for n, r in report["runs"].items()}))
    print(
        f"\nreport: {report['report']}\nMLflow UI: mlflow ui --backend-store-uri "
        f"sqlite:///{report['mlflow_db']}  (then open http://127.0.0.1:5000)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="simvlg demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="demo", help="base config (default: the packaged demo.yaml)")
    p.add_argument("--run-dir", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--heldout-images", type=int, default=240)
    p.add_argument(
        "--vit-steps", type=int, default=600, help="ViT pre-training on random-colour shapes (batches of 64)"
    )
    p.add_argument("--lm-steps", type=int, default=400, help="LM pre-training on caption text")
    p.add_argument(
        "--tomeformer-init",
        choices=["bert", "minilm"],
        default="bert",
        help="TomeFormer start: small random BERT, or real MiniLM-L6 weights "
        "(then use --set model.tomeformer.num_layers=6 --set model.tomeformer.r=6)",
    )
    p.add_argument(
        "--compare",
        choices=["qformer", "joint"],
        default=None,
        help="also train the Q-Former (or the joint adaptive) connector with the same budget and compare",
    )
    p.add_argument(
        "--tasks",
        choices=["adaptive"],
        default=None,
        help="also train the TomeFormer on the task mixture with uniform and with adaptive task "
        "sampling, and compare (pipeline/demo/compact.py)",
    )
    p.add_argument(
        "--task-lm-steps",
        type=int,
        default=compact.TASK_LM_STEPS,
        help="--tasks: pre-training of the second LM on task text (batches of 32)",
    )
    p.add_argument(
        "--sweep-r",
        default=None,
        metavar="R,R,...",
        help="also train with these per-layer merge counts (Fig. 3 in miniature)",
    )
    p.add_argument(
        "--pformer",
        action="store_true",
        help="also pre-train a P-Former on the captions and sentences never seen with an image, "
        "then train the TomeFormer with its alignment loss (position and assignment match) "
        "with the same budget and compare (pipeline/demo/pformer.py)",
    )
    p.add_argument(
        "--loss-targets",
        default="0.5,0.2,0.1",
        metavar="L,L,...",
        help="losses for 'steps to reach a loss' (mean of 5 logged points)",
    )
    args = p.parse_args(argv)
    try:
        targets = [float(t) for t in args.loss_targets.split(",")]
    except ValueError:
        p.error(f"--loss-targets {args.loss_targets!r}: expected numbers separated by commas")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = Path(args.run_dir).resolve()
    base = load_config(args.config, args.overrides)
    check_inputs(
        run_dir,
        {
            "corpus_version": CORPUS_VERSION,
            "train_images": args.train_images,
            "heldout_images": args.heldout_images,
            "seed": base.run.seed,
            "vit_steps": args.vit_steps,
            "lm_steps": args.lm_steps,
            "tomeformer_init": args.tomeformer_init,
        },
    )
    stages = Stages()
    corpus_info = stages.run(
        "corpus", make_corpus, run_dir / "corpus", args.train_images, args.heldout_images, base.run.seed
    )
    manifest = stages.run("shards", make_shards, run_dir / "corpus", run_dir / "data", corpus_info["rows"])
    bb = stages.run(
        "backbones",
        make_backbones,
        run_dir / "backbones",
        base.model.vision.arch_config,
        args.vit_steps,
        base.model.llm.prompt,
        args.lm_steps,
        args.tomeformer_init,
        base.run.seed,
    )
    config = write_config(run_dir, _config_path(args.config), args.overrides)
    variants = {"tomeformer": []}
    if args.compare == "qformer":
        variants["qformer"] = ["model.connector=qformer"]
    if args.compare == "joint":
        variants["joint"] = compact.JOINT
    for r in args.sweep_r.split(",") if args.sweep_r else []:
        variants[f"tomeformer_r{r}"] = [f"model.tomeformer.r={int(r)}"]
    if args.pformer:
        from pipeline.demo import pformer as pformer_demo

        variants |= stages.run("pformer", pformer_demo.pretrain, run_dir, config, args.overrides, corpus_info)
    runs = {}
    for name, extra in variants.items():
        vdir = run_dir / "train" / name
        ov = args.overrides + extra
        res = {"train": stages.run(f"train[{name}]", train, config, vdir, ov)}
        res["eval"] = stages.run(f"eval[{name}]", evaluate, config, vdir, ov)
        res["steps_to_loss"] = {t: steps_to_loss(res["train"]["curve"], t) for t in targets}
        runs[name] = res
    if args.tasks:
        runs.update(compact.run(stages, run_dir, config, args, base, targets))
    report = {
        "timings": stages.timings,
        "corpus": {k: v for k, v in corpus_info.items() if k != "rows"},
        "shards": {
            "shards": manifest.shards,
            "num_samples": manifest.num_samples,
            "counts": manifest.counts.model_dump(),
        },
        "backbones": bb,
        "runs": runs,
        "attribute_accuracy": runs["tomeformer"]["eval"]["attribute_accuracy"],
        "mlflow_run_id": runs["tomeformer"]["train"]["summary"]["mlflow_run_id"],
        "mlflow_db": str(run_dir / "train" / "tomeformer" / "mlflow.db"),
        "report": str(run_dir / "report.json"),
        "config": str(config),
    }
    if args.pformer:  # compared on the LM loss (an aligned run's loss adds the alignment term)
        captioning = {k: v for k, v in runs.items() if "captioning_curve" not in v}  # not the task runs
        report["pformer"] = pformer_demo.compare(run_dir, captioning, targets)
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    if args.pformer:
        pformer_demo.print_comparison(report["pformer"])
    if args.tasks:
        compact.print_comparison(runs)
    return 0


def _config_path(name: str) -> str:
    from pipeline.config import resolve_config_path

    return str(resolve_config_path(name).resolve())
