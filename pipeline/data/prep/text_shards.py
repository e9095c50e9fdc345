"""Sentences -> text-only tar shards in img2dataset's layout (NNNNN.tar + NNNNN_stats.json), for the
`sentences` recipe (P-Former pre-training): one sample per sentence, `KEY.txt` holding it. Nothing is
downloaded, so nothing fails; each shard's stats file is written last and marks it finished, as the
video shards' and img2dataset's do (a re-run rewrites only shards without one).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..formats.jsonfile import write_json_atomic
from ..formats.shards import ShardWriter, shard_name


def _write_text_shard(sid: int, sentences: list[str], shards_dir: Path, digits: int) -> None:
    name = shard_name(sid)
    t0 = time.time()
    with ShardWriter(shards_dir / f"{name}.tar") as shard:
        for i, sentence in enumerate(sentences):
            shard.add(f"{name}{i:0{digits}d}", {"txt": sentence})
    n = len(sentences)
    stats = {
        "count": n,
        "successes": n,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": time.time() - t0,
        "start_time": t0,
        "end_time": time.time(),
        "status_dict": {"success": n},
    }
    write_json_atomic(shards_dir / f"{name}_stats.json", stats)  # last: marks the shard done


def write_text_shards(
    input_dir: Path, shards_dir: Path, info: dict, *, samples_per_shard: int, log=None
) -> None:
    """The converted sentences (input_dir's parquet parts, whole shards per part) -> shards_dir."""
    import pyarrow.parquet as pq

    shards_dir.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(samples_per_shard - 1)))  # sample keys: the shard name + the index
    sid = written = 0
    for f in info["files"]:
        sentences = pq.read_table(input_dir / f, columns=["caption"]).column("caption").to_pylist()
        for start in range(0, len(sentences), samples_per_shard):
            name = shard_name(sid)
            if not ((shards_dir / f"{name}_stats.json").is_file() and (shards_dir / f"{name}.tar").is_file()):
                _write_text_shard(sid, sentences[start : start + samples_per_shard], shards_dir, digits)
                written += 1
            sid += 1
    print(f"prep: {written} text shard(s) written, {sid - written} already finished", file=log or sys.stderr)
