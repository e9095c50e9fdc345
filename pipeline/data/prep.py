"""`simvlg prep`: URL lists -> WebDataset shards + manifest.json, one command per recipe.

    simvlg prep cc3m --input Train_GCC-training.tsv --out data/cc3m
    simvlg prep list                               # recipes and the inputs each expects
    simvlg prep split laion115m_capfilt --input laion_synthetic_filtered_large.json --parts 64 --out D
    simvlg prep merge --out D                      # after the SLURM array (data_prep/)
    simvlg prep manifest --out D                   # rebuild D/manifest.json from the shards

Layout of --out DIR:
    DIR/input/part-NNNNN.parquet + _SOURCE.json   the validated list (url, caption[, captions])
    DIR/shards/NNNNN.tar, NNNNN_stats.json, NNNNN.parquet   img2dataset's output (per-URL status)
    DIR/manifest.json                              shard pattern, sample and failure counts
(The manifest is kept out of shards/: img2dataset's incremental mode takes every *.json there for a
shard's stats file.)

Steps: read the recipe's list -> validate every row (missing columns, empty captions, unreadable
files fail here, before any download) -> parquet -> img2dataset (webdataset output, jpg+txt+json,
shorter side 384 px kept aspect, never upscaled, retries, timeouts, max_image_area) -> check the
outputs (each expected shard has its stats file and a readable tar whose sample count matches) ->
manifest. A re-run reuses the converted input, redoes only shards that are not finished (no stats
file, or a stats file whose tar is missing or broken: that stats file is removed first so img2dataset
redoes it) and never rewrites a finished shard. Exit status: 0 when every shard is finished, 1 when
some are not (re-run the same command), 2 on bad input or usage.

Why keep_ratio (shorter side 384, aspect kept): training takes RandomResizedCrop(224|364,
scale 0.5-1) and eval resize+center-crop, so the stored image must keep its whole field of view and
enough pixels; `border` would bake black bars into the crops and `center_crop` would drop content the
caption may describe. Images smaller than 384 are stored as they are (resize_only_if_bigger).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from array import array
from collections import Counter
from pathlib import Path

from .recipes import RECIPES, Args, PrepInputError, RowValidator, _check_readable
from .shards import brace_pattern, count_tar_samples

MANIFEST_VERSION = 1
DEFAULT_MAX_IMAGE_AREA = 40_000_000  # ~ 8000 x 5000; img2dataset still decodes before checking


class PrepError(RuntimeError):
    pass


# -------------------------------------------------------------------------------- conversion
def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(recipe: str, rargs: Args, opts: dict, known: list[dict] = ()) -> dict:
    """What a conversion was made from: each input's content hash (reused from `known` while its size
    and mtime are unchanged, so a re-run does not re-read a 20 GB list) and every option."""
    inputs = []
    for i, p in enumerate(rargs.inputs):
        st = _check_readable(p).stat()
        entry = {"path": str(Path(p).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}
        old = known[i] if i < len(known) else {}
        same_file = {k: old.get(k) for k in ("path", "size", "mtime")} == entry
        entry["sha256"] = old["sha256"] if same_file and old.get("sha256") else _sha256(p)
        inputs.append(entry)
    return {"recipe": recipe, "inputs": inputs,
            "options": {"url_col": rargs.url_col, "caption_col": rargs.caption_col,
                        "image_root": rargs.image_root, "video_root": rargs.video_root,
                        "base_url": rargs.base_url, "split": rargs.split, **opts}}


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words; inputs are compared by content only."""
    out = []
    if old.get("recipe") != new["recipe"]:
        out.append(f"recipe {old.get('recipe')} -> {new['recipe']}")
    a, b = old.get("inputs", []), new["inputs"]
    if len(a) != len(b):
        out.append(f"{len(a)} input file(s) -> {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.get("sha256") != y["sha256"]:
            was = f"sha256 {x['sha256'][:12]}" if x.get("sha256") else f"{x.get('size')} bytes"
            out.append(f"input {i + 1} ({Path(y['path']).name}) has other content "
                       f"(sha256 {y['sha256'][:12]}, was {was})")
    oa, ob = old.get("options", {}), new["options"]
    for k in sorted(set(oa) | set(ob)):
        if oa.get(k) != ob.get(k):
            out.append(f"--{k.replace('_', '-')} {oa.get(k)!r} -> {ob.get(k)!r}")
    return out


def convert(recipe_name: str, rargs: Args, input_dir: Path, *, samples_per_shard: int,
            drop_invalid: bool = False, drop_duplicates: bool = False, limit: int | None = None,
            rows_per_file: int = 1_000_000, log=None) -> dict:
    """Validate the recipe's rows and write them as parquet parts. Reused when already done for the
    same inputs (by content) and options; anything else for the same folder is an error naming what
    changed. Duplicate URLs (or video files) are counted, and dropped with drop_duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    recipe = RECIPES[recipe_name]
    marker = input_dir / "_SOURCE.json"
    done = json.loads(marker.read_text()) if marker.is_file() else None
    fp = _fingerprint(recipe_name, rargs, {"samples_per_shard": samples_per_shard,
                                           "drop_invalid": drop_invalid,
                                           "drop_duplicates": drop_duplicates, "limit": limit},
                      known=(done or {}).get("inputs", []))
    if done is not None:
        if "drop_duplicates" not in done.get("options", {}):  # made before the option existed
            done["options"]["drop_duplicates"] = False
        changes = fingerprint_changes(done, fp)
        if not changes:
            if [i["mtime"] for i in done["inputs"]] != [i["mtime"] for i in fp["inputs"]]:
                done["inputs"] = fp["inputs"]  # same content, touched since: remember the new mtimes
                marker.write_text(json.dumps(done, indent=1))
            print(f"prep: reusing converted input {input_dir} ({done['rows']} rows)", file=log or sys.stderr)
            return done
        raise PrepInputError(f"{input_dir.parent} was prepared from other inputs or options: "
                             + "; ".join(changes) + "; use another --out, or delete that folder to "
                             "start over")
    validator = RowValidator(kind=recipe.kind, drop_invalid=drop_invalid, source=" + ".join(rargs.inputs)
                             or recipe_name)
    rows = validator(recipe.read(rargs))
    # whole shards per parquet file so img2dataset's shard ids stay contiguous
    per_file = samples_per_shard * max(1, rows_per_file // samples_per_shard)
    tmp = input_dir.with_name(input_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, counts, buf, schema, total = [], [], [], None, 0
    key_hashes = array("Q")  # 8 bytes per row: duplicates are found after the stream (numpy)

    def flush():
        nonlocal buf, schema
        if not buf:
            return
        if schema is None:
            fields = [(k, pa.list_(pa.string()) if k == "captions" else pa.string()) for k in buf[0]]
            schema = pa.schema(fields)
        table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in buf], schema=schema)
        name = f"part-{len(files):05d}.parquet"
        pq.write_table(table, tmp / name)
        files.append(name)
        counts.append(len(buf))
        buf = []

    try:
        for row in rows:
            buf.append(row)
            total += 1
            key = (row.get("url") or row.get("video") or "").encode()
            key_hashes.append(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
            if len(buf) == per_file:
                flush()
            if limit is not None and total >= limit:
                break
        flush()
        validator.finish(log)  # raises on unusable rows (unless drop_invalid): nothing downloaded yet
        duplicates, counts = _duplicates(key_hashes, tmp, files, counts, drop=drop_duplicates)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    validation = {**validator.stats, "duplicate_urls": duplicates,
                  "dropped_duplicates": duplicates if drop_duplicates else 0}
    if duplicates:
        print(f"prep: {duplicates} rows repeat a URL seen earlier in the list"
              + (" (dropped)" if drop_duplicates else " (kept; --drop-duplicates drops them)"),
              file=log or sys.stderr)
    total -= validation["dropped_duplicates"]
    info = {**fp, "rows": total, "files": files, "file_rows": counts, "columns": schema.names,
            "validation": validation,
            "expected_shards": sum(math.ceil(c / samples_per_shard) for c in counts)}
    (tmp / "_SOURCE.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(input_dir, ignore_errors=True)
    os.replace(tmp, input_dir)
    print(f"prep: {total} rows validated -> {input_dir} ({len(files)} parquet file(s))",
          file=log or sys.stderr)
    return info


def _duplicates(key_hashes: array, folder: Path, files: list[str], counts: list[int], *,
                drop: bool) -> tuple[int, list[int]]:
    """Rows whose URL (64-bit hash) appeared earlier; with drop, rewrite the parts without them."""
    import numpy as np

    h = np.frombuffer(key_hashes, dtype=np.uint64)
    if not len(h):
        return 0, counts
    _, first = np.unique(h, return_index=True)
    duplicates = len(h) - len(first)
    if not drop or not duplicates:
        return duplicates, counts
    import pyarrow.parquet as pq

    keep = np.zeros(len(h), dtype=bool)
    keep[first] = True
    start, new_counts = 0, []
    for name, n in zip(files, counts):
        table = pq.read_table(folder / name).filter(keep[start:start + n])
        pq.write_table(table, folder / name)
        new_counts.append(table.num_rows)
        start += n
    return duplicates, new_counts


# ------------------------------------------------------------------------------ verification
def _shard_id(name: str) -> int | None:
    m = re.match(r"^(\d+)(?:_stats\.json|\.tar)$", name)
    return int(m.group(1)) if m else None


def _verify_one(path: str) -> dict:
    try:
        return {"samples": count_tar_samples(path), "ok": True}
    except (OSError, tarfile.TarError, EOFError) as e:
        return {"samples": 0, "ok": False, "error": str(e)}


def verify_shards(shards_dir: Path, cache: dict | None = None, processes: int = 1) -> dict[int, dict]:
    """{id: {"file", "samples", "size", "mtime", "ok", "error"}} for every NNNNN.tar; sample counts
    from the tar headers (cached by size + mtime; uncached shards are scanned in `processes`)."""
    cache = cache or {}
    out, todo = {}, []
    for tar in sorted(shards_dir.glob("*.tar")):
        sid = _shard_id(tar.name)
        if sid is None:
            continue
        st = tar.stat()
        c = cache.get(sid)
        if c and c.get("size") == st.st_size and c.get("mtime") == int(st.st_mtime) and c.get("ok"):
            out[sid] = c
            continue
        out[sid] = {"id": sid, "file": tar.name, "size": st.st_size, "mtime": int(st.st_mtime)}
        todo.append((sid, str(tar)))
    if processes > 1 and len(todo) > 8:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_verify_one, [p for _, p in todo], chunksize=4))
    else:
        results = [_verify_one(p) for _, p in todo]
    for (sid, _), r in zip(todo, results):
        out[sid].update(r)
    return out


def _tar_looks_complete(path: Path) -> str | None:
    """Cheap check (no scan): a tar closed properly is a whole number of 512-byte blocks ending in two
    zero blocks. img2dataset writes a shard's stats only after closing its tar."""
    try:
        size = path.stat().st_size
        if size < 1024 or size % 512:
            return f"size {size} is not a closed tar"
        with open(path, "rb") as f:
            f.seek(size - 1024)
            if f.read(1024).count(0) != 1024:
                return "no end-of-archive marker (truncated)"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def reset_unfinished(shards_dir: Path, log=None, cache: dict | None = None) -> list[int]:
    """Remove the stats (and status parquet, and tar) of shards that are not whole, so img2dataset's
    incremental mode redoes them: the tar is missing, not a closed tar, unreadable (a garbled member
    header included), or holds another number of samples than its stats file says were written.
    Whole shards are not touched; tar scans are cached by size + mtime in the manifest."""
    if not shards_dir.is_dir():
        return []
    verified = verify_shards(shards_dir, cache)
    redo = []
    for stats_file in sorted(shards_dir.glob("*_stats.json")):
        sid = _shard_id(stats_file.name)
        if sid is None:
            continue
        tar = shards_dir / stats_file.name.replace("_stats.json", ".tar")
        why = "tar missing" if not tar.is_file() else _tar_looks_complete(tar)
        if why is None:
            v = verified.get(sid, {})
            try:
                written = json.loads(stats_file.read_text()).get("successes")
            except ValueError:
                written = None
            if not v.get("ok"):
                why = f"unreadable: {v.get('error')}"
            elif written is not None and v["samples"] != written:
                why = f"holds {v['samples']} samples, its stats say {written} were written"
        if why:
            print(f"prep: shard {sid} will be redone ({why})", file=log or sys.stderr)
            stats_file.unlink()
            (shards_dir / stats_file.name.replace("_stats.json", ".parquet")).unlink(missing_ok=True)
            tar.unlink(missing_ok=True)
            redo.append(sid)
    return redo


def _finished(shards_dir: Path) -> dict[int, dict]:
    """{id: stats} of shards that have a stats file and a tar (cheap; no tar reading)."""
    out = {}
    if not shards_dir.is_dir():
        return out
    for f in shards_dir.glob("*_stats.json"):
        sid = _shard_id(f.name)
        if sid is not None and (shards_dir / f.name.replace("_stats.json", ".tar")).is_file():
            try:
                out[sid] = json.loads(f.read_text())
            except ValueError:
                pass
    return out


def _cached_manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _cached_shards(manifest: Path) -> dict:
    try:
        m = json.loads(manifest.read_text())
        return {int(e["id"]): e for e in m.get("shard_list", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# ---------------------------------------------------------------------------------- manifest
_CAUSES = [
    ("http_404", ("http error 404",)),
    ("http_403", ("http error 403",)),
    ("http_error", ("http error",)),
    ("timeout", ("timed out", "timeout")),
    ("connection_refused", ("connection refused", "errno 111")),
    ("dns", ("name or service not known", "temporary failure in name resolution", "getaddrinfo",
             "nodename nor servname", "no address associated")),
    ("connection_error", ("connection reset", "remote end closed", "incompleteread", "incomplete read",
                          "connection aborted", "broken pipe", "eof occurred")),
    ("bad_url", ("unknown url type", "no host given", "invalid url", "url can't contain")),
    ("ssl", ("ssl", "certificate")),
    ("empty_response", ("!buf.empty()", "empty response", "zero bytes")),
    ("undecodable_image", ("image decoding error", "cannot identify image")),
    ("too_large", ("image area too large",)),
    ("too_small", ("image too small",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
    ("opted_out", ("x-robots-tag",)),
    ("hash_mismatch", ("hash mismatch",)),
    ("missing_file", ("no such file", "missing file", "errno 2")),
    ("unreadable_video", ("unreadable video",)),
]


def cause_category(message: str) -> str:
    m = message.lower()
    for name, needles in _CAUSES:
        if any(n in m for n in needles):
            return name
    return "other"


def build_manifest(out: Path, *, recipe: str, kind: str, settings: dict | None = None,
                   timing: dict | None = None, processes: int = 1) -> dict:
    out = Path(out)
    shards_dir = out / "shards"
    source = {}
    if (out / "input" / "_SOURCE.json").is_file():
        source = json.loads((out / "input" / "_SOURCE.json").read_text())
    expected = source.get("expected_shards")
    stats = {}
    for f in sorted(shards_dir.glob("*_stats.json")) if shards_dir.is_dir() else []:
        sid = _shard_id(f.name)
        if sid is not None:
            try:
                stats[sid] = json.loads(f.read_text())
            except ValueError:
                pass
    verified = (verify_shards(shards_dir, _cached_shards(out / "manifest.json"), processes)
                if shards_dir.is_dir() else {})
    expected_ids = set(range(expected)) if expected is not None else set(stats) | set(verified)
    def whole(i):  # readable, and holds what img2dataset says it wrote
        v, written = verified.get(i, {}), stats[i].get("successes")
        return v.get("ok") and (written is None or v["samples"] == written)

    mismatched = sorted(i for i in expected_ids if i in stats and verified.get(i, {}).get("ok")
                        and not whole(i))
    finished = sorted(i for i in expected_ids if i in stats and whole(i))
    incomplete = sorted(expected_ids - set(finished))
    width = max([5] + [len(v["file"]) - 4 for v in verified.values()])
    with_samples = [i for i in finished if verified[i]["samples"] > 0]
    by_cause: Counter = Counter()
    totals = Counter()
    for i in finished:
        s = stats[i]
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(s.get(k, 0))
        for msg, n in (s.get("status_dict") or {}).items():
            if msg != "success":
                by_cause[msg] += int(n)
    by_category: Counter = Counter()
    for msg, n in by_cause.items():
        by_category[cause_category(msg)] += n
    num_samples = sum(verified[i]["samples"] for i in finished)
    duration = sum(float(stats[i].get("duration", 0.0)) for i in finished)
    manifest = {
        "version": MANIFEST_VERSION,
        "recipe": recipe,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": not incomplete and expected is not None,
        "shards": brace_pattern(str(shards_dir.resolve()), with_samples, width),
        "shards_relative": brace_pattern("shards", with_samples, width),
        "num_shards": len(with_samples),
        "num_samples": num_samples,
        "counts": {
            "input_rows": source.get("rows"),
            "dropped_rows": (source.get("validation") or {}).get("dropped", {}),
            "duplicate_urls": (source.get("validation") or {}).get("duplicate_urls", 0),
            "dropped_duplicates": (source.get("validation") or {}).get("dropped_duplicates", 0),
            "attempted": totals["count"],
            "successes": totals["successes"],
            "failed_to_download": totals["failed_to_download"],
            "failed_to_resize": totals["failed_to_resize"],
            "by_category": dict(by_category.most_common()),
            "by_cause": dict(by_cause.most_common(50)),
        },
        "expected_shards": expected,
        "incomplete_shards": incomplete,
        "empty_shards": [i for i in finished if verified[i]["samples"] == 0],
        "mismatched_shards": mismatched,
        "shard_seconds": round(duration, 2),
        "settings": settings or {},
        "timing": timing or {},
        "input": {k: source.get(k) for k in ("recipe", "inputs", "options", "rows", "columns")},
        "shard_list": [verified[i] | {"stats_successes": stats[i].get("successes")} for i in finished],
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


# ------------------------------------------------------------------------------ img2dataset
def run_img2dataset(input_dir: Path, shards_dir: Path, *, columns: list[str], processes: int, threads: int,
                    image_size: int, resize_mode: str, samples_per_shard: int, timeout: int, retries: int,
                    max_image_area: float, min_image_size: int, max_aspect_ratio: float,
                    encode_quality: int, distributor: str = "multiprocessing",
                    user_agent_token: str | None = "simvlg") -> dict:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # else every worker phones home on import
    # hard memory ceiling: OpenCV refuses to decode above this many pixels (counted as a decoding
    # error); max_image_area (checked after decoding) gives the "image area too large" count below it
    if math.isfinite(max_image_area):
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(2 * max_image_area)))
    import img2dataset

    settings = dict(
        url_list=str(input_dir), input_format="parquet", url_col="url", caption_col="caption",
        save_additional_columns=["captions"] if "captions" in columns else None,
        output_format="webdataset", output_folder=str(shards_dir), processes_count=processes,
        thread_count=threads, image_size=image_size, resize_mode=resize_mode, resize_only_if_bigger=True,
        encode_format="jpg", encode_quality=encode_quality, number_sample_per_shard=samples_per_shard,
        timeout=timeout, retries=retries, max_image_area=max_image_area, min_image_size=min_image_size,
        max_aspect_ratio=max_aspect_ratio, incremental_mode="incremental", distributor=distributor,
        extract_exif=False, enable_wandb=False, user_agent_token=user_agent_token, max_shard_retry=2,
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


# ------------------------------------------------------------------------------ video shards
def _probe_video(path: str) -> str | None:
    try:
        import av
        with av.open(path) as c:
            if not c.streams.video:
                return "unreadable video: no video stream"
            for _ in c.decode(c.streams.video[0]):
                return None
        return "unreadable video: no frames"
    except Exception as e:  # noqa: BLE001
        return f"unreadable video: {type(e).__name__}"


def _write_video_shard(task) -> int:
    sid, rows, shards_dir, width = task
    name = f"{sid:0{width}d}"
    tmp = Path(shards_dir) / f"{name}.tar.tmp"
    status: Counter = Counter()
    t0 = time.time()
    ok = failed = 0
    with tarfile.open(tmp, "w") as tar:
        for i, row in enumerate(rows):
            key = f"{sid:0{width}d}{i:04d}"
            path = row["video"]
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                status[f"missing file: {e.strerror}"] += 1
                failed += 1
                continue
            err = _probe_video(path)
            if err:
                status[err] += 1
                failed += 1
                continue
            ext = Path(path).suffix.lower().lstrip(".") or "mp4"
            meta = {"video_id": row.get("video_id"), "caption": row["caption"],
                    "captions": row.get("captions") or [row["caption"]], "file": Path(path).name}
            for member, payload in ((f"{key}.{ext}", data), (f"{key}.txt", row["caption"].encode()),
                                    (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(payload), 0, 0o444
                tar.addfile(info, _bytes_io(payload))
            ok += 1
            status["success"] += 1
    os.replace(tmp, Path(shards_dir) / f"{name}.tar")
    stats = {"count": len(rows), "successes": ok, "failed_to_download": failed, "failed_to_resize": 0,
             "duration": time.time() - t0, "start_time": t0, "end_time": time.time(),
             "status_dict": dict(status)}
    (Path(shards_dir) / f"{name}_stats.json").write_text(json.dumps(stats, indent=1))
    return sid


def _bytes_io(b: bytes):
    import io
    return io.BytesIO(b)


def write_video_shards(input_dir: Path, shards_dir: Path, info: dict, *, samples_per_shard: int,
                       processes: int, log=None) -> None:
    import pyarrow.parquet as pq

    shards_dir.mkdir(parents=True, exist_ok=True)
    width = 5
    tasks, sid = [], 0
    for f in info["files"]:
        rows = pq.read_table(input_dir / f).to_pylist()
        for start in range(0, len(rows), samples_per_shard):
            name = f"{sid:0{width}d}"
            done = (shards_dir / f"{name}_stats.json").is_file() and (shards_dir / f"{name}.tar").is_file()
            if not done:
                tasks.append((sid, rows[start:start + samples_per_shard], str(shards_dir), width))
            sid += 1
    print(f"prep: {len(tasks)} video shard(s) to write, {sid - len(tasks)} already finished",
          file=log or sys.stderr)
    if processes > 1 and len(tasks) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(processes, len(tasks))) as pool:
            for _ in pool.imap_unordered(_write_video_shard, tasks):
                pass
    else:
        for t in tasks:
            _write_video_shard(t)


# ------------------------------------------------------------------------------- the commands
def run_recipe(recipe_name: str, out: Path, rargs: Args, *, processes: int = 0, threads: int = 64,
               image_size: int = 384, resize_mode: str = "keep_ratio", samples_per_shard: int | None = None,
               timeout: int = 10, retries: int = 2, max_image_area: float = DEFAULT_MAX_IMAGE_AREA,
               min_image_size: int = 0, max_aspect_ratio: float = float("inf"), encode_quality: int = 95,
               drop_invalid: bool = False, drop_duplicates: bool = False, limit: int | None = None,
               convert_only: bool = False, distributor: str = "multiprocessing", log=None) -> dict:
    recipe = RECIPES[recipe_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sps = samples_per_shard or recipe.samples_per_shard
    processes = processes or (os.cpu_count() or 1)
    info = convert(recipe_name, rargs, out / "input", samples_per_shard=sps, drop_invalid=drop_invalid,
                   drop_duplicates=drop_duplicates, limit=limit, log=log)
    if convert_only:
        return info
    shards_dir = out / "shards"
    reset_unfinished(shards_dir, log, cache=_cached_shards(out / "manifest.json"))
    before = _finished(shards_dir)
    todo = sorted(set(range(info["expected_shards"])) - set(before))
    t0 = time.time()
    if not todo:
        print(f"prep: all {info['expected_shards']} shards already finished", file=log or sys.stderr)
        old = _cached_manifest(out)
        settings = old.get("settings", {})
    elif recipe.kind == "video":
        write_video_shards(out / "input", shards_dir, info, samples_per_shard=sps, processes=processes,
                           log=log)
        settings = {"samples_per_shard": sps}
    else:
        settings = run_img2dataset(out / "input", shards_dir, columns=info["columns"], processes=processes,
                                   threads=threads, image_size=image_size, resize_mode=resize_mode,
                                   samples_per_shard=sps, timeout=timeout, retries=retries,
                                   max_image_area=max_image_area, min_image_size=min_image_size,
                                   max_aspect_ratio=max_aspect_ratio, encode_quality=encode_quality,
                                   distributor=distributor)
        # check outputs, not exit codes (e.g. a missing distributor exits 0 having written nothing)
        if not any(shards_dir.glob("*_stats.json")):
            raise PrepError(f"img2dataset wrote no shard into {shards_dir} (distributor {distributor!r}); "
                            "see its output above")
    wall = time.time() - t0
    settings = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in settings.items()}
    after = _finished(shards_dir)
    new_ids = set(after) - set(before)
    attempted = sum(after[i].get("count", 0) for i in new_ids)
    ok = sum(after[i].get("successes", 0) for i in new_ids)
    timing = {"wall_seconds": round(wall, 2), "shards_this_run": len(new_ids), "urls_this_run": attempted,
              "urls_per_second": round(attempted / wall, 1) if wall > 0 and attempted else None,
              "samples_per_second": round(ok / wall, 1) if wall > 0 and ok else None}
    if not todo:
        timing = _cached_manifest(out).get("timing", timing)
    m = build_manifest(out, recipe=recipe_name, kind=recipe.kind, settings=settings, timing=timing,
                       processes=processes)
    c = m["counts"]
    fails = ", ".join(f"{k} {v}" for k, v in c["by_category"].items()) or "none"
    print(f"prep {recipe_name}: {m['num_samples']} samples in {m['num_shards']} shards "
          f"({c['successes']}/{c['attempted']} ok); failures: {fails}; {wall:.1f} s this run",
          file=log or sys.stderr)
    if m["incomplete_shards"]:
        print(f"prep: {len(m['incomplete_shards'])} shard(s) not finished {m['incomplete_shards'][:10]}: "
              "re-run the same command to retry them", file=log or sys.stderr)
    return m


def split_list(recipe_name: str, out: Path, rargs: Args, parts: int, *, drop_invalid=False,
               drop_duplicates=False, limit=None, log=None) -> list[Path]:
    """Validate + convert once, then cut into `parts` parquet files out/parts/part_NNNNN.parquet for a
    SLURM array (each task runs recipe `urls` on its part)."""
    import pyarrow.parquet as pq

    if RECIPES[recipe_name].kind != "image":
        raise PrepInputError(f"split is for URL lists; {recipe_name} is a local video recipe")
    out = Path(out)
    info = convert(recipe_name, rargs, out / "input", samples_per_shard=1, drop_invalid=drop_invalid,
                   drop_duplicates=drop_duplicates, limit=limit, log=log)
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
        sid = _shard_id(stale.name)
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


# ------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simvlg prep",
        description="Turn a dataset's URL list into WebDataset shards + manifest.json (img2dataset). "
                    "RECIPE is one of: " + ", ".join(RECIPES)
                    + "; or list | split RECIPE | merge | manifest.")
    p.add_argument("recipe", help="recipe name, or list / split / merge / manifest")
    p.add_argument("split_recipe", nargs="?", help="(split only) the recipe whose list to split")
    p.add_argument("--out", help="output folder (input/, shards/, manifest.json)")
    p.add_argument("--input", dest="inputs", action="append", default=[], metavar="FILE",
                   help="input list(s) as published; repeat for recipes with two files (sbu)")
    p.add_argument("--image-root", help="coco_karpathy: local COCO 2014 image folder (else --base-url)")
    p.add_argument("--base-url", default="http://images.cocodataset.org/", help="coco_karpathy image host")
    p.add_argument("--video-root", help="msrvtt/msvd: folder holding the video files")
    p.add_argument("--split", default="train", help="msrvtt/msvd split in the annotation file")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--drop-invalid", action="store_true",
                   help="drop rows with an empty url/caption instead of failing (they are counted)")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="drop rows whose URL appeared earlier in the list (always counted)")
    p.add_argument("--limit", type=int, help="use only the first N valid rows (trial runs)")
    p.add_argument("--processes", type=int, default=0, help="download processes (default: all cores)")
    p.add_argument("--threads", type=int, default=64, help="download threads per process")
    p.add_argument("--image-size", type=int, default=384, help="shorter side stored (keep_ratio)")
    p.add_argument("--resize-mode", default="keep_ratio",
                   choices=["keep_ratio", "center_crop", "border", "keep_ratio_largest", "no"])
    p.add_argument("--samples-per-shard", type=int, help="default: 10000 images, 500 videos")
    p.add_argument("--timeout", type=int, default=10, help="seconds per HTTP request")
    p.add_argument("--retries", type=int, default=2, help="extra attempts per failed URL")
    p.add_argument("--max-image-area", type=float, default=DEFAULT_MAX_IMAGE_AREA,
                   help="skip images with more pixels than this (counted as too_large)")
    p.add_argument("--min-image-size", type=int, default=0)
    p.add_argument("--max-aspect-ratio", type=float, default=float("inf"))
    p.add_argument("--encode-quality", type=int, default=95)
    p.add_argument("--distributor", default="multiprocessing", choices=["multiprocessing", "pyspark", "ray"])
    p.add_argument("--convert-only", action="store_true", help="validate + write parquet, no download")
    p.add_argument("--parts", type=int, help="(split) number of parts, one per SLURM array task")
    p.add_argument("--link", default="hardlink", choices=["hardlink", "symlink", "copy"],
                   help="(merge) how merged shard names point at the parts' shards")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rargs = Args(inputs=args.inputs, url_col=args.url_col, caption_col=args.caption_col,
                 image_root=args.image_root, video_root=args.video_root, base_url=args.base_url,
                 split=args.split)
    try:
        if args.recipe == "list":
            for r in RECIPES.values():
                print(f"{r.name:18s} {r.kind:5s}  {r.inputs}")
            return 0
        if not args.out:
            print("simvlg prep: --out DIR is required", file=sys.stderr)
            return 2
        if args.recipe == "merge":
            m = merge_parts(Path(args.out), link=args.link)
            return 0 if m["complete"] else 1
        if args.recipe == "manifest":
            src = Path(args.out) / "input" / "_SOURCE.json"
            recipe = json.loads(src.read_text()).get("recipe", "urls") if src.is_file() else "urls"
            m = build_manifest(Path(args.out), recipe=recipe, kind=RECIPES.get(recipe, RECIPES["urls"]).kind)
            print(json.dumps({k: m[k] for k in ("shards", "num_shards", "num_samples", "complete")}))
            return 0 if m["complete"] else 1
        if args.recipe == "split":
            if args.split_recipe not in RECIPES or not args.parts:
                print("simvlg prep split RECIPE --input ... --parts N --out DIR", file=sys.stderr)
                return 2
            split_list(args.split_recipe, Path(args.out), rargs, args.parts, drop_invalid=args.drop_invalid,
                       drop_duplicates=args.drop_duplicates, limit=args.limit)
            return 0
        if args.recipe not in RECIPES:
            print(f"simvlg prep: unknown recipe {args.recipe!r}; known: {', '.join(RECIPES)}",
                  file=sys.stderr)
            return 2
        m = run_recipe(args.recipe, Path(args.out), rargs, processes=args.processes, threads=args.threads,
                       image_size=args.image_size, resize_mode=args.resize_mode,
                       samples_per_shard=args.samples_per_shard, timeout=args.timeout, retries=args.retries,
                       max_image_area=args.max_image_area, min_image_size=args.min_image_size,
                       max_aspect_ratio=args.max_aspect_ratio, encode_quality=args.encode_quality,
                       drop_invalid=args.drop_invalid, drop_duplicates=args.drop_duplicates,
                       limit=args.limit, convert_only=args.convert_only,
                       distributor=args.distributor)
        if args.convert_only:
            return 0
        return 0 if m["complete"] else 1
    except PrepInputError as e:
        print(f"simvlg prep: bad input: {e}", file=sys.stderr)
        return 2
    except PrepError as e:
        print(f"simvlg prep: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
