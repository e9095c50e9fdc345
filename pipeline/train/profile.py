"""Where a training step's time goes, on one rank: `simvlg bench step` attaches this to a Trainer.

    prof = StepProfiler(trainer, warmup=3).attach()
    trainer.fit()
    prof.totals()       # {phase: seconds over the measured steps}, plus steps, samples, tokens

Phases are exclusive (a collective inside the backward counts as communication, not backward):
  data                 waiting for the loader's next batch
  vit_forward          the frozen ViT (+ temporal modules for video)
  connector_forward    TomeFormer / Q-Former and the projections
  llm_forward          the frozen LLM and the loss
  llm_backward         from the loss back to the soft prompt's gradient
  connector_backward   from there to the end of the backward pass (ZeRO's gradient hooks included)
  optimizer            DeepSpeed's step (overflow check, clipping, AdamW, ZeRO's parameter gather)
  communication        host time inside torch.distributed collectives (gloo: the whole transfer;
                       NCCL: the launch only, the transfer overlaps and shows up where it is waited on)
  other                the rest of the step (bookkeeping, the per-step all-reduce's Python side)
On a GPU every phase boundary synchronises the device, so the figures are device time; this costs a
little throughput, which is why only the benchmark does it.

`emulate_legacy_syncs` adds back what the training loop did before it stopped waiting for the device:
a host read of the loss and a one-element all-reduce per micro-batch, and a metrics all-reduce every
step, so `--vs legacy` can show both side by side in one run.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist

PHASES = (
    "data",
    "vit_forward",
    "connector_forward",
    "llm_forward",
    "llm_backward",
    "connector_backward",
    "optimizer",
    "communication",
    "other",
)
COLLECTIVES = (
    "all_reduce",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "reduce_scatter",
    "all_gather",
    "broadcast",
    "reduce",
    "barrier",
    "all_to_all_single",
)


class StepProfiler:
    def __init__(self, trainer, *, warmup: int = 2, emulate_legacy_syncs: bool = False):
        self.trainer, self.warmup, self.legacy = trainer, warmup, emulate_legacy_syncs
        self.cuda = trainer.device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.mark = time.perf_counter()
        self.steps = self.samples = 0
        self.tokens = 0.0
        self.step_seconds = 0.0
        self.snapshot: dict[str, float] = {}
        self.cycle_start = self.mark
        self.last = {"samples": 0, "tokens": 0.0}

    # -- exclusive phase timing ---------------------------------------------------------------------
    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def enter(self, phase: str) -> None:
        now = self._now()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.mark
        self.stack.append(phase)
        self.mark = now

    def exit(self) -> None:
        now = self._now()
        self.seconds[self.stack.pop()] += now - self.mark
        self.mark = now

    def switch(self, phase: str) -> None:
        if self.stack:
            self.exit()
        self.enter(phase)

    def _timed(self, phase: str, fn):
        def wrapper(*a, **kw):
            self.enter(phase)
            try:
                return fn(*a, **kw)
            finally:
                self.exit()

        return wrapper

    # -- hooks ----------------------------------------------------------------------------------------
    def attach(self) -> StepProfiler:
        tr = self.trainer
        model = tr.model
        for name, phase in (
            ("vision", "vit_forward"),
            ("connector", "connector_forward"),
            ("llm", "llm_forward"),
        ):
            module = getattr(model, name)
            module.register_forward_pre_hook(lambda *_, p=phase: self.enter(p))
            module.register_forward_hook(lambda *_: self.exit())
        soft_prompt = model.soft_prompt

        def soft_prompt_with_hook(*a, **kw):
            out = soft_prompt(*a, **kw)
            if out.requires_grad:  # its gradient ends the LLM's backward
                out.register_hook(lambda g: (self.switch("connector_backward"), g)[1])
            return out

        model.soft_prompt = soft_prompt_with_hook
        backward = tr.engine.backward

        def timed_backward(loss, *a, **kw):
            self.enter("llm_backward")
            try:
                return backward(loss, *a, **kw)
            finally:
                self.exit()

        tr.engine.backward = timed_backward
        tr.engine.step = self._timed("optimizer", tr.engine.step)
        tr._next_batch = self._timed("data", tr._next_batch)
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._timed("communication", getattr(dist, name)))
        if self.legacy:
            forward_backward = tr._forward_backward

            def with_syncs(batch):
                out = forward_backward(batch)
                float(out["loss"].item())  # the per-micro-batch host read
                dist.all_reduce(torch.ones(1, device=tr.device))  # the per-micro-batch finite-loss vote
                return out

            tr._forward_backward = with_syncs
        train_step = tr.train_step
        first = tr.step

        def counted_step():
            # A cycle runs from the start of one step to the start of the next, so it includes what
            # fit() does between steps (the per-step all-reduce, logging). The first `warmup` steps
            # are not measured; the caller runs one step more than it wants measured.
            now = self._now()
            done = tr.step - first
            if done == self.warmup:
                self.seconds.clear()
                self.mark, self.cycle_start = now, now
            elif done > self.warmup:
                self.step_seconds += now - self.cycle_start
                self.steps += 1
                self.samples += self.last["samples"]
                self.tokens += self.last["tokens"]
                self.snapshot = dict(self.seconds)
                self.cycle_start = now
            out = train_step()
            if out is not None:
                if self.legacy:  # the old per-step metrics all-reduce
                    vec = torch.zeros(4 + 2 * len(tr.arm_names), dtype=torch.float64, device=tr.device)
                    dist.all_reduce(vec)
                    vec.tolist()
                self.last = {"samples": out["samples"], "tokens": float(out["sums"].tokens)}
            return out

        tr.train_step = counted_step
        return self

    def totals(self) -> dict:
        """Seconds per phase over the measured steps ("other": the step's time no phase claimed)."""
        out = {p: self.snapshot.get(p, 0.0) for p in PHASES if p != "other"}
        out["other"] = max(0.0, self.step_seconds - sum(out.values()))
        return {
            "phases": out,
            "steps": self.steps,
            "samples": self.samples,
            "tokens": self.tokens,
            "seconds": self.step_seconds,
        }
