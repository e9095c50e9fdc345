"""One source's raw samples for one logical worker: its shard sequence, cut into segments, through a
shuffle buffer, with a position that a resume restores without replaying or skipping anything.

The loader's guarantees (modes, exact resume, skips) are described in pipeline/data/loader.py; this
module is the bottom of that stack: shard urls -> tar samples (pipeline/data/shards.py) -> shuffled
raw samples `{"__key__", ext: bytes}`, counted per (segment, samples emitted in it).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from .formats.shards import ALLOWED_EXTS, TEXT_EXTS, iter_tar_samples

SEGMENT_SHARDS = 4  # shards per stream segment: the most a resume has to fast-forward through


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts, identical in every process (no hash randomisation)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float
    kind: str = "image"
    num_samples: int | None = None


class _Dead(Exception):
    pass


class SourceStream:
    """One source's raw samples for one logical worker.

    The shard sequence (resampled: drawn with replacement; epoch/eval: this worker's share of a pass)
    is cut into *segments* of SEGMENT_SHARDS shards (a pass end also ends a segment). Each segment has
    its own shuffle-buffer seed and the buffer drains at its end, so a position is (segment, samples
    emitted in it) and resuming skips whole segments for free (no I/O), then fast-forwards at most one
    segment by scanning tar headers.
    """

    def __init__(
        self,
        index: int,
        src: Source,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        mode: str,
        shard_shuffle: bool,
        buffer: int,
        on_skip,
        start: tuple[int, int] = (0, 0),
    ):
        self.index, self.src = index, src
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.G = world_size * num_workers
        self.g = rank * num_workers + worker
        self.worker = worker
        self.mode = mode  # resampled | epoch | eval
        self.shard_shuffle = shard_shuffle
        self.buffer = buffer if mode != "eval" else 0
        self.on_skip = on_skip
        self.seg, self.seg_pos = int(start[0]), 0
        self.lazy = False
        self.muted = False
        self._it = self._stream(self.seg)
        if start[1]:
            self.fast_forward(int(start[1]))

    @property
    def position(self) -> list[int]:
        return [self.seg, self.seg_pos]

    # -- shard sequences, cut into segments: (list of (url, split), ends_a_pass)
    def _segments(self):
        urls, K = self.src.urls, SEGMENT_SHARDS
        if self.mode == "resampled":
            rng = random.Random(
                stable_seed(self.seed, "shards", self.index, self.rank, self.worker, self.epoch)
            )
            while True:
                yield [(rng.choice(urls), None) for _ in range(K)], False
        pas = 0
        while True:
            order = list(urls)
            if self.shard_shuffle and self.mode == "epoch":
                random.Random(stable_seed(self.seed, "perm", self.index, self.epoch, pas)).shuffle(order)
            if len(order) >= self.G:
                mine = [(u, None) for u in order[self.g :: self.G]]
                if self.shard_shuffle and self.mode == "epoch":
                    random.Random(
                        stable_seed(self.seed, "local", self.index, self.g, self.epoch, pas)
                    ).shuffle(mine)
            else:  # fewer shards than workers: every worker reads every shard, keeps its samples
                mine = [(u, (self.G, (self.g + j) % self.G)) for j, u in enumerate(order)]
            for i in range(0, len(mine), K):
                yield mine[i : i + K], i + K >= len(mine)
            if self.mode == "eval":
                return
            pas += 1

    def _on_error(self, kind, url, exc):
        if not self.muted:
            self.on_skip(self.index, kind)

    def _read(self, shards, counter: dict):
        lazy = lambda: self.lazy
        always_lazy = lambda: True
        allowed = frozenset(TEXT_EXTS) if self.src.kind == "text" else ALLOWED_EXTS  # text: no media read
        for url, split in shards:
            got = 0
            # when splitting by sample, other workers' samples are only header-scanned (local files)
            for j, sample in enumerate(
                iter_tar_samples(
                    url, lazy=always_lazy if split else lazy, on_error=self._on_error, allowed=allowed
                )
            ):
                if split is not None and j % split[0] != split[1]:
                    continue
                got += 1
                yield sample
            counter["got"] += got
            counter["empty_run"] = 0 if got else counter["empty_run"] + 1

    def _stream(self, start_seg: int):
        counter = {"got": 0, "empty_run": 0}
        pass_from_start = start_seg == 0
        limit = 2 * len(self.src.urls) + 8
        for seg, (shards, pass_end) in enumerate(self._segments()):
            if seg < start_seg:
                pass_from_start = pass_end  # the next segment starts a pass
                continue
            rng = random.Random(
                stable_seed(self.seed, "buffer", self.index, self.rank, self.worker, self.epoch, seg)
            )
            for sample in self._shuffled(self._read(shards, counter), rng):
                yield seg, sample
            if self.mode == "resampled" and counter["empty_run"] >= limit:
                raise _Dead(f"{limit} shards in a row gave no samples")
            if pass_end:
                if counter["got"] == 0 and pass_from_start:
                    raise _Dead(f"a whole pass over {len(self.src.urls)} shards gave no samples")
                counter["got"], pass_from_start = 0, True

    def _shuffled(self, it, rng: random.Random):
        """Shuffle buffer (webdataset's algorithm: start emitting at 100, grow to `buffer`), drained at
        the end of the segment."""
        size = self.buffer
        if size <= 1:
            yield from it
            return
        initial = min(100, size)
        buf: list = []

        def pick():
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            return buf.pop()

        for s in it:
            buf.append(s)
            if len(buf) < size:
                s2 = next(it, None)
                if s2 is not None:
                    buf.append(s2)
            if len(buf) >= initial:
                yield pick()
        while buf:
            yield pick()

    def next(self) -> dict:
        """Next raw sample. Raises StopIteration when exhausted (eval) or _Dead when it never yields."""
        seg, s = next(self._it)
        if seg != self.seg:
            self.seg, self.seg_pos = seg, 0
        self.seg_pos += 1
        return s

    def fast_forward(self, n: int) -> None:
        self.lazy, self.muted = True, True
        try:
            for _ in range(n):
                self.next()
        finally:
            self.lazy, self.muted = False, False
