"""Zero-shot video captioning (MSR-VTT, MSVD test): as image captioning, on clips.

Each clip gives data.num_frames frames, uniformly spaced (LAVIS alpro_video_eval: the first frame of
each of T equal segments), each squashed to image_size like an eval image: pixels [B, T, 3, H, W] for
`model.generate` (temporal merging inside the ViT, then the frames pooled as the model's config
says). The caption prompt and metrics are the images'; generation is eval.num_beams (5) beams, at
most eval.video_max_new_tokens (20) and at least eval.video_min_new_tokens (5) new tokens (the
official MSR-VTT eval config). The gallery shows the middle frame; no merge figures (the per-frame
merge sources of a pooled video prompt are not one image's).
"""

from __future__ import annotations

import torch

from . import captioning

prompts = captioning.prompts
record = captioning.record
score = captioning.score


def generation_kwargs(eval_cfg) -> dict:
    return {
        "num_beams": eval_cfg.num_beams,
        "max_new_tokens": eval_cfg.video_max_new_tokens,
        "min_new_tokens": eval_cfg.video_min_new_tokens,
        "repetition_penalty": eval_cfg.repetition_penalty,
    }


def middle_frame(pixels: torch.Tensor) -> torch.Tensor:
    """[T, 3, H, W] -> [3, H, W] (images pass through)."""
    return pixels[pixels.shape[0] // 2] if pixels.dim() == 4 else pixels
