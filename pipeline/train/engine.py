"""The training job: DeepSpeed ZeRO-2 around the trainable connector, the frozen ViT and LLM beside it.

    simvlg train CONFIG [--run-dir DIR] [--set k=v ...]

runs this under the `deepspeed` launcher (it re-executes itself through the launcher when started
bare). One step = `grad_accum` micro-batches per rank. Everything a step needs to be reproduced
(weights, optimizer partitions, data position, RNGs) is checkpointed, so a killed run resumed from
step k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.train import checkpoint
from pipeline.train.schedule import lr_at, param_groups
from pipeline.train.signals import StopFlag, requeue_slurm_job
from pipeline.train.tracking import Tracker

if TYPE_CHECKING:
    from pipeline.data.loader import TrainLoader

log = logging.getLogger("simvlg.train")
DS_OVERRIDDEN = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")
# fp16 dynamic loss scaling as torch.cuda.amp.GradScaler's defaults (the official run's AMP): start at
# 2^16, halve on every overflow (hysteresis 1), double after 2000 clean steps. A ds_config's own "fp16"
# block may change these; "enabled" always follows train.precision.
FP16_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1,
                "min_loss_scale": 1}


class NonFiniteLossError(RuntimeError):
    pass


def deepspeed_config(cfg: Config) -> dict:
    """The JSON config with every batch/precision/clipping field taken from the YAML (grad_clip 0:
    no clipping); fp16 gets dynamic loss scaling (FP16_SCALING unless the JSON sets its own)."""
    raw = json.loads(Path(cfg.train.ds_config).read_text())
    ds = {k: v for k, v in raw.items() if not k.startswith("_") and k not in DS_OVERRIDDEN}
    t = cfg.train
    fp16 = {"enabled": t.precision == "fp16"}
    if t.precision == "fp16":
        own = {k: v for k, v in (raw.get("fp16") or {}).items() if k != "enabled"}
        fp16.update({**FP16_SCALING, **own})
    ds.update(train_batch_size=t.global_batch, train_micro_batch_size_per_gpu=t.micro_batch,
              gradient_accumulation_steps=t.grad_accum, gradient_clipping=t.grad_clip,
              bf16={"enabled": t.precision == "bf16"}, fp16=fp16)
    ds.setdefault("zero_optimization", {})["stage"] = t.zero_stage
    ds["steps_per_print"] = 10**9  # we log ourselves
    return ds


@contextmanager
def frozen_children_detached(model: torch.nn.Module):
    """Take every direct child whose parameters are all frozen (SimVLG: the ViT and the LLM) out of
    `model` for the duration, then put it back. deepspeed.initialize casts every parameter of the
    module it is given to the engine dtype (and broadcasts it); frozen weights must stay exactly as
    loaded, in their own dtype, so the engine never sees them. The model's forward uses them as usual
    afterwards; ZeRO only ever touches the parameters handed to its optimizer."""
    detached = {}
    for name, child in list(model.named_children()):
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            detached[name] = child
            setattr(model, name, None)
    try:
        yield list(detached)
    finally:
        for name, child in detached.items():
            setattr(model, name, child)


def check_world(cfg: Config, world_size: int) -> None:
    t = cfg.train
    if t.micro_batch * t.grad_accum * world_size != t.global_batch:
        raise SystemExit(
            f"simvlg train: train.global_batch is {t.global_batch} but micro_batch {t.micro_batch} x "
            f"grad_accum {t.grad_accum} x {world_size} running ranks = "
            f"{t.micro_batch * t.grad_accum * world_size}; fix the config or launch.nodes/"
            f"gpus_per_node (the config expects {cfg.world_size} ranks)")


def _exclude_frozen_from_state_dict(model: torch.nn.Module) -> None:
    """Checkpoints hold the trainable part only. DeepSpeed's exclude_frozen_parameters misses tied
    frozen weights (OPT's lm_head is embed_tokens: 257 MB at 2.7b), so drop every frozen name."""
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop(module, state_dict, prefix, local_metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    model.register_state_dict_post_hook(drop)


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _all_reduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, *, model=None, loader: TrainLoader | None = None,
                 guard=None):
        import deepspeed

        from pipeline.data import build_loader
        from pipeline.models import CaptionTokenizer, build_model

        self.cfg, self.run_dir = cfg, run_dir
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if guard is not None:
            guard.watch_peers(self.world)  # from here a failed or killed peer ends this rank too
        check_world(cfg, self.world)
        torch.manual_seed(cfg.run.seed + self.rank)
        device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                  if torch.cuda.is_available() else torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.model = model if model is not None else build_model(cfg.model, device=device)
        tokenize = CaptionTokenizer.from_config(cfg.model.llm)
        self.loader: TrainLoader = loader if loader is not None else build_loader(
            cfg.data, tokenize=tokenize, batch_size=cfg.train.micro_batch, rank=self.rank,
            world_size=self.world, seed=cfg.run.seed, train=True)
        _exclude_frozen_from_state_dict(self.model)
        t = cfg.train
        optimizer = torch.optim.AdamW(param_groups(self.model.named_parameters(), t.weight_decay),
                                      lr=lr_at(0, t), betas=tuple(t.betas))
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with frozen_children_detached(self.model):  # frozen ViT/LLM: never cast, never broadcast
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model, optimizer=optimizer, config=deepspeed_config(cfg),
                model_parameters=trainable)
        self.device = self.engine.device
        self.ckpt_root = run_dir / "checkpoints"
        self.step = 0
        self.nan_skips = 0
        self._resumed_rng = None
        self.stop = StopFlag()
        run_id = self._resume()
        self.tracker = Tracker(cfg, run_dir, run_id=run_id) if self.rank == 0 else None

    # -- checkpoints ----------------------------------------------------------------------------
    def _resume(self) -> str | None:
        folder = checkpoint.find_resumable(self.ckpt_root) if self.rank == 0 else None
        shared = [str(folder) if folder else None]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is None:
            return None
        state = checkpoint.load(self.engine, Path(shared[0]), rank=self.rank, world_size=self.world)
        self.step, self.nan_skips = state["step"], state["nan_skips"]
        self.loader.load_state_dict(state["loader"])
        self._resumed_rng = state["rng"]  # restored in fit(), after the loader's iterator exists
        if self.rank == 0:
            log.warning("resumed from %s at step %d", shared[0], self.step)
        return state.get("mlflow_run_id")

    def save(self) -> Path:
        state = {"nan_skips": self.nan_skips, "rng": checkpoint.rng_state(),
                 "loader": self.loader.state_dict(),
                 "mlflow_run_id": self.tracker.run_id if self.tracker else None}
        return checkpoint.save(self.engine, self.ckpt_root, self.step, state, rank=self.rank,
                               world_size=self.world, keep=self.cfg.train.keep_ckpts,
                               barrier=dist.barrier)

    # -- one optimizer step -----------------------------------------------------------------------
    def _next_batch(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:  # epoch mode: the next pass starts with a fresh iterator
            self._it = iter(self.loader)
            return next(self._it)

    def _micro_batches(self):
        """Yields `grad_accum` finite-loss micro-batches; a non-finite loss on any rank skips that
        micro-batch on every rank (decided together, so ZeRO's collectives stay in step)."""
        t, done, in_a_row = self.cfg.train, 0, 0
        while done < t.grad_accum:
            t0 = time.perf_counter()
            batch = self._next_batch()
            self.data_wait += time.perf_counter() - t0
            out = self.engine(**{k: v for k, v in _to_device(batch, self.device).items()
                                 if k in ("pixel_values", "input_ids", "attention_mask", "labels")})
            finite = _all_reduce([float(torch.isfinite(out["loss"]).item())], self.device)[0]
            if finite < self.world:
                self.nan_skips += 1
                in_a_row += 1
                if in_a_row >= t.max_nan_in_row:
                    raise NonFiniteLossError(
                        f"{in_a_row} micro-batches in a row had a non-finite loss (step {self.step}); "
                        f"stopping. Lower train.lr or check the data; the last checkpoint is intact.")
                continue
            in_a_row = 0
            done += 1
            yield batch, out

    def train_step(self) -> dict:
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses, samples, tokens = [], 0, 0
        per_source = defaultdict(lambda: [0.0, 0.0])  # name -> [loss sum, count]
        for batch, out in self._micro_batches():
            self.engine.backward(out["loss"])
            self.engine.step()
            losses.append(out["loss"].item())
            samples += batch["pixel_values"].shape[0]
            tokens += int(out.get("num_tokens", 0))
            if "per_sample_loss" in out:
                for name, value in zip(batch["source"], out["per_sample_loss"].tolist()):
                    per_source[name][0] += value
                    per_source[name][1] += 1
        names = [s.name for s in self.cfg.data.sources]
        flat = [sum(losses), len(losses), samples, tokens]
        flat += [v for n in names for v in per_source[n]]
        total = _all_reduce(flat, self.device)
        source_loss = {n: total[4 + 2 * i] / total[5 + 2 * i]
                       for i, n in enumerate(names) if total[5 + 2 * i] > 0}
        if source_loss:
            self.loader.report_loss(source_loss)
        grad_norm = self.engine.get_global_grad_norm()
        self.step += 1
        return {"loss": total[0] / total[1], "lr": lr, "samples": total[2], "tokens": total[3],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                **{f"loss/{n}": v for n, v in source_loss.items()}}

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        t = self.cfg.train
        self.engine.train()
        self._it = iter(self.loader)
        if self._resumed_rng is not None:
            checkpoint.set_rng_state(self._resumed_rng)
        window_start, self.data_wait = time.perf_counter(), 0.0
        window_samples = window_tokens = 0
        first_step, history = self.step, []
        status, stopped_by = "FINISHED", None
        try:
            while self.step < t.steps:
                m = self.train_step()
                window_samples += m["samples"]
                window_tokens += m["tokens"]
                history.append((self.step, m["loss"]))
                stop_now = _all_reduce([float(bool(self.stop))], self.device)[0] > 0
                if self.step % t.log_every == 0 or self.step == t.steps or stop_now:
                    elapsed = time.perf_counter() - window_start
                    wait = _all_reduce([self.data_wait], self.device)[0] / self.world
                    metrics = {"loss": m["loss"], "lr": m["lr"], "grad_norm": m["grad_norm"],
                               "samples_per_s": window_samples / elapsed,
                               "tokens_per_s": window_tokens / elapsed,
                               "data_wait_frac": min(1.0, wait / elapsed), "nan_skips": self.nan_skips,
                               **{k: v for k, v in m.items() if k.startswith("loss/")},
                               **self._skip_metrics()}
                    self._log(metrics, elapsed_steps=self.step - first_step)
                    window_start, self.data_wait = time.perf_counter(), 0.0
                    window_samples = window_tokens = 0
                if self.step % t.ckpt_every == 0 or self.step == t.steps or stop_now:
                    self.save()
                if stop_now:
                    stopped_by = self.stop.signum or "peer"
                    break
        except BaseException:
            status = "FAILED"
            raise
        finally:
            if self.tracker:
                self.tracker.close(status if stopped_by is None else "KILLED")
        if stopped_by is not None and self.rank == 0:
            log.warning("stopped by signal at step %d after checkpointing", self.step)
            requeue_slurm_job()
        return {"step": self.step, "history": history, "stopped": stopped_by is not None}

    def _skip_metrics(self) -> dict:
        counts = self.loader.skip_counts()
        names = sorted(counts)
        totals = _all_reduce([float(counts[n]) for n in names], self.device) if names else []
        return {f"skipped/{n}": v for n, v in zip(names, totals)}

    def _log(self, metrics: dict, elapsed_steps: int) -> None:
        if self.rank != 0:
            return
        t = self.cfg.train
        rate = metrics["samples_per_s"] / max(1, t.global_batch)  # steps per second
        eta = (t.steps - self.step) / rate if rate > 0 else float("inf")
        log.info("step %d/%d loss %.4f lr %.2e gnorm %.3f %.1f samples/s data-wait %.0f%% eta %s",
                 self.step, t.steps, metrics["loss"], metrics["lr"], metrics["grad_norm"],
                 metrics["samples_per_s"], 100 * metrics["data_wait_frac"], _hms(eta))
        self.tracker.log(self.step, metrics)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs INFO to the terminal, the others WARNING; every rank logs INFO to
    <run_dir>/logs/rank<R>.log, where a failing rank's traceback also goes (pipeline/failfast.py)."""
    fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handlers = [terminal]
    try:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "logs" / f"rank{rank}.log"))
    except OSError as e:
        log.warning("cannot write rank logs in %s: %s", run_dir / "logs", e)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    logging.captureWarnings(True)


def run(cfg: Config, run_dir: Path, guard=None) -> dict:
    """Entry point on each rank (under a launcher)."""
    rank = int(os.environ.get("RANK", "0"))
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, rank)
    trainer = Trainer(cfg, run_dir, guard=guard)
    t0 = time.time()
    result = trainer.fit()
    if trainer.rank == 0:
        if result["step"] >= cfg.train.steps:  # the trained connector, for `simvlg eval` and as
            trainer.model.save_connector(run_dir / "connector", step=result["step"])  # init_connector
        losses = [loss for _, loss in result["history"]]
        summary = {"steps": result["step"], "stopped_by_signal": result["stopped"],
                   "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "nan_skips": trainer.nan_skips,
                   "wall_s": round(time.time() - t0, 1),
                   "mlflow_run_id": trainer.tracker.run_id if trainer.tracker else None}
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary)
    return result


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print("\n".join(["", "training summary", "-" * (width + 24)] +
                    [f"{k:<{width}}  {v}" for k, v in summary.items()]), file=sys.stderr)
