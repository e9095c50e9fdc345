"""`simvlg bench data`: how fast the loader feeds a trainer, on local shards.

    simvlg bench data --shards 'data/cc3m/shards/{00000..00010}.tar' --workers 0,1,2 --seconds 10
    simvlg bench data --synthetic 2000          # make 384-px JPEG shards in a temp folder first

Prints, per line: decode+augment samples/s in one process (what one worker can do), then the full
loader (tar read, shuffle, mixing, decode, augment, collate, normalise, IPC) with k workers, its
samples/s per busy core, and the fraction of time a trainer taking --step-ms per batch waits for data.
The target it prints its verdict against, and what it measured here: README, "Measured here".
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image


def _photos() -> list[np.ndarray]:
    try:
        import skimage.data as d

        imgs = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]
        return [i if i.ndim == 3 else np.stack([i] * 3, -1) for i in imgs]
    except Exception:  # scikit-image is a dev extra
        rng = np.random.default_rng(0)
        small = [(rng.random((24, 32, 3)) * 255).astype(np.uint8) for _ in range(4)]
        return [np.asarray(Image.fromarray(a).resize((512, 384))) for a in small]


def make_synthetic_shards(
    folder: str | Path, n: int, per_shard: int = 500, size: int = 384, seed: int = 0
) -> str:
    """n JPEG samples shaped like `simvlg prep` output (shorter side `size`, q95) -> brace pattern."""
    from .formats.shards import write_shard

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bases = _photos()
    encoded = []
    for k in range(16):
        a = bases[k % len(bases)]
        img = Image.fromarray(a)
        w, h = img.size
        s = size / min(w, h)
        crop = img.crop((rng.randint(0, w // 8), rng.randint(0, h // 8), w, h))
        crop = crop.resize((max(size, round(crop.width * s)), max(size, round(crop.height * s))))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=95)
        encoded.append(buf.getvalue())
    n_shards = max(1, (n + per_shard - 1) // per_shard)
    for sid in range(n_shards):
        samples = []
        for i in range(min(per_shard, n - sid * per_shard)):
            key = f"{sid:05d}{i:04d}"
            samples.append(
                {
                    "__key__": key,
                    "jpg": encoded[rng.randrange(len(encoded))],
                    "txt": f"a synthetic photo number {sid * per_shard + i}",
                    "json": json.dumps({"key": key, "status": "success"}),
                }
            )
        write_shard(folder / f"{sid:05d}.tar", samples)
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def _one_source(pattern: str):
    from pipeline.config import DataConfig, SourceConfig

    return DataConfig(sources=[SourceConfig(name="bench", shards=pattern)])


def bench_decode(pattern: str, *, image_size: int, min_scale: float, seconds: float) -> dict:
    """One process: decode + RandomResizedCrop + to-uint8 on samples already in memory."""
    from .formats.shards import iter_tar_samples
    from .loader import resolve_sources
    from .transforms import TrainTransform

    urls = resolve_sources(_one_source(pattern)).pop().urls
    skips: Counter = Counter()
    t0 = time.perf_counter()
    raw = []
    for u in urls:
        for s in iter_tar_samples(u, on_error=lambda kind, _url, _e: skips.update([kind])):
            if "jpg" not in s:
                skips["missing_image"] += 1
                continue
            try:  # the loader skips and counts undecodable images; so does the benchmark
                with Image.open(io.BytesIO(s["jpg"])) as im:
                    im.convert("RGB")
            except Exception:  # truncated, not an image, ...
                skips["corrupt_image"] += 1
                continue
            raw.append(s)
        if len(raw) >= 2000:
            break
    read_s = time.perf_counter() - t0
    if not raw:
        raise SystemExit(
            f"simvlg bench data: no decodable jpg sample in {pattern} (skipped: {dict(skips) or 'nothing'})"
        )
    tf = TrainTransform(image_size, min_scale)
    rng = random.Random(0)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = raw[n % len(raw)]
        with Image.open(io.BytesIO(s["jpg"])) as im:
            img = im.convert("RGB")
        tf.apply(img, tf.params(img.width, img.height, rng))
        n += 1
    dt = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return {
        "decode_augment_per_s": n / dt,
        "tar_read_samples_per_s": len(raw) / read_s if read_s else None,
        "n": n,
        "image_wh": list(img.size),
        "skipped": dict(skips),
    }


def bench_loader(
    pattern: str,
    *,
    workers: int,
    batch_size: int,
    image_size: int,
    min_scale: float,
    seconds: float,
    step_ms: float,
    warmup_batches: int = 3,
    float32: bool = False,
) -> dict:
    from pipeline.config import DataConfig, SourceConfig

    from .bench_vs import Float32Stream, batch_bytes_per_sample
    from .loader import build_loader

    cfg = DataConfig(
        sources=[SourceConfig(name="bench", shards=pattern)],
        num_workers=workers,
        image_size=image_size,
        min_scale=min_scale,
        shuffle_buffer=500,
    )
    loader = build_loader(cfg, tokenize=None, batch_size=batch_size, seed=0)
    if float32:  # the worker stage as it was (see bench_vs)
        loader.dataset.__class__ = Float32Stream
    it = iter(loader)
    for _ in range(warmup_batches):
        bytes_per_sample = batch_bytes_per_sample(next(it))
    w0 = loader.wait_time
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n += b["pixel_values"].shape[0]
        if step_ms:
            time.sleep(step_ms / 1000)
    dt = time.perf_counter() - t0
    wait = loader.wait_time - w0
    it.close()  # stops the workers now
    skipped = loader.skip_counts(nested=True).get("bench", {})
    return {
        "workers": workers,
        "samples_per_s": n / dt,
        "wait_fraction": wait / dt,
        "wait_ms_per_batch": 1000 * wait / max(1, n // batch_size),
        "skipped": skipped,
        "bytes_per_sample": bytes_per_sample,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="simvlg bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="brace pattern, manifest.json or folder of local shards")
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="first write N synthetic 384-px JPEG samples into a temp folder and use them",
    )
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts for the full loader")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--min-scale", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated trainer step per batch")
    p.add_argument(
        "--vs",
        default="",
        metavar="OTHER[,OTHER]",
        help="also measure, side by side: webdataset (an open_clip-style webdataset pipeline, "
        "same decode and augmentation) and/or float32 (our loader as it was, float32 "
        "through the worker queue)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    others = [v for v in args.vs.split(",") if v]
    if set(others) - {"webdataset", "float32"}:
        p.error(f"--vs takes webdataset and/or float32, got {args.vs!r}")
    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory(prefix="simvlg-bench-")
        args.shards = make_synthetic_shards(tmp.name, args.synthetic)
    if not args.shards:
        p.error("give --shards PATTERN or --synthetic N")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = {
        "shards": args.shards,
        "cores": cores,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
    }
    out["decode"] = bench_decode(
        args.shards, image_size=args.image_size, min_scale=args.min_scale, seconds=args.seconds
    )
    out["loader"] = []
    kw = dict(
        batch_size=args.batch_size,
        image_size=args.image_size,
        min_scale=args.min_scale,
        seconds=args.seconds,
        step_ms=args.step_ms,
    )
    for k in [int(x) for x in args.workers.split(",") if x.strip()]:
        r = bench_loader(args.shards, workers=k, **kw)
        r["samples_per_s_per_core"] = r["samples_per_s"] / max(1, min(k, cores))
        r["vs"] = {}
        if "float32" in others:
            r["vs"]["float32"] = bench_loader(args.shards, workers=k, float32=True, **kw)
        if "webdataset" in others:
            from .bench_vs import bench_webdataset
            from .loader import resolve_sources

            urls = resolve_sources(_one_source(args.shards))[0].urls
            r["vs"]["webdataset"] = bench_webdataset(urls, workers=k, **kw)
        out["loader"].append(r)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        d = out["decode"]
        print(
            f"shards {args.shards}  ({cores} cores, batch {args.batch_size}, {args.image_size} px, "
            f"stored {d['image_wh'][0]}x{d['image_wh'][1]})"
        )
        print(
            f"decode+augment, one process: {d['decode_augment_per_s']:8.1f} samples/s   "
            f"(tar read {d['tar_read_samples_per_s'] or 0:.0f} samples/s)"
        )
        print(
            f"{'workers':>8} {'samples/s':>10} {'per core':>9} {'data wait':>10} {'wait/batch':>11} "
            f"{'bytes/sample':>13}" + "".join(f" {'vs ' + o + ' samples/s':>26}" for o in others)
        )
        for r in out["loader"]:
            cells = "".join(
                f" {v['samples_per_s']:>17.1f} ({v['samples_per_s'] / r['samples_per_s']:.2f}x)"
                + (f" {v['bytes_per_sample']}B" if o == "float32" else "")
                for o, v in ((o, r["vs"][o]) for o in others)
            )
            print(
                f"{r['workers']:>8} {r['samples_per_s']:>10.1f} {r['samples_per_s_per_core']:>9.1f} "
                f"{100 * r['wait_fraction']:>9.1f}% {r['wait_ms_per_batch']:>9.1f}ms "
                f"{r['bytes_per_sample']:>12}B{cells}"
            )
        for where, counts in [("reading for decode", d["skipped"])] + [
            (f"loader, {r['workers']} workers", r["skipped"]) for r in out["loader"]
        ]:
            if counts:
                print(f"skipped ({where}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        per_core = d["decode_augment_per_s"]
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"one core decodes+augments {per_core:.0f} samples/s -> 8 free cores ~{8 * per_core:.0f} "
            f"samples/s (target >= 500 = 5 x one GPU at ~100 samples/s); load average now {load:.1f} "
            f"on {cores} cores"
        )
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
