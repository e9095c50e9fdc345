"""BLIP-2 image transforms and caption cleaning.

Train (LAVIS blip2_image_train): RandomResizedCrop(image_size, scale=(min_scale, 1), bicubic),
horizontal flip if data.hflip (the official run flips; captions that say "left"/"right" then lie half
the time), CLIP mean/std. Eval (LAVIS blip_image_eval): Resize((image_size, image_size)) bicubic, the
whole image squashed to a square, no crop. Video frames (LAVIS alpro_video_*): each frame is squashed
to image_size x image_size first (decord's resize at load time), then the train crop is drawn in that
square, one crop and flip per clip; here the crop box is mapped back to the source frame so each
frame is resampled once. Transforms draw from an explicit `random.Random`, never from torch's global
RNG, so a worker's augmentation is reproducible from its seed and running in the trainer's process
does not disturb the trainer's RNG.

Calling a transform gives a uint8 CHW tensor; the loader uses `.apply()` (uint8 HWC numpy), stacks a
batch with `stack_hwc` and normalises it with `normalize_batch` in one vectorised step: no per-sample
torch work, which is slow in a busy multi-threaded trainer process.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = Image.Resampling.BICUBIC


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lower-case, punctuation .!"()*#:;~ to spaces, collapse spaces,
    strip, keep at most max_words words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`. Returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    # fallback: center crop at the nearest allowed ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def to_hwc(img: Image.Image) -> np.ndarray:
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)


def stack_hwc(arrays: list[np.ndarray]) -> torch.Tensor:
    """[..., H, W, 3] uint8 arrays -> one contiguous uint8 tensor [N, ..., 3, H, W] (no per-sample torch
    work: small torch ops are slow in a busy trainer process)."""
    x = torch.from_numpy(np.stack(arrays))
    dims = list(range(x.dim()))
    return x.permute(*dims[:-3], dims[-1], dims[-3], dims[-2]).contiguous()


def normalize_batch(x: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 normalised, channel dim at -3, on x's device."""
    shape = [1] * x.dim()
    shape[-3] = 3
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape) * 255.0
    inv = 1.0 / (torch.tensor(std, dtype=torch.float32, device=x.device).view(shape) * 255.0)
    return x.to(torch.float32).sub_(m).mul_(inv)  # in place: one float buffer per batch


class TrainTransform:
    """RandomResizedCrop + optional hflip. `params(w, h, rng)` then `apply(img, params)` lets a video
    clip share one crop over all its frames."""

    def __init__(
        self,
        image_size: int = 224,
        min_scale: float = 0.5,
        hflip: bool = False,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size = image_size
        self.scale = (min_scale, 1.0)
        self.ratio = ratio
        self.hflip = hflip

    def params(self, width: int, height: int, rng: random.Random):
        crop = random_resized_crop_params(width, height, self.scale, self.ratio, rng)
        flip = self.hflip and rng.random() < 0.5
        return crop, flip

    def squashed_params(self, width: int, height: int, rng: random.Random):
        """Params as if the image were first squashed to size x size (video frames, LAVIS): the
        crop is drawn in the square and its box mapped back to the width x height source."""
        (top, left, h, w), flip = self.params(self.size, self.size, rng)
        sx, sy = width / self.size, height / self.size
        return (top * sy, left * sx, h * sy, w * sx), flip

    def apply(self, img: Image.Image, params) -> np.ndarray:
        """uint8 HWC array (the loader stacks these and converts once per batch)."""
        (top, left, h, w), flip = params
        img = img.resize((self.size, self.size), _BICUBIC, box=(left, top, left + w, top + h))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_hwc(img)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """uint8 CHW tensor."""
        rng = rng or random.Random()
        arr = self.apply(img, self.params(img.width, img.height, rng))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)


class EvalTransform:
    """Resize((image_size, image_size)), bicubic: the whole image squashed, no crop (LAVIS
    blip_image_eval, the official evaluation)."""

    def __init__(self, image_size: int = 224):
        self.size = image_size

    def params(self, width: int, height: int, rng=None):
        return None

    squashed_params = params

    def apply(self, img: Image.Image, params=None) -> np.ndarray:
        return to_hwc(img.resize((self.size, self.size), _BICUBIC))

    def __call__(self, img: Image.Image, rng=None) -> torch.Tensor:
        return torch.from_numpy(self.apply(img).copy()).permute(2, 0, 1)


def build_transform(image_size: int, min_scale: float = 0.5, hflip: bool = False, train: bool = True):
    return TrainTransform(image_size, min_scale, hflip) if train else EvalTransform(image_size)
