"""`simvlg eval CONFIG --checkpoint DIR --task TASK [--task ...] [--run-dir DIR] [--set k=v ...]`

Builds the model from the config (frozen ViT + LLM from their configured weights), loads the trained
connector from --checkpoint, and runs each task (default: eval.tasks) with `evaluate_task`. Outputs go
to <run dir>/eval/<task>/ (predictions.json, metrics.json, gallery.html, merge/*.png) and
<run dir>/eval/report.json (all tasks so far); metrics and files go to MLflow as a run named
"<run.name>-eval" in the config's tracking store (the run dir's sqlite store by default).

--checkpoint accepts
  * a connector folder (config.json with "format": "simvlg-connector" + model.safetensors), as
    `SimVLG.save_connector` writes;
  * a training checkpoint folder (<run>/checkpoints/step_XXXXXXXX with COMPLETE.json and the
    DeepSpeed ds/mp_rank_00_model_states.pt): the `connector.*` weights are taken from it;
  * a run dir or its checkpoints/ folder: the newest complete training checkpoint in it.

Several ranks: start it under a launcher (`torchrun --nproc_per_node N -m pipeline.eval ...`,
`deepspeed`, `srun`; RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set); ranks split the samples and rank 0
gathers, scores and writes. Every failure (config, missing/mismatched annotation files, missing media,
an empty set, an unusable checkpoint) is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import ConfigError, load_config

from .metrics import MetricError
from .tasks import EvalDataError, check_task_files

log = logging.getLogger("simvlg.eval")


class CheckpointError(ValueError):
    """--checkpoint does not point at something a connector can be loaded from."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (path or packaged name)")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="connector folder, training checkpoint folder (step_*), or a run dir (its newest "
        "complete checkpoint)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TASK",
        help="task to run (repeatable; default eval.tasks): coco_karpathy_test, "
        "coco_karpathy_val, nocaps_val, flickr30k_test, vqav2_val, okvqa_test, "
        "gqa_testdev, msrvtt_test, msvd_test, or a custom eval.datasets entry",
    )
    p.add_argument(
        "--run-dir", default=None, help="where eval/<task>/ outputs and MLflow go (default run.run_dir)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set eval.max_samples=100 (repeatable)",
    )


# ---------------------------------------------------------------------------------- checkpoints
def _load_states(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # DeepSpeed may pickle objects the safe loader refuses
        warnings.warn(
            f"{path}: safe load failed ({type(e).__name__}); loading it as a trusted training "
            "checkpoint of this run",
            stacklevel=2,
        )
        return torch.load(path, map_location="cpu", weights_only=False)


def _load_training_checkpoint(model, folder: Path) -> int | None:
    from pipeline.train import checkpoint as ckpt

    why = ckpt.problem(folder)
    if why is not None:
        raise CheckpointError(f"{folder}: incomplete training checkpoint: {why}")
    states = sorted((folder / "ds").glob("mp_rank_*_model_states.pt")) or sorted(
        folder.rglob("*model_states.pt")
    )
    if not states:
        raise CheckpointError(f"{folder}: no DeepSpeed model states (ds/mp_rank_00_model_states.pt)")
    sd = _load_states(states[0])
    module = sd.get("module", sd) if isinstance(sd, dict) else {}
    conn = {k[len("connector.") :]: v for k, v in module.items() if k.startswith("connector.")}
    if not conn:
        raise CheckpointError(f"{states[0]}: no connector.* weights in it")
    own = model.connector.state_dict()
    trainable = [k for k, p in model.connector.named_parameters() if p.requires_grad]
    missing = [k for k in trainable if k not in conn]
    unexpected = [k for k in conn if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{states[0]}: connector weights do not fit this config's model: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]})"
        )
    bad = [k for k, v in conn.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{states[0]}: shape mismatch for {bad[0]}: {tuple(conn[bad[0]].shape)} in the "
            f"checkpoint, {tuple(own[bad[0]].shape)} in the model"
        )
    model.connector.load_state_dict({k: v.to(own[k].dtype) for k, v in conn.items()}, strict=False)
    try:
        return int(json.loads((folder / "COMPLETE.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint(model, path: str | Path) -> dict:
    """Load the connector weights into `model`; returns {kind, path, step}."""
    from pipeline.train import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--checkpoint {p}: not found")
    cfg_file = p / "config.json"
    if cfg_file.is_file() and (p / "model.safetensors").is_file():
        try:
            meta = json.loads(cfg_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        if meta.get("format") != "simvlg-connector":
            raise CheckpointError(
                f"{p}: config.json is not a simvlg connector (format "
                f"{meta.get('format')!r}); pass a connector folder from save_connector"
            )
        try:
            model.load_connector(p)
        except (ValueError, RuntimeError, KeyError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{p}: cannot load the connector into this config's model: {msg}") from None
        return {"kind": "connector", "path": str(p), "step": meta.get("step")}
    if (p / "COMPLETE.json").is_file():
        return {"kind": "training", "path": str(p), "step": _load_training_checkpoint(model, p)}
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    found = ckpt.find_resumable(root)
    if found is not None:
        return {"kind": "training", "path": str(found), "step": _load_training_checkpoint(model, found)}
    raise CheckpointError(
        f"--checkpoint {p}: not a connector folder (config.json + model.safetensors), a "
        "training checkpoint (step_*/ with COMPLETE.json) or a run dir with a complete "
        "checkpoint in checkpoints/"
    )


# ------------------------------------------------------------------------------------- running
def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world, whether we initialised the group). Under a launcher: env:// rendezvous."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method="env://")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _device() -> torch.device:
    if torch.cuda.is_available():
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(d)
        return d
    return torch.device("cpu")


def _update_report(path: Path, report: dict) -> None:
    from pipeline.data.formats.jsonfile import write_json_atomic

    try:
        all_reports = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        all_reports = {}
    all_reports[report["task"]] = {
        k: report[k] for k in ("metrics", "num_samples", "partial", "step", "checkpoint", "notes")
    }
    write_json_atomic(path, all_reports)


def run(args, *, model=None) -> int:
    """`model`: an already built model (tests, the demo); else built from the config. Under a
    launcher, a rank that fails or dies ends the others (pipeline/failfast.py)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.failfast import RankGuard

        rank = int(os.environ.get("RANK", "0"))
        log_dir = (Path(args.run_dir) if args.run_dir else Path(".")) / "logs"
        with RankGuard("simvlg eval", log_dir, rank) as guard:
            return _run(args, model=model, guard=guard)
    return _run(args, model=model)


def _run(args, *, model=None, guard=None) -> int:
    tracker, initialised, status = None, False, "FAILED"
    try:
        cfg = load_config(args.config, args.overrides)
        tasks = list(args.task) or list(cfg.eval.tasks)
        if not tasks:
            raise EvalDataError("no tasks: pass --task or set eval.tasks")
        for t in tasks:
            check_task_files(t, cfg.eval)  # unknown tasks, missing files fail before the model is built
        run_dir = Path(args.run_dir) if args.run_dir else cfg.run_dir
        rank, world, initialised = _init_distributed()
        if guard is not None:
            guard.watch_peers(world)
        device = _device()
        if model is None:
            from pipeline.models import build_model
            from pipeline.preflight import check_for_eval

            check_for_eval(cfg, args.config)  # a random ViT or missing weights: refuse in one line
            model = build_model(cfg.model, device=device)
        info = load_checkpoint(model, args.checkpoint)
        step = info["step"] or 0
        if rank == 0:
            (run_dir / "eval").mkdir(parents=True, exist_ok=True)
            from pipeline.train.tracking import Tracker

            tcfg = cfg.model_copy(deep=True)
            tcfg.run.name = f"{cfg.run.name}-eval"
            tracker = Tracker(tcfg, run_dir)
        from .evaluate import evaluate_task

        for t in tasks:
            report = evaluate_task(
                model,
                cfg,
                t,
                run_dir / "eval" / t,
                rank=rank,
                world_size=world,
                device=device,
                tracker=tracker,
                step=step,
                checkpoint=info["path"],
            )
            if rank == 0:
                _update_report(run_dir / "eval" / "report.json", report)
        status = "FINISHED"
        return 0
    except (ConfigError, EvalDataError, MetricError, CheckpointError) as e:
        print(f"simvlg eval: error: {e}", file=sys.stderr)
        return 1
    finally:
        if tracker is not None:
            tracker.close(status)
        if guard is not None:
            guard.finish()  # before the process group (and rank 0's store) goes away
        if initialised:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="simvlg eval",
        description="Zero-shot evaluation of a trained connector: captioning (CIDEr, BLEU-4, METEOR, "
        "ROUGE-L, SPICE if available), VQA accuracy, GQA exact match, video captioning; "
        "predictions, metrics, a gallery and merged-token figures in the run dir and MLflow.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
