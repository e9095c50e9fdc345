"""Standard splits, in one place: the annotation readers (annotations.py) apply them for both sides,
so the prep recipes of datasets with evaluation splits read only the split asked for (`simvlg prep
RECIPE --split train`) and no evaluation image or clip reaches a training shard, while the
evaluation tasks read their val or test split with the same rules.

| dataset   | standard split                                          | read from                       |
|-----------|---------------------------------------------------------|---------------------------------|
| COCO      | Karpathy: train (+ restval) / val 5000 / test 5000      | dataset_coco.json "split", or   |
|           |                                                         | LAVIS coco_karpathy_{split}.json|
| Flickr30K | Karpathy: train 29000 / val 1014 / test 1000 images     | dataset_flickr30k.json "split", |
|           |                                                         | or BLIP flickr30k_{split}.json  |
| MSR-VTT   | video0-6512 train, 6513-7009 val, 7010-9999 test        | the video id (+ "split")        |
| MSVD      | vid1-1200 train, 1201-1300 val, 1301-1970 test          | youtube_mapping: clip -> vidN   |
| NoCaps    | val and test only (Open Images), no training split      | no recipe                       |

A per-split file (LAVIS/BLIP `*_{train,val,test}.json`) is checked against --split by its name;
lists that hold several splits are filtered by the rules above, and a list without any sample of the
asked split is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

SPLITS = ("train", "val", "test")
MSRVTT_RANGES = {"train": (0, 6512), "val": (6513, 7009), "test": (7010, 9999)}
MSVD_RANGES = {"train": (1, 1200), "val": (1201, 1300), "test": (1301, 1970)}


def _in_ranges(n: int, ranges: dict) -> str | None:
    return next((s for s, (lo, hi) in ranges.items() if lo <= n <= hi), None)


def msrvtt_split(video_id: str) -> str | None:
    """ "video7010" (or "video7010.mp4") -> "test"; None if not an MSR-VTT id."""
    m = re.fullmatch(r"video(\d+)", Path(str(video_id)).stem)
    return _in_ranges(int(m.group(1)), MSRVTT_RANGES) if m else None


def msvd_split(vid: str) -> str | None:
    """ "vid1301" -> "test"; None if not a vidN name (map clip names with read_msvd_mapping)."""
    m = re.fullmatch(r"vid(\d+)", str(vid))
    return _in_ranges(int(m.group(1)), MSVD_RANGES) if m else None


def karpathy_split(value: str) -> str:
    """Karpathy's split field: restval is training data."""
    return "train" if value == "restval" else value


def split_in_name(path: str | Path) -> str | None:
    """The split a per-split file's name states (coco_karpathy_test.json -> test, cap_val.json -> val),
    None when it names none or several (train_val_videodatainfo.json)."""
    words = set(re.split(r"[^a-z]+", Path(path).stem.lower()))
    found = [s for s in SPLITS if s in words]
    return found[0] if len(found) == 1 else None
