"""Video frames with PyAV: sampling strategies and mp4/webm decoding, and video batches."""

import io
import json
import random

import numpy as np
import pytest

from pipeline.config import DataConfig, SourceConfig
from pipeline.data import build_loader
from pipeline.data.formats.shards import write_shard
from pipeline.data.transforms import EvalTransform
from pipeline.data.video import decode_frames, encode_video, sample_indices, video_to_tensor


def clip(n=24, w=64, h=48, fmt="mp4") -> bytes:
    # frame k has brightness ~10k: the decoded frame order is visible in the pixels
    frames = [np.full((h, w, 3), min(250, 10 * k), np.uint8) for k in range(n)]
    buf = io.BytesIO()
    encode_video(frames, buf, fps=8, fmt=fmt)
    return buf.getvalue()


def test_sample_indices():
    # LAVIS: np.arange(0, vlen, vlen / n).astype(int) (the first frame of each segment)
    assert sample_indices(80, 8, "uniform") == [0, 10, 20, 30, 40, 50, 60, 70]
    assert sample_indices(100, 3, "uniform") == [0, 33, 66]
    r = sample_indices(80, 8, "random", random.Random(0))
    assert all(10 * i <= x < 10 * (i + 1) for i, x in enumerate(r))
    ht = sample_indices(80, 8, "headtail", random.Random(1))
    assert all(x < 40 for x in ht[:4]) and all(x >= 40 for x in ht[4:]) and ht == sorted(ht)
    assert len(set(ht)) == 8  # without replacement, as rnd.sample
    draws = {tuple(sample_indices(80, 4, "headtail", random.Random(s))) for s in range(20)}
    assert len(draws) > 15  # random in training
    assert sample_indices(3, 8, "random", random.Random(0)) == sample_indices(3, 8, "uniform")
    assert len(sample_indices(3, 8)) == 8
    with pytest.raises(ValueError):
        sample_indices(10, 4, "bogus")


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_decode_frames(fmt):
    data = clip(fmt=fmt)
    frames = decode_frames(data, 4, "uniform")
    assert len(frames) == 4 and frames[0].size == (64, 48)
    means = [np.asarray(f).mean() for f in frames]
    assert means == sorted(means) and means[-1] > means[0] + 50
    x = video_to_tensor(data, EvalTransform(32), 4, "uniform", random.Random(0))
    assert tuple(x.shape) == (4, 3, 32, 32)


def test_corrupt_video_raises():
    with pytest.raises(Exception):  # noqa: B017 - any decoder error
        decode_frames(b"\x00\x00\x00\x18ftypmp42 not really a video", 4)


def test_video_batches(tmp_path):
    good = clip()
    samples = [
        {
            "__key__": f"v{i}",
            "mp4": good,
            "txt": "a person is talking",
            "json": json.dumps({"captions": [f"caption {i} a", f"caption {i} b"]}),
        }
        for i in range(5)
    ]
    samples.append({"__key__": "vbad", "mp4": good[: len(good) // 4], "txt": "broken"})
    samples.append({"__key__": "vw", "webm": clip(fmt="webm"), "txt": "webm clip"})
    write_shard(tmp_path / "00000.tar", samples)
    cfg = DataConfig(
        sources=[SourceConfig(name="vid", shards=str(tmp_path / "00000.tar"), kind="video")],
        num_workers=0,
        image_size=32,
        num_frames=4,
        frame_sampling="headtail",
        shuffle_buffer=0,
    )
    loader = build_loader(cfg, tokenize=None, batch_size=3, seed=0, train=False)
    batches = list(loader)
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(3, 4, 3, 32, 32), (3, 4, 3, 32, 32)]
    keys = [k for b in batches for k in b["keys"]]
    assert "vbad" not in keys and "vw" in keys
    assert batches[0]["captions"][0] == "caption 0 a"  # eval: the first of the json captions
    assert loader.skip_counts()["vid/corrupt_video"] == 1
    train = build_loader(cfg, tokenize=None, batch_size=2, seed=0)
    b = next(iter(train))
    assert tuple(b["pixel_values"].shape) == (2, 4, 3, 32, 32)
