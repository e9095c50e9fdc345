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
from tiny_run import make_tiny_run

from pipeline.config import ConfigError, load_config
from pipeline.train import checkpoint

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "config": make_tiny_run(root, steps=STEPS)}


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
