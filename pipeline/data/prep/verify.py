"""Which shards of OUT/shards/ are finished: img2dataset's stats file, a whole tar, and as many samples
in it as the stats say were written. A shard that is not finished has its files removed so that
img2dataset's incremental mode downloads it again; finished shards are never touched.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

from ..formats.manifest import Manifest, read_manifest
from ..formats.shards import IMAGE_EXTS, VIDEO_EXTS, count_tar_samples, shard_id


def sample_exts(kind: str) -> tuple[str, ...]:
    """The member that makes a sample of a shard of this kind (a text shard's samples are sentences)."""
    return ("txt",) if kind == "text" else IMAGE_EXTS + VIDEO_EXTS


def _verify_one(path: str, exts: tuple[str, ...] = IMAGE_EXTS + VIDEO_EXTS) -> dict:
    try:
        return {"samples": count_tar_samples(path, exts), "ok": True}
    except (OSError, tarfile.TarError, EOFError) as e:
        return {"samples": 0, "ok": False, "error": str(e)}


def verify_shards(
    shards_dir: Path, cache: dict | None = None, processes: int = 1, kind: str = "image"
) -> dict[int, dict]:
    """{id: {"file", "samples", "size", "mtime", "ok", "error"}} for every NNNNN.tar; sample counts
    from the tar headers (cached by size + mtime; uncached shards are scanned in `processes`)."""
    cache = cache or {}
    out, todo = {}, []
    for tar in sorted(shards_dir.glob("*.tar")):
        sid = shard_id(tar.name)
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
            results = list(
                ex.map(_verify_one, [p for _, p in todo], [sample_exts(kind)] * len(todo), chunksize=4)
            )
    else:
        results = [_verify_one(p, sample_exts(kind)) for _, p in todo]
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


def reset_unfinished(shards_dir: Path, log=None, cache: dict | None = None, kind: str = "image") -> list[int]:
    """Remove the stats (and status parquet, and tar) of shards that are not whole, so img2dataset's
    incremental mode redoes them: the tar is missing, not a closed tar, unreadable (a garbled member
    header included), or holds another number of samples than its stats file says were written.
    Whole shards are not touched; tar scans are cached by size + mtime in the manifest."""
    if not shards_dir.is_dir():
        return []
    verified = verify_shards(shards_dir, cache, kind=kind)
    redo = []
    for stats_file in sorted(shards_dir.glob("*_stats.json")):
        sid = shard_id(stats_file.name)
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


def finished_shards(shards_dir: Path) -> dict[int, dict]:
    """{id: stats} of shards that have a stats file and a tar (cheap; no tar reading)."""
    out = {}
    if not shards_dir.is_dir():
        return out
    for f in shards_dir.glob("*_stats.json"):
        sid = shard_id(f.name)
        if sid is not None and (shards_dir / f.name.replace("_stats.json", ".tar")).is_file():
            try:
                out[sid] = json.loads(f.read_text())
            except ValueError:
                pass
    return out


def previous_manifest(out: Path) -> Manifest | None:
    """The manifest an earlier run wrote into OUT, or None (none, unreadable, or not a manifest)."""
    try:
        return read_manifest(out / "manifest.json")
    except ValueError:
        return None


def cached_shard_list(out: Path) -> dict[int, dict]:
    """{id: shard entry} of the earlier manifest: tar scans to reuse while size and mtime hold."""
    m = previous_manifest(out)
    return {e.id: e.model_dump(exclude_none=True) for e in m.shard_list} if m else {}
