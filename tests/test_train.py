"""The training job for real: `simvlg train` started bare launches 2 CPU ranks through the `deepspeed`
launcher (ZeRO-2, bf16, gloo) on tiny real-architecture backbones and real WebDataset shards.

One uninterrupted run is the reference; a run killed with SIGKILL and resumed must reproduce its
per-step losses bit for bit; SIGTERM checkpoints and exits 0 even with MLflow unreachable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds

from pipeline.config import ConfigError, load_config
from pipeline.train import checkpoint

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import BertConfig, BertModel

    from pipeline.demo import backbones, corpus

    root = tmp_path_factory.mktemp("train")
    shards = root / "shards"
    shards.mkdir()
    samples = list(corpus.generate(96, 0, seed=5))
    for s in range(3):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for split, i, attrs, caption, img in samples[s * 32:(s + 1) * 32]:
                import io

                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=95)
                sink.write({"__key__": f"{s:05d}{i:04d}", "jpg": buf.getvalue(), "txt": caption,
                            "json": json.dumps(attrs).encode()})
    bb = root / "backbones"
    backbones.build_vit(bb / "vit")
    backbones.build_llm(bb / "opt", corpus.all_captions(), "a photo of", steps=30)
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=128)).save_pretrained(bb / "bert")
    cfg = root / "train.yaml"
    cfg.write_text(f"""inherit: demo.yaml
run: {{name: train-test, seed: 3}}
data:
  sources: [{{name: shapes, shards: "{shards}/{{00000..00002}}.tar", weight: 1}}]
  num_workers: 1
  shuffle_buffer: 16
model:
  vision: {{name: {bb}/vit}}
  tomeformer: {{init: {bb}/bert, num_layers: 3, r: 8}}
  llm: {{name: {bb}/opt}}
train:
  steps: {STEPS}
  global_batch: 8
  micro_batch: 4
  grad_accum: 1
  lr: 2.0e-3
  warmup_steps: 1
  log_every: 1
  ckpt_every: 2
  keep_ckpts: 2
""")
    return {"root": root, "config": cfg}


def simvlg_train(config, run_dir, *overrides, **popen):
    cmd = [str(Path(sys.executable).parent / "simvlg"), "train", str(config), "--run-dir", str(run_dir)]
    for ov in overrides:
        cmd += ["--set", ov]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def losses(run_dir) -> dict[int, float]:
    """Per-step loss; a step logged twice (killed, then resumed) keeps its last value."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def reference(setup):
    run_dir = setup["root"] / "reference"
    proc = simvlg_train(setup["config"], run_dir)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return run_dir


def test_two_rank_run_learns_checkpoints_and_tracks(reference):
    got = losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    first, last = got[1], min(got[STEPS - 1], got[STEPS])
    assert last < first, got
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    for key in ("lr", "grad_norm", "samples_per_s", "tokens_per_s", "data_wait_frac", "nan_skips"):
        assert key in rows[-1], key
    assert rows[-1]["samples_per_s"] > 0
    kept = [p.name for p in checkpoint.complete_checkpoints(reference / "checkpoints")]
    assert kept == [f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]  # keep_ckpts: 2
    ckpt = reference / "checkpoints" / f"step_{STEPS:08d}"
    states = {p.name for p in (ckpt / "ds").iterdir()}
    assert any("optim_states" in n for n in states) and len([n for n in states if "optim" in n]) == 2
    model_file = next((ckpt / "ds").glob("mp_rank_00_model_states.pt"))
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    assert module and all(k.startswith("connector.") for k in module), list(module)[:5]

    from mlflow.tracking import MlflowClient

    summary = json.loads((reference / "train_summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{reference / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.steps"] == str(STEPS)
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == STEPS
    assert {"config.yaml", "system.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_sigkill_then_resume_is_bit_identical(setup, reference):
    run_dir = setup["root"] / "killed"
    proc = simvlg_train(setup["config"], run_dir, start_new_session=True)
    target = run_dir / "checkpoints" / "step_00000004" / "COMPLETE.json"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert target.exists(), proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(run_dir))
    assert killed_at < STEPS, "the run finished before it could be killed"

    resumed = simvlg_train(setup["config"], run_dir)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    assert "resumed from" in out and "step_00000004" in out
    ref, got = losses(reference), losses(run_dir)
    for step in range(5, STEPS + 1):
        assert got[step] == ref[step], (step, got[step], ref[step])  # bit-identical, not approx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the resumed job continued the killed job's MLflow run
    assert runs[0].info.run_id == json.loads((run_dir / "train_summary.json").read_text())[
        "mlflow_run_id"]
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == set(
        range(1, STEPS + 1))


def test_sigterm_checkpoints_and_exits_zero_with_mlflow_down(setup):
    run_dir = setup["root"] / "sigterm"
    proc = simvlg_train(setup["config"], run_dir, "train.steps=1000", "train.ckpt_every=500",
                        "tracking.uri=http://127.0.0.1:9")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    last = max(losses(run_dir))
    assert 2 <= last < 1000
    saved = checkpoint.find_resumable(run_dir / "checkpoints")
    assert saved is not None and saved.name == f"step_{last:08d}"
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["stopped_by_signal"] is True and summary["mlflow_run_id"] is None
    assert "MLflow" in out and "failed" in out  # warned, did not stop


def test_global_batch_mismatch_is_a_clear_error(setup):
    with pytest.raises(ConfigError, match=r"train.global_batch: expected .* = 16, got 8"):
        load_config(setup["config"], ["train.micro_batch=8"])
    from pipeline.train.engine import check_world

    cfg = load_config(setup["config"])
    with pytest.raises(SystemExit, match="global_batch is 8 but micro_batch 4 x grad_accum 1 x 1 "
                                         "running ranks = 4"):
        check_world(cfg, 1)
