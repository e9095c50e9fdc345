"""The compact-representations paper in miniature: `simvlg demo --compare joint` and `--tasks adaptive`.

--compare joint   the joint adaptive connector (models/joint.py) trained with the demo's budget beside
                  the TomeFormer: width 128 (the demo BERT's), 4 heads, N = 29 latents (the
                  TomeFormer's soft-prompt length), 2 fusion iterations, MLP ratio 2 (the BERT's);
                  captioning only, the same backbones and shards. Its text side reads "a photo of".
--tasks adaptive  the TomeFormer on the paper's task mixture (captioning, completion, masked
                  reconstruction, matching, object questions; data/tasks.py), minimum 1 sample of each
                  per batch, once with uniform task sampling and once with adaptive sampling (mixing.py:
                  shares = L_S / sum L, floor 0.05, losses averaged over the last 50 steps). What it needs
                  beyond the default demo:
                  - labelled shards: the prepared shards copied with each sample's object labels in its
                    json, {"objects": [{"name": shape, "attributes": [size, colour], "count": n}]}, read
                    from its caption (the corpus writes the caption from exactly these attributes);
                  - a task LM: the demo's OPT cannot read "Question:", "?" or "yes" (its word-level
                    vocabulary is the caption grammar's), so a second one is trained on task text:
                    the image's attribute words as context, then [BOS] text input, target (80% of
                    lines; the rest without context), as the caption LM learns to follow its context;
                  - held-out questions: for every held-out image one question of each kind an image of
                    one group can answer (exists, or, count, list; "and" needs two kinds of object),
                    negatives drawn from the other held-out images (so "is there a green circle?" is
                    asked of a red triangle), scored by exact match after the VQA normalisation
                    (eval kind gqa).
                  Reported per run: steps for the captioning arm's loss (mixed-task losses are not
                  comparable across runs) to reach the loss targets, held-out caption attribute
                  accuracy, held-out question accuracy by kind.
"""

from __future__ import annotations

import json
import math
import random
import tarfile
from pathlib import Path

from pipeline.data.formats.manifest import read_manifest, write_manifest
from pipeline.data.formats.shards import ShardWriter, resolve_spec
from pipeline.data.tasks import QUESTION_KINDS, TASKS, make_example, object_question, objects_from_labels

from . import backbones, corpus

JOINT = [
    "model.connector=joint",
    "model.joint.width=128",
    "model.joint.heads=4",
    "model.joint.num_latents=29",
    "model.joint.iterations=2",
    "model.joint.mlp_ratio=2.0",
    "model.joint.max_text_len=32",
]
TASK_LM_STEPS = 1500
ONE_GROUP_KINDS = ("exists", "or", "count", "list")  # "and" needs two different objects
SAMPLING = {
    "tasks_uniform": ["data.mixing=sample"],
    "tasks_adaptive": ["data.mixing=adaptive", "data.adaptive_floor=0.05", "data.adaptive_window=50"],
}


def labels(a: dict) -> dict:
    """A corpus image's object labels (data/tasks.py's format)."""
    return {
        "objects": [
            {
                "name": a["shape"],
                "attributes": [a["size"], a["color"]],
                "count": corpus.COUNTS.index(a["count"]) + 1,
            }
        ]
    }


# ------------------------------------------------------------------------------ labelled shards
def label_shards(manifest: Path, out: Path) -> Path:
    """The prepared shards again, each sample's json with its labels; returns the new manifest."""
    done = out / "manifest.json"
    if done.is_file():
        return done
    m = read_manifest(manifest)
    urls, _ = resolve_spec(str(manifest))
    out.mkdir(parents=True, exist_ok=True)
    for url in urls:
        with tarfile.open(url) as tar:
            samples: dict[str, dict] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        target = out / Path(url).relative_to(manifest.parent)  # the manifest's layout (shards/...)
        target.parent.mkdir(parents=True, exist_ok=True)
        with ShardWriter(target) as w:
            for key, members in samples.items():
                meta = json.loads(members["json"])
                attrs = corpus.parse_caption(members["txt"].decode())
                if attrs is None:
                    raise ValueError(f"{url}: sample {key}: caption {members['txt']!r} is not the corpus's")
                members["json"] = json.dumps(meta | {"labels": labels(attrs)})
                w.add(key, members)
    return write_manifest(out, m.model_copy(update={"shards": str(out / m.shards_relative)}))


# ------------------------------------------------------------------------------------- task LM
def _example(a: dict, rng: random.Random, sets: list[dict], prompt: str):
    others = [sets[rng.randrange(len(sets))] for _ in range(3)]
    pool = [(corpus.caption(b), labels(b)) for b in others]
    return make_example(rng.choice(TASKS), corpus.caption(a), labels(a), rng, pool=pool, prompt=prompt)


def build_tokenizer(texts: list[str]):
    """Word-level, punctuation split off (the caption LM's tokenizer keeps "triangle?" whole)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
    specials = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids: pad 1, bos = eos 2
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_task_llm(out: Path, prompt: str, steps: int = TASK_LM_STEPS, seed: int = 0) -> dict:
    """The demo's small OPT (3 x 128), trained on task text (module docstring); saved like the caption
    LM, loaded by training through from_pretrained."""
    import torch

    info = out / "task_llm.json"
    if info.is_file():
        done = json.loads(info.read_text())
        if done.get("steps") != steps:
            raise SystemExit(
                f"simvlg demo: {out} holds a task LM trained {done.get('steps')} steps, not "
                f"{steps}; pass another --run-dir, or delete that folder to train it again"
            )
        return done
    rng, sets = random.Random(seed), corpus.all_attribute_sets()
    vocab_rng = random.Random(seed + 1)
    drawn = (_example(sets[vocab_rng.randrange(len(sets))], vocab_rng, sets, prompt) for _ in range(20000))
    texts = [prompt] + [f"{ex.text_input} {ex.target}" for ex in drawn]
    texts += [corpus.caption(a) for a in sets] + ["zero one two three yes no"]
    tok = build_tokenizer(texts)
    torch.manual_seed(seed)
    model = backbones.small_opt(len(tok))
    ids_of = lambda text: tok(text, add_special_tokens=False).input_ids
    bos = tok.bos_token_id

    def line():
        a = sets[rng.randrange(len(sets))]
        ex = _example(a, rng, sets, prompt)
        context = [a[k] for k in ("count", "size", "color", "shape", "position")]
        rng.shuffle(context)
        head = (ids_of(" ".join(context)) if rng.random() < 0.8 else []) + [bos] + ids_of(ex.text_input)
        tail = ids_of(ex.target) + [tok.eos_token_id]
        return head + tail, [-100] * len(head) + tail

    def lr_at(step):  # warm-up, then cosine to 5%: at a constant 3e-3 the loss stalls ~0.3
        cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
        return 3e-3 * min(1.0, (step + 1) / 50) * (0.05 + 0.95 * cosine)

    loss = backbones.train_lm(model, line, steps, tok.pad_token_id, name="task LM", every=250, lr_at=lr_at)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    result = {
        "task_lm": f"OPTForCausalLM 3 x 128 on task text, vocab {len(tok)}, loss {loss:.4f} "
        f"after {steps} steps",
        "steps": steps,
    }
    info.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- held-out questions
def heldout_questions(corpus_dir: Path, out: Path) -> dict:
    """GQA-style questions on the held-out images (eval kind gqa): {qid: {imageId, question, answer,
    kind}}; answers normalised as the scorer normalises predictions ("two" -> "2")."""
    from pipeline.eval.metrics import process_digit_article, process_punctuation

    heldout = json.loads((corpus_dir / "heldout.json").read_text())
    objects = [objects_from_labels(labels(h["attributes"])) for h in heldout]
    questions = {}
    for i, h in enumerate(heldout):
        rng = random.Random(i)
        near = rng.sample(range(len(heldout)), min(8, len(heldout)))
        others = [o for j in near if j != i for o in objects[j]]
        for kind in ONE_GROUP_KINDS:
            ex = object_question(objects[i], rng, others, kinds=[kind], template="{q}")
            questions[f"{i}-{kind}"] = {
                "imageId": h["image"],
                "question": ex.text_input,
                "kind": kind,
                "answer": process_digit_article(process_punctuation(ex.target)),
            }
    out.write_text(json.dumps(questions, indent=0))
    return {k: sum(q["kind"] == k for q in questions.values()) for k in ONE_GROUP_KINDS}


def write_config(run_dir: Path, demo_config: Path, questions: Path, shards: Path, llm: Path) -> Path:
    """The task runs' config: the demo's, on labelled shards with the task mixture and the task LM,
    with the held-out questions as an eval task."""
    mixture = ", ".join(f"{t}: 1" for t in TASKS)
    path = run_dir / "tasks_config.yaml"
    path.write_text(f"""# written by `simvlg demo --tasks adaptive` (pipeline/demo/compact.py)
inherit: {demo_config}
data:
  sources: [{{name: shapes, shards: "{shards}", weight: 1, tasks: {{{mixture}}}}}]
  tasks: {{minimum_per_batch: 1}}
model:
  llm: {{name: "{llm}"}}
eval:
  datasets:
    shapes_questions: {{kind: gqa, questions: "{questions}", images: "{run_dir / "corpus"}",
                        image_template: "{{image_id}}"}}
""")
    return path


# ----------------------------------------------------------------------------------- measuring
def evaluate_questions(config: Path, run_dir: Path, overrides: list[str]) -> dict:
    """Held-out question accuracy (exact match, %), overall and by kind."""
    import torch

    from pipeline.config import load_config
    from pipeline.eval.evaluate import evaluate_task
    from pipeline.eval.run import load_checkpoint
    from pipeline.models import build_model

    torch.set_num_threads(2)
    cfg = load_config(config, overrides)
    model = build_model(cfg.model)
    load_checkpoint(model, run_dir)
    out = run_dir / "eval" / "shapes_questions"
    evaluate_task(model, cfg, "shapes_questions", out)
    records = json.loads((out / "predictions.json").read_text())
    kinds = {
        qid: q["kind"]
        for qid, q in json.loads(Path(cfg.eval.datasets["shapes_questions"]["questions"]).read_text()).items()
    }
    acc = {"all": round(100 * sum(r["accuracy"] for r in records) / len(records), 1)}
    for k in ONE_GROUP_KINDS:
        mine = [r["accuracy"] for r in records if kinds[str(r["id"])] == k]
        acc[k] = round(100 * sum(mine) / len(mine), 1)
    return {"accuracy": acc, "n": len(records), "samples": records[:8]}


def arm_curve(run_dir: Path, arm: str) -> list[tuple[int, float]]:
    from .run import training_rows

    return [(r["step"], r[f"loss/{arm}"]) for r in training_rows(run_dir) if f"loss/{arm}" in r]


def run(stages, run_dir: Path, demo_config: Path, args, base, targets: list[float]) -> dict:
    """Both task runs, trained and measured with run.py's stages (args: the demo's flags)."""
    from .run import evaluate, steps_to_loss, train

    overrides = args.overrides
    shards = stages.run(
        "labelled shards", label_shards, run_dir / "data" / "manifest.json", run_dir / "data_labelled"
    )
    lm = stages.run(
        "task LM",
        build_task_llm,
        run_dir / "backbones" / "opt_tasks",
        base.model.llm.prompt,
        steps=args.task_lm_steps,
        seed=base.run.seed,
    )
    kinds = stages.run(
        "held-out questions",
        heldout_questions,
        run_dir / "corpus",
        run_dir / "corpus" / "heldout_questions.json",
    )
    config = write_config(
        run_dir,
        demo_config,
        run_dir / "corpus" / "heldout_questions.json",
        shards,
        run_dir / "backbones" / "opt_tasks",
    )
    runs = {}
    for name, extra in SAMPLING.items():
        vdir, ov = run_dir / "train" / name, overrides + extra
        res = {"train": stages.run(f"train[{name}]", train, config, vdir, ov)}
        res["eval"] = stages.run(f"eval[{name}]", evaluate, config, vdir, ov)
        res["questions"] = stages.run(f"questions[{name}]", evaluate_questions, config, vdir, ov)
        curve = arm_curve(vdir, "shapes/captioning")
        res["captioning_curve"] = curve
        res["steps_to_loss"] = {t: steps_to_loss(curve, t) for t in targets}
        tails = {a: [x for _, x in arm_curve(vdir, f"shapes/{a}")[-5:]] for a in TASKS}
        last = {a: round(sum(t) / len(t), 4) if t else None for a, t in tails.items()}
        q = res["questions"]["accuracy"]
        res["rows"] = [
            ("question accuracy", ", ".join(f"{k} {v:.1f}%" for k, v in q.items())),
            ("final loss by task (5 logged)", ", ".join(f"{a} {v}" for a, v in last.items())),
        ]
        res["final_task_losses"] = last
        runs[name] = res
    runs["tasks_uniform"]["task_lm"] = lm | {"questions_by_kind": kinds}
    return runs


def print_comparison(runs: dict) -> None:
    """The captioning arm's loss of the task runs side by side (their mixed losses are not comparable)."""
    from .run import side_by_side

    curves = {n: r["captioning_curve"] for n, r in runs.items() if "captioning_curve" in r}
    if len(curves) > 1:
        print("\ncaptioning-task loss of the task runs (steps to reach a loss: the table above)")
        print(side_by_side(curves))


__all__ = [
    "JOINT",
    "QUESTION_KINDS",
    "SAMPLING",
    "build_task_llm",
    "heldout_questions",
    "label_shards",
    "labels",
    "run",
]
