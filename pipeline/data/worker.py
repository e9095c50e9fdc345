"""The worker stage of the loader: in each DataLoader worker, one logical worker mixes its source
streams into batches, decodes and transforms the samples and collates them (tokenisation included).

Batch n of logical worker l on rank r is a pure function of (seed, rank, l, epoch, n, the per-source
stream positions, the mixing shares): see pipeline/data/loader.py for the guarantees this gives.
"""

from __future__ import annotations

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
from .mixing import choose, normalize
from .streams import Source, SourceStream, _Dead, stable_seed
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

    def __init__(self, sources: list[Source], *, data_cfg, tokenize, batch_size: int, rank: int,
                 world_size: int, seed: int, train: bool, epoch_batches: int | None,
                 shares_tensor: torch.Tensor | None):
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
        self.static_shares = normalize([s.weight for s in sources])
        self.shares_tensor = shares_tensor
        self.salt = 0  # bumped by a non-strict load_state_dict
        self.start: dict = {"epoch": 0, "offset": 0, "workers": {}}

    # -- per-worker setup
    def _shares(self) -> list[float]:
        if self.shares_tensor is not None:
            return self.shares_tensor.tolist()
        return self.static_shares

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
            try:
                streams.append(SourceStream(i, s, seed=seed, epoch=epoch, rank=self.rank,
                                            world_size=self.world_size, worker=lw, num_workers=W,
                                            mode=self.mode, shard_shuffle=self.shard_shuffle,
                                            buffer=self.buffer, on_skip=on_skip, start=start))
                alive.append(True)
            except (StopIteration, _Dead):  # ran out while fast-forwarding
                streams.append(SourceStream(i, s, seed=seed, epoch=epoch, rank=self.rank,
                                            world_size=self.world_size, worker=lw, num_workers=W,
                                            mode=self.mode, shard_shuffle=self.shard_shuffle,
                                            buffer=self.buffer, on_skip=on_skip))
                alive.append(False)
        quota = self._quota(lw, W)
        if self.mode == "eval":
            yield from self._eval_batches(streams, lw, epoch, n, skips, on_skip)
            return
        while quota is None or n < quota:
            rng = random.Random(stable_seed(seed, "batch", self.rank, lw, epoch, n))
            shares = self._shares()
            items: list = []
            src = choose(shares, rng, alive) if self.mixing == "batch" else None
            while len(items) < self.batch_size:
                if self.mixing != "batch":
                    src = choose(shares, rng, alive)
                item = self._next_item(streams[src], rng, on_skip)
                if item is None:  # source dead
                    alive[src] = False
                    skips[self.names[src]]["dead_source"] += 1
                    warnings.warn(f"data source {self.names[src]!r} gives no samples on rank {self.rank} "
                                  f"worker {lw}; mixing continues without it", stacklevel=2)
                    if not any(alive):
                        raise RuntimeError(f"no data source gives samples on rank {self.rank} worker {lw}: "
                                           f"check the shards of {self.names}")
                    if self.mixing == "batch":
                        src = choose(shares, rng, alive)
                    continue
                items.append(item)
            n += 1
            yield self._collate(items, lw, epoch, n, streams, skips)
            skips.clear()

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
        while True:
            try:
                raw = stream.next()
            except (StopIteration, _Dead):
                return None
            item = self._decode(raw, stream.index, rng, on_skip)
            if item is not None:
                return item

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
            on_skip(si, "corrupt_tar" if damaged else
                    "oversized" if raw.get("__oversized__") else "missing_image")
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
        return BatchMeta(worker=lw, epoch=epoch, batches=n, positions=[s.position for s in streams],
                         skips={k: dict(v) for k, v in skips.items()})

    def _collate(self, items, lw, epoch, n, streams, skips) -> tuple[BatchMeta, dict]:
        pixels, captions, sis, keys = zip(*items)
        # uint8 across the process boundary (a quarter of float32's bytes); the vision tower
        # normalises on the training device. Text sources have no pixels (a batch is one kind).
        batch = {} if pixels[0] is None else {"pixel_values": stack_hwc(pixels)}
        if self.tokenize is not None:
            batch.update(self.tokenize(list(captions)))
        batch.update({
            "captions": list(captions),
            "source": [self.names[i] for i in sis],
            "source_idx": torch.tensor(sis, dtype=torch.long),
            "keys": list(keys),
        })
        return self._meta(lw, epoch, n, streams, skips), batch
