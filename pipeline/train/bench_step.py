"""`simvlg bench step CONFIG`: run real training steps of a config and show where a step's time goes.

    simvlg bench step demo --steps 20                    # after `make demo`: 2 CPU ranks
    simvlg bench step simvlg_opt2.7b --set model.vision.checkpoint=... --peak-tflops 989   # a GPU node
    simvlg bench step demo --vs legacy                   # and the loop as it was, side by side

The ranks start as for `simvlg train` (same launcher, same Trainer, same data), with checkpoints and
MLflow off, in a temporary run dir. After `--warmup` steps, `--steps` steps are measured per phase
(pipeline/train/profile.py): data wait, ViT forward, connector forward/backward, LLM
forward/backward, optimizer, communication. Printed: ms per step per phase (mean over ranks),
samples/s, tokens/s, peak memory per rank, model FLOPs per sample and MFU (pipeline/train/mfu.py:
datasheet peak for A100/H100/H200, --peak-tflops otherwise, measured matmul throughput on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

LABELS = {
    "data": "data wait",
    "vit_forward": "ViT forward",
    "connector_forward": "connector forward",
    "llm_forward": "LLM forward (+ loss)",
    "llm_backward": "LLM backward",
    "connector_backward": "connector backward",
    "optimizer": "optimizer step",
    "communication": "communication",
    "other": "other",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simvlg bench step", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="YAML config (path or packaged name)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=10, help="steps measured (after the warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default launch.gpus_per_node)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of one device at the training precision (default: A100/H100/H200 "
        "datasheet, measured matmul throughput on a CPU)",
    )
    p.add_argument(
        "--vs",
        choices=["legacy"],
        default=None,
        help="legacy: also run the loop as it was before it stopped waiting for the device "
        "(a host read + all-reduce per micro-batch, a metrics all-reduce per step)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="current", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p


def bench_overrides(args) -> list[str]:
    return [
        *args.overrides,
        f"train.steps={args.warmup + args.steps + 1}",
        "train.log_every=1000000000",
        "tracking.enabled=false",
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.config import load_config
    from pipeline.train.launch import under_launcher

    if under_launcher():
        return rank_main(args)
    from pipeline.preflight import check_for_training
    from pipeline.train.launch import start_ranks

    cfg = load_config(args.config, bench_overrides(args))
    check_for_training(cfg, args.config)
    if args.peak_tflops:
        os.environ["SIMVLG_PEAK_TFLOPS"] = str(args.peak_tflops)
    results = []
    with tempfile.TemporaryDirectory(prefix="simvlg-bench-step-") as tmp:
        for variant in ["current"] + (["legacy"] if args.vs else []):
            out = Path(tmp) / f"{variant}.json"
            target = [
                "--module",
                "pipeline.train.bench_step",
                args.config,
                "--run-dir",
                str(Path(tmp) / variant),
                "--variant",
                variant,
                "--out",
                str(out),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            for ov in args.overrides:
                target += ["--set", ov]
            code = start_ranks(
                args.nproc or cfg.launch.gpus_per_node, target, "simvlg bench step", Path(tmp) / variant
            )
            if code != 0:
                return code
            results.append(json.loads(out.read_text()))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_table(args.config, results)
    return 0


def rank_main(args) -> int:
    import torch
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.failfast import RankGuard
    from pipeline.train.engine import Trainer, setup_logging
    from pipeline.train.profile import PHASES, StepProfiler

    rank = int(os.environ["RANK"])
    run_dir = Path(args.run_dir)
    with RankGuard("simvlg bench step", run_dir / "logs", rank) as guard:
        cfg = load_config(args.config, bench_overrides(args))
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir, rank)
        trainer = Trainer(cfg, run_dir, guard=guard)
        trainer.checkpoints = False
        prof = StepProfiler(
            trainer, warmup=args.warmup, emulate_legacy_syncs=args.variant == "legacy"
        ).attach()
        trainer.fit()
        t = prof.totals()
        if trainer.device.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(trainer.device)
        else:  # the rank's peak resident memory (weights, activations, optimizer state, everything)
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        vec = torch.tensor(
            [t["phases"][p] for p in PHASES] + [t["seconds"], t["steps"], t["samples"], t["tokens"]],
            dtype=torch.float64,
        )
        dist.all_reduce(vec)  # phases: summed over ranks (averaged below); samples/tokens: global
        peak = torch.tensor([float(peak_mem)], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        world = dist.get_world_size()
        if rank == 0:
            v = vec.tolist()
            steps = v[len(PHASES) + 1] / world
            seconds = v[len(PHASES)] / world
            result = {
                "variant": args.variant,
                "ranks": world,
                "device": trainer.device.type,
                "precision": cfg.train.precision,
                "micro_batch": cfg.train.micro_batch,
                "grad_accum": cfg.train.grad_accum,
                "steps": int(steps),
                "ms_per_step": {p: 1000 * v[i] / world / steps for i, p in enumerate(PHASES)},
                "step_ms": 1000 * seconds / steps,
                "samples_per_s": v[len(PHASES) + 2] / seconds,
                "tokens_per_s": v[len(PHASES) + 3] / seconds,
                "peak_memory_bytes": peak.item(),
                "flops_per_sample": trainer.flops_per_sample,
                "peak_flops_per_device": trainer.peak_flops,
            }
            achieved = (result["flops_per_sample"] or 0) * result["samples_per_s"]
            result["model_tflops_per_s"] = achieved / 1e12
            result["mfu"] = achieved / (world * trainer.peak_flops) if trainer.peak_flops else None
            Path(args.out).write_text(json.dumps(result))
    return 0


def print_table(config: str, results: list[dict]) -> None:
    r0 = results[0]
    print(
        f"simvlg bench step {config}: {r0['ranks']} {r0['device']} ranks, {r0['precision']}, micro-batch "
        f"{r0['micro_batch']} x accum {r0['grad_accum']}, {r0['steps']} steps measured"
    )
    head = "".join(f"{r['variant']:>22}" for r in results)
    print(f"{'phase (ms per step, mean over ranks)':<38}{head}")
    for p, label in LABELS.items():
        cells = "".join(
            f"{r['ms_per_step'][p]:>14.1f} {100 * r['ms_per_step'][p] / r['step_ms']:>5.1f}% "
            for r in results
        )
        print(f"  {label:<36}{cells}")
    print(f"  {'step':<36}" + "".join(f"{r['step_ms']:>14.1f} {100:>5.0f}% " for r in results))
    rows = [
        ("samples/s", lambda r: f"{r['samples_per_s']:.1f}"),
        ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
        ("peak memory per rank", lambda r: f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"),
        ("model FLOPs per sample", lambda r: f"{(r['flops_per_sample'] or 0) / 1e9:.2f} GFLOP"),
        ("model TFLOP/s (all ranks)", lambda r: f"{r['model_tflops_per_s']:.4f}"),
        (
            "peak per device",
            lambda r: (
                f"{(r['peak_flops_per_device'] or 0) / 1e9:.1f} GFLOP/s"
                if r["peak_flops_per_device"]
                else "unknown (--peak-tflops)"
            ),
        ),
        ("MFU", lambda r: f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"),
    ]
    for name, fmt in rows:
        print(f"{name:<38}" + "".join(f"{fmt(r):>22}" for r in results))
    if r0["device"] == "cpu":
        print(
            "(on a CPU the peak is the matmul throughput this process measured at start-up, and peak "
            "memory is the rank's resident set)"
        )


if __name__ == "__main__":
    sys.exit(main())
