"""What a run produced, in words: img2dataset's failure messages by cause, and the manifest built
from what the shards folder holds (the causes are documented in data_prep/README.md).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from ..formats.manifest import Counts, Manifest, ShardEntry, write_manifest
from ..formats.shards import SHARD_WIDTH, brace_pattern, shard_id
from .verify import cached_shard_list, verify_shards

_CAUSES = [
    ("http_404", ("http error 404",)),
    ("http_403", ("http error 403",)),
    ("http_error", ("http error",)),
    ("timeout", ("timed out", "timeout")),
    ("connection_refused", ("connection refused", "errno 111")),
    (
        "dns",
        (
            "name or service not known",
            "temporary failure in name resolution",
            "getaddrinfo",
            "nodename nor servname",
            "no address associated",
        ),
    ),
    (
        "connection_error",
        (
            "connection reset",
            "remote end closed",
            "incompleteread",
            "incomplete read",
            "connection aborted",
            "broken pipe",
            "eof occurred",
        ),
    ),
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


def build_manifest(
    out: Path,
    *,
    recipe: str,
    kind: str,
    settings: dict | None = None,
    timing: dict | None = None,
    processes: int = 1,
) -> Manifest:
    """OUT/manifest.json from what OUT/shards/ holds (tars scanned, or their cached scan reused) and
    OUT/input/_SOURCE.json (the expected shard count, the validation counts); returns it."""
    out = Path(out)
    shards_dir = out / "shards"
    source = {}
    if (out / "input" / "_SOURCE.json").is_file():
        source = json.loads((out / "input" / "_SOURCE.json").read_text())
    expected = source.get("expected_shards")
    stats = {}
    for f in sorted(shards_dir.glob("*_stats.json")) if shards_dir.is_dir() else []:
        sid = shard_id(f.name)
        if sid is not None:
            try:
                stats[sid] = json.loads(f.read_text())
            except ValueError:
                pass
    verified = (
        verify_shards(shards_dir, cached_shard_list(out), processes, kind=kind) if shards_dir.is_dir() else {}
    )
    expected_ids = set(range(expected)) if expected is not None else set(stats) | set(verified)

    def whole(i):  # readable, and holds what img2dataset says it wrote
        v, written = verified.get(i, {}), stats[i].get("successes")
        return v.get("ok") and (written is None or v["samples"] == written)

    mismatched = sorted(
        i for i in expected_ids if i in stats and verified.get(i, {}).get("ok") and not whole(i)
    )
    finished = sorted(i for i in expected_ids if i in stats and whole(i))
    incomplete = sorted(expected_ids - set(finished))
    width = max([SHARD_WIDTH] + [len(v["file"]) - len(".tar") for v in verified.values()])
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
    validation = source.get("validation") or {}
    manifest = Manifest(
        recipe=recipe,
        kind=kind,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        complete=not incomplete and expected is not None,
        shards=brace_pattern(str(shards_dir.resolve()), with_samples, width),
        shards_relative=brace_pattern("shards", with_samples, width),
        num_shards=len(with_samples),
        num_samples=num_samples,
        counts=Counts(
            input_rows=source.get("rows"),
            dropped_rows=validation.get("dropped", {}),
            duplicate_urls=validation.get("duplicate_urls", 0),
            dropped_duplicates=validation.get("dropped_duplicates", 0),
            attempted=totals["count"],
            successes=totals["successes"],
            failed_to_download=totals["failed_to_download"],
            failed_to_resize=totals["failed_to_resize"],
            by_category=dict(by_category.most_common()),
            by_cause=dict(by_cause.most_common(50)),
        ),
        expected_shards=expected,
        incomplete_shards=incomplete,
        empty_shards=[i for i in finished if verified[i]["samples"] == 0],
        mismatched_shards=mismatched,
        shard_seconds=round(duration, 2),
        settings=settings or {},
        timing=timing or {},
        input={k: source.get(k) for k in ("recipe", "inputs", "options", "rows", "columns")},
        shard_list=[
            ShardEntry(**{**verified[i], "stats_successes": stats[i].get("successes")}) for i in finished
        ],
    )
    write_manifest(out, manifest)
    return manifest
