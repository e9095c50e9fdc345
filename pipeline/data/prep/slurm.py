"""At LAION scale: split a validated list into parts for a SLURM array (each task runs recipe `urls`
on its part into OUT/part_NNNNN/), then merge the parts' shards and manifests into one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from ..formats.shards import brace_pattern, shard_id
from .convert import convert
from .counts import MANIFEST_VERSION
from .download import DEFAULT_OPTIONS, DownloadOptions
from .lists import Args, PrepInputError
from .recipes import RECIPES
from .run import PrepError


def split_list(recipe_name: str, out: Path, rargs: Args, parts: int,
               opts: DownloadOptions = DEFAULT_OPTIONS, log=None) -> list[Path]:
    """Validate + convert once, then cut into `parts` parquet files out/parts/part_NNNNN.parquet for a
    SLURM array (each task runs recipe `urls` on its part)."""
    import pyarrow.parquet as pq

    if RECIPES[recipe_name].kind != "image":
        raise PrepInputError(f"split is for URL lists; {recipe_name} is a local video recipe")
    out = Path(out)
    info = convert(recipe_name, rargs, out / "input", samples_per_shard=1, drop_invalid=opts.drop_invalid,
                   drop_duplicates=opts.drop_duplicates, limit=opts.limit, log=log)
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
    print(f"prep: {n} rows in {len(paths)} parts under {pdir}; submit with\n"
          f"  sbatch --array=0-{len(paths) - 1} data_prep/prep_slurm_array.sbatch {out}",
          file=log or sys.stderr)
    return paths


def merge_parts(out: Path, *, link: str = "hardlink", log=None) -> dict:
    """One manifest over out/part_*/ with globally unique shard names out/shards/NNNNNN.tar
    (hard links, symlinks or copies of the parts' shards)."""
    out = Path(out)
    part_dirs = sorted(p for p in out.glob("part_*") if p.is_dir())
    if not part_dirs:
        raise PrepError(f"{out}: no part_*/ folders to merge")
    expected_parts = sorted((out / "parts").glob("part_*.parquet")) if (out / "parts").is_dir() else []
    merged = out / "shards"
    merged.mkdir(exist_ok=True)
    width = 6
    gid = 0
    shard_list, missing_parts, incomplete = [], [], {}
    totals, by_cause, by_cat = Counter(), Counter(), Counter()
    done_names = {p.name for p in part_dirs if (p / "manifest.json").is_file()}
    for p in expected_parts:
        if p.stem not in done_names:
            missing_parts.append(p.stem)
    for pd in part_dirs:
        mf = pd / "manifest.json"
        if not mf.is_file():
            missing_parts.append(pd.name)
            continue
        pm = json.loads(mf.read_text())
        if pm.get("incomplete_shards"):
            incomplete[pd.name] = pm["incomplete_shards"]
        for k in ("attempted", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(pm["counts"].get(k) or 0)
        totals["input_rows"] += int(pm["counts"].get("input_rows") or 0)
        by_cause.update(pm["counts"].get("by_cause", {}))
        by_cat.update(pm["counts"].get("by_category", {}))
        for e in pm.get("shard_list", []):
            if e.get("samples", 0) <= 0:
                continue
            src = pd / "shards" / e["file"]
            dst = merged / f"{gid:0{width}d}.tar"
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
            shard_list.append({"id": gid, "file": dst.name, "samples": e["samples"], "part": pd.name,
                               "part_file": e["file"]})
            gid += 1
    for stale in merged.glob("*.tar"):
        sid = shard_id(stale.name)
        if sid is not None and sid >= gid:
            stale.unlink()
    ids = list(range(gid))
    manifest = {
        "version": MANIFEST_VERSION, "recipe": "merge", "kind": "image",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": not missing_parts and not incomplete,
        "shards": brace_pattern(str(merged.resolve()), ids, width),
        "shards_relative": brace_pattern("shards", ids, width),
        "num_shards": gid, "num_samples": sum(e["samples"] for e in shard_list),
        "counts": {**dict(totals), "by_category": dict(by_cat.most_common()),
                   "by_cause": dict(by_cause.most_common(50))},
        "parts": [p.name for p in part_dirs], "missing_parts": missing_parts,
        "incomplete_shards": incomplete, "shard_list": shard_list,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    print(f"prep merge: {manifest['num_samples']} samples in {gid} shards from {len(part_dirs)} parts"
          + (f"; missing parts {missing_parts}" if missing_parts else "")
          + (f"; unfinished shards in {sorted(incomplete)}" if incomplete else ""), file=log or sys.stderr)
    return manifest
