"""Zero-shot video captioning (MSR-VTT, MSVD test): as image captioning, on clips.

Each clip gives data.num_frames frames, uniformly spaced (middle of T equal segments), each resized
and center-cropped like an eval image: pixels [B, T, 3, H, W] for `model.generate` (temporal
merging inside the ViT, then the frames pooled as the model's config says). Same prompt, generation
settings and caption metrics as images. The gallery shows the middle frame; no merge figures (the
per-frame merge sources of a pooled video prompt are not one image's).
"""

from __future__ import annotations

import torch

from . import captioning

prompts = captioning.prompts
generation_kwargs = captioning.generation_kwargs
clean = captioning.clean
record = captioning.record
score = captioning.score


def middle_frame(pixels: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] -> [3, H, W] (images pass through)."""
    return pixels[pixels.shape[0] // 2] if pixels.dim() == 4 else pixels
