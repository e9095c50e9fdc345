"""`simvlg train`: run the trainer on this rank, or start the ranks first.

Under a launcher (`deepspeed`, `torchrun`, `srun` with RANK/WORLD_SIZE set) this process is one rank.
Started bare, it checks the config and the files it names (pipeline/preflight.py), then re-executes
itself through the `deepspeed` launcher with `launch.gpus_per_node` processes on this node (CPU ranks
when there is no GPU: DS_ACCELERATOR=cpu, gloo, 1 thread each). SIGTERM/SIGUSR1 reach the ranks, which
checkpoint and exit 0; a failure in any rank ends every rank (pipeline/failfast.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.config import dump_yaml, load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (path or packaged name)")
    p.add_argument(
        "--run-dir",
        default=None,
        help="where checkpoints, metrics and MLflow live "
        "(default: run.run_dir); an existing run dir is resumed from its latest checkpoint",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key (repeatable)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks to start on this node when started bare (default launch.gpus_per_node)",
    )
    p.add_argument(
        "--check-only",
        action="store_true",
        help="check the config and the files it names (as `simvlg config validate`), then exit",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launcher_command(nproc: int, port: int, target: list[str]) -> list[str]:
    """The `deepspeed` launcher's per-node part (deepspeed.launcher.launch) for `nproc` ranks on this
    node. We start it directly rather than through the `deepspeed` command, whose outer runner
    neither forwards SIGTERM on one node nor dies with us."""
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nproc))}).encode()).decode()
    return [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.launch",
        f"--world_info={world_info}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "--no_local_rank",
        *target,
    ]


def launch_local(args, cfg) -> int:
    target = ["--module", "pipeline.train", args.config, "--run-dir", str(args.run_dir)]
    for ov in args.overrides:
        target += ["--set", ov]
    return start_ranks(args.nproc or cfg.launch.gpus_per_node, target, "simvlg train", args.run_dir)


def start_ranks(nproc: int, target: list[str], what: str, run_dir: Path) -> int:
    """Run `target` as `nproc` ranks on this node under the deepspeed launcher; forward SIGTERM and
    SIGUSR1 to the ranks; return the launcher's exit status."""
    import torch

    env = dict(os.environ)
    # DeepSpeed JIT-builds a small op on first use; build it once per environment, not per home.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["SIMVLG_PREFLIGHT_DONE"] = "1"
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = launcher_command(nproc, _free_port(), target)
    print(f"{what}: {nproc} ranks on this node: " + " ".join(target[1:]), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent(signal.SIGTERM))

    def forward(signum, _frame):
        # SIGUSR1 would kill the launcher, and it ends its ranks on SIGTERM without waiting for a
        # checkpoint: signal the ranks themselves. They checkpoint at the next step boundary and
        # exit 0, and then so does the launcher.
        for rank in _children(proc.pid):
            rank.send_signal(signal.SIGTERM)

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    code = proc.wait()
    if code != 0:
        print(
            f"{what}: failed (exit status {code}); the ranks' tracebacks are in {Path(run_dir) / 'logs'}",
            file=sys.stderr,
        )
    return code


def die_with_parent(sig: int):
    """A preexec_fn: the child gets `sig` when this process dies (Linux), so nothing is orphaned."""

    def setup():
        if sys.platform.startswith("linux"):
            import ctypes

            ctypes.CDLL(None).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG

    return setup


def _children(pid: int) -> list:
    import psutil  # a dependency of deepspeed

    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    args.run_dir = Path(args.run_dir) if args.run_dir else cfg.run_dir
    if not os.environ.get("SIMVLG_PREFLIGHT_DONE"):
        from pipeline.preflight import check_for_training

        check_for_training(cfg, args.config)  # a ConfigError: one line, exit 1, before any rank starts
    if args.check_only:
        return 0
    if not under_launcher():
        return launch_local(args, cfg)
    from pipeline.failfast import RankGuard

    rank = int(os.environ["RANK"])
    die_with_parent(signal.SIGTERM)()  # our launcher gone: checkpoint at the next step and stop
    run_dir = args.run_dir
    with RankGuard("simvlg train", run_dir / "logs", rank) as guard:
        from pipeline.train.engine import run

        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        result = run(cfg, run_dir, guard)
    return 0 if result["step"] >= cfg.train.steps or result["stopped"] else 1
