"""`simvlg demo --pformer`: the P-Former (issue 15) in miniature, after the demo's corpus, shards and
backbones, every step through the real commands.

    sentences  the corpus' training captions + every sentence of the grammar (REPEAT copies each; 72 of
               the 288 name a held-out colour-shape pair and never appear with an image: text beyond
               the pairs, as the method intends) -> `simvlg prep sentences` -> text shards + manifest
    bert       a small random BERT (2 x 128) with a word-level WordPiece vocabulary of the grammar
    train      `simvlg train` with model.kind: pformer (2 CPU ranks, the demo's frozen OPT, N = 29, the
               demo's prompt) -> pformer/ (the frozen target of the alignment loss)

The demo then trains the TomeFormer with the alignment loss, position-wise (official) and with the
optimal assignment (ours), beside its baseline, same steps, batch and seed (`variants`). `compare`
puts the runs side by side on their LM loss (an aligned run's logged loss adds align_weight x align,
so its curve and steps-to-loss are rewritten to the LM part) and on held-out attribute accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPEAT = 4  # copies of each grammar sentence among the P-Former's sentences
ALIGN_WEIGHT = 100.0  # omega: the paper's for BLIP-2's LM stage (poster Table 4), as simvlg_opt2.7b_pformer
PFORMER_STEPS = 800
MATCHES = ("position", "assignment")


def sentences(corpus_info: dict) -> tuple[list[str], list[str]]:
    """(the training captions, every sentence of the grammar): the P-Former's two input files."""
    from pipeline.demo import corpus

    captions = [r["caption"] for r in corpus_info["rows"] if r["path"].startswith("train/")]  # not the
    return captions, corpus.all_captions()  # broken URLs


def build_bert(out: Path, words: list[str], seed: int = 0) -> Path:
    """A small random BERT with a WordPiece vocabulary of whole words (the grammar's): what the P-Former
    starts from (bert-base-uncased at scale), saved with its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words))
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(str(out / "vocab.txt"))  # the vocab path (transformers 5 ignores vocab_file=)
    torch.manual_seed(seed)
    BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
        )
    ).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_config(root: Path, demo_config: Path, steps: int) -> Path:
    """The P-Former run's config: the demo's (its frozen OPT and prompt, 2 ranks, fp32) as a stage-0 run
    on the sentence shards."""
    text = f"""# written by `simvlg demo --pformer`; re-run with: simvlg train {root}/pformer_config.yaml
inherit: {demo_config}
run: {{name: demo-pformer, run_dir: "{root}/train"}}
data:
  sources: [{{name: sentences, shards: "{root}/sentences/manifest.json", kind: text, weight: 1}}]
model:
  kind: pformer
  pformer: {{init: "{root}/bert", num_prompts: 29, max_text_tokens: 16}}
train: {{steps: {steps}, lr: 1.0e-3, min_lr: 1.0e-4, warmup_steps: 50, log_every: 25, ckpt_every: 400}}
"""
    path = root / "pformer_config.yaml"
    path.write_text(text)
    return path


def pretrain(
    run_dir: Path,
    demo_config: Path,
    overrides: list[str],
    corpus_info: dict,
    steps: int = PFORMER_STEPS,
    align_weight: float = ALIGN_WEIGHT,
) -> dict[str, list[str]]:
    """Sentences, BERT and P-Former training (each reused when done); -> the demo's extra variants."""
    from pipeline.data import prep

    root = run_dir / "pformer"
    captions, grammar = sentences(corpus_info)
    if not (root / "sentences" / "manifest.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "captions.txt").write_text("\n".join(captions) + "\n")
        (root / "grammar.txt").write_text("\n".join(grammar * REPEAT) + "\n")
        code = prep.main(
            [
                "sentences",
                "--input",
                str(root / "captions.txt"),
                "--input",
                str(root / "grammar.txt"),
                "--out",
                str(root / "sentences"),
            ]
        )
        if code != 0:
            raise SystemExit(f"simvlg demo: prep sentences failed (exit {code}); see above")
    if not (root / "bert" / "vocab.txt").is_file():
        build_bert(root / "bert", [w for s in grammar for w in s.split()])
    folder = root / "train" / "pformer"
    if not (folder / "config.json").is_file():
        config = write_config(root, demo_config, steps)
        cmd = [str(Path(sys.executable).parent / "simvlg"), "train", str(config)]
        for ov in overrides:
            cmd += ["--set", ov]
        code = subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if code != 0 or not (folder / "config.json").is_file():
            raise SystemExit(f"simvlg demo: P-Former training failed (exit {code}); run dir {root / 'train'}")
    return {
        f"align_{m}": [
            f"train.align_weight={align_weight}",
            f"train.align_match={m}",
            f"model.pformer_checkpoint={folder}",
        ]
        for m in MATCHES
    }


def _lm_curve(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    from pipeline.demo.run import training_rows

    rows = training_rows(run_dir)
    lm = [(r["step"], r.get("lm_loss", r["loss"])) for r in rows]
    return lm, [(r["step"], r["align_loss"]) for r in rows if "align_loss" in r]


def compare(run_dir: Path, runs: dict, targets: list[float]) -> dict:
    """Side by side on the LM loss and held-out accuracy. Rewrites each run's curve and steps_to_loss to
    the LM part (so the demo's table and learning curves compare like with like)."""
    from pipeline.demo.run import steps_to_loss

    stage0 = (run_dir / "pformer" / "train" / "metrics.jsonl").read_text().splitlines()
    first, pformer = json.loads(stage0[0]), json.loads(stage0[-1])
    out = {
        "pformer": {
            k: (round(first.get(k, float("nan")), 4), round(pformer.get(k, float("nan")), 4))
            for k in ("lm_loss", "contrastive_loss", "vq_loss")
        },
        "runs": {},
    }
    for name, res in runs.items():
        lm, align = _lm_curve(run_dir / "train" / name)
        res["train"]["curve"] = lm
        res["steps_to_loss"] = {t: steps_to_loss(lm, t) for t in targets}
        ev = res.get("eval", {})
        out["runs"][name] = {
            "steps_to_lm_loss": res["steps_to_loss"],
            "final_lm_loss": round(sum(v for _, v in lm[-5:]) / max(1, len(lm[-5:])), 4),
            "align_loss": (round(align[0][1], 4), round(align[-1][1], 4)) if align else None,
            "attribute_accuracy": ev.get("attribute_accuracy", {}),
            "exact_caption_match": ev.get("exact_caption_match"),
        }
    return out


def print_comparison(cmp: dict) -> None:
    pf, runs = cmp["pformer"], cmp["runs"]
    print(
        "\nP-Former stage 0 (captions + grammar sentences), first -> last logged: "
        + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in pf.items())
    )
    names = list(runs)
    first = runs[names[0]]
    rows = [("", names)]
    for t in first["steps_to_lm_loss"]:
        rows.append((f"steps to LM loss {t}", [runs[n]["steps_to_lm_loss"][t] or "never" for n in names]))
    rows.append(("final LM loss", [runs[n]["final_lm_loss"] for n in names]))
    align = [runs[n]["align_loss"] for n in names]
    rows.append(("align loss first -> last", [f"{a[0]} -> {a[1]}" if a else "-" for a in align]))
    for a in first["attribute_accuracy"]:
        rows.append((f"held-out {a}", [f"{runs[n]['attribute_accuracy'].get(a, 0):.1%}" for n in names]))
    rows.append(("held-out exact captions", [f"{runs[n]['exact_caption_match'] or 0:.1%}" for n in names]))
    w = max(len(k) for k, _ in rows)
    for k, vals in rows:
        print(f"{k:<{w}}" + "".join(f"{str(v):>22}" for v in vals))
