"""Frozen weights stay exactly as loaded when the real Trainer starts a DeepSpeed engine.

A bf16 or fp16 engine casts every parameter of the module it is handed. The ViT and LLM are frozen
in their own precision (the paper run: EVA-ViT-g fp16, OPT fp16; the video run: ViT fp32), so the
trainer keeps them out of the engine; here the real `Trainer` (DeepSpeed ZeRO-2, CPU accelerator,
gloo, one rank) is started for bf16 and for fp16 with dynamic loss scaling, one optimizer step is
taken, and every frozen tensor is compared bit for bit with what `build_model` loaded.

Each precision runs in its own process (the engine initialises torch.distributed)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import opt_tokenizer, save_opt

pytestmark = pytest.mark.slow  # ~20 s per engine start on 2 CPU cores

WORKER = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from pipeline.config import load_config
    from pipeline.models import CaptionTokenizer, build_model
    from pipeline.train.engine import Trainer, deepspeed_config

    cfg = load_config(sys.argv[1])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    def frozen_tensors():  # parameters and buffers (the trainer's state_dict hook hides frozen ones)
        named = list(model.named_parameters()) + list(model.named_buffers())
        return {k: v for k, v in named if not k.startswith("connector.")}

    loaded = {k: v.detach().clone() for k, v in frozen_tensors().items()}
    tok = CaptionTokenizer.from_config(cfg.model.llm)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "source": ["a", "a"],
             **tok(["a red circle", "two small dogs"])}

    class Loader:  # what the Trainer needs of a loader (pipeline.data.loader.TrainLoader)
        arm_names, adaptive = ["a"], False

        def __iter__(self):
            while True:
                yield batch

        def state_dict(self):
            return {}

        def load_state_dict(self, state, strict=True):
            pass

        def skip_counts(self):
            return {}

        def report_loss(self, losses):
            return None

    Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(sys.argv[2]), model=model, loader=Loader())

    def frozen_diff():
        now = frozen_tensors()
        return [k for k, v in loaded.items() if now[k].dtype != v.dtype or not torch.equal(now[k], v)]

    after_init = frozen_diff()
    trainer._it, trainer.data_wait = iter(trainer.loader), 0.0
    conn = {k: v.detach().float().clone() for k, v in model.connector.state_dict().items()}
    m = trainer.train_step()
    moved = [k for k, v in model.connector.state_dict().items() if not torch.equal(v.float(), conn[k])]
    scale = getattr(trainer.optimizer, "loss_scale", None) if cfg.train.precision == "fp16" else None
    print("RESULT " + json.dumps({
        "after_init": after_init, "after_step": frozen_diff(), "loss": float(m["loss"]), "moved": len(moved),
        "connector_dtype": str(model.connector_dtype), "vision_dtype": str(model.vision.dtype),
        "llm_dtype": str(model.llm_dtype), "n_frozen": len(loaded), "loss_scale": scale,
        "ds_fp16": deepspeed_config(cfg)["fp16"]}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """A tiny HF ViT, BERT and OPT (+ a byte-level BPE tokenizer in OPT's layout), saved to folders."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("prec")
    torch.manual_seed(0)
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        ),
        add_pooling_layer=False,
    ).save_pretrained(root / "vit")
    BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=80,
        )
    ).save_pretrained(root / "bert")
    hf_tok = opt_tokenizer(["a red circle", "two small dogs play", "\n"] * 8)
    save_opt(root / "opt", hf_tok, width=32, ffn=64, max_positions=128)
    return root


def start_trainer(bb: Path, tmp: Path, precision: str, vision: str, llm: str) -> dict:
    repo = Path(__file__).resolve().parent.parent
    cfg = tmp / f"{precision}.yaml"
    cfg.write_text(f"""
run: {{name: prec-{precision}, seed: 0}}
data: {{sources: [{{name: a, shards: "unused/{{0..1}}.tar"}}], num_workers: 0}}
model:
  vision: {{name: {bb / "vit"}, loader: hf, image_size: 32, precision: {vision}}}
  tomeformer: {{init: {bb / "bert"}, num_layers: 2, r: 8}}
  llm: {{name: {bb / "opt"}, precision: {llm}, prompt: "", max_text_tokens: 8}}
train: {{steps: 2, global_batch: 2, micro_batch: 2, grad_accum: 1, lr: 1.0e-3, warmup_steps: 0,
        precision: {precision}, grad_clip: 0.0, zero_stage: 2,
        ds_config: {repo / "ds_configs/zero2_fp16.json"}}}
tracking: {{enabled: false}}
launch: {{nodes: 1, gpus_per_node: 1}}
""")
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(repo),
    }
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(cfg), str(tmp / precision)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize(
    "precision,vision,llm", [("bf16", "fp16", "bf16"), ("fp16", "fp16", "fp16"), ("bf16", "fp32", "fp16")]
)
def test_frozen_weights_bit_identical_after_engine_start(backbones, tmp_path, precision, vision, llm):
    r = start_trainer(backbones, tmp_path, precision, vision, llm)
    assert r["n_frozen"] > 20
    assert r["after_init"] == [] and r["after_step"] == []  # every frozen tensor, dtype and bits
    assert r["vision_dtype"] == str({"fp16": torch.float16, "fp32": torch.float32}[vision])
    assert r["llm_dtype"] == str({"fp16": torch.float16, "bf16": torch.bfloat16}[llm])
    # the trainable connector is the engine's: cast to its dtype, and it learns
    assert r["connector_dtype"] == str({"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
    assert r["moved"] > 0 and r["loss"] == r["loss"]  # finite (not NaN)
    if precision == "fp16":
        assert r["ds_fp16"] == {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 2000,
            "hysteresis": 1,
            "min_loss_scale": 1,
        }
        assert r["loss_scale"] == 2**16  # DeepSpeed's dynamic scaler, at its start value
