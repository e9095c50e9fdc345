"""Evaluation media: image and video files from a local folder (FolderMedia) or from local WebDataset
shards (ShardMedia, e.g. what `simvlg prep` wrote), and the torch Dataset that decodes them.

A medium is found by the name its annotation gives it (pipeline/data/formats/annotations.py): in a
folder as `root/name`, else `root/basename(name)` (videos also with each video extension); in shards
by the sample key or the basename/stem of the `url`/`image`/`file_name`/`video`/`video_id` in its
.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline.data.formats.shards import IMAGE_EXTS, VIDEO_EXTS, iter_tar_samples, local_path, resolve_spec

VIDEO_SUFFIXES = tuple("." + e for e in VIDEO_EXTS)


class EvalDataError(ValueError):
    """An evaluation set that cannot be used: the one-line message says which file and why."""


class FolderMedia:
    """Media files under a local folder: `root/name`, else `root/basename(name)` (+ video suffixes)."""

    def __init__(self, root: Path, kind: str):
        self.root, self.kind = Path(root), kind
        self._cache: dict[str, Path | None] = {}

    def describe(self) -> str:
        return str(self.root)

    def locate(self, name: str) -> Path | None:
        if name in self._cache:
            return self._cache[name]
        cands = [self.root / name, self.root / os.path.basename(name)]
        if self.kind == "video" and Path(name).suffix.lower() not in VIDEO_SUFFIXES:
            cands += [c.with_name(c.name + s) for c in cands[:2] for s in VIDEO_SUFFIXES]
        found = next((c for c in cands if c.is_file()), None)
        self._cache[name] = found
        return found

    def read(self, name: str) -> bytes:
        p = self.locate(name)
        if p is None:
            raise FileNotFoundError(f"{self.root / name}")
        return p.read_bytes()


class ShardMedia:
    """Media inside local WebDataset .tar shards, found by sample key or the file names in its json."""

    NAME_FIELDS = ("url", "image", "file_name", "video", "video_id", "key", "image_id", "id")

    def __init__(self, spec: str, kind: str):
        self.spec, self.kind = spec, kind
        try:
            urls, _ = resolve_spec(spec)
        except ValueError as e:
            raise EvalDataError(f"shards {spec!r}: {e}") from None
        exts = VIDEO_EXTS if kind == "video" else IMAGE_EXTS
        self.index: dict[str, object] = {}
        ambiguous: set[str] = set()
        errors: list[str] = []
        for url in urls:
            path = local_path(url)
            if path is None:
                raise EvalDataError(f"shards {spec!r}: {url} is not a local file (eval shards must be local)")
            if not os.path.isfile(path):
                raise EvalDataError(f"shards {spec!r}: shard not found: {path}")
            for s in iter_tar_samples(
                path, lazy=lambda: True, on_error=lambda kind, u, e: errors.append(f"{u}: {kind} ({e})")
            ):
                member = next((s[e] for e in exts if e in s), None)
                if member is None:
                    continue
                names = {s["__key__"], os.path.basename(s["__key__"])}
                if "json" in s:
                    try:
                        js = s["json"]
                        meta = json.loads(js.read() if hasattr(js, "read") else js)
                    except (ValueError, OSError):
                        meta = {}
                    for f in self.NAME_FIELDS:
                        v = meta.get(f) if isinstance(meta, dict) else None
                        if isinstance(v, (str, int)) and str(v):
                            v = str(v)
                            names |= {v, os.path.basename(v), Path(os.path.basename(v)).stem}
                for n in names:
                    if n in self.index and self.index[n] != member:
                        ambiguous.add(n)
                    self.index[n] = member
        for n in ambiguous:
            self.index.pop(n, None)
        if errors:
            raise EvalDataError(f"shards {spec!r}: unreadable shard {errors[0]}")

    def describe(self) -> str:
        return f"shards {self.spec}"

    def locate(self, name: str):
        base = os.path.basename(name)
        for n in (name, base, Path(base).stem):
            if n in self.index:
                return self.index[n]
        return None

    def read(self, name: str) -> bytes:
        m = self.locate(name)
        if m is None:
            raise FileNotFoundError(f"{name} in {self.describe()}")
        return m.read() if hasattr(m, "read") else m


class EvalDataset(Dataset):
    """Item i -> (i, uint8 pixels): images [3, S, S] (resize shorter side + center crop), videos
    [T, 3, S, S] (T frames, uniformly spaced, one crop for all)."""

    def __init__(self, data, image_size: int, num_frames: int = 8):  # data: tasks.TaskData
        from pipeline.data.transforms import EvalTransform

        self.data = data
        self.transform = EvalTransform(image_size)
        self.num_frames = num_frames

    def __len__(self) -> int:
        return len(self.data.samples)

    def __getitem__(self, i: int):
        import io

        from PIL import Image

        s = self.data.samples[i]
        try:
            raw = self.data.media.read(s.media)
            if self.data.kind == "video_caption":
                from pipeline.data.video import decode_frames

                frames = decode_frames(raw, self.num_frames, "uniform")
                pixels = torch.stack([self.transform(f) for f in frames])
            else:
                with Image.open(io.BytesIO(raw)) as im:
                    pixels = self.transform(im.convert("RGB"))
        except Exception as e:  # any unreadable medium fails the run, by name
            raise EvalDataError(
                f"{self.data.task}: cannot read {s.media!r} (id {s.id!r}) from "
                f"{self.data.media.describe()}: {type(e).__name__}: {e}"
            ) from None
        return i, pixels


def collate(items):
    idx, pixels = zip(*items)
    return list(idx), torch.stack(pixels)
