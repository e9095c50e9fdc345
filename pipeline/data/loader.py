"""Streaming WebDataset loader: expand → split → shuffle → mix → decode → transform → collate.

    loader = build_loader(cfg.data, tokenize=tok, batch_size=100, rank=r, world_size=n, seed=42)
    for step, batch in zip(range(steps), loader):
        ... batch["pixel_values"], batch["input_ids"], ...
        loader.report_loss({"laion": 2.1, "coco": 1.7})     # adaptive mixing only
        metrics.update(loader.skip_counts())                # {"laion/corrupt_image": 3, ...}
    ckpt["data"] = loader.state_dict()                      # per rank

Each DataLoader worker runs one *logical worker* (worker.py): one stream per source (streams.py:
shard sequence → tar samples → shuffle buffer), a seeded RNG per batch for source choice,
augmentation, caption and frame choice, and yields whole collated batches (tokenisation included).
Batch n of logical worker l on rank r is a pure function of (seed, rank, l, epoch, n, the per-source
stream positions, the mixing shares). This module is the trainer's side: the DataLoader around the
workers, the consumed position (resume state), skip counts and adaptive-mixing feedback.

Modes
- resampled (train, data.resampled=true): shards drawn with replacement, seeded per
  (seed, source, rank, worker, epoch). Infinite unless `epoch_batches` is given, in which case each
  `iter()` yields exactly `epoch_batches` batches and the next one uses epoch+1 seeds.
- epoch (train, data.resampled=false): each pass permutes a source's shards with a seed shared by all
  ranks, then gives global worker g = rank·W + w the shards g, g+G, ... (G = world·W): disjoint across
  ranks and workers. A source with fewer shards than G is split by sample instead (every worker
  reads every shard, keeps samples i ≡ g mod G). Every rank yields exactly `epoch_batches` batches
  (default Σ num_samples // (batch_size·world_size)): a worker whose shards run out starts its next
  pass, so no rank stops early and collectives never hang.
- eval (train=False): one pass in order, split like epoch mode, eval transforms, last batch partial;
  ranks may end with different batch counts.

Exact resume (what is guaranteed): each source stream is cut into segments of SEGMENT_SHARDS
shards, each with its own shuffle-buffer seed, the buffer draining at the segment's end. A stream's
position is (segment, samples emitted in it), raw samples pulled including skipped ones.
`state_dict()` records, for every logical worker, how many of its batches the trainer consumed and
its streams' positions after the last consumed batch. `load_state_dict()` + `iter()` rebuilds each
stream from its seed, skips earlier segments without any I/O and fast-forwards through at most one
segment (tar headers only for local shards; pipe:/http shards are read but not decoded), then rotates
the worker order so the batch after the checkpoint is the one an uninterrupted run would have produced
next. The resumed sequence is identical to the uninterrupted one (same samples, same crops, same
tasks; tested), in adaptive mode too: batch g uses the shares published for it when the trainer asked
for batch g - delay (mixing.py), and the state holds the loss history and the shares already
published for the batches after the checkpoint (a state written before that existed resumes with the
shares restored from the loss history: close, not exact). Prefetched but unconsumed batches are
dropped and regenerated, never skipped. Requires the same sources, arms (source/task pairs), seed,
rank, world size, num_workers, batch size and mode; otherwise load_state_dict raises (strict) or
starts a fresh epoch with new seeds (strict=False: nothing is guaranteed but fresh data).
Resume cost: one segment's header scan per stream (4 shards of 10k samples: a few seconds).

Skips: unreadable_shard, corrupt_tar (samples lost to a damaged archive: a garbled member header is
skipped and reading resumes after it; a truncated shard keeps the samples before the break),
corrupt_image, corrupt_video, missing_image, missing_caption, oversized, dead_source, bad_labels (a
source with the objects task: a sample whose json "labels" are malformed) — counted per
source in the workers, shipped with each batch, summed in the trainer process over consumed batches
(`skip_counts()`: a fixed key set per source, so ranks can all-reduce it), restored with the state.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader

from .formats.shards import resolve_spec
from .mixing import AdaptiveMixer, make_arms
from .streams import Source
from .worker import MixedStream


@runtime_checkable
class TrainLoader(Protocol):
    """What the trainer needs of its data (StreamingLoader is one; tests pass smaller ones)."""

    def __iter__(self) -> Iterator[dict]: ...  # batches: pixel_values, input_ids, ..., source

    def state_dict(self) -> dict: ...  # the position after the batches consumed so far

    def load_state_dict(self, state: dict, strict: bool = True) -> None: ...

    def skip_counts(self) -> dict[str, int]: ...  # {"<source>/<cause>": n}, the same keys on every rank

    def report_loss(self, losses: dict[str, float]) -> list[float] | None: ...  # adaptive mixing

    @property
    def arm_names(self) -> list[str]: ...  # what each batch's arm_idx / source_idx indexes

    @property
    def adaptive(self) -> bool: ...  # whether report_loss must be fed every step


SKIP_KINDS = (
    "unreadable_shard",
    "corrupt_tar",
    "corrupt_image",
    "corrupt_video",
    "missing_image",
    "missing_caption",
    "oversized",
    "dead_source",
    "bad_labels",
)
STATE_VERSION = 2


def _worker_init(_worker_id: int) -> None:
    """SLURM signals every process of a job step, and the deepspeed launcher terminates its whole
    process tree: a worker killed by that signal would crash its rank before it can checkpoint.
    Workers ignore those signals; instead the kernel kills a worker the moment its rank dies
    (PR_SET_PDEATHSIG), and the rank stops its workers itself (StreamingLoader._stop_workers)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return  # elsewhere PyTorch's worker watchdog ends orphans within a few seconds of idling
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _stop_workers(it) -> None:
    """Shut a DataLoader iterator's workers down now. Left to the interpreter's exit, a worker that
    ignores SIGTERM hangs multiprocessing's final join forever (PyTorch skips its own shutdown
    during interpreter exit)."""
    workers = list(getattr(it, "_workers", []))
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except Exception:  # killing below is the fallback
            pass
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _stop_all_workers() -> None:  # registered after multiprocessing's exit hook, so it runs first
    from torch.utils.data._utils import signal_handling

    for it in list(_LIVE_ITERATORS):
        if getattr(it, "_worker_pids_set", False):  # or PyTorch's SIGCHLD handler reports the kill
            signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in list(getattr(it, "_workers", [])):
            if w.is_alive():
                w.kill()


class StreamingLoader:
    """The trainer side: wraps a torch DataLoader around MixedStream, tracks consumed positions,
    skip counts and data-wait time, and feeds adaptive mixing."""

    def __init__(
        self,
        dataset: MixedStream,
        *,
        num_workers: int,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        mixer: AdaptiveMixer | None = None,
    ):
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.mixer = mixer
        self._state = {"epoch": 0, "consumed": 0, "workers": {}}
        self._skips: dict = defaultdict(lambda: defaultdict(int))
        self.wait_time = 0.0
        self.batches = 0

    @property
    def arm_names(self) -> list[str]:
        """Sources, or source/task pairs when sources name tasks: what batch["arm_idx"] indexes."""
        return [a.name for a in self.dataset.arms]

    @property
    def adaptive(self) -> bool:
        return self.mixer is not None

    @property
    def epoch_batches(self) -> int | None:
        return self.dataset.epoch_batches

    def __len__(self) -> int:
        if self.dataset.epoch_batches is None:
            raise TypeError("an infinite (resampled, no epoch_batches) loader has no length")
        return self.dataset.epoch_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._state["epoch"]:
            self._state = {"epoch": int(epoch), "consumed": 0, "workers": {}}

    def __iter__(self):
        W = max(1, self.num_workers)
        ds = self.dataset
        ds.start = {
            "epoch": self._state["epoch"],
            "offset": self._state["consumed"] % W,
            "workers": {k: dict(v) for k, v in self._state["workers"].items()},
        }
        kw = {}
        if self.num_workers > 0:
            kw = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False}
        # A private generator: the DataLoader draws its base seed when the iterator is created,
        # which must not move the trainer's global torch RNG (dropout) or resume would diverge.
        generator = torch.Generator().manual_seed(self._state["epoch"])
        if self.num_workers > 0:
            kw["worker_init_fn"] = _worker_init
        dl = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            **kw,
        )
        self._publish()
        it = iter(dl)
        _LIVE_ITERATORS.add(it)
        try:
            while True:
                self._publish()
                t0 = time.perf_counter()
                try:
                    meta, batch = next(it)
                except StopIteration:
                    break
                self.wait_time += time.perf_counter() - t0
                self._add_skips(meta.skips)
                if batch is None:  # an eval pass's trailing skips, no batch
                    continue
                self._state["workers"][str(meta.worker)] = {
                    "batches": int(meta.batches),
                    "pos": [[int(a), int(b)] for a, b in meta.positions],
                }
                self._state["consumed"] += 1
                self.batches += 1
                yield batch
        finally:  # an error, or the consumer stopped early (GeneratorExit): workers go now
            _stop_workers(it)
        # a finite epoch ran to its end: the next iter() starts the next epoch
        self._state = {"epoch": self._state["epoch"] + 1, "consumed": 0, "workers": {}}

    def _add_skips(self, skips: dict) -> None:
        for src, kinds in skips.items():
            for k, v in kinds.items():
                self._skips[src][k] += int(v)

    # -- feedback and reporting
    def _consumed_total(self) -> int:
        """Batches consumed since the start of training (the global index of the next one)."""
        return self._state["epoch"] * (self.dataset.epoch_batches or 0) + self._state["consumed"]

    def _publish(self) -> None:
        """Adaptive: before asking for batch k, fix the shares of batches up to k + delay."""
        if self.mixer is not None:
            self.mixer.publish(self._consumed_total() + self.mixer.schedule.delay)

    def report_loss(self, losses: dict[str, float]) -> list[float] | None:
        """Per-arm mean training loss (e.g. all-reduced over ranks) -> new adaptive shares, used from
        the batch `delay` after the next one asked for. A no-op returning None unless data.mixing is
        adaptive."""
        if self.mixer is None:
            return None
        return self.mixer.report_loss(losses)

    def shares(self) -> dict[str, float]:
        """The arms' current shares (adaptive: what the next published batches get)."""
        current = self.mixer.current if self.mixer is not None else self.dataset.static_shares
        return dict(zip(self.arm_names, current))

    def skip_counts(self, nested: bool = False) -> dict:
        """Samples/shards skipped over the consumed batches (restored across resume).

        Default: {"<source>/<cause>": n} for every source x SKIP_KINDS, zeros included, so every rank
        returns the same keys in the same order (safe to all-reduce). nested=True: {source: {cause: n}}
        with the non-zero counts only."""
        if nested:
            return {s: dict(kinds) for s, kinds in self._skips.items() if kinds}
        return {
            f"{s}/{k}": int(self._skips.get(s, {}).get(k, 0)) for s in self.dataset.names for k in SKIP_KINDS
        }

    def stats(self) -> dict:
        return {"data_wait_s": self.wait_time, "batches": self.batches}

    # -- checkpointing
    def _identity(self) -> dict:
        d = self.dataset
        return {
            "sources": d.names,
            "seed": d.seed,
            "rank": d.rank,
            "world_size": d.world_size,
            "num_workers": max(1, self.num_workers),
            "batch_size": d.batch_size,
            "mode": d.mode,
            "mixing": d.mixing,
            "epoch_batches": d.epoch_batches,
            **self._identity_since_tasks(),
        }

    def _identity_since_tasks(self) -> dict:
        """Identity keys a state written before tasks existed does not hold (accepted when absent)."""
        out = {"arms": self.arm_names}
        if self.mixer is not None:
            out["share_delay"] = self.mixer.schedule.delay
        return out

    def state_dict(self) -> dict:
        """JSON-serialisable position of this rank's loader after the batches consumed so far."""
        out = {
            "version": STATE_VERSION,
            **self._identity(),
            "salt": self.dataset.salt,
            "epoch": self._state["epoch"],
            "consumed": self._state["consumed"],
            "workers": {k: dict(v) for k, v in self._state["workers"].items()},
            "skips": self.skip_counts(nested=True),
        }
        if self.mixer is not None:
            out["adaptive"] = self.mixer.state_dict()
            # the shares already fixed for the batches after the consumed ones (mixing.py)
            out["adaptive_published"] = self.mixer.schedule.rows(self._consumed_total())
        return out

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        mine = self._identity()
        new_keys = self._identity_since_tasks()
        diff = {
            k: (state.get(k), v)
            for k, v in mine.items()
            if state.get(k) != v and not (k in new_keys and k not in state)
        }
        self._skips = defaultdict(lambda: defaultdict(int))
        for s, kinds in state.get("skips", {}).items():
            for k, v in kinds.items():
                self._skips[s][k] = int(v)
        if self.mixer is not None and "adaptive" in state:
            self.mixer.load_state_dict(state["adaptive"])
        if diff:
            if strict:
                raise ValueError(
                    "data loader state does not match this loader (exact resume impossible): "
                    + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                )
            # approximate: fresh streams with new seeds, so nothing is replayed in distribution
            self.dataset.salt = int(state.get("salt", 0)) + 1
            self._state = {"epoch": int(state.get("epoch", 0)), "consumed": 0, "workers": {}}
            return
        self.dataset.salt = int(state.get("salt", 0))
        self._state = {
            "epoch": int(state["epoch"]),
            "consumed": int(state["consumed"]),
            "workers": {
                str(k): {"batches": int(v["batches"]), "pos": [[int(a), int(b)] for a, b in v["pos"]]}
                for k, v in state["workers"].items()
            },
        }
        if self.mixer is not None and "adaptive_published" in state:
            self.mixer.schedule.restore(self._consumed_total(), state["adaptive_published"])


def resolve_sources(data_cfg) -> list[Source]:
    if not data_cfg.sources:
        raise ValueError("data.sources is empty: name at least one shard source")
    out = []
    for i, s in enumerate(data_cfg.sources):
        try:
            urls, total = resolve_spec(s.shards)
        except ValueError as e:
            raise ValueError(f"data.sources.{i} ({s.name}): {e}") from None
        out.append(Source(s.name, urls, float(s.weight), s.kind, s.num_samples or total))
    return out


def build_loader(
    data_cfg,
    *,
    tokenize,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    train: bool = True,
    epoch_batches: int | None = None,
    num_workers: int | None = None,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> StreamingLoader:
    """A loader over `data_cfg.sources` for one rank (see the module docstring for the guarantees).

    tokenize: picklable `list[str] -> dict(input_ids, attention_mask, labels)` run in the workers, or
    None for pixels and captions only. num_workers defaults to data_cfg.num_workers.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    sources = resolve_sources(data_cfg)
    kinds = {s.kind for s in sources}
    if len(kinds) > 1 and data_cfg.mixing != "batch" and train:
        raise ValueError(
            f"sources of different kinds ({', '.join(sorted(kinds))}) can only be mixed with "
            "data.mixing: batch (a batch holds one kind)"
        )
    if train and not data_cfg.resampled and epoch_batches is None:
        if any(s.num_samples is None for s in sources):
            missing = [s.name for s in sources if s.num_samples is None]
            raise ValueError(
                f"epoch mode (data.resampled: false) needs num_samples for {missing} "
                "(set data.sources.N.num_samples, point shards at a manifest.json, or pass "
                "epoch_batches)"
            )
        epoch_batches = sum(s.num_samples for s in sources) // (batch_size * world_size)
        if epoch_batches < 1:
            raise ValueError(
                f"epoch mode: {sum(s.num_samples for s in sources)} samples are fewer than "
                f"one batch of {batch_size} per rank on {world_size} ranks"
            )
    if not train:
        epoch_batches = None
    arms = make_arms(
        [s.name for s in sources], [s.weight for s in sources], [dict(s.tasks) for s in data_cfg.sources]
    )
    check_arms(data_cfg, [a.name for a in arms], batch_size, train)
    nw = data_cfg.num_workers if num_workers is None else num_workers
    mixer = None
    if data_cfg.mixing == "adaptive" and train:
        # shares are fixed `delay` batches ahead, past what the workers have prefetched (mixing.py)
        mixer = AdaptiveMixer(
            [a.name for a in arms],
            [a.weight for a in arms],
            data_cfg.adaptive_floor,
            data_cfg.adaptive_window,
            delay=nw * prefetch_factor + 1,
        )
    ds = MixedStream(
        sources,
        data_cfg=data_cfg,
        tokenize=tokenize,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        train=train,
        epoch_batches=epoch_batches,
        arms=arms,
        schedule=mixer.schedule if mixer else None,
    )
    return StreamingLoader(
        ds, num_workers=nw, prefetch_factor=prefetch_factor, pin_memory=pin_memory, mixer=mixer
    )


def check_arms(data_cfg, arms: list[str], batch_size: int, train: bool = True) -> None:
    """What the mixing over arms cannot do (preflight runs the same before a launch)."""
    from .tasks import QUESTION_KINDS

    bad = [k for k in data_cfg.tasks.question_kinds if k not in QUESTION_KINDS]
    if bad:
        raise ValueError(f"data.tasks.question_kinds: unknown {bad}; kinds: {', '.join(QUESTION_KINDS)}")
    if not train:
        return
    if data_cfg.mixing == "adaptive" and len(arms) * data_cfg.adaptive_floor >= 1:
        raise ValueError(
            f"data.adaptive_floor {data_cfg.adaptive_floor} x {len(arms)} mixing arms >= 1: "
            "every share would be pinned at the floor; lower the floor"
        )
    m = data_cfg.tasks.minimum_per_batch
    per_batch = len(arms) if data_cfg.mixing != "batch" else max(len(s.tasks) for s in data_cfg.sources)
    if m * per_batch > batch_size:
        raise ValueError(
            f"data.tasks.minimum_per_batch {m} x {per_batch} mixing arms is more than a "
            f"micro-batch of {batch_size} ({', '.join(arms)})"
        )


__all__ = ["SKIP_KINDS", "StreamingLoader", "TrainLoader", "build_loader", "check_arms", "resolve_sources"]
