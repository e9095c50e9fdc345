"""The worker stage of the loader: in each DataLoader worker, one logical worker mixes its source
streams into batches, decodes and transforms the samples and collates them (tokenisation included).

Batch n of logical worker l on rank r is a pure function of (seed, rank, l, epoch, n, the per-source
stream positions, the mixing shares): see pipeline/data/loader.py for the guarantees this gives.

With tasks (data.sources[].tasks), each slot of a batch draws a mixing arm, a (source, task) pair
(mixing.py); the task's (text input, target) is made from the slot's sample, with the rest of the
batch as the pool of negatives (tasks.py), by the batch's RNG; the tokenizer's `pairs` lays out each
row as [BOS, text input | target, end]. Extra batch keys: task, arm_idx, text_inputs, targets.
"""

from __future__ import annotations

import functools
import io
import json
import random
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from .formats.shards import IMAGE_EXTS, VIDEO_EXTS, resolve_lazy
from .mixing import Arm, ShareSchedule, choose, make_arms, normalize
from .streams import Source, SourceStream, _Dead, stable_seed
from .tasks import make_example, objects_from_labels
from .transforms import build_transform, pre_caption, stack_hwc
from .video import video_frames


@dataclass
class BatchMeta:
    """Where a logical worker stands after a batch: travels with the batch to the loader (which keeps
    it as its resume state and sums the skips), never to the trainer."""

    worker: int  # logical worker
    epoch: int
    batches: int  # batches this worker has made this epoch, this one included
    positions: list[list[int]]  # per source stream: [segment, raw samples pulled in it]
    skips: dict[str, dict[str, int]]  # since the previous batch: {source: {cause: count}}


class MixedStream(IterableDataset):
    """The worker side: yields (BatchMeta, collated batch) pairs; the batch is None when an eval pass
    ends with skips after its last full batch (they still reach the trainer's counts)."""

    def __init__(
        self,
        sources: list[Source],
        *,
        data_cfg,
        tokenize,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        train: bool,
        epoch_batches: int | None,
        arms: list[Arm] | None = None,
        schedule: ShareSchedule | None = None,
    ):
        super().__init__()
        self.sources = sources
        self.names = [s.name for s in sources]
        self.mixing = data_cfg.mixing
        self.mode = "eval" if not train else ("resampled" if data_cfg.resampled else "epoch")
        self.shard_shuffle = data_cfg.shard_shuffle
        self.buffer = data_cfg.shuffle_buffer
        self.max_words = data_cfg.max_words
        self.num_frames = data_cfg.num_frames
        self.frame_sampling = data_cfg.frame_sampling if train else "uniform"
        self.transform = build_transform(data_cfg.image_size, data_cfg.min_scale, data_cfg.hflip, train)
        self.tokenize = tokenize
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.train = train
        self.epoch_batches = epoch_batches
        self.source_shares = normalize([s.weight for s in sources])
        self.arms = arms or make_arms(
            self.names, [s.weight for s in sources], [{"captioning": 1.0}] * len(sources)
        )
        self.static_shares = [a.weight for a in self.arms]
        self.schedule = schedule  # adaptive: the shares of each batch, published by the trainer's side
        self.tasks = data_cfg.tasks
        self.arm_of = {(a.source, a.task): i for i, a in enumerate(self.arms)}
        self.tasks_on = train and any(a.task != "captioning" for a in self.arms)
        self.needs_labels = [self.tasks_on and (i, "objects") in self.arm_of for i in range(len(sources))]
        self.prompt = getattr(tokenize, "prompt", "")  # captioning's and completion's text input
        self.tokenize_pairs = getattr(tokenize, "pairs", None) if self.tasks_on else None
        if self.tasks_on and tokenize is not None and self.tokenize_pairs is None:
            raise ValueError("tasks need a tokenizer with pairs(text_inputs, targets) (CaptionTokenizer)")
        if self.tasks_on:  # rows are tokenised as (text input, target) pairs, not as captions
            self.tokenize = None
        self.salt = 0  # bumped by a non-strict load_state_dict
        self.start: dict = {"epoch": 0, "offset": 0, "workers": {}}

    # -- per-worker setup
    def _shares(self, g: int | None = None) -> list[float]:
        """Arm shares of global batch g (adaptive: as published for it), else the configured ones."""
        if self.schedule is not None and g is not None:
            return self.schedule.get(g)
        return self.static_shares

    def _batch_index(self, lw: int, W: int, epoch: int, n: int) -> int:
        """Batch n (0-based) of logical worker l is the trainer's (n·W + l)-th batch of the epoch (the
        DataLoader takes workers in turn; a resume rotates them so this still holds)."""
        return epoch * (self.epoch_batches or 0) + n * W + lw

    def __iter__(self):
        info = get_worker_info()
        p, W = (info.id, info.num_workers) if info is not None else (0, 1)
        lw = (p + self.start["offset"]) % W
        yield from self._batches(lw, W)

    def _quota(self, lw: int, W: int) -> int | None:
        E = self.epoch_batches
        if E is None:
            return None
        return E // W + (1 if lw < E % W else 0)

    def _batches(self, lw: int, W: int):
        epoch = self.start["epoch"]
        st = self.start["workers"].get(str(lw), {})
        n = int(st.get("batches", 0))
        pos = [tuple(p) for p in st.get("pos", [(0, 0)] * len(self.sources))]
        skips: dict = defaultdict(lambda: defaultdict(int))

        def on_skip(i, kind):
            skips[self.names[i]][kind] += 1

        seed = stable_seed(self.seed, self.salt)
        streams, alive = [], []
        for i, (s, start) in enumerate(zip(self.sources, pos)):
            stream = functools.partial(
                SourceStream,
                i,
                s,
                seed=seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                worker=lw,
                num_workers=W,
                mode=self.mode,
                shard_shuffle=self.shard_shuffle,
                buffer=self.buffer,
                on_skip=on_skip,
            )
            try:
                streams.append(stream(start=start))
                alive.append(True)
            except (StopIteration, _Dead):  # ran out while fast-forwarding
                streams.append(stream())
                alive.append(False)
        quota = self._quota(lw, W)
        if self.mode == "eval":
            yield from self._eval_batches(streams, lw, epoch, n, skips, on_skip)
            return
        while quota is None or n < quota:
            rng = random.Random(stable_seed(seed, "batch", self.rank, lw, epoch, n))
            shares = self._shares(self._batch_index(lw, W, epoch, n))  # per arm
            items, labels, arms = [], [], []
            src = choose(self.source_shares, rng, alive) if self.mixing == "batch" else None
            due = self._minimum(src, alive)  # arms still owed their per-batch minimum
            while len(items) < self.batch_size:
                arm = due.pop(0) if due else self._draw_arm(shares, rng, src, alive)
                s = self.arms[arm].source
                got = self._next_item(streams[s], rng, on_skip)
                if got is None:  # source dead
                    alive[s] = False
                    skips[self.names[s]]["dead_source"] += 1
                    warnings.warn(
                        f"data source {self.names[s]!r} gives no samples on rank {self.rank} "
                        f"worker {lw}; mixing continues without it",
                        stacklevel=2,
                    )
                    if not any(alive):
                        raise RuntimeError(
                            f"no data source gives samples on rank {self.rank} worker {lw}: "
                            f"check the shards of {self.names}"
                        )
                    if self.mixing == "batch":
                        src = choose(self.source_shares, rng, alive)
                        due = self._minimum(src, alive)
                    due = [a for a in due if alive[self.arms[a].source]]
                    continue
                items.append(got[0])
                labels.append(got[1])
                arms.append(arm)
            n += 1
            meta, batch = self._collate(items, lw, epoch, n, streams, skips)
            if self.tasks_on:
                batch.update(self._task_rows(items, labels, arms, rng))
            else:
                batch["arm_idx"] = batch["source_idx"]
            yield meta, batch
            skips.clear()

    # -- arms and tasks
    def _minimum(self, src: int | None, alive: list[bool]) -> list[int]:
        """data.tasks.minimum_per_batch slots of every arm (of the batch's source in batch mode)."""
        m = self.tasks.minimum_per_batch
        return [
            a
            for a, arm in enumerate(self.arms)
            for _ in range(m)
            if alive[arm.source] and (src is None or arm.source == src)
        ]

    def _draw_arm(self, shares: list[float], rng: random.Random, src: int | None, alive: list[bool]) -> int:
        if src is None:  # sample / adaptive: every slot draws its arm
            return choose(shares, rng, [alive[a.source] for a in self.arms])
        mine = [a for a, arm in enumerate(self.arms) if arm.source == src]
        if len(mine) == 1:  # batch mode, one task: no draw (the RNG sequence of a task-free config)
            return mine[0]
        return choose(shares, rng, [a.source == src for a in self.arms])

    def _task_rows(self, items, labels, arms, rng: random.Random) -> dict:
        """Each slot's (text input, target) for its arm's task; the rest of the batch is the pool. A
        sample that cannot make its task (no labels, a one-word caption) makes a caption, and its loss
        counts for the source's captioning arm where there is one."""
        captions = [it[1] for it in items]
        pool = list(zip(captions, labels))
        t = self.tasks
        examples = [
            make_example(
                self.arms[a].task,
                captions[i],
                labels[i],
                rng,
                pool=pool[:i] + pool[i + 1 :],
                prompt=self.prompt,
                kinds=t.question_kinds,
                mask_rate=t.mask_rate,
            )
            for i, a in enumerate(arms)
        ]
        arm_idx = [self.arm_of.get((self.arms[a].source, ex.task), a) for a, ex in zip(arms, examples)]
        rows = {
            "task": [ex.task for ex in examples],
            "arm_idx": torch.tensor(arm_idx, dtype=torch.long),
            "text_inputs": [ex.text_input for ex in examples],
            "targets": [ex.target for ex in examples],
        }
        if self.tokenize_pairs is not None:
            rows.update(self.tokenize_pairs(rows["text_inputs"], rows["targets"]))
        return rows

    def _eval_batches(self, streams, lw, epoch, n, skips, on_skip):
        rng = random.Random(0)
        items: list = []
        for stream in streams:
            while True:
                try:
                    raw = stream.next()
                except (StopIteration, _Dead):
                    break
                item = self._decode(raw, stream.index, rng, on_skip)
                if item is None:
                    continue
                items.append(item)
                if len(items) == self.batch_size:
                    n += 1
                    yield self._collate(items, lw, epoch, n, streams, skips)
                    items = []
                    skips.clear()
        if items:
            n += 1
            yield self._collate(items, lw, epoch, n, streams, skips)
        elif skips:  # skips after the last full batch still reach the trainer
            yield self._meta(lw, epoch, n, streams, skips), None

    def _next_item(self, stream: SourceStream, rng: random.Random, on_skip):
        """(decoded item, object labels or None), or None when the source has run dry."""
        while True:
            try:
                raw = stream.next()
            except (StopIteration, _Dead):
                return None
            item = self._decode(raw, stream.index, rng, on_skip)
            if item is None:
                continue
            if not self.needs_labels[stream.index]:
                return item, None
            try:
                return item, self._labels(raw)
            except ValueError:  # malformed labels: the sample is lost, counted
                on_skip(stream.index, "bad_labels")

    @staticmethod
    def _labels(raw: dict) -> dict | None:
        """The sample json's "labels" ({"objects": [...]}, tasks.py), checked; None without."""
        js = raw.get("json")
        if js is None or b'"labels"' not in js:
            return None
        meta = json.loads(js)
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if labels is not None and not isinstance(labels, dict):
            raise ValueError(f"labels must be an object, got {type(labels).__name__}")
        objects_from_labels(labels)  # raises on a malformed entry
        return labels

    # -- decode one raw sample (never unpickles: only image/video/txt/json members were read)
    def _caption(self, raw: dict, rng: random.Random) -> str:
        cap = None
        js = raw.get("json")
        if js is not None and (b'"captions"' in js or "txt" not in raw):
            try:
                meta = json.loads(js)
            except ValueError:
                meta = None
            if isinstance(meta, dict):
                caps = meta.get("captions")
                if isinstance(caps, list):
                    caps = [c for c in caps if isinstance(c, str) and c.strip()]
                    if caps:
                        cap = rng.choice(caps) if self.train else caps[0]
                if cap is None and isinstance(meta.get("caption"), str):
                    cap = meta["caption"]
        if cap is None and "txt" in raw:
            cap = raw["txt"].decode("utf-8", "replace")
        return pre_caption(cap, self.max_words) if cap else ""

    def _decode(self, raw: dict, si: int, rng: random.Random, on_skip):
        try:
            resolve_lazy(raw)
        except OSError:
            on_skip(si, "corrupt_tar")
            return None
        kind = self.sources[si].kind
        damaged = raw.get("__damaged__")  # next to damage in its tar: a loss there is corrupt_tar
        if kind == "text":  # a sentence: its txt/json only (the stream never read any media)
            caption = self._caption(raw, rng)
            if not caption:
                on_skip(si, "corrupt_tar" if damaged else "missing_caption")
                return None
            return None, caption, si, raw["__key__"]
        exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
        ext = next((e for e in exts if e in raw), None)
        if ext is None:
            on_skip(
                si, "corrupt_tar" if damaged else "oversized" if raw.get("__oversized__") else "missing_image"
            )
            return None
        caption = self._caption(raw, rng)
        if not caption:
            on_skip(si, "corrupt_tar" if damaged else "missing_caption")
            return None
        if kind == "video":
            try:
                pixels = video_frames(raw[ext], self.transform, self.num_frames, self.frame_sampling, rng)
            except Exception:  # any decoder failure is a corrupt sample
                on_skip(si, "corrupt_tar" if damaged else "corrupt_video")
                return None
        else:
            try:
                with Image.open(io.BytesIO(raw[ext])) as im:
                    img = im.convert("RGB")
            except Exception:  # truncated, not an image, decompression bomb, ...
                on_skip(si, "corrupt_tar" if damaged else "corrupt_image")
                return None
            pixels = self.transform.apply(img, self.transform.params(img.width, img.height, rng))
        return pixels, caption, si, raw["__key__"]

    @staticmethod
    def _meta(lw, epoch, n, streams, skips) -> BatchMeta:
        return BatchMeta(
            worker=lw,
            epoch=epoch,
            batches=n,
            positions=[s.position for s in streams],
            skips={k: dict(v) for k, v in skips.items()},
        )

    def _collate(self, items, lw, epoch, n, streams, skips) -> tuple[BatchMeta, dict]:
        pixels, captions, sis, keys = zip(*items)
        # uint8 across the process boundary (a quarter of float32's bytes); the vision tower
        # normalises on the training device. Text sources have no pixels (a batch is one kind).
        batch = {} if pixels[0] is None else {"pixel_values": stack_hwc(pixels)}
        if self.tokenize is not None:
            batch.update(self.tokenize(list(captions)))
        batch.update(
            {
                "captions": list(captions),
                "source": [self.names[i] for i in sis],
                "source_idx": torch.tensor(sis, dtype=torch.long),
                "keys": list(keys),
            }
        )
        return self._meta(lw, epoch, n, streams, skips), batch
