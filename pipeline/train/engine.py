"""The training job: DeepSpeed ZeRO-2 around the trainable connector, the frozen ViT and LLM beside it.

    simvlg train CONFIG [--run-dir DIR] [--set k=v ...]

runs this under the `deepspeed` launcher (it re-executes itself through the launcher when started
bare). One step = `grad_accum` micro-batches per rank. Everything a step needs to be reproduced
(weights, optimizer partitions, data position, RNGs) is checkpointed, so a killed run resumed from
step k continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import Config
from pipeline.train import checkpoint
from pipeline.train.deepspeed_setup import (
    check_world,
    deepspeed_config,
    exclude_frozen_from_state_dict,
    frozen_children_detached,
    init_distributed,
)
from pipeline.train.mfu import mfu_metrics, peak_flops
from pipeline.train.schedule import lr_at, param_groups
from pipeline.train.signals import StopFlag, requeue_slurm_job
from pipeline.train.tracking import Tracker

if TYPE_CHECKING:
    from pipeline.data.loader import TrainLoader

log = logging.getLogger("simvlg.train")


def model_inputs(model: torch.nn.Module) -> set[str]:
    """The batch keys the model's forward takes (pixel_values, input_ids, ...: whatever it names)."""
    params = inspect.signature(model.forward).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class NonFiniteLossError(RuntimeError):
    pass


class StepSums:
    """One step's training signal, summed on the device over micro-batches: the loss, caption tokens,
    per-arm (data source, or source/task) loss sums and sample counts for mixing and logging, and any
    named parts of the loss the model reports in out["losses"] (e.g. lm, align)."""

    def __init__(self, arms: int, device):
        z = lambda n: torch.zeros(n, dtype=torch.float64, device=device)
        self.loss, self.micro, self.tokens = z(()), z(()), z(())
        self.arm_loss, self.arm_count = z(arms), z(arms)
        self.parts: dict[str, torch.Tensor] = {}
        self.samples = 0

    def add(self, out: dict, batch: dict) -> None:
        n = batch["input_ids"].shape[0]  # samples (text-only batches have no pixels)
        arm = batch.get("arm_idx", batch.get("source_idx"))
        arm = (torch.zeros(n, dtype=torch.long) if arm is None else arm).to(self.loss.device)
        self.loss += out["loss"].detach()
        self.micro += 1
        self.tokens += out["num_tokens"]
        self.arm_loss.index_add_(0, arm, out["per_sample_loss"].detach().double())
        # a row with no target token left (its text input filled the row) has no loss to say: not counted
        tokens = out.get("per_sample_tokens")
        seen = torch.ones_like(arm, dtype=torch.float64) if tokens is None else (tokens > 0).double()
        self.arm_count.index_add_(0, arm, seen.to(self.loss.device))
        for name, value in sorted(out.get("losses", {}).items()):
            self.parts[name] = self.parts.get(name, 0) + value.detach().double()
        self.samples += n

    def arms(self) -> torch.Tensor:
        return torch.cat([self.arm_loss, self.arm_count])

    def logged(self) -> list:
        """[loss, micro, tokens, arm sums, arm counts, parts...] (parts in name order)."""
        return [
            self.loss,
            self.micro,
            self.tokens,
            self.arm_loss,
            self.arm_count,
            *[self.parts[k] for k in sorted(self.parts)],
        ]


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    def __init__(
        self, cfg: Config, run_dir: Path, *, model=None, loader: TrainLoader | None = None, guard=None
    ):
        import deepspeed

        from pipeline.data import build_loader
        from pipeline.models import build_training_model, training_tokenizer

        self.cfg, self.run_dir = cfg, run_dir
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if guard is not None:
            guard.watch_peers(self.world)  # from here a failed or killed peer ends this rank too
        check_world(cfg, self.world)
        torch.manual_seed(cfg.run.seed + self.rank)
        device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # SimVLG (with a frozen P-Former under train.align_weight) or a P-Former (model.kind: pformer)
        self.model = model if model is not None else build_training_model(cfg, device=device)
        tokenize = training_tokenizer(cfg)
        self.loader: TrainLoader = (
            loader
            if loader is not None
            else build_loader(
                cfg.data,
                tokenize=tokenize,
                batch_size=cfg.train.micro_batch,
                rank=self.rank,
                world_size=self.world,
                seed=cfg.run.seed,
                train=True,
                pin_memory=device.type == "cuda",
            )
        )  # pinned uint8 batches: non-blocking copies to the GPU
        exclude_frozen_from_state_dict(self.model)
        t = cfg.train
        optimizer = torch.optim.AdamW(
            param_groups(self.model.named_parameters(), t.weight_decay), lr=lr_at(0, t), betas=tuple(t.betas)
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        with frozen_children_detached(self.model):  # frozen ViT/LLM: never cast, never broadcast
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.model,
                optimizer=optimizer,
                config=deepspeed_config(cfg),
                model_parameters=trainable,
            )
        self.device = self.engine.device
        self.ckpt_root = run_dir / "checkpoints"
        self.checkpoints = True  # `simvlg bench step` turns them off
        # what the loader's batches are labelled by for loss feedback: its arms (data sources, or
        # source/task pairs), each batch carrying arm_idx (or source_idx) per sample
        self.arm_names = list(self.loader.arm_names)
        self.model_inputs = model_inputs(self.model)
        self.adaptive = self.loader.adaptive
        self.flops_per_sample: float | None = None  # counted on the first micro-batch
        self.peak_flops = peak_flops(self.device, t.precision)
        self.step = 0
        self.nan_skips = 0
        self._nan_in_row = 0
        self.data_wait = 0.0
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
        state = {
            "nan_skips": self.nan_skips,
            "rng": checkpoint.rng_state(),
            "loader": self.loader.state_dict(),
            "mlflow_run_id": self.tracker.run_id if self.tracker else None,
        }
        return checkpoint.save(
            self.engine,
            self.ckpt_root,
            self.step,
            state,
            rank=self.rank,
            world_size=self.world,
            keep=self.cfg.train.keep_ckpts,
            barrier=dist.barrier,
        )

    # -- one optimizer step -----------------------------------------------------------------------
    def _next_batch(self) -> dict:
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:  # epoch mode: the next pass starts with a fresh iterator
            self._it = iter(self.loader)
            batch = next(self._it)
        self.data_wait += time.perf_counter() - t0
        return batch

    def _forward_backward(self, batch: dict) -> dict:
        inputs = {k: v for k, v in _to_device(batch, self.device).items() if k in self.model_inputs}
        out = self.engine(**inputs)
        self.engine.backward(out["loss"])
        self.engine.step()  # the optimizer update on the last micro-batch of the step
        return out

    def train_step(self) -> dict | None:
        """One optimizer step over `grad_accum` micro-batches. Nothing here waits for the device:
        losses and token counts add up in device tensors (StepSums), all-reduced only when needed
        (log steps, adaptive mixing). Returns None when DeepSpeed skipped the update because some
        rank's gradients were not finite (its ZeRO optimizer decides that across ranks); the step
        is then done again with the next micro-batches."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = StepSums(len(self.arm_names), self.device)
        for _ in range(t.grad_accum):
            batch = self._next_batch()
            if self.flops_per_sample is None:  # count the model FLOPs once, on a real micro-batch
                with FlopCounterMode(display=False) as counter:
                    out = self._forward_backward(batch)
                self.flops_per_sample = counter.get_total_flops() / batch["input_ids"].shape[0]
            else:
                out = self._forward_backward(batch)
            sums.add(out, batch)
        if getattr(self.optimizer, "overflow", False):
            self.nan_skips += 1
            self._nan_in_row += 1
            if self._nan_in_row >= t.max_nan_in_row:
                raise NonFiniteLossError(
                    f"{self._nan_in_row} steps in a row had non-finite gradients (step {self.step}); "
                    "stopping. Lower train.lr or check the data; the last checkpoint is intact."
                )
            return None
        self._nan_in_row = 0
        self.step += 1
        return {"lr": lr, "sums": sums, "samples": sums.samples, "loss": sums.loss / sums.micro}

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> dict:
        t = self.cfg.train
        A = len(self.arm_names)
        self.engine.train()
        self._it = iter(self.loader)
        if self._resumed_rng is not None:
            checkpoint.set_rng_state(self._resumed_rng)
        window_start, self.data_wait = time.perf_counter(), 0.0
        window = {"samples": 0, "tokens": torch.zeros((), dtype=torch.float64, device=self.device)}
        first_step, history = self.step, []
        status, stopped_by = "FINISHED", None
        try:
            while self.step < t.steps:
                m = self.train_step()
                if m is None:
                    continue
                sums = m["sums"]
                window["samples"] += m["samples"]
                window["tokens"] += sums.tokens
                log_now = self.step % t.log_every == 0 or self.step == t.steps or self.step == first_step + 1
                # one small all-reduce per step: the stop flag, the per-source losses adaptive mixing
                # needs every step, and on log steps everything logged
                got = self._sum_over_ranks(
                    stop=float(bool(self.stop)),
                    **({"arms": sums.arms()} if self.adaptive else {}),
                    **(self._window(sums, window) if log_now else {}),
                )
                stop_now = got["stop"][0] > 0
                if self.adaptive:
                    total, count = got["arms"][:A], got["arms"][A:]
                    self.loader.report_loss(
                        {n: a / c for n, a, c in zip(self.arm_names, total, count) if c > 0}
                    )
                if stop_now and not log_now:  # the stop step is always logged
                    log_now = True
                    got = self._sum_over_ranks(**self._window(sums, window))
                if log_now:
                    metrics = self._metrics(got, m["lr"], time.perf_counter() - window_start)
                    history.append((self.step, metrics["loss"]))
                    self._log(metrics)
                    window_start, self.data_wait = time.perf_counter(), 0.0
                    window = {"samples": 0, "tokens": torch.zeros_like(window["tokens"])}
                if self.checkpoints and (self.step % t.ckpt_every == 0 or self.step == t.steps or stop_now):
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
        self._it.close()  # the loader's workers stop now, not at interpreter exit
        if stopped_by is not None and self.rank == 0:
            log.warning("stopped by signal at step %d after checkpointing", self.step)
            requeue_slurm_job()
        return {"step": self.step, "history": history, "stopped": stopped_by is not None}

    def _window(self, sums: StepSums, window: dict) -> dict:
        """What a log line needs, still on the device: this step's sums, the window's samples, tokens
        and data wait, the skip counts (same keys on every rank)."""
        skips = self.loader.skip_counts()
        self._skip_names = sorted(skips)
        self._part_names = sorted(sums.parts)
        return {
            "step": sums.logged(),
            "window": [window["samples"], window["tokens"], self.data_wait],
            "skips": [float(skips[n]) for n in self._skip_names],
        }

    def _sum_over_ranks(self, **named) -> dict[str, list[float]]:
        """Named tensors / numbers / lists of them, summed over ranks in ONE all-reduce: the only
        place a step waits for the device."""

        def flat(v) -> torch.Tensor:
            if torch.is_tensor(v):
                return v.reshape(-1).to(self.device, torch.float64)
            if isinstance(v, list):
                return (
                    torch.cat([flat(x) for x in v])
                    if v
                    else torch.zeros(0, dtype=torch.float64, device=self.device)
                )
            return torch.tensor([float(v)], dtype=torch.float64, device=self.device)

        parts = {k: flat(v) for k, v in named.items()}
        total = torch.cat(list(parts.values()))
        dist.all_reduce(total)
        out, i = {}, 0
        for k, v in parts.items():
            out[k] = total[i : i + v.numel()].tolist()
            i += v.numel()
        return out

    def _metrics(self, got: dict, lr: float, elapsed: float) -> dict:
        A = len(self.arm_names)
        step, (samples, tokens, wait) = got["step"], got["window"]
        loss, micro, arm_loss, arm_count = step[0], step[1], step[3 : 3 + A], step[3 + A : 3 + 2 * A]
        parts = step[3 + 2 * A :]
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss / micro,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens / elapsed,
            "data_wait_frac": min(1.0, wait / self.world / elapsed),
            "nan_skips": self.nan_skips,
            **{f"{n}_loss": v / micro for n, v in zip(self._part_names, parts)},  # lm_loss, align_loss
            **{f"loss/{n}": a / c for n, a, c in zip(self.arm_names, arm_loss, arm_count) if c > 0},
            **{f"skipped/{n}": v for n, v in zip(self._skip_names, got["skips"])},
            **mfu_metrics(self.flops_per_sample, samples / elapsed, self.world, self.peak_flops),
        }

    def _log(self, metrics: dict) -> None:
        if self.rank != 0:
            return
        t = self.cfg.train
        rate = metrics["samples_per_s"] / max(1, t.global_batch)  # steps per second
        eta = (t.steps - self.step) / rate if rate > 0 else float("inf")
        log.info(
            "step %d/%d loss %.4f lr %.2e gnorm %.3f %.1f samples/s data-wait %.0f%% eta %s",
            self.step,
            t.steps,
            metrics["loss"],
            metrics["lr"],
            metrics["grad_norm"],
            metrics["samples_per_s"],
            100 * metrics["data_wait_frac"],
            _hms(eta),
        )
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
        if result["step"] >= cfg.train.steps:  # the trained connector/ (for `simvlg eval` and as
            trainer.model.save_trained(run_dir, step=result["step"])  # init_connector) or pformer/
        losses = [loss for _, loss in result["history"]]
        summary = {
            "steps": result["step"],
            "stopped_by_signal": result["stopped"],
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "nan_skips": trainer.nan_skips,
            "wall_s": round(time.time() - t0, 1),
            "mlflow_run_id": trainer.tracker.run_id if trainer.tracker else None,
        }
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        print_summary(summary)
    return result


def print_summary(summary: dict) -> None:
    width = max(len(k) for k in summary)
    print(
        "\n".join(
            ["", "training summary", "-" * (width + 24)] + [f"{k:<{width}}  {v}" for k, v in summary.items()]
        ),
        file=sys.stderr,
    )
