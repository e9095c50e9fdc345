"""At LAION scale: split a validated list into parts for a SLURM array (each task runs recipe `urls`
on its part into OUT/part_NNNNN/), then merge the parts' shards and manifests into one.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from ..formats.manifest import Counts, Manifest, ShardEntry, read_manifest, write_manifest
from ..formats.shards import SHARD_WIDTH, brace_pattern, shard_id, shard_name
from .convert import convert
from .download import DEFAULT_OPTIONS, DownloadOptions
from .lists import Args, PrepInputError
from .recipes import RECIPES
from .run import PrepError


def split_list(
    recipe_name: str, out: Path, rargs: Args, parts: int, opts: DownloadOptions = DEFAULT_OPTIONS, log=None
) -> list[Path]:
    """Validate + convert once, then cut into `parts` parquet files out/parts/part_NNNNN.parquet for a
    SLURM array (each task runs recipe `urls` on its part)."""
    import pyarrow.parquet as pq

    if RECIPES[recipe_name].kind != "image":
        raise PrepInputError(f"split is for URL lists; {recipe_name} is a local video recipe")
    out = Path(out)
    info = convert(
        recipe_name,
        rargs,
        out / "input",
        samples_per_shard=1,
        drop_invalid=opts.drop_invalid,
        drop_duplicates=opts.drop_duplicates,
        limit=opts.limit,
        log=log,
    )
    table = pq.ParquetDataset([str(out / "input" / f) for f in info["files"]]).read()
    n = table.num_rows
    per = math.ceil(n / parts)
    pdir = out / "parts"
    pdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(parts):
        sl = table.slice(i * per, max(0, min(per, n - i * per)))
        if sl.num_rows == 0:
            break
        p = pdir / f"part_{i:05d}.parquet"
        if not p.exists():
            pq.write_table(sl, p.with_suffix(".tmp"))
            os.replace(p.with_suffix(".tmp"), p)
        paths.append(p)
    print(
        f"prep: {n} rows in {len(paths)} parts under {pdir}; submit with\n"
        f"  sbatch --array=0-{len(paths) - 1} data_prep/prep_slurm_array.sbatch {out}",
        file=log or sys.stderr,
    )
    return paths


def merge_parts(out: Path, *, link: str = "hardlink", log=None) -> Manifest:
    """One manifest over out/part_*/ with globally unique shard names out/shards/NNNNNN.tar
    (hard links, symlinks or copies of the parts' shards); counts are summed over the parts."""
    out = Path(out)
    part_dirs = sorted(p for p in out.glob("part_*") if p.is_dir())
    if not part_dirs:
        raise PrepError(f"{out}: no part_*/ folders to merge")
    expected_parts = sorted((out / "parts").glob("part_*.parquet")) if (out / "parts").is_dir() else []
    merged = out / "shards"
    merged.mkdir(exist_ok=True)
    width = SHARD_WIDTH + 1
    done = {p.name for p in part_dirs if (p / "manifest.json").is_file()}
    missing_parts = sorted(({p.stem for p in expected_parts} | {p.name for p in part_dirs}) - done)
    shard_list: list[ShardEntry] = []
    incomplete: dict[str, list[int]] = {}
    sums, dropped, by_cause, by_cat = Counter(), Counter(), Counter(), Counter()
    for pd in (p for p in part_dirs if p.name in done):
        try:
            pm = read_manifest(pd / "manifest.json")
        except ValueError as e:
            raise PrepError(f"merge: {e}") from None
        if pm.incomplete_shards:
            incomplete[pd.name] = pm.incomplete_shards
        c = pm.counts
        for k in (
            "attempted",
            "successes",
            "failed_to_download",
            "failed_to_resize",
            "duplicate_urls",
            "dropped_duplicates",
        ):
            sums[k] += getattr(c, k)
        sums["input_rows"] += c.input_rows or 0
        dropped.update(c.dropped_rows)
        by_cause.update(c.by_cause)
        by_cat.update(c.by_category)
        for e in pm.shard_list:
            if e.samples <= 0:
                continue
            src = pd / "shards" / e.file
            dst = merged / f"{shard_name(len(shard_list), width)}.tar"
            if dst.exists() or dst.is_symlink():
                dst.unlink()
            if link == "hardlink":
                try:
                    os.link(src, dst)
                except OSError:
                    os.symlink(src.resolve(), dst)
            elif link == "symlink":
                os.symlink(src.resolve(), dst)
            else:
                shutil.copyfile(src, dst)
            shard_list.append(
                ShardEntry(
                    id=len(shard_list), file=dst.name, samples=e.samples, part=pd.name, part_file=e.file
                )
            )
    n = len(shard_list)
    for stale in merged.glob("*.tar"):
        sid = shard_id(stale.name)
        if sid is not None and sid >= n:
            stale.unlink()
    manifest = Manifest(
        recipe="merge",
        kind="image",
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        complete=not missing_parts and not incomplete,
        shards=brace_pattern(str(merged.resolve()), range(n), width),
        shards_relative=brace_pattern("shards", range(n), width),
        num_shards=n,
        num_samples=sum(e.samples for e in shard_list),
        counts=Counts(
            **sums,
            dropped_rows=dict(dropped),
            by_category=dict(by_cat.most_common()),
            by_cause=dict(by_cause.most_common(50)),
        ),
        parts=[p.name for p in part_dirs],
        missing_parts=missing_parts,
        incomplete_parts=incomplete,
        shard_list=shard_list,
    )
    write_manifest(out, manifest)
    print(
        f"prep merge: {manifest.num_samples} samples in {n} shards from {len(part_dirs)} parts"
        + (f"; missing parts {missing_parts}" if missing_parts else "")
        + (f"; unfinished shards in {sorted(incomplete)}" if incomplete else ""),
        file=log or sys.stderr,
    )
    return manifest
