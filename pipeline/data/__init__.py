"""Data: `simvlg prep` (prep/) writes WebDataset shards and a manifest; loader.py streams them
(streams.py -> worker.py: mixing.py, transforms.py, video.py); formats/ holds the contracts both sides
share (shards, manifest, annotation files, splits); bench.py measures the throughput."""

from .loader import SKIP_KINDS, StreamingLoader, build_loader
from .transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, build_transform, pre_caption

__all__ = [
    "SKIP_KINDS",
    "StreamingLoader",
    "build_loader",
    "CLIP_MEAN",
    "CLIP_STD",
    "EvalTransform",
    "TrainTransform",
    "build_transform",
    "pre_caption",
]
