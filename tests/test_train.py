"""The training job for real: `simvlg train` started bare launches 2 CPU ranks through the `deepspeed`
launcher (ZeRO-2, bf16, gloo) on tiny real-architecture backbones and real WebDataset shards.

One uninterrupted run is the reference; a run with one rank SIGKILLed ends everywhere within 60 s and,
resumed, reproduces the reference's per-step losses bit for bit; data failing at run time and a
DataLoader worker raising end every rank with one line each; SIGTERM through launchers/train_local.sh
checkpoints and exits 0 even with MLflow unreachable."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tiny_run import make_tiny_run

from pipeline.config import ConfigError, load_config
from pipeline.train import checkpoint

pytestmark = pytest.mark.slow
STEPS = 16
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"root": root, "config": make_tiny_run(root, steps=STEPS)}


def simvlg_train(config, run_dir, *overrides, env_extra=None, **popen):
    cmd = [str(Path(sys.executable).parent / "simvlg"), "train", str(config), "--run-dir", str(run_dir)]
    for ov in overrides:
        cmd += ["--set", ov]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
        **(env_extra or {}),
    }
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


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
    # the trained connector as a folder (for `simvlg eval` and model.init_connector)
    meta = json.loads((reference / "connector" / "config.json").read_text())
    assert meta["format"] == "simvlg-connector" and meta["step"] == STEPS

    from mlflow.tracking import MlflowClient

    summary = json.loads((reference / "train_summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{reference / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.steps"] == str(STEPS)
    assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == STEPS
    assert {"config.yaml", "system.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def _ranks(simvlg_pid: int) -> dict[int, psutil.Process]:
    """{rank: process} under `simvlg train` (simvlg -> deepspeed launcher -> ranks -> workers)."""
    launchers = [
        p
        for p in psutil.Process(simvlg_pid).children()
        if "deepspeed.launcher.launch" in " ".join(p.cmdline())
    ]
    return {int(p.environ()["RANK"]): p for p in launchers[0].children()} if launchers else {}


def _wait_gone(procs: list, timeout: float) -> list:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        p.kill()
    return alive


def _left_behind(run_dir: Path) -> list:
    """Processes still running for this run dir (ranks and their forked DataLoader workers carry
    `--run-dir DIR` in their command line); killed, and returned."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and str(run_dir) in " ".join(p.info["cmdline"] or []):
            left.append(p)
    return _wait_gone(left, timeout=3)


def _shm_buffers() -> set[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (deepspeed_setup.init_distributed unlinks them)."""
    return {p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")}


def test_chaos_sigkill_one_rank_then_resume_is_bit_identical(setup, reference):
    """SIGKILL one rank (not the group) at a random step: every other process exits within 60 s, and
    a restart resumes from the last checkpoint and reproduces the uninterrupted run bit for bit."""
    rng = random.Random(os.environ.get("SIMVLG_CHAOS_SEED", "14"))
    kill_after, victim = rng.randint(3, STEPS - 6), rng.randint(0, 1)
    run_dir = setup["root"] / "chaos"
    shm_before = _shm_buffers()
    proc = simvlg_train(setup["config"], run_dir, start_new_session=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= kill_after:
            break
        time.sleep(0.01)
    # a tiny step takes ~0.1 s: freeze the ranks where they are (SIGSTOP), so the kill lands mid-run
    ranks = _ranks(proc.pid)
    assert sorted(ranks) == [0, 1], proc.communicate()[0][-3000:]
    tree = psutil.Process(proc.pid).children(recursive=True)
    frozen = [p for r in ranks.values() for p in [r, *r.children(recursive=True)]]
    for p in frozen:
        p.suspend()
    t0 = time.time()
    ranks[victim].kill()
    for p in frozen:
        if p.pid != ranks[victim].pid and p.is_running():
            p.resume()
    out, _ = proc.communicate(timeout=120)
    took = time.time() - t0
    leftover = _wait_gone(tree, timeout=5) + _left_behind(run_dir) + sorted(_shm_buffers() - shm_before)
    print(f"chaos: killed rank {victim} after step {kill_after}; everything exited in {took:.1f} s")
    assert took < 60 and proc.returncode != 0 and not leftover, (took, leftover, out[-3000:])
    killed_at = max(losses(run_dir))
    assert killed_at < STEPS, "the run finished before it could be killed"

    resumed = simvlg_train(setup["config"], run_dir)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    saved = int(re.search(r"resumed from \S*step_(\d+)", out).group(1))
    assert killed_at - 2 <= saved <= killed_at  # ckpt_every: 2
    assert "resumed from" in out and f"step_{saved:08d}" in out
    ref, got = losses(reference), losses(run_dir)
    for step in range(saved + 1, STEPS + 1):
        assert got[step] == ref[step], (step, got[step], ref[step])  # bit-identical, not approx
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # the resumed job continued the killed job's MLflow run
    assert runs[0].info.run_id == json.loads((run_dir / "train_summary.json").read_text())["mlflow_run_id"]
    assert {m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")} == set(
        range(1, STEPS + 1)
    )


def test_data_that_fails_at_run_time_ends_every_rank_with_one_line(setup):
    """The shards vanish after the config was checked (preflight skipped): before, each rank printed
    a 50-line traceback and then waited forever on its DataLoader worker."""
    run_dir = setup["root"] / "nodata"
    proc = simvlg_train(
        setup["config"],
        run_dir,
        "data.sources.0.shards=/nowhere/{00000..00003}.tar",
        env_extra={"SIMVLG_PREFLIGHT_DONE": "1"},
        start_new_session=True,
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and not _left_behind(run_dir), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if "RuntimeError: no data source gives samples" in ln]
    failed = [ln for ln in lines if " stops: " not in ln]  # the failing rank(s): cause + where
    assert failed and all("traceback:" in ln for ln in failed), out[-3000:]
    assert len(lines) <= 2  # one line per rank, nothing repeated
    assert "Traceback" in "".join(p.read_text() for p in (run_dir / "logs").glob("rank*.log"))


def test_a_worker_raising_mid_epoch_ends_every_rank(setup, tmp_path):
    from pipeline.train.launch import _free_port, launcher_command

    run_dir = tmp_path / "fault"
    script = Path(__file__).with_name("fault_rank.py")
    cmd = launcher_command(2, _free_port(), [str(script), str(setup["config"]), "--run-dir", str(run_dir)])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "SIMVLG_PREFLIGHT_DONE": "1",
        "FAULT_RANK": "1",
        "FAULT_BATCH": "4",
        "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
    }
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and not _left_behind(run_dir), out[-3000:]
    assert "rank 1 failed: RuntimeError: injected fault in a DataLoader worker of rank 1" in out, out[-3000:]
    assert "Traceback" not in out
    steps = losses(run_dir)
    assert 1 <= max(steps) < STEPS  # it trained, then stopped at the fault
    assert checkpoint.find_resumable(run_dir / "checkpoints") is not None  # and can resume


def test_sigterm_checkpoints_and_exits_zero_with_mlflow_down(setup):
    """Through launchers/train_local.sh, the one-node launch path users are told to use."""
    run_dir = setup["root"] / "sigterm"
    cmd = [
        str(REPO / "launchers" / "train_local.sh"),
        str(setup["config"]),
        "2",
        "--run-dir",
        str(run_dir),
        "--set",
        "train.steps=1000",
        "--set",
        "train.ckpt_every=500",
        "--set",
        "tracking.uri=http://127.0.0.1:9",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
    from pipeline.train.deepspeed_setup import check_world

    cfg = load_config(setup["config"])
    with pytest.raises(
        SystemExit, match="global_batch is 8 but micro_batch 4 x grad_accum 1 x 1 running ranks = 4"
    ):
        check_world(cfg, 1)
