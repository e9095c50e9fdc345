"""Local video files -> tar shards in img2dataset's layout (NNNNN.tar + NNNNN_stats.json), for the
video recipes (msrvtt, msvd): each file is probed (one decoded frame) before it is written; one that
cannot be read is counted under its cause, like a failed download.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from ..formats.jsonfile import write_json_atomic
from ..formats.shards import ShardWriter, shard_name


def _probe_video(path: str) -> str | None:
    try:
        import av

        with av.open(path) as c:
            if not c.streams.video:
                return "unreadable video: no video stream"
            for _ in c.decode(c.streams.video[0]):
                return None
        return "unreadable video: no frames"
    except Exception as e:
        return f"unreadable video: {type(e).__name__}"


def _write_video_shard(task) -> int:
    sid, rows, shards_dir = task
    name = shard_name(sid)
    status: Counter = Counter()
    t0 = time.time()
    ok = failed = 0
    with ShardWriter(Path(shards_dir) / f"{name}.tar") as shard:
        for i, row in enumerate(rows):
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
            meta = {
                "video_id": row.get("video_id"),
                "caption": row["caption"],
                "captions": row.get("captions") or [row["caption"]],
                "file": Path(path).name,
            }
            shard.add(f"{name}{i:04d}", {ext: data, "txt": row["caption"], "json": json.dumps(meta)})
            ok += 1
            status["success"] += 1
    stats = {
        "count": len(rows),
        "successes": ok,
        "failed_to_download": failed,
        "failed_to_resize": 0,
        "duration": time.time() - t0,
        "start_time": t0,
        "end_time": time.time(),
        "status_dict": dict(status),
    }
    write_json_atomic(Path(shards_dir) / f"{name}_stats.json", stats)  # last: marks the shard done
    return sid


def write_video_shards(
    input_dir: Path, shards_dir: Path, info: dict, *, samples_per_shard: int, processes: int, log=None
) -> None:
    import pyarrow.parquet as pq

    shards_dir.mkdir(parents=True, exist_ok=True)
    tasks, sid = [], 0
    for f in info["files"]:
        rows = pq.read_table(input_dir / f).to_pylist()
        for start in range(0, len(rows), samples_per_shard):
            name = shard_name(sid)
            done = (shards_dir / f"{name}_stats.json").is_file() and (shards_dir / f"{name}.tar").is_file()
            if not done:
                tasks.append((sid, rows[start : start + samples_per_shard], str(shards_dir)))
            sid += 1
    print(
        f"prep: {len(tasks)} video shard(s) to write, {sid - len(tasks)} already finished",
        file=log or sys.stderr,
    )
    if processes > 1 and len(tasks) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(processes, len(tasks))) as pool:
            for _ in pool.imap_unordered(_write_video_shard, tasks):
                pass
    else:
        for t in tasks:
            _write_video_shard(t)
