"""The P-Former in the pipeline (issue 15): the pformer_opt2.7b config pinned to the official stage 0;
`simvlg prep sentences` -> text shards the loader reads as text sources; preflight refusals; SimVLG with
the alignment loss sends gradients only into the connector and reports both losses; and (slow) stage 0
through `simvlg train` on 2 CPU ranks: its reconstruction loss falls, it writes pformer/, and a run
killed mid-way resumes bit-identically.

Backbones are the demo's kind: a small BERT with a word-level vocabulary of the shapes grammar (its
tokenizer saved with it), the demo's OPT trained briefly on the caption text, a random HF ViT."""

from __future__ import annotations

import functools
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, DataConfig, SourceConfig, load_config
from pipeline.data import build_loader, prep
from pipeline.data.formats.manifest import read_manifest
from pipeline.data.formats.shards import write_shard

LLM_PROMPT = "a photo of"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """bert/ (+ tokenizer), opt/ (+ tokenizer), vit/, tomeformer/, sentences/ (prep output)."""
    from transformers import BertConfig, BertModel

    from pipeline.demo import backbones, corpus
    from pipeline.demo import pformer as pformer_demo

    root = tmp_path_factory.mktemp("pformer_train")
    grammar = corpus.all_captions()
    pformer_demo.build_bert(root / "bert", [w for s in grammar for w in s.split()])
    backbones.build_llm(root / "opt", corpus.all_attribute_sets(), corpus.caption, LLM_PROMPT, steps=30)
    backbones.build_vit(root / "vit")
    torch.manual_seed(0)
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(root / "tomeformer")
    (root / "grammar.txt").write_text("\n".join(grammar) + "\n")
    assert (
        prep.main(
            [
                "sentences",
                "--input",
                str(root / "grammar.txt"),
                "--out",
                str(root / "sentences"),
                "--samples-per-shard",
                "100",
            ]
        )
        == 0
    )
    return root


def model_section(f: Path, **pformer) -> dict:
    return {
        "vision": {
            "name": str(f / "vit"),
            "loader": "hf",
            "image_size": 64,
            "precision": "fp32",
            "arch_config": None,
            "checkpoint": None,
        },
        "tomeformer": {"init": str(f / "tomeformer"), "num_layers": 2, "r": 18},  # 65 -> 29 tokens
        "qformer": {"init": str(f / "tomeformer"), "num_layers": 2, "num_queries": 29},
        "llm": {"name": str(f / "opt"), "precision": "fp32", "prompt": LLM_PROMPT, "max_text_tokens": 16},
        "pformer": {"init": str(f / "bert"), "num_prompts": 29, "max_text_tokens": 16, **pformer},
    }


def write_config(
    root: Path, f: Path, *, kind: str, steps: int = 4, micro: int = 4, lr: float = 3e-3, ckpt_every: int = 2
) -> Path:
    """A 2-rank config inheriting the demo's, on the sentence shards (pformer) or image shards."""
    text = f'[{{name: sentences, shards: "{f}/sentences/manifest.json", kind: text}}]'
    images = f'[{{name: shapes, shards: "{root}/images/{{00000..00001}}.tar"}}]'
    sources = text if kind == "pformer" else images
    cfg = root / f"{kind}.yaml"
    cfg.write_text(f"""inherit: demo.yaml
run: {{name: pformer-test, seed: 3}}
data: {{sources: {sources}, num_workers: 1, shuffle_buffer: 16}}
model: {json.dumps({"kind": kind, **model_section(f)})}
train: {{steps: {steps}, global_batch: {2 * micro}, micro_batch: {micro}, grad_accum: 1, lr: {lr},
         min_lr: {lr / 10}, warmup_steps: 5, log_every: 1, ckpt_every: {ckpt_every}, keep_ckpts: 2,
         precision: fp32}}
""")
    return cfg


# ------------------------------------------------------------------------------------- the config
OFFICIAL_STAGE0 = {  # key: (value, where the official code / its stage-0 log sets it)
    "model.kind": ("pformer", "stage 0: pformer_opt.py"),
    "model.pformer.init": ("bert-base-uncased", "BertModel.from_pretrained('bert-base-uncased')"),
    "model.pformer.num_prompts": (29, "ours: SimVLG's soft-prompt length (official num_query_token 32)"),
    "model.pformer.max_text_tokens": (32, "max_txt_len 32"),
    "model.pformer.mask_ratio": (0.25, "torch.full(input_ids.shape, 0.25)"),
    "model.pformer.views": (1, "sim_t2t = text_feat @ text_feat_all.t()"),
    "model.pformer.contrast_dim": (256, "self.embed_dim = 256"),
    "model.pformer.temp_init": (0.07, "self.Pformer.temp = 0.07"),
    "model.pformer.label_smoothing": (0.1, "cross_entropy(..., label_smoothing=0.1)"),
    "model.pformer.lm_weight": (1.0, "loss = loss_c + loss_vq + loss_lm"),
    "model.pformer.contrastive_weight": (1.0, "loss = loss_c + loss_vq + loss_lm"),
    "model.pformer.vq_weight": (1.0, "loss = loss_c + loss_vq + loss_lm"),
    "model.llm.name": ("facebook/opt-2.7b", "opt_model"),
    "model.llm.precision": ("fp16", "torch_dtype=torch.float16"),
    "model.llm.prompt": ("", "prompt: ''"),
    "model.llm.max_text_tokens": (32, "opt_tokenizer(..., max_length=self.max_txt_len)"),
    "model.llm.truncation": ("sequence", "truncation=True over the whole row"),
    "model.llm.bos_target": (True, "targets masked only `if self.prompt`"),
    "model.llm.caption_end": ("newline", "text = [t + '\\n' ...]"),
    "train.lr": (1e-4, "init_lr"),
    "train.min_lr": (1e-5, "min_lr"),
    "train.warmup_steps": (2000, "warmup_steps"),
    "train.warmup_start_lr": (1e-6, "warmup_lr"),
    "train.weight_decay": (0.05, "weight_decay"),
    "train.global_batch": (384, "128 x world_size 3"),
    "train.steps": (156_250, "max_epoch 5 x 12M sentences / 384"),
    "train.precision": ("fp16", "amp: true"),
    "train.grad_clip": (0.0, "LAVIS does not clip"),
    "train.align_weight": (0.0, "not a SimVLG run"),
    "data.resampled": (False, "epochs"),
    "data.max_words": (50, "blip_caption"),
    "run.seed": (42, "seed"),
}


def test_pformer_config_pins_the_official_stage0():
    from pipeline.preflight import token_plan

    cfg = load_config("pformer_opt2.7b")
    get = lambda k: functools.reduce(getattr, k.split("."), cfg)
    wrong = {k: (get(k), want, where) for k, (want, where) in OFFICIAL_STAGE0.items() if get(k) != want}
    assert not wrong, wrong
    assert [(s.kind, s.num_samples) for s in cfg.data.sources] == [("text", 12_000_000)]
    assert cfg.train.steps == 5 * 12_000_000 // 384
    # N is the SimVLG connector's soft-prompt length (257 tokens, r = 19 x 12 layers)
    assert token_plan(load_config("simvlg_opt2.7b"), files=False)[-1] == cfg.model.pformer.num_prompts == 29
    # the SimVLG + alignment config is the main run plus exactly the alignment fields
    from pipeline.config import flatten

    main, aligned = (flatten(load_config(n).to_dict()) for n in ("simvlg_opt2.7b", "simvlg_opt2.7b_pformer"))
    changed = {k for k in aligned if aligned[k] != main.get(k)} - {"inherit", "run.name"}
    assert changed == {
        "train.align_weight",
        "model.pformer_checkpoint",
        "model.pformer.arch_config",
        "model.pformer.num_prompts",
    }, changed
    assert (aligned["train.align_weight"], aligned["train.align_match"]) == ("100.0", "position")


# --------------------------------------------------------------------------------- prep and loader
def test_prep_sentences_writes_text_shards_the_loader_reads(folders, tmp_path, capsys):
    from pipeline.demo import corpus
    from pipeline.models.training import training_tokenizer

    m = read_manifest(folders / "sentences" / "manifest.json")
    assert (m.kind, m.recipe, m.num_samples, m.num_shards, m.complete) == ("text", "sentences", 288, 3, True)
    with tarfile.open(folders / "sentences" / "shards" / "00000.tar") as t:
        names = t.getnames()
    assert len(names) == 100 and all(n.endswith(".txt") for n in names)
    # BLIP JSON (a caption, or a list of them) + a caption list; empty captions refused before writing
    (tmp_path / "blip.json").write_text(
        json.dumps(
            [
                {"image": "a.jpg", "caption": "a red circle"},
                {"url": "b", "caption": ["one", "two blue squares"]},
            ]
        )
    )
    (tmp_path / "more.txt").write_text("three green stars\n\n")
    out = tmp_path / "s"
    assert (
        prep.main(
            [
                "sentences",
                "--input",
                str(tmp_path / "blip.json"),
                "--input",
                str(tmp_path / "more.txt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert read_manifest(out / "manifest.json").num_samples == 4
    (tmp_path / "bad.json").write_text(json.dumps([{"caption": "ok"}, {"caption": " "}]))
    assert prep.main(["sentences", "--input", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")]) == 2
    assert "1 row(s) with empty caption" in capsys.readouterr().err
    assert not (tmp_path / "b" / "shards").exists()

    # the loader: one pass delivers every sentence once, batches without pixels, P-Former inputs masked
    cfg = load_config(write_config(tmp_path, folders, kind="pformer"))
    data = DataConfig(
        sources=[SourceConfig(name="s", shards=str(folders / "sentences" / "manifest.json"), kind="text")],
        num_workers=0,
    )
    loader = build_loader(data, tokenize=training_tokenizer(cfg), batch_size=32, train=False)
    batches = list(loader)
    got = [c for b in batches for c in b["captions"]]
    assert sorted(got) == sorted(corpus.all_captions())
    b = batches[0]
    assert "pixel_values" not in b
    assert {"bert_input_ids", "bert_attention_mask", "input_ids", "labels"} <= set(b)
    assert (b["bert_input_ids"] == 4).any()  # [MASK] (id 4 in the demo vocabulary)


def test_text_sources_read_only_text_and_count_what_they_skip(tmp_path):
    from pipeline.data.streams import Source, SourceStream

    write_shard(
        tmp_path / "00000.tar",
        [
            {"__key__": "a", "jpg": b"\xff" * 64, "txt": "a red circle"},
            {"__key__": "b", "jpg": b"\xff" * 64, "txt": ""},
            {"__key__": "c", "json": json.dumps({"captions": ["one star"]})},
        ],
    )
    src = Source("img", [str(tmp_path / "00000.tar")], 1.0, "text")
    stream = SourceStream(
        0,
        src,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
        worker=0,
        num_workers=1,
        mode="eval",
        shard_shuffle=False,
        buffer=0,
        on_skip=lambda *a: None,
    )
    raws = [stream.next() for _ in range(3)]
    assert all("jpg" not in r for r in raws)  # an image shard read as text: its images are never read
    data = DataConfig(
        sources=[SourceConfig(name="img", shards=str(tmp_path / "00000.tar"), kind="text")], num_workers=0
    )
    loader = build_loader(data, tokenize=None, batch_size=8, train=False)
    (batch,) = list(loader)
    assert batch["captions"] == ["a red circle", "one star"] and "pixel_values" not in batch
    assert loader.skip_counts()["img/missing_caption"] == 1


# ------------------------------------------------------------------------------ alignment, gradients
def save_pformer_folder(
    f: Path, out: Path, *, num_prompts: int = 29, width: int | None = None, tokenizer: bool = True
) -> Path:
    from transformers import AutoTokenizer

    from pipeline.models.pformer import build_pformer
    from pipeline.models.pformer_files import save_pformer
    from pipeline.schema import PFormerConfig

    pcfg = PFormerConfig(**model_section(f)["pformer"] | {"num_prompts": num_prompts})
    torch.manual_seed(0)
    pf = build_pformer(pcfg, width or 128)  # the demo OPT is 128 wide
    tok = AutoTokenizer.from_pretrained(f / "bert") if tokenizer else None
    return save_pformer(pf, out, pcfg, tokenizer=tok)


@pytest.mark.parametrize("connector", ["tomeformer", "qformer"])
def test_alignment_trains_only_the_connector_and_reports_both_losses(folders, tmp_path, connector):
    from pipeline.models import build_training_model, training_tokenizer
    from pipeline.train.engine import frozen_children_detached

    folder = save_pformer_folder(folders, tmp_path / "pf")
    cfg = load_config(
        write_config(tmp_path, folders, kind="simvlg"),
        [
            f"model.connector={connector}",
            f"model.pformer_checkpoint={folder}",
            "train.align_weight=10",
            "train.align_match=assignment",
        ],
    )
    model = build_training_model(cfg)
    batch = training_tokenizer(cfg)(["two small red circles on the left", "one large blue square on the top"])
    model.train()
    assert not model.pformer.training and not any(m.training for m in model.pformer.modules())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("connector.")}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    out = model(torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8), **batch)
    assert sorted(out["losses"]) == ["align", "lm"] and out["losses"]["align"] > 0
    torch.testing.assert_close(out["loss"], out["losses"]["lm"] + 10 * out["losses"]["align"])
    out["loss"].backward()
    opt.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("connector.") for n in grads), sorted(grads)[:5]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert {n.split(".")[0] for n in frozen} == {"vision", "llm", "pformer"}
    with frozen_children_detached(model) as detached:  # kept out of DeepSpeed's cast, as the ViT and LLM
        assert set(detached) == {"vision", "llm", "pformer"}
    # the same targets whatever the parent's mode (no dropout), and none without the alignment tokens
    with torch.no_grad():
        t1 = model.pformer(batch["bert_input_ids"], batch["bert_attention_mask"])
        model.train()
        assert torch.equal(t1, model.pformer(batch["bert_input_ids"], batch["bert_attention_mask"]))
    plain = {k: v for k, v in batch.items() if not k.startswith("bert_")}
    with pytest.raises(ValueError, match="no bert_input_ids"):
        model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), **plain)


def test_preflight_refuses_what_training_would(folders, tmp_path):
    from pipeline.preflight import check_for_training

    def refused(cfg_path, overrides, match):
        with pytest.raises(ConfigError, match=match):
            check_for_training(load_config(cfg_path, overrides), "c.yaml")

    pformer_cfg = write_config(tmp_path, folders, kind="pformer")
    assert check_for_training(load_config(pformer_cfg), "c.yaml")["sources"][0]["samples"] == 288
    refused(pformer_cfg, ["data.sources.0.kind=image"], "data.sources.0.kind: a P-Former trains on sentences")
    refused(pformer_cfg, ["train.align_weight=1"], "train.align_weight: 1.0 applies to SimVLG training")
    refused(
        pformer_cfg, ["data.sources.0.tasks={captioning: 1, masked: 1}"], "a P-Former reconstructs sentences"
    )
    refused(pformer_cfg, [f"model.pformer.init={tmp_path}/nowhere"], "model.pformer.init: not found")

    (tmp_path / "images").mkdir()
    write_shard(tmp_path / "images" / "00000.tar", [{"__key__": "a", "jpg": b"x", "txt": "a"}])
    write_shard(tmp_path / "images" / "00001.tar", [{"__key__": "b", "jpg": b"x", "txt": "b"}])
    simvlg_cfg = write_config(tmp_path, folders, kind="simvlg")
    good = save_pformer_folder(folders, tmp_path / "good")
    ok = check_for_training(
        load_config(simvlg_cfg, ["train.align_weight=1", f"model.pformer_checkpoint={good}"]), "c.yaml"
    )
    assert ok["alignment"]["num_prompts"] == 29
    refused(simvlg_cfg, ["data.sources.0.kind=text"], "text sources have no images to train SimVLG on")
    refused(simvlg_cfg, ["train.align_weight=1"], "model.pformer_checkpoint: not set, but train.align_weight")
    aligned = lambda folder: ["train.align_weight=1", f"model.pformer_checkpoint={folder}"]
    refused(simvlg_cfg, aligned(tmp_path / "missing"), "model.pformer_checkpoint: not found")
    refused(
        simvlg_cfg,
        aligned(good) + ["model.connector=joint", "model.joint.num_latents=8"],
        "makes 29 prompts, the joint connector's soft prompt has 8 tokens",
    )
    refused(
        simvlg_cfg,
        aligned(good) + ["data.sources.0.tasks={captioning: 1, masked: 1}"],
        r"data.sources \(.*\): tasks other than captioning cannot be trained with train.align_weight",
    )
    (tmp_path / "conn").mkdir()
    (tmp_path / "conn" / "config.json").write_text('{"format": "simvlg-connector"}')
    refused(simvlg_cfg, aligned(tmp_path / "conn"), "format is 'simvlg-connector', expected 'simvlg-pformer'")
    refused(
        simvlg_cfg,
        aligned(save_pformer_folder(folders, tmp_path / "n5", num_prompts=5)),
        "makes 5 prompts, the tomeformer connector's soft prompt has 29 tokens",
    )
    refused(
        simvlg_cfg,
        aligned(save_pformer_folder(folders, tmp_path / "w64", width=64)),
        "prompts are 64 wide .* takes 128",
    )
    refused(
        simvlg_cfg,
        aligned(save_pformer_folder(folders, tmp_path / "notok", tokenizer=False)),
        "no tokenizer/ folder",
    )
    from safetensors.torch import load_file, save_file

    broken = save_pformer_folder(folders, tmp_path / "broken")  # a strict load: no key may be missing
    sd = load_file(str(broken / "model.safetensors"))
    sd.pop("llm_proj.bias")
    save_file(sd, str(broken / "model.safetensors"))
    refused(simvlg_cfg, aligned(broken), r"does not match its config.json: missing \['llm_proj.bias'\]")


def test_demo_compares_runs_on_their_lm_loss(tmp_path, capsys):
    """An aligned run logs loss = lm + w * align: the demo's table and curves must use the LM part."""
    from pipeline.demo import pformer as pformer_demo

    (tmp_path / "pformer" / "train").mkdir(parents=True)
    (tmp_path / "pformer" / "train" / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "loss": 2.0, "lm_loss": lm, "contrastive_loss": 0.7, "vq_loss": 0.01})
            + "\n"
            for s, lm in ((1, 0.9), (2, 0.2))
        )
    )
    curves = {
        "tomeformer": [(s, {"loss": 1 / s}) for s in range(1, 11)],
        "align_position": [
            (s, {"loss": 1 / s + 50 * 0.01, "lm_loss": 1 / s, "align_loss": 0.01}) for s in range(1, 11)
        ],
    }
    runs = {}
    for name, rows in curves.items():
        (tmp_path / "train" / name).mkdir(parents=True)
        (tmp_path / "train" / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, **r}) + "\n" for s, r in rows)
        )
        runs[name] = {
            "train": {"curve": [(s, r["loss"]) for s, r in rows]},
            "eval": {"attribute_accuracy": {"shape": 0.9}, "exact_caption_match": 0.8},
        }
    cmp = pformer_demo.compare(tmp_path, runs, [0.3])
    assert runs["align_position"]["train"]["curve"] == runs["tomeformer"]["train"]["curve"]  # LM part
    assert cmp["runs"]["align_position"]["steps_to_lm_loss"] == cmp["runs"]["tomeformer"]["steps_to_lm_loss"]
    assert cmp["runs"]["align_position"]["align_loss"] == (0.01, 0.01)
    assert cmp["pformer"]["lm_loss"] == (0.9, 0.2)
    pformer_demo.print_comparison(cmp)
    out = capsys.readouterr().out
    assert "lm_loss 0.9 -> 0.2" in out and "held-out shape" in out and "90.0%" in out


# ------------------------------------------------------------------------ stage 0 through simvlg train
STEPS = 120  # batches of 32: the P-Former (a random BERT here) needs ~100 to beat the no-prompt level


def part_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if key in row:
            out[row["step"]] = row[key]
    return out


@pytest.mark.slow
def test_pformer_trains_through_simvlg_train_and_resumes_bit_identically(folders, tmp_path):
    from test_train import _left_behind, simvlg_train

    from pipeline.models.pformer_files import load_pformer
    from pipeline.train import checkpoint

    cfg = write_config(tmp_path, folders, kind="pformer", steps=STEPS, micro=16, lr=1e-3, ckpt_every=20)
    ref = tmp_path / "reference"
    proc = simvlg_train(cfg, ref)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    lm = part_losses(ref, "lm_loss")
    assert sorted(lm) == list(range(1, STEPS + 1))
    assert len(part_losses(ref, "contrastive_loss")) == len(part_losses(ref, "vq_loss")) == STEPS
    first = sum(lm[s] for s in range(1, 11)) / 10
    last = sum(lm[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    print(f"P-Former reconstruction (LM) loss, mean of 10 steps: {first:.3f} -> {last:.3f}")
    assert last < 0.9 * first, lm  # the frozen LLM reconstructs the sentences better from the prompts
    module = torch.load(
        next((ref / "checkpoints" / f"step_{STEPS:08d}" / "ds").glob("mp_rank_00_model*.pt")),
        map_location="cpu",
        weights_only=False,
    )["module"]
    assert module and all(k.startswith("pformer.") for k in module)  # the frozen LLM is not checkpointed
    pf = load_pformer(ref / "pformer", llm_width=128)  # strict, and usable as the alignment target
    assert pf.num_prompts == 29 and json.loads((ref / "pformer" / "config.json").read_text())["step"] == STEPS

    # killed (the whole process group) after step 70, restarted: the same losses from the checkpoint on
    run = tmp_path / "killed"
    proc = simvlg_train(cfg, run, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if (run / "metrics.jsonl").exists() and max(part_losses(run), default=0) >= 70:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not _left_behind(run)
    killed_at = max(part_losses(run))
    assert killed_at < STEPS, "the run finished before it could be killed"
    saved = checkpoint.find_resumable(run / "checkpoints")
    resumed = simvlg_train(cfg, run)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resumed from" in out, out[-4000:]
    start = int(saved.name.split("_")[1])
    for key in ("loss", "lm_loss", "contrastive_loss", "vq_loss"):
        want, got = part_losses(ref, key), part_losses(run, key)
        for step in range(start + 1, STEPS + 1):
            assert got[step] == want[step], (key, step, got[step], want[step])  # bit-identical
