"""`simvlg train`: run the trainer on this rank, or start the ranks first.

Under a launcher (`deepspeed`, `torchrun`, `srun` with RANK/WORLD_SIZE set) this process is one rank.
Started bare, it re-executes itself through the `deepspeed` launcher with `launch.gpus_per_node`
processes on this node (CPU ranks when there is no GPU: DS_ACCELERATOR=cpu, gloo, 1 thread each).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.config import dump_yaml, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (path or packaged name)")
    p.add_argument("--run-dir", default=None, help="where checkpoints, metrics and MLflow live "
                   "(default: run.run_dir); an existing run dir is resumed from its latest checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to start on this node when started bare (default launch.gpus_per_node)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_local(args, cfg) -> int:
    import torch

    nproc = args.nproc or cfg.launch.gpus_per_node
    env = dict(os.environ)
    # DeepSpeed JIT-builds a small op on first use; build it once per environment, not per home.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(_free_port()),
           "--no_local_rank", "--module", "pipeline.train", args.config, "--run-dir", str(args.run_dir)]
    for ov in args.overrides:
        cmd += ["--set", ov]
    print("simvlg train: " + " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        # Neither layer of the deepspeed launcher forwards SIGUSR1, and its outer runner does not
        # forward SIGTERM on one node: signal the ranks themselves. They checkpoint at the next
        # step boundary and exit 0, and then so do the launchers.
        for rank in _rank_processes(proc.pid):
            rank.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    return proc.wait()


def _rank_processes(runner_pid: int) -> list:
    import psutil  # a dependency of deepspeed

    try:
        tree = psutil.Process(runner_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    launchers = {p.pid for p in tree if "deepspeed.launcher.launch" in " ".join(_cmdline(p))}
    return [p for p in tree if p.ppid() in launchers]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone already
        return []


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    args.run_dir = Path(args.run_dir) if args.run_dir else cfg.run_dir
    if not under_launcher():
        return launch_local(args, cfg)
    from pipeline.train.engine import run

    run_dir = args.run_dir
    if os.environ.get("RANK") == "0":
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    result = run(cfg, run_dir)
    return 0 if result["step"] >= cfg.train.steps or result["stopped"] else 1
