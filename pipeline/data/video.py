"""Frames from mp4/webm/avi/mkv bytes with PyAV, decoded in the loader's workers.

Sampling T frame indices out of N:
- uniform:  middle of each of T equal segments (eval; deterministic)
- random:   a random frame in each of T equal segments (TSN-style training)
- headtail: T/2 random frames from the first half, T - T/2 from the second half, sorted (LAVIS)
Clips with fewer than T frames repeat frames (uniformly spread indices).
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch


def sample_indices(n: int, t: int, mode: str = "uniform", rng: random.Random | None = None) -> list[int]:
    if n <= 0:
        raise ValueError("video has no frames")
    rng = rng or random.Random(0)
    if n < t or mode == "uniform":
        return [min(n - 1, i * n // t) for i in range(t)]
    if mode == "random":
        edges = np.linspace(0, n, t + 1)
        out = []
        for i in range(t):
            lo, hi = int(edges[i]), max(int(edges[i]) + 1, int(edges[i + 1]))
            out.append(min(n - 1, rng.randrange(lo, hi)))
        return out
    if mode == "headtail":
        half = n // 2
        h = t // 2
        if half < h or n - half < t - h:
            return sample_indices(n, t, "random", rng)
        head = sorted(rng.sample(range(0, half), h))
        tail = sorted(rng.sample(range(half, n), t - h))
        return head + tail
    raise ValueError(f"unknown frame sampling {mode!r} (uniform, random, headtail)")


def decode_frames(data: bytes, num_frames: int, mode: str = "uniform", rng: random.Random | None = None):
    """Decode `num_frames` PIL images from encoded video bytes. Raises on an unreadable video."""
    import av  # lazy: only video sources need it

    with av.open(io.BytesIO(data), mode="r") as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n = stream.frames or 0
        if n > 0:
            # count known (mp4): decode sequentially, convert only the chosen frames, stop early
            idx = sample_indices(n, num_frames, mode, rng)
            wanted, last = set(idx), max(idx)
            got = {}
            for k, frame in enumerate(container.decode(stream)):
                if k in wanted:
                    got[k] = frame.to_image()
                if k >= last:
                    break
            if len(got) == len(wanted):
                return [got[i] for i in idx]
    # count unknown (webm) or wrong: decode all, then choose
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = list(container.decode(stream))
    if not frames:
        raise ValueError("video has no decodable frames")
    idx = sample_indices(len(frames), num_frames, mode, rng)
    return [frames[i].to_image() for i in idx]


def video_frames(data: bytes, transform, num_frames: int, mode: str, rng: random.Random) -> np.ndarray:
    """uint8 [T, H, W, 3]; frames squashed to the transform's square, one crop (and flip) per clip."""
    frames = decode_frames(data, num_frames, mode, rng)
    params = transform.squashed_params(frames[0].width, frames[0].height, rng)
    return np.stack([transform.apply(f, params) for f in frames])


def video_to_tensor(data: bytes, transform, num_frames: int, mode: str, rng: random.Random) -> torch.Tensor:
    """uint8 [T, 3, H, W]."""
    return torch.from_numpy(video_frames(data, transform, num_frames, mode, rng)).permute(0, 3, 1, 2)


def encode_video(frames: list[np.ndarray], path_or_buf, fps: int = 10, fmt: str = "mp4") -> None:
    """Write uint8 HWC RGB frames as mp4 (mpeg4) or webm (vp8). For tests and synthetic corpora."""
    import av

    codec = {"mp4": "mpeg4", "webm": "libvpx"}[fmt]
    with av.open(path_or_buf, mode="w", format=fmt) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height = frames[0].shape[1], frames[0].shape[0]
        s.pix_fmt = "yuv420p"
        for a in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(pkt)
        for pkt in s.encode():
            out.mux(pkt)
