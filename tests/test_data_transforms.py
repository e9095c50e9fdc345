"""BLIP-2 transforms and BLIP's caption cleaning."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EvalTransform,
    TrainTransform,
    normalize_batch,
    pre_caption,
    random_resized_crop_params,
)


def test_pre_caption_matches_blip():
    assert pre_caption("A Dog.  Running!! (on the) beach;~ #1\n") == "a dog running on the beach 1"
    assert pre_caption("  Hello: World  ") == "hello world"
    long = " ".join(f"w{i}" for i in range(80))
    assert pre_caption(long, max_words=50).split() == [f"w{i}" for i in range(50)]
    assert pre_caption("it's left-to-right, ok?") == "it's left-to-right, ok?"  # BLIP keeps , ? ' -


def test_random_resized_crop_params_in_bounds_and_seeded():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(384, 288, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and 0 <= left and top + h <= 288 and left + w <= 384
        assert h * w >= 0.5 * 384 * 288 * 0.97  # scale lower bound (rounding)
    a = random_resized_crop_params(300, 200, (0.5, 1), (0.75, 4 / 3), random.Random(5))
    b = random_resized_crop_params(300, 200, (0.5, 1), (0.75, 4 / 3), random.Random(5))
    assert a == b


def test_train_transform_shape_no_flip_by_default():
    img = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (100, 1))[..., None].repeat(3, 2))
    t = TrainTransform(64, min_scale=1.0)  # full-area crops at ratio ~1: left stays dark, right bright
    for seed in range(20):
        x = t(img, random.Random(seed))
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
        assert x[0, :, :8].float().mean() < x[0, :, -8:].float().mean()  # never flipped
    flips = [TrainTransform(64, 1.0, hflip=True)(img, random.Random(s)) for s in range(20)]
    assert any(f[0, :, :8].float().mean() > f[0, :, -8:].float().mean() for f in flips)


def test_train_transform_uses_its_rng_only():
    img = Image.new("RGB", (120, 90), (10, 20, 30))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    TrainTransform(32)(img, random.Random(1))
    assert torch.equal(state, torch.get_rng_state())


def test_eval_transform_squashes_like_lavis():
    """Resize((S, S)) bicubic, as LAVIS blip_image_eval / torchvision on a PIL image: the whole image,
    aspect ratio not kept, nothing cropped."""
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 50:150] = 255  # a white centre square of the wide image: half the width
    img = Image.fromarray(arr)
    x = EvalTransform(50)(img)
    assert x.shape == (3, 50, 50)
    white = (x[0] > 128).float().mean(1)  # per row: the white band is half of every row
    assert torch.allclose(white, torch.full((50,), 0.5), atol=0.05)
    want = np.asarray(img.resize((50, 50), Image.Resampling.BICUBIC))
    assert np.array_equal(x.permute(1, 2, 0).numpy(), want)
    from torchvision.transforms import InterpolationMode, Resize

    tv = np.asarray(Resize((50, 50), interpolation=InterpolationMode.BICUBIC)(img))
    assert np.array_equal(x.permute(1, 2, 0).numpy(), tv)


def test_video_crop_is_drawn_in_the_squashed_frame():
    """LAVIS squashes frames to S x S at decode time, then crops: the crop box, mapped back to the
    source frame, keeps the square's proportions (a full-area crop covers the whole wide frame)."""
    t = TrainTransform(32, min_scale=1.0, hflip=False, ratio=(1.0, 1.0))
    (top, left, h, w), flip = t.squashed_params(200, 100, random.Random(0))
    assert (top, left, h, w) == (0, 0, 100, 200) and flip is False
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 100:] = 255
    out = t.apply(Image.fromarray(arr), ((top, left, h, w), flip))
    assert out.shape == (32, 32, 3) and abs(out[..., 0].mean() / 255 - 0.5) < 0.05
    small = TrainTransform(32, min_scale=0.25, ratio=(1.0, 1.0))
    for s in range(20):
        (top, left, h, w), _ = small.squashed_params(200, 100, random.Random(s))
        assert abs(w / h - 2.0) < 0.1 and 0 <= left and left + w <= 200 + 1e-6 and top + h <= 100 + 1e-6


def test_normalize_batch_clip_stats():
    x = torch.tensor(CLIP_MEAN).mul(255).view(1, 3, 1, 1).expand(2, 3, 4, 4).round().to(torch.uint8)
    y = normalize_batch(x)
    assert y.dtype == torch.float32 and y.abs().max() < 0.02
    z = normalize_batch(torch.full((1, 5, 3, 2, 2), 255, dtype=torch.uint8))  # video [B,T,3,H,W]
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    assert z[0, 0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-5)
