"""Every option of a `simvlg prep` run, in one place (DownloadOptions), and the img2dataset call.

The command line is built from DownloadOptions' fields (flag, default and help come from here), and
run_recipe / run_img2dataset take the one object: an option is added or changed in this file only.

Why keep_ratio (shorter side 384, aspect kept): training takes RandomResizedCrop(224|364,
scale 0.5-1) and eval resize+center-crop, so the stored image must keep its whole field of view and
enough pixels; `border` would bake black bars into the crops and `center_crop` would drop content the
caption may describe. Images smaller than 384 are stored as they are (resize_only_if_bigger).
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_IMAGE_AREA = 40_000_000  # ~ 8000 x 5000; img2dataset still decodes before checking


def _opt(default, help: str | None = None, **argparse_kw):
    """A field with its command-line help (and argparse extras such as choices)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass(frozen=True)
class DownloadOptions:
    # conversion (part of the input fingerprint: another value refuses a re-run into the same --out)
    samples_per_shard: int | None = _opt(None, "default: 10000 images, 500 videos, 50000 sentences")
    drop_invalid: bool = _opt(
        False, "drop rows with an empty url/caption instead of failing (they are counted)"
    )
    drop_duplicates: bool = _opt(False, "drop rows whose URL appeared earlier in the list (always counted)")
    limit: int | None = _opt(None, "use only the first N valid rows (trial runs)")
    # img2dataset
    processes: int = _opt(0, "download processes (default: all cores)")
    threads: int = _opt(64, "download threads per process")
    image_size: int = _opt(384, "shorter side stored (keep_ratio)")
    resize_mode: str = _opt(
        "keep_ratio", None, choices=["keep_ratio", "center_crop", "border", "keep_ratio_largest", "no"]
    )
    timeout: int = _opt(10, "seconds per HTTP request")
    retries: int = _opt(2, "extra attempts per failed URL")
    max_image_area: float = _opt(
        DEFAULT_MAX_IMAGE_AREA, "skip images with more pixels than this (counted as too_large)"
    )
    min_image_size: int = _opt(0)
    max_aspect_ratio: float = _opt(float("inf"))
    encode_quality: int = _opt(95)
    distributor: str = _opt("multiprocessing", None, choices=["multiprocessing", "pyspark", "ray"])
    user_agent_token: str | None = field(default="simvlg", metadata={"cli": False})


DEFAULT_OPTIONS = DownloadOptions()


def run_img2dataset(input_dir: Path, shards_dir: Path, *, columns: list[str], opts: DownloadOptions) -> dict:
    """Download the parquet parts of input_dir into shards_dir; returns the settings passed. `opts` is
    resolved: samples_per_shard and processes are set (run_recipe fills in the recipe's defaults)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else every worker phones home on import
    # hard memory ceiling: OpenCV refuses to decode above this many pixels (counted as a decoding
    # error); max_image_area (checked after decoding) gives the "image area too large" count below it
    if math.isfinite(opts.max_image_area):
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(2 * opts.max_image_area)))
    import img2dataset

    settings = dict(
        url_list=str(input_dir),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["captions"] if "captions" in columns else None,
        output_format="webdataset",
        output_folder=str(shards_dir),
        processes_count=opts.processes,
        thread_count=opts.threads,
        image_size=opts.image_size,
        resize_mode=opts.resize_mode,
        resize_only_if_bigger=True,
        encode_format="jpg",
        encode_quality=opts.encode_quality,
        number_sample_per_shard=opts.samples_per_shard,
        timeout=opts.timeout,
        retries=opts.retries,
        max_image_area=opts.max_image_area,
        min_image_size=opts.min_image_size,
        max_aspect_ratio=opts.max_aspect_ratio,
        incremental_mode="incremental",
        distributor=opts.distributor,
        extract_exif=False,
        enable_wandb=False,
        user_agent_token=opts.user_agent_token,
        max_shard_retry=2,
    )
    old = signal.getsignal(signal.SIGINT)
    try:
        img2dataset.download(**settings)
    finally:
        try:
            signal.signal(signal.SIGINT, old)
        except (ValueError, TypeError):  # not the main thread
            pass
    return settings
