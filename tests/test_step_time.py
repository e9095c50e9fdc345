"""Where a training step's time goes (issue 17): no host sync per micro-batch, one small all-reduce
per step, MFU, `simvlg bench step`, and what crosses the DataLoader's process boundary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_precision import _free_port, backbones  # noqa: F401 - a fixture, used by name

from pipeline.train.mfu import gpu_peak_tflops, measured_cpu_flops, mfu_metrics

REPO = Path(__file__).resolve().parent.parent


def test_gpu_peaks_by_device_name():
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200", "fp32") == 494.5
    assert gpu_peak_tflops("Tesla V100-SXM2-32GB", "fp16") is None


def test_mfu_is_model_flops_over_all_devices_peak():
    m = mfu_metrics(2e12, samples_per_s=300.0, world=8, peak=312e12)
    assert m["model_tflops_per_s"] == pytest.approx(600.0)
    assert m["mfu"] == pytest.approx(600e12 / (8 * 312e12))
    assert "mfu" not in mfu_metrics(2e12, 300.0, 8, None) and mfu_metrics(None, 300.0, 8, 1e12) == {}
    assert measured_cpu_flops(torch.float32, size=256, seconds=0.05) > 1e8


def test_captions_are_padded_to_the_batch_not_to_max_text_tokens():
    from pipeline.models.llm import CaptionTokenizer

    class Words:  # a word-level tokenizer: one id per word, BOS 1, EOS 2, PAD 0
        eos_token_id, pad_token_id = 2, 0

        def __call__(self, text, add_special_tokens=True):
            ids = [3 + len(w) for w in text.split()] if text != "\n" else [9]
            return type("E", (), {"input_ids": ([1] if add_special_tokens else []) + ids})()

    tok = CaptionTokenizer(Words(), prompt="", max_text_tokens=32)
    short = tok(["a b", "c"])
    assert short["input_ids"].shape == (2, 4)  # BOS + 2 words + end, not 1 + 32
    assert tok(["a b c d e"])["input_ids"].shape == (1, 7)


SYNC_WORKER = textwrap.dedent("""
    import inspect, json, sys, torch
    import torch.distributed as dist
    from pathlib import Path
    from pipeline.config import load_config
    from pipeline.models import CaptionTokenizer, build_model
    from pipeline.train import engine
    from pipeline.train.engine import Trainer

    cfg = load_config(sys.argv[1])
    model = build_model(cfg.model)
    tok = CaptionTokenizer.from_config(cfg.model.llm)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8),
             "source_idx": torch.zeros(2, dtype=torch.long), **tok(["a red circle", "two small dogs"])}

    class Loader:
        arm_names, adaptive = ["a"], False

        def __iter__(self):
            while True:
                yield dict(batch)

        def skip_counts(self):
            return {"a/corrupt_image": 0}

        def state_dict(self):
            return {}

    Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(sys.argv[2]), model=model, loader=Loader())
    calls = {"all_reduce": 0, "host_reads": 0}

    def from_engine():  # the caller is the training loop itself (not DeepSpeed's own collectives)
        return any(f.filename == engine.__file__ for f in inspect.stack()[2:6])

    all_reduce = dist.all_reduce
    def counting_all_reduce(*a, **kw):
        calls["all_reduce"] += from_engine()
        return all_reduce(*a, **kw)
    dist.all_reduce = counting_all_reduce
    for name in ("item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        def counted(self, *a, _o=original, **kw):
            calls["host_reads"] += from_engine()
            return _o(self, *a, **kw)
        setattr(torch.Tensor, name, counted)
    per_step = []
    step = trainer.train_step
    def recorded():
        before = dict(calls)
        out = step()
        per_step.append({"train_step": {k: calls[k] - before[k] for k in calls}})
        return out
    trainer.train_step = recorded
    trainer.fit()
    lines = [json.loads(x) for x in (Path(sys.argv[2]) / "metrics.jsonl").read_text().splitlines()]
    print("RESULT " + json.dumps({"per_step": per_step, "calls": calls, "logged": lines}))
""")


@pytest.mark.slow
def test_no_host_sync_per_micro_batch_and_one_all_reduce_per_step(backbones, tmp_path):  # noqa: F811
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
run: {{name: sync, seed: 0}}
data: {{sources: [{{name: a, shards: "unused/{{0..1}}.tar"}}], num_workers: 0}}
model:
  vision: {{name: {backbones / "vit"}, loader: hf, image_size: 32, precision: fp32}}
  tomeformer: {{init: {backbones / "bert"}, num_layers: 2, r: 8}}
  llm: {{name: {backbones / "opt"}, precision: fp32, prompt: "", max_text_tokens: 8}}
train: {{steps: 6, global_batch: 4, micro_batch: 2, grad_accum: 2, lr: 1.0e-3, warmup_steps: 0,
        precision: fp32, zero_stage: 2, log_every: 3, ckpt_every: 1000}}
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
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SYNC_WORKER, str(cfg), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout + proc.stderr)[-4000:]
    r = json.loads(lines[-1][len("RESULT ") :])
    # inside a step (2 micro-batches each): the loop neither reads the device nor reduces anything
    assert all(s["train_step"] == {"all_reduce": 0, "host_reads": 0} for s in r["per_step"]), r["per_step"]
    # between steps: one all-reduce per step (stop flag; on log steps the metrics ride along)
    assert r["calls"]["all_reduce"] == 6, r["calls"]
    logged = [row for row in r["logged"] if "loss" in row]
    assert [row["step"] for row in logged] == [1, 3, 6]
    assert all(row["mfu"] > 0 and row["model_tflops_per_s"] > 0 for row in logged)


@pytest.mark.slow
def test_bench_step_prints_the_breakdown_and_mfu(tmp_path):
    from tiny_run import make_tiny_run

    config = make_tiny_run(tmp_path, steps=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "simvlg"),
            "bench",
            "step",
            str(config),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--vs",
            "legacy",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    current, legacy = json.loads(out.stdout[out.stdout.rindex("[\n {") :])  # after the launcher logs
    for r in (current, legacy):
        assert r["ranks"] == 2 and r["steps"] == 2
        assert set(r["ms_per_step"]) == {
            "data",
            "vit_forward",
            "connector_forward",
            "llm_forward",
            "llm_backward",
            "connector_backward",
            "optimizer",
            "communication",
            "other",
        }
        assert all(v >= 0 for v in r["ms_per_step"].values())
        for phase in (
            "vit_forward",
            "connector_forward",
            "llm_forward",
            "llm_backward",
            "connector_backward",
            "optimizer",
            "communication",
        ):
            assert r["ms_per_step"][phase] > 0, phase
        assert sum(r["ms_per_step"].values()) == pytest.approx(r["step_ms"], rel=0.05)
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
        assert r["flops_per_sample"] > 0 and 0 < r["mfu"] < 1
    assert current["variant"] == "current" and legacy["variant"] == "legacy"


def test_uint8_pixels_are_normalised_on_the_device_by_the_vision_tower():
    from pipeline.config import VisionConfig
    from pipeline.data.transforms import normalize_batch
    from pipeline.models.vision import build_vision

    torch.manual_seed(0)
    tower = build_vision(
        VisionConfig(
            name="vit_tiny_patch16_224", loader="timm", image_size=32, precision="fp32", feature_layer=-1
        )
    )
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(tower(pixels), tower(normalize_batch(pixels)))
        frames = pixels[:, None].expand(2, 3, 3, 32, 32)  # video [B, T, 3, H, W]
        assert torch.equal(tower(frames), tower(normalize_batch(frames)))
