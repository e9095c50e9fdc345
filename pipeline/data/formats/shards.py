"""WebDataset tar shards: names, specs, reading and writing, in one place.

Names: img2dataset's layout, `NNNNN.tar` (+ `NNNNN_stats.json`, `NNNNN.parquet`) with 5 digits; a
merged SLURM run numbers its shards with 6. Sample keys inside a shard are the shard name + 4 digits.

Shard specs are brace patterns (`dir/{00000..01255}.tar`), several joined with `::`, or the path of a
`manifest.json` written by `simvlg prep` (its shard pattern is resolved next to it and its sample
count is used for epoch sizing; the manifest's schema is in manifest.py).

The reader groups tar members into samples the WebDataset way (key = path up to the first dot of the
basename, extension = the rest, lower-cased). Shards come from the internet: only the extensions in
`ALLOWED_EXTS` are ever read; everything else (`.pyd`, `.pickle`, `.pth`, ...) is skipped without
reading its bytes, and nothing is ever unpickled. The writer (ShardWriter, write_shard) writes to a
temporary name and renames a finished tar into place, so a reader never sees half a shard.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from .manifest import read_manifest

# media extensions, of tar members and of files (prep's video recipes, eval's media folders)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")
TEXT_EXTS = ("txt", "json")
ALLOWED_EXTS = frozenset(IMAGE_EXTS + VIDEO_EXTS + TEXT_EXTS)
MAX_MEMBER_BYTES = 512 * 2**20  # a member above this is skipped unread (counted as oversized)

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
SHARD_WIDTH = 5  # digits of a shard name (img2dataset's)
_SHARD_FILE_RE = re.compile(r"^(\d+)(?:_stats\.json|\.tar)$")


# -------------------------------------------------------------------------------------- names
def shard_name(sid: int, width: int = SHARD_WIDTH) -> str:
    """12 -> "00012" (the tar is "00012.tar", its samples "000120000", "000120001", ...)."""
    return f"{sid:0{width}d}"


def shard_id(filename: str) -> int | None:
    """ "00012.tar" or "00012_stats.json" -> 12; None for any other name."""
    m = _SHARD_FILE_RE.match(filename)
    return int(m.group(1)) if m else None


def local_path(url: str) -> str | None:
    """The file path of a local shard url (a path, or file://PATH); None for pipe: and other schemes."""
    if url.startswith("file://"):
        return url[len("file://") :]
    if "://" in url or url.startswith("pipe:"):
        return None
    return url


# -------------------------------------------------------------------------------- specs
def resolve_spec(spec: str) -> tuple[list[str], int | None]:
    """A shard spec -> (list of shard urls, total samples if a manifest says so).

    `spec` is a brace pattern, several patterns joined by `::`, a manifest.json, or a folder holding
    one. Raises ValueError with the spec in the message if it expands to nothing.
    """
    urls: list[str] = []
    total: int | None = 0
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        p = Path(part)
        if part.endswith(".json") or (p.is_dir() and (p / "manifest.json").is_file()):
            mpath = p if part.endswith(".json") else p / "manifest.json"
            m = read_manifest(mpath)
            urls += list(braceexpand.braceexpand(m.pattern(next_to=mpath))) if m.num_shards else []
            total = None if total is None else total + m.num_samples
        else:
            urls += list(braceexpand.braceexpand(part))
            total = None
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    return urls, total


def brace_pattern(folder: str, ids: list[int], width: int = SHARD_WIDTH, ext: str = ".tar") -> str:
    """Compact brace pattern for shard ids: `f/{00000..00009}.tar`, or `f/{{00000..00003},{00007..00009}}.tar`
    when there are gaps. braceexpand() of the result gives back exactly the ids, in order."""
    ids = sorted(set(ids))
    if not ids:
        return ""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))

    def fmt(a: int, b: int) -> str:
        return f"{a:0{width}d}" if a == b else f"{{{a:0{width}d}..{b:0{width}d}}}"

    if len(runs) == 1:
        body = fmt(*runs[0])
    else:
        body = "{" + ",".join(fmt(a, b) for a, b in runs) + "}"
    prefix = folder.rstrip("/") + "/" if folder else ""
    return f"{prefix}{body}{ext}"


# ---------------------------------------------------------------------------------- tar reading
@dataclass(frozen=True)
class LazyMember:
    """Where a member's bytes are, for skipping without reading (fast-forward on resume)."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise tarfile.ReadError(f"{self.path}: unexpected end of data")
        return data


def resolve_lazy(sample: dict) -> dict:
    for k, v in list(sample.items()):
        if isinstance(v, LazyMember):
            sample[k] = v.read()
    return sample


def _open_stream(url: str):
    """(fileobj, closer) for pipe: and http(s):// shards (read sequentially)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)

        def close():
            proc.stdout.close()
            proc.wait()

        return proc.stdout, close
    r = urllib.request.urlopen(url, timeout=60)  # shard urls are configured by the user
    return r, r.close


def _members(tar: tarfile.TarFile, path: str | None, size: int | None):
    """(member, bytes of damage skipped right before it) in archive order, then a final
    (None, damaged bytes after the last member) for local files.

    The tar is opened with ignore_zeros, so tarfile resynchronises after a garbled header (it tries
    every following 512-byte block) instead of reading it as the end of the archive, which would lose
    every later sample silently. A member that does not start where the previous one ended tells us
    bytes were skipped; after the last member only zero blocks may follow."""
    expected = 0
    for m in tar:
        yield m, max(0, m.offset - expected)
        expected = m.offset_data + -(-m.size // 512) * 512 if m.isfile() else m.offset_data
    if path is not None and size is not None and size > expected:
        with open(path, "rb") as f:
            f.seek(expected)
            zeros = all(chunk.count(0) == len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
        yield None, 0 if zeros else size - expected


def iter_tar_samples(
    url: str, *, lazy=lambda: False, on_error=None, allowed: frozenset = ALLOWED_EXTS
) -> Iterator[dict]:
    """Yield samples `{"__key__", "__url__", ext: bytes | LazyMember}` from one tar shard.

    `lazy()` is polled per member: when true (and the shard is a local file) member bytes are not
    read, a LazyMember is stored instead. Errors never propagate. A garbled member header does not end
    the shard: reading resumes at the next valid header. A sample next to damage (garbled bytes, or
    the archive breaking off inside it) carries `__damaged__`: the loader delivers it if it is still
    whole, else counts it as `corrupt_tar`. `on_error(kind, url, exc)` is called with kind
    "unreadable_shard" (cannot open) or "corrupt_tar" (damage no sample carries: the archive broke
    off between samples). Members whose extension is not in `allowed` are never read.
    """
    path = local_path(url)
    closer = None
    current: dict | None = None
    try:
        if path is not None:
            size = os.path.getsize(path)
            fileobj = open(path, "rb")
            closer = fileobj.close
            tar = tarfile.open(fileobj=fileobj, mode="r:", ignore_zeros=True)
        else:
            size = None
            fileobj, closer = _open_stream(url)
            tar = tarfile.open(fileobj=fileobj, mode="r|*", ignore_zeros=True)
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        if closer:
            closer()
        if on_error:
            on_error("unreadable_shard", url, e)
        return
    damaged_next = False  # garbled bytes were skipped: the next sample may have lost a member
    try:
        for m, skipped in _members(tar, path, size):
            if m is None:  # garbled bytes after the last member (or no tar member at all)
                if skipped and current is not None:
                    current["__damaged__"] = True
                elif skipped and on_error:
                    whole = skipped == size
                    on_error(
                        "unreadable_shard" if whole else "corrupt_tar",
                        url,
                        tarfile.ReadError(
                            "not a tar archive" if whole else f"{skipped} garbled bytes at the end"
                        ),
                    )
                break
            if skipped:
                damaged_next = True
            if not m.isfile():
                continue
            match = _KEY_RE.match(m.name)
            if not match:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if key.startswith("__") or os.path.basename(key).startswith("._"):
                continue
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if damaged_next:  # damage right before this member: the sample may have lost one
                current["__damaged__"] = True
                damaged_next = False
            if ext not in allowed:
                continue  # never read: shards come from the internet
            if m.size > MAX_MEMBER_BYTES:
                current.setdefault("__oversized__", []).append(ext)
                continue
            if path is not None and lazy():
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError("unexpected end of data")
                current[ext] = LazyMember(path, m.offset_data, m.size)
            else:
                f = tar.extractfile(m)
                data = f.read()
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                current[ext] = data
        if current is not None:
            if damaged_next:
                current["__damaged__"] = True
            yield current
            current = None
    except (OSError, tarfile.TarError, EOFError, ValueError, UnicodeDecodeError) as e:
        if current is not None and len(current) > 2:  # its complete members; decode decides
            current["__damaged__"] = True
            yield current  # counted as corrupt_tar by the loader if it is not usable
        elif on_error:  # the break fell between samples: count the loss once
            on_error("corrupt_tar", url, e)
    finally:
        try:
            tar.close()
        finally:
            if closer:
                closer()


def count_tar_samples(path: str, image_exts=IMAGE_EXTS + VIDEO_EXTS) -> int:
    """Number of samples with an image/video member (reads headers only). Raises tarfile.ReadError
    on a broken tar: truncated, or a garbled header anywhere (which plain tarfile reads as the end)."""
    n = 0
    size = os.path.getsize(path)
    with tarfile.open(path, mode="r:", ignore_zeros=True) as tar:
        for m, skipped in _members(tar, path, size):
            if skipped:
                if skipped == size:
                    raise tarfile.ReadError(f"{path}: not a tar archive")
                where = m.offset if m is not None else size
                raise tarfile.ReadError(f"{path}: {skipped} bytes of garbled data before byte {where}")
            if m is None:
                break
            if m.offset_data + m.size > size:
                raise tarfile.ReadError(f"{path}: unexpected end of data")
            match = _KEY_RE.match(m.name) if m.isfile() else None
            if match and match.group(2).lower() in image_exts:
                n += 1
    return n


class ShardWriter:
    """Writes one WebDataset tar, sample by sample, under `path.tmp`; renamed to `path` when the block
    ends without an error (removed if it raises), so a reader never sees half a shard.

        with ShardWriter(dir / "00003.tar") as w:
            w.add("000030000", {"jpg": data, "txt": "a caption", "json": b'{...}'})
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:
        self.tar = tarfile.open(self.tmp, "w")
        return self

    def add(self, key: str, members: dict) -> None:
        """One sample: {ext: bytes | str}; keys starting with "__" are not written."""
        import io

        for ext, data in members.items():
            if ext.startswith("__"):
                continue
            if isinstance(data, str):
                data = data.encode()
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tar.addfile(info, io.BytesIO(data))

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tar.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_shard(path: str | Path, samples: list[dict]) -> None:
    """Write samples `{"__key__": k, ext: bytes | str}` as a WebDataset tar (atomic rename)."""
    with ShardWriter(path) as w:
        for s in samples:
            w.add(s["__key__"], s)
