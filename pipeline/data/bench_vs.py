"""What `simvlg bench data --vs ...` compares our loader with, on the same shards, decode, augmentation
and worker count:

- `webdataset`: the usual choice, an open_clip-style pipeline of the `webdataset` library
  (ResampledShards -> tarfile_to_samples -> shuffle -> decode + augment -> batched, in a WebLoader).
  No exact resume, and it unpickles nothing only because we never ask it to decode pickles.
- `float32`: our loader as it was before it sent uint8 across the process boundary (each worker
  normalised its batch to float32: four times the bytes through the worker queue).
"""

from __future__ import annotations

import io
import random
import time

import torch
from PIL import Image

from .transforms import TrainTransform, normalize_batch, pre_caption, stack_hwc
from .worker import MixedStream


class Float32Stream(MixedStream):
    """The worker stage as it was: batches normalised to float32 before they leave the worker."""

    def _collate(self, *args):
        meta, batch = super()._collate(*args)
        batch["pixel_values"] = normalize_batch(batch["pixel_values"])
        return meta, batch


def webdataset_loader(
    urls: list[str],
    *,
    batch_size: int,
    workers: int,
    image_size: int,
    min_scale: float,
    shuffle: int = 500,
    seed: int = 0,
):
    """An open_clip-style webdataset pipeline with our decode and augmentation (uint8 out)."""
    import webdataset as wds

    transform = TrainTransform(image_size, min_scale)
    rng = random.Random(seed)

    def decode_augment(sample):
        with Image.open(io.BytesIO(sample["jpg"])) as im:
            img = im.convert("RGB")
        caption = pre_caption(sample["txt"].decode("utf-8", "replace"), 50)
        return transform.apply(img, transform.params(img.width, img.height, rng)), caption

    def collate(items):
        pixels, captions = zip(*items)
        return {"pixel_values": stack_hwc(list(pixels)), "captions": list(captions)}

    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle),
        wds.map(decode_augment, handler=wds.warn_and_continue),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    return wds.WebLoader(
        pipeline, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=False
    )


def bench_webdataset(
    urls: list[str],
    *,
    workers: int,
    batch_size: int,
    image_size: int,
    min_scale: float,
    seconds: float,
    step_ms: float,
    warmup_batches: int = 3,
) -> dict:
    it = iter(
        webdataset_loader(
            urls, batch_size=batch_size, workers=workers, image_size=image_size, min_scale=min_scale
        )
    )
    for _ in range(warmup_batches):
        next(it)
    n, wait, t0 = 0, 0.0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        w = time.perf_counter()
        b = next(it)
        wait += time.perf_counter() - w
        n += b["pixel_values"].shape[0]
        if step_ms:
            time.sleep(step_ms / 1000)
    dt = time.perf_counter() - t0
    del it
    return {
        "workers": workers,
        "samples_per_s": n / dt,
        "wait_fraction": wait / dt,
        "wait_ms_per_batch": 1000 * wait / max(1, n // batch_size),
        "skipped": {},
    }


def batch_bytes_per_sample(batch: dict) -> int:
    """Bytes of tensors one sample sends through the worker queue (a tensor under two keys, like
    arm_idx = source_idx without tasks, is sent once)."""
    n = batch["pixel_values"].shape[0]
    tensors = {id(v): v for v in batch.values() if torch.is_tensor(v)}.values()
    return sum(v.numel() * v.element_size() for v in tensors) // n
