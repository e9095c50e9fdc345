"""No test data in training: every recipe of a dataset with standard splits writes only --split, and
the ids it would put into training shards are disjoint from the ids the evaluation tasks read.

Each dataset is written in its published formats, holding every split; the training side is the
recipe's reader (what `simvlg prep RECIPE --split train` converts), the evaluation side the reader
`simvlg eval` uses for the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.formats.annotations import read_captions, read_video_captions
from pipeline.data.formats.splits import msrvtt_split, msvd_split, split_in_name
from pipeline.data.prep.lists import Args, PrepInputError
from pipeline.data.prep.recipes import RECIPES


def train_rows(recipe: str, *inputs, split="train", **kw) -> list[dict]:
    return list(RECIPES[recipe].read(Args(inputs=[str(p) for p in inputs], split=split, **kw)))


def stem_id(url: str) -> str:
    return Path(url).stem


def test_split_rules():
    assert [msrvtt_split(f"video{i}") for i in (0, 6512, 6513, 7009, 7010, 9999)] == [
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
    ]
    assert msrvtt_split("video7010.mp4") == "test" and msrvtt_split("clip3") is None
    assert [msvd_split(f"vid{i}") for i in (1, 1200, 1201, 1300, 1301, 1970)] == [
        "train",
        "train",
        "val",
        "val",
        "test",
        "test",
    ]
    assert split_in_name("coco_karpathy_test.json") == "test" and split_in_name("cap_val.json") == "val"
    assert split_in_name("train_val_videodatainfo.json") is None
    assert split_in_name("dataset_coco.json") is None


@pytest.fixture
def coco(tmp_path):
    images, lavis = [], {"val": [], "test": []}
    for i, split in enumerate(["train", "train", "restval", "val", "val", "test", "test", "test"]):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i:012d}.jpg"
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "split": split,
                "cocoid": i,
                "sentences": [{"raw": f"caption {i} a"}, {"raw": f"caption {i} b"}],
            }
        )
        if split in lavis:
            caps = [f"caption {i} a", f"caption {i} b"]
            lavis[split].append({"image": f"{folder}/{name}", "caption": caps})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for split, rows in lavis.items():
        (tmp_path / f"coco_karpathy_{split}.json").write_text(json.dumps(rows))
    return tmp_path


def test_coco_karpathy_train_is_disjoint_from_val_and_test(coco):
    train = {int(stem_id(r["url"])[-12:]) for r in train_rows("coco_karpathy", coco / "dataset_coco.json")}
    assert train == {0, 1, 2}  # train + restval
    for split, want in (("val", {3, 4}), ("test", {5, 6, 7})):
        ev = {s.id for s in read_captions(coco / f"coco_karpathy_{split}.json")}
        assert ev == want and not train & ev
        # one reader for both sides: evaluation may read Karpathy's file too, by its split
        assert {s.id for s in read_captions(coco / "dataset_coco.json", split)} == want
        assert {
            int(stem_id(r["url"])[-12:])
            for r in train_rows("coco_karpathy", coco / "dataset_coco.json", split=split)
        } == want
    rows = train_rows("coco_karpathy", coco / "dataset_coco.json")
    assert rows[0]["url"] == "http://images.cocodataset.org/train2014/COCO_train2014_000000000000.jpg"
    assert rows[0]["captions"] == ["caption 0 a", "caption 0 b"]
    with pytest.raises(PrepInputError, match="a test split file, but --split is train"):
        train_rows("coco_karpathy", coco / "coco_karpathy_test.json")
    assert len(train_rows("coco_karpathy", coco / "coco_karpathy_test.json", split="test")) == 3


def test_flickr30k_train_is_disjoint_from_test(tmp_path):
    root = tmp_path / "flickr30k-images"
    root.mkdir()
    images = [
        {"filename": f"{1000 + i}.jpg", "split": s, "sentences": [{"raw": f"a dog {i}"}]}
        for i, s in enumerate(["train"] * 3 + ["val", "test", "test"])
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    test = [{"image": f"flickr30k-images/{1000 + i}.jpg", "caption": [f"a dog {i}"]} for i in (4, 5)]
    (tmp_path / "flickr30k_test.json").write_text(json.dumps(test))
    train = {
        int(stem_id(r["url"]))
        for r in train_rows("flickr30k", tmp_path / "dataset_flickr30k.json", image_root=str(tmp_path))
    }
    ev = {s.id for s in read_captions(tmp_path / "flickr30k_test.json")}
    assert train == {1000, 1001, 1002} and ev == {1004, 1005} and not train & ev
    with pytest.raises(PrepInputError, match="needs --image-root"):
        train_rows("flickr30k", tmp_path / "dataset_flickr30k.json")
    with pytest.raises(PrepInputError, match="a test split file"):
        train_rows("flickr30k", tmp_path / "flickr30k_test.json", image_root=str(tmp_path))


def test_msrvtt_train_is_disjoint_from_test(tmp_path):
    vids = tmp_path / "videos"
    vids.mkdir()
    ids = {"train": [0, 1, 6512], "validate": [6513, 7009], "test": [7010, 9999]}

    def info(splits):
        videos = [{"video_id": f"video{i}", "split": s} for s in splits for i in ids[s]]
        sents = [
            {"video_id": v["video_id"], "caption": f"a clip {v['video_id']} {k}"}
            for v in videos
            for k in range(2)
        ]
        return {"videos": videos, "sentences": sents}

    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(info(["train", "validate"])))
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(info(["test"])))
    lavis_all = [{"video": f"video{i}.mp4", "caption": f"c {i}"} for s in ids for i in ids[s]]
    (tmp_path / "msrvtt_all.json").write_text(json.dumps(lavis_all))
    kw = {"video_root": str(vids)}
    train = {r["video_id"] for r in train_rows("msrvtt", tmp_path / "train_val_videodatainfo.json", **kw)}
    ev = {s.id for s in read_video_captions(tmp_path / "test_videodatainfo.json")}
    assert train == {"video0", "video1", "video6512"} and ev == {"video7010", "video9999"}
    assert not train & ev
    # a LAVIS list holding every split: only the standard train ids go to training
    assert {r["video_id"] for r in train_rows("msrvtt", tmp_path / "msrvtt_all.json", **kw)} == train
    with pytest.raises(PrepInputError, match="no videos with split 'train'"):
        train_rows("msrvtt", tmp_path / "test_videodatainfo.json", **kw)
    test_list = [r for r in lavis_all if r["video"] in ("video7010.mp4", "video9999.mp4")]
    (tmp_path / "msrvtt_cap.json").write_text(json.dumps(test_list))
    with pytest.raises(PrepInputError, match=r"no videos of split 'train' \(it holds test\)"):
        train_rows("msrvtt", tmp_path / "msrvtt_cap.json", **kw)


def test_msvd_split_is_honoured_and_train_is_disjoint_from_test(tmp_path):
    """MSVD's --split used to be ignored: the training shards held msvd_test clips."""
    vids = tmp_path / "YouTubeClips"
    vids.mkdir()
    clips = {f"clip{n}_0_5": f"vid{n}" for n in (1, 2, 1200, 1201, 1301, 1970)}
    (tmp_path / "youtube_mapping.txt").write_text("".join(f"{c} {v}\n" for c, v in clips.items()))
    (tmp_path / "AllVideoDescriptions.txt").write_text(
        "# MSVD\n" + "".join(f"{c} a man is playing {k}\n" for c in clips for k in ("guitar", "piano"))
    )
    kw = {"video_root": str(vids)}
    rows = train_rows("msvd", tmp_path / "AllVideoDescriptions.txt", tmp_path / "youtube_mapping.txt", **kw)
    train = {clips[r["video_id"]] for r in rows}
    ev = {
        s.id
        for s in read_video_captions(
            tmp_path / "AllVideoDescriptions.txt", mapping=tmp_path / "youtube_mapping.txt"
        )
    }
    assert train == {"vid1", "vid2", "vid1200"} and ev == {"vid1301", "vid1970"} and not train & ev
    assert rows[0]["captions"] == ["a man is playing guitar", "a man is playing piano"]
    with pytest.raises(PrepInputError, match="youtube_mapping.txt"):  # cannot split without the map
        train_rows("msvd", tmp_path / "AllVideoDescriptions.txt", **kw)
    test_list = [{"video": "clip1301_0_5.avi", "caption": "x"}]
    (tmp_path / "msvd_test.json").write_text(json.dumps(test_list))
    with pytest.raises(PrepInputError, match="a test split file, but --split is train"):
        train_rows("msvd", tmp_path / "msvd_test.json", **kw)
    assert (
        train_rows("msvd", tmp_path / "msvd_test.json", tmp_path / "youtube_mapping.txt", split="test", **kw)[
            0
        ]["video_id"]
        == "clip1301_0_5"
    )


def test_nocaps_has_no_training_recipe():
    assert not any("nocaps" in name for name in RECIPES)
