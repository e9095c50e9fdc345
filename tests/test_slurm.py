"""launchers/train_slurm.sbatch on a real one-node SLURM cluster started by the test: the job
trains with 2 CPU ranks, SIGUSR1 (SLURM's pre-emption warning) makes it checkpoint, exit and
requeue itself, and the requeued job resumes from that checkpoint and finishes."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm
from tiny_run import make_tiny_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STEPS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = LocalSlurm.available()
    if why:
        pytest.skip(f"SLURM unavailable: {why}")
    c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def steps_logged(run_dir: Path) -> list[int]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x)["step"] for x in f.read_text().splitlines() if '"loss"' in x]


def test_sbatch_trains_checkpoints_on_usr1_requeues_and_resumes(cluster, tmp_path):
    """Submitted as the README says, from a fresh clone's folder (no logs/ made beforehand, no
    --output): SLURM must be able to open the job's output file before the script runs."""
    config = make_tiny_run(tmp_path, steps=STEPS)
    run_dir, clone = tmp_path / "run", tmp_path / "clone"
    shutil.copytree(REPO / "launchers", clone / "launchers")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin:/usr/sbin:/sbin",
        "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
        "HF_HUB_OFFLINE": "1",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    # only the resources differ from the README's command: this machine has 2 CPUs and no GPU
    job = cluster.sbatch(
        "--ntasks-per-node=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--mem=8000",
        "launchers/train_slurm.sbatch",
        str(config),
        "--run-dir",
        str(run_dir),
        "--set",
        "train.ckpt_every=1000",
        "--set",
        "launch.gpus_per_node=2",
        env=env,
        cwd=clone,
    )
    log = clone / f"simvlg-{job}.out"
    logs = clone / "logs"
    deadline = time.time() + 600
    while time.time() < deadline and len(steps_logged(run_dir)) < 3:
        assert cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:]
        time.sleep(1)
    assert len(steps_logged(run_dir)) >= 3, log.read_text()[-3000:] if log.exists() else "no log"
    cluster.run("scancel", "--signal=USR1", job)  # as SLURM does 120 s before the time limit

    state = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=900)
    text = log.read_text()
    assert state == "COMPLETED", f"{state}\n{text[-4000:]}"
    assert "restart 0" in text and "restart 1" in text, text[-3000:]  # the job ran twice
    assert "received SIGUSR1" in text and "requeued SLURM job" in text
    assert "resumed from" in text
    saved = [p.name for p in (run_dir / "checkpoints").glob("step_*")]
    signal_step = int(text.split("stopped by signal at step ")[1].split()[0])
    assert f"step_{signal_step:08d}" in saved and f"step_{STEPS:08d}" in saved
    steps = steps_logged(run_dir)
    assert set(steps) == set(range(1, STEPS + 1)) and steps[-1] == STEPS
    # nothing was trained twice: the resumed job started right after the signal step
    assert steps.count(signal_step + 1) == 1
    hostfile = logs / f"hostfile-{job}"
    assert hostfile.read_text().split() == ["localhost", "slots=2"]
    out = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, env=cluster.env
    ).stdout
    assert "Restarts=1" in out
