"""Data: `simvlg prep` recipes (prep.py, recipes.py) write WebDataset shards; loader.py streams them
(mixing.py, transforms.py, video.py, shards.py); bench.py measures the throughput."""

from .loader import SKIP_KINDS, StreamingLoader, build_loader
from .transforms import CLIP_MEAN, CLIP_STD, EvalTransform, TrainTransform, build_transform, pre_caption

__all__ = ["SKIP_KINDS", "StreamingLoader", "build_loader", "CLIP_MEAN", "CLIP_STD", "EvalTransform",
           "TrainTransform", "build_transform", "pre_caption"]
