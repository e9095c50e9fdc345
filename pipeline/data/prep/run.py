"""One recipe run: convert -> reset unfinished shards -> download (or write video shards) -> manifest.

Re-running the same command resumes: the converted input is reused, finished shards are never
rewritten, and only the shards that are not finished are downloaded again.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..formats.manifest import Manifest
from .convert import convert
from .counts import build_manifest
from .download import DEFAULT_OPTIONS, DownloadOptions, run_img2dataset
from .lists import Args
from .recipes import RECIPES
from .text_shards import write_text_shards
from .verify import cached_shard_list, finished_shards, previous_manifest, reset_unfinished
from .video_shards import write_video_shards


class PrepError(RuntimeError):
    """A run that did not produce what it should (exit status 1: re-run the same command)."""


def convert_input(
    recipe_name: str, out: Path, rargs: Args, opts: DownloadOptions = DEFAULT_OPTIONS, log=None
) -> dict:
    """The validated list as parquet under OUT/input/ (reused if done before): its _SOURCE.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sps = opts.samples_per_shard or RECIPES[recipe_name].samples_per_shard
    return convert(
        recipe_name,
        rargs,
        out / "input",
        samples_per_shard=sps,
        drop_invalid=opts.drop_invalid,
        drop_duplicates=opts.drop_duplicates,
        limit=opts.limit,
        log=log,
    )


def run_recipe(
    recipe_name: str, out: Path, rargs: Args, opts: DownloadOptions = DEFAULT_OPTIONS, log=None
) -> Manifest:
    recipe = RECIPES[recipe_name]
    out = Path(out)
    sps = opts.samples_per_shard or recipe.samples_per_shard
    processes = opts.processes or (os.cpu_count() or 1)
    info = convert_input(recipe_name, out, rargs, opts, log)
    shards_dir = out / "shards"
    reset_unfinished(shards_dir, log, cache=cached_shard_list(out), kind=recipe.kind)
    before = finished_shards(shards_dir)
    todo = sorted(set(range(info["expected_shards"])) - set(before))
    t0 = time.time()
    if not todo:
        print(f"prep: all {info['expected_shards']} shards already finished", file=log or sys.stderr)
        old = previous_manifest(out)
        settings = old.settings if old else {}
    elif recipe.kind == "text":
        write_text_shards(out / "input", shards_dir, info, samples_per_shard=sps, log=log)
        settings = {"samples_per_shard": sps}
    elif recipe.kind == "video":
        write_video_shards(
            out / "input", shards_dir, info, samples_per_shard=sps, processes=processes, log=log
        )
        settings = {"samples_per_shard": sps}
    else:
        settings = run_img2dataset(
            out / "input",
            shards_dir,
            columns=info["columns"],
            opts=replace(opts, samples_per_shard=sps, processes=processes),
        )
        # check outputs, not exit codes (e.g. a missing distributor exits 0 having written nothing)
        if not any(shards_dir.glob("*_stats.json")):
            raise PrepError(
                f"img2dataset wrote no shard into {shards_dir} (distributor "
                f"{opts.distributor!r}); see its output above"
            )
    wall = time.time() - t0
    settings = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in settings.items()}
    after = finished_shards(shards_dir)
    new_ids = set(after) - set(before)
    attempted = sum(after[i].get("count", 0) for i in new_ids)
    ok = sum(after[i].get("successes", 0) for i in new_ids)
    timing = {
        "wall_seconds": round(wall, 2),
        "shards_this_run": len(new_ids),
        "urls_this_run": attempted,
        "urls_per_second": round(attempted / wall, 1) if wall > 0 and attempted else None,
        "samples_per_second": round(ok / wall, 1) if wall > 0 and ok else None,
    }
    if not todo and previous_manifest(out) is not None:
        timing = previous_manifest(out).timing
    m = build_manifest(
        out, recipe=recipe_name, kind=recipe.kind, settings=settings, timing=timing, processes=processes
    )
    c = m.counts
    fails = ", ".join(f"{k} {v}" for k, v in c.by_category.items()) or "none"
    print(
        f"prep {recipe_name}: {m.num_samples} samples in {m.num_shards} shards "
        f"({c.successes}/{c.attempted} ok); failures: {fails}; {wall:.1f} s this run",
        file=log or sys.stderr,
    )
    if m.incomplete_shards:
        print(
            f"prep: {len(m.incomplete_shards)} shard(s) not finished {m.incomplete_shards[:10]}: "
            "re-run the same command to retry them",
            file=log or sys.stderr,
        )
    return m
