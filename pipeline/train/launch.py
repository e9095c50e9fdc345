"""`simvlg train`: run the trainer on this rank, or start the ranks first.

Under a launcher (`deepspeed`, `torchrun`, `srun` with RANK/WORLD_SIZE set) this process is one rank.
Started bare, it re-executes itself through the `deepspeed` launcher with `launch.gpus_per_node`
processes on this node (CPU ranks when there is no GPU: DS_ACCELERATOR=cpu, gloo, 1 thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(_free_port()),
           "--no_local_rank", "--module", "pipeline.train", args.config, "--run-dir", str(args.run_dir)]
    for ov in args.overrides:
        cmd += ["--set", ov]
    print("simvlg train: " + " ".join(cmd), file=sys.stderr)
    started = time.time()
    proc = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum, _frame):
        # The deepspeed launcher passes SIGTERM on to the ranks (and would die of SIGUSR1), so
        # either signal reaches the ranks as SIGTERM: they checkpoint at the next step and exit 0.
        forwarded.append(signum)
        proc.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    code = proc.wait()
    if forwarded:
        # The launcher exits 1 after any signal; what counts is whether the ranks checkpointed.
        summary = Path(args.run_dir) / "train_summary.json"
        if summary.is_file() and summary.stat().st_mtime >= started and \
                json.loads(summary.read_text()).get("stopped_by_signal"):
            return 0
    return code


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
