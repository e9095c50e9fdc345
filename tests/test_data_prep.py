"""data_prep: recipes validate before downloading; img2dataset end to end against a loopback server with
broken URLs; incremental re-runs; video recipe; SLURM array split/run/merge."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers_http import refused_url, serve_folder
from PIL import Image

from pipeline.config import DataConfig, SourceConfig
from pipeline.data import build_loader, prep
from pipeline.data.formats.manifest import read_manifest
from pipeline.data.formats.shards import resolve_spec, write_shard
from pipeline.data.prep.recipes import PrepInputError, iter_json_list

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test: bad inputs must be caught before."""

    def boom(*a, **k):
        raise AssertionError("img2dataset was started for a bad input")

    from pipeline.data.prep import run

    monkeypatch.setattr(run, "run_img2dataset", boom)


def run_prep(argv, capsys):
    rc = prep.main(argv)
    return rc, capsys.readouterr().err


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "name,content,message",
    [
        ("nocap.json", json.dumps([{"url": "http://x/a.jpg", "text": "a"}]), "missing column(s) ['caption']"),
        (
            "empty_caption.json",
            json.dumps(
                [{"url": "http://x/a.jpg", "caption": "ok"}, {"url": "http://x/b.jpg", "caption": "  "}]
            ),
            "1 row(s) with empty caption",
        ),
        ("nourl.jsonl", '{"url": "", "caption": "a"}\n{"url": "http://x", "caption": "b"}\n', "empty url"),
        ("broken.json", '[{"url": "http://x/a.jpg", "caption": "a"}, {"url": ', "not a valid JSON list"),
        ("notalist.json", '{"url": "http://x/a.jpg"}', "expected '['"),
        ("empty.csv", "", "input file is empty"),
        ("bad.parquet", "PAR1 this is not parquet", "cannot read parquet"),
        ("list.xml", "<urls/>", "unknown input format"),
    ],
)
def test_bad_url_lists_fail_before_download(tmp_path, capsys, no_download, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    rc, err = run_prep(["urls", "--input", str(f), "--out", str(tmp_path / "out")], capsys)
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out" / "shards").exists() and not (tmp_path / "out" / "input").exists()


def test_unreadable_inputs(tmp_path, capsys, no_download):
    rc, err = run_prep(["cc3m", "--input", str(tmp_path / "nope.tsv"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "does not exist" in err
    rc, err = run_prep(["cc12m", "--input", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "is a folder" in err
    (tmp_path / "cc3m.tsv").write_text("a cat\thttp://x/1.jpg\nthree\tfields\there\n")
    rc, err = run_prep(["cc3m", "--input", str(tmp_path / "cc3m.tsv"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "line 2 has 3 tab-separated fields" in err
    (tmp_path / "u.txt").write_text("http://x/1.jpg\nhttp://x/2.jpg\n")
    (tmp_path / "c.txt").write_text("one\n")
    rc, err = run_prep(
        [
            "sbu",
            "--input",
            str(tmp_path / "u.txt"),
            "--input",
            str(tmp_path / "c.txt"),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert rc == 2 and "different line counts" in err
    rc, err = run_prep(["sbu", "--input", str(tmp_path / "u.txt"), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2
    rc, err = run_prep(["laion", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "unknown recipe" in err


def test_drop_invalid_and_formats(tmp_path, capsys):
    f = tmp_path / "cc12m.tsv"
    f.write_text(
        "url\tcaption\nhttp://x/1.jpg\tA  red\tcar\nhttp://x/2.jpg\t \nhttp://x/3.jpg\ta boat\n".replace(
            "A  red\tcar", "A  red car"
        )
    )
    rc, err = run_prep(["cc12m", "--input", str(f), "--out", str(tmp_path / "o"), "--convert-only"], capsys)
    assert rc == 2 and "--drop-invalid" in err
    rc, err = run_prep(
        ["cc12m", "--input", str(f), "--out", str(tmp_path / "o"), "--convert-only", "--drop-invalid"], capsys
    )
    assert rc == 0 and "dropped 1 of 3 rows" in err
    rows = pq.read_table(tmp_path / "o" / "input" / "part-00000.parquet").to_pylist()
    assert rows == [
        {"url": "http://x/1.jpg", "caption": "A red car"},
        {"url": "http://x/3.jpg", "caption": "a boat"},
    ]
    # same out, different input: refused rather than mixing two lists' shard numbering
    g = tmp_path / "other.tsv"
    g.write_text("http://y/1.jpg\tz\n")
    rc, err = run_prep(["cc12m", "--input", str(g), "--out", str(tmp_path / "o"), "--convert-only"], capsys)
    assert rc == 2 and "input 1 (other.tsv) has other content" in err  # names what changed
    assert "--drop-invalid True -> False" in err
    # the same bytes with a new mtime (copied, touched) are the same input; a dropped option is not
    os.utime(f, (1, 1))
    rc, err = run_prep(
        ["cc12m", "--input", str(f), "--out", str(tmp_path / "o"), "--convert-only", "--drop-invalid"], capsys
    )
    assert rc == 0 and "reusing converted input" in err
    rc, err = run_prep(["cc12m", "--input", str(f), "--out", str(tmp_path / "o"), "--convert-only"], capsys)
    assert rc == 2 and "--drop-invalid True -> False" in err and "other content" not in err


def test_duplicate_urls_counted_and_dropped_on_request(tmp_path, capsys):
    f = tmp_path / "l.csv"
    f.write_text(
        "url,caption\nhttp://x/1.jpg,a\nhttp://x/2.jpg,b\nhttp://x/1.jpg,a again\nhttp://x/1.jpg,c\n"
    )
    rc, err = run_prep(["urls", "--input", str(f), "--out", str(tmp_path / "o"), "--convert-only"], capsys)
    assert rc == 0 and "2 rows repeat a URL" in err
    src = json.loads((tmp_path / "o" / "input" / "_SOURCE.json").read_text())
    assert src["rows"] == 4 and src["validation"]["duplicate_urls"] == 2
    rc, err = run_prep(
        ["urls", "--input", str(f), "--out", str(tmp_path / "d"), "--convert-only", "--drop-duplicates"],
        capsys,
    )
    assert rc == 0 and "(dropped)" in err
    rows = pq.read_table(tmp_path / "d" / "input" / "part-00000.parquet").to_pylist()
    assert [r["url"] for r in rows] == ["http://x/1.jpg", "http://x/2.jpg"]
    src = json.loads((tmp_path / "d" / "input" / "_SOURCE.json").read_text())
    assert src["rows"] == 2 and src["validation"]["dropped_duplicates"] == 2


def test_coco_karpathy_groups_captions(tmp_path, capsys):
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    ann = [
        {
            "image": f"val2014/COCO_val2014_{i:012d}.jpg",
            "caption": f"caption {i}.{j}",
            "image_id": f"coco_{i}",
        }
        for i in range(3)
        for j in range(2)
    ]
    (tmp_path / "coco_karpathy_train.json").write_text(json.dumps(ann))
    rc, _ = run_prep(
        [
            "coco_karpathy",
            "--input",
            str(tmp_path / "coco_karpathy_train.json"),
            "--image-root",
            str(tmp_path / "coco"),
            "--out",
            str(tmp_path / "o"),
            "--convert-only",
        ],
        capsys,
    )
    assert rc == 0
    rows = pq.read_table(tmp_path / "o" / "input" / "part-00000.parquet").to_pylist()
    assert len(rows) == 3 and rows[1]["captions"] == ["caption 1.0", "caption 1.1"]
    assert rows[0]["url"].startswith("file://") and rows[0]["url"].endswith("COCO_val2014_000000000000.jpg")
    val = [{"image": "val2014/x.jpg", "caption": ["a", "b", "c"]}]
    (tmp_path / "coco_karpathy_val.json").write_text(json.dumps(val))
    rc, _ = run_prep(
        [
            "coco_karpathy",
            "--input",
            str(tmp_path / "coco_karpathy_val.json"),
            "--split",
            "val",
            "--out",
            str(tmp_path / "v"),
            "--convert-only",
        ],
        capsys,
    )
    rows = pq.read_table(tmp_path / "v" / "input" / "part-00000.parquet").to_pylist()
    assert rows == [
        {"url": "http://images.cocodataset.org/val2014/x.jpg", "caption": "a", "captions": ["a", "b", "c"]}
    ]


def test_json_list_streams_in_small_chunks(tmp_path):
    rows = [{"url": f"http://x/{i}", "caption": "é ü 汉字 [x], {y}"} for i in range(300)]
    (tmp_path / "l.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2))
    assert list(iter_json_list(tmp_path / "l.json", chunk=64)) == rows
    (tmp_path / "e.json").write_text("[]")
    assert list(iter_json_list(tmp_path / "e.json")) == []
    (tmp_path / "b.json").write_text('[{"a": 1} {"b": 2}]')
    with pytest.raises(PrepInputError, match="expected ',' or ']'"):
        list(iter_json_list(tmp_path / "b.json"))


# ------------------------------------------------------------------------ manifest & resume
def _fake_shard(d: Path, sid: int, n: int):
    write_shard(
        d / f"{sid:05d}.tar", [{"__key__": f"{sid:05d}{i:04d}", "jpg": b"x", "txt": "c"} for i in range(n)]
    )
    (d / f"{sid:05d}_stats.json").write_text(
        json.dumps(
            {
                "count": n + 1,
                "successes": n,
                "failed_to_download": 1,
                "failed_to_resize": 0,
                "duration": 1.0,
                "status_dict": {"success": n, "HTTP Error 404: Not Found": 1},
            }
        )
    )


def test_flags_are_the_fields_of_download_options():
    """Every option lives once, in DownloadOptions: the parser's defaults are its defaults, and a flag
    is parsed as its field's type."""
    from dataclasses import asdict, fields

    from pipeline.data.prep import DownloadOptions, build_parser

    defaults = vars(build_parser().parse_args(["urls"]))
    flags = {f.name for f in fields(DownloadOptions) if f.metadata.get("cli", True)}
    want = asdict(DownloadOptions())
    assert flags and {k: defaults[k] for k in flags} == {k: want[k] for k in flags}
    args = build_parser().parse_args(
        [
            "urls",
            "--max-image-area",
            "4e6",
            "--limit",
            "3",
            "--threads",
            "8",
            "--drop-duplicates",
            "--max-aspect-ratio",
            "2.5",
        ]
    )
    assert (args.max_image_area, args.limit, args.threads, args.drop_duplicates, args.max_aspect_ratio) == (
        4e6,
        3,
        8,
        True,
        2.5,
    )
    assert not hasattr(args, "user_agent_token")  # not a flag


def test_manifest_and_unfinished_shards(tmp_path):
    out = tmp_path / "o"
    (out / "shards").mkdir(parents=True)
    (out / "input").mkdir()
    (out / "input" / "_SOURCE.json").write_text(json.dumps({"rows": 40, "expected_shards": 4}))
    for sid in range(3):
        _fake_shard(out / "shards", sid, 9)
    m = prep.build_manifest(out, recipe="urls", kind="image")
    assert m.num_samples == 27 and m.num_shards == 3 and not m.complete
    assert m.incomplete_shards == [3] and m.shards_relative == "shards/{00000..00002}.tar"
    assert m.counts.by_category == {"http_404": 3}
    # a finished shard whose tar vanished or broke is redone; the others are left alone
    (out / "shards" / "00001.tar").unlink()
    (out / "shards" / "00002.tar").write_bytes(b"garbage")
    before = (out / "shards" / "00000.tar").stat().st_mtime_ns
    assert prep.reset_unfinished(out / "shards") == [1, 2]
    assert not (out / "shards" / "00001_stats.json").exists()
    assert (out / "shards" / "00000_stats.json").exists()
    assert (out / "shards" / "00000.tar").stat().st_mtime_ns == before


def test_manifests_of_prep_and_merge_round_trip_through_the_model(tmp_path):
    """Prep and the SLURM merge write one Manifest; every reader reads it back; version-1 files load."""
    out = tmp_path / "big"
    for part, n in (("part_00000", 3), ("part_00001", 2)):
        d = out / part
        (d / "shards").mkdir(parents=True)
        (d / "input").mkdir()
        (d / "input" / "_SOURCE.json").write_text(
            json.dumps(
                {
                    "rows": 9 * n + n,
                    "expected_shards": n,
                    "validation": {"dropped": {"empty caption": 1}, "duplicate_urls": 2},
                }
            )
        )
        for sid in range(n):
            _fake_shard(d / "shards", sid, 9)
        written = prep.build_manifest(d, recipe="urls", kind="image")
        assert read_manifest(d / "manifest.json") == written  # what prep wrote is what readers get
        assert written.complete and written.counts.dropped_rows == {"empty caption": 1}
    (out / "parts").mkdir()
    for i in range(3):  # a third part was submitted but has not run yet
        (out / "parts" / f"part_{i:05d}.parquet").write_bytes(b"")
    merged = prep.merge_parts(out)
    assert read_manifest(out / "manifest.json") == merged
    assert merged.num_samples == 45 and merged.num_shards == 5 and merged.missing_parts == ["part_00002"]
    assert not merged.complete and merged.counts.attempted == 50 and merged.counts.duplicate_urls == 4
    assert merged.counts.by_category == {"http_404": 5} and merged.counts.dropped_rows == {"empty caption": 2}
    urls, total = resolve_spec(str(out))  # the loader, preflight and eval read it through resolve_spec
    assert len(urls) == 5 and total == 45 and all(Path(u).is_file() for u in urls)
    # version 1, the keys written before the model (a merge wrote its unfinished shards by part)
    v1 = merged.to_json() | {"version": 1, "incomplete_shards": {"part_00001": [4]}}
    del v1["incomplete_parts"], v1["missing_parts"]
    (out / "manifest.json").write_text(json.dumps(v1))
    old = read_manifest(out / "manifest.json")
    assert old.version == 2 and old.incomplete_parts == {"part_00001": [4]} and old.incomplete_shards == []
    assert resolve_spec(str(out / "manifest.json"))[1] == 45
    for bad, why in (
        ({**v1, "num_samples": "45"}, "num_samples: input should be a valid integer"),
        ({**v1, "shard_count": 5}, "shard_count: unknown key"),
        ({"shards": "x/{0..1}.tar"}, "no 'version' key"),
    ):
        (out / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=why):
            resolve_spec(str(out))


def garble_header(tar_path: Path, member: str) -> None:
    """Overwrite a member's header with junk: Python's tarfile alone reads that as the end."""
    with tarfile.open(tar_path) as t:
        offset = t.getmember(member).offset
    data = bytearray(tar_path.read_bytes())
    data[offset : offset + 512] = bytes((7 * i + 13) % 251 for i in range(512))
    tar_path.write_bytes(bytes(data))


def test_a_garbled_member_header_makes_the_shard_unfinished(tmp_path):
    out = tmp_path / "o"
    (out / "shards").mkdir(parents=True)
    (out / "input").mkdir()
    (out / "input" / "_SOURCE.json").write_text(json.dumps({"rows": 16, "expected_shards": 2}))
    for sid in range(2):
        _fake_shard(out / "shards", sid, 8)
    garble_header(out / "shards" / "00001.tar", "000010002.jpg")
    m = prep.build_manifest(out, recipe="urls", kind="image")
    assert not m.complete and m.incomplete_shards == [1] and m.num_samples == 8
    assert prep.reset_unfinished(out / "shards") == [1]  # the next run downloads it again
    assert not (out / "shards" / "00001.tar").exists() and (out / "shards" / "00000.tar").exists()
    # a readable tar holding fewer samples than its stats say were written is redone as well
    _fake_shard(out / "shards", 1, 8)
    write_shard(
        out / "shards" / "00001.tar",
        [{"__key__": f"00001{i:04d}", "jpg": b"x", "txt": "c"} for i in range(5)],
    )
    m = prep.build_manifest(out, recipe="urls", kind="image")
    assert not m.complete and m.mismatched_shards == [1]
    assert prep.reset_unfinished(out / "shards") == [1]


def _video(n=12) -> bytes:
    from pipeline.data.video import encode_video

    buf = io.BytesIO()
    encode_video([np.full((32, 48, 3), 20 * k % 255, np.uint8) for k in range(n)], buf, fps=6)
    return buf.getvalue()


def test_msrvtt_recipe_writes_video_shards(tmp_path, capsys):
    vids = tmp_path / "videos"
    vids.mkdir()
    for i in range(5):
        (vids / f"video{i}.mp4").write_bytes(_video())
    (vids / "video5.mp4").write_bytes(b"not a video")
    info = {
        "videos": [{"video_id": f"video{i}", "split": "train" if i != 4 else "test"} for i in range(6)],
        "sentences": [
            {"video_id": f"video{i}", "caption": f"a man does thing {i} {j}"}
            for i in range(6)
            for j in range(3)
        ],
    }
    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(info))
    argv = [
        "msrvtt",
        "--input",
        str(tmp_path / "train_val_videodatainfo.json"),
        "--video-root",
        str(vids),
        "--out",
        str(tmp_path / "o"),
        "--samples-per-shard",
        "2",
        "--processes",
        "1",
    ]
    rc, err = run_prep(argv, capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["num_samples"] == 4 and m["counts"]["by_category"] == {"unreadable_video": 1}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "shards").glob("*.tar")}
    assert run_prep(argv, capsys)[0] == 0  # re-run: nothing rewritten
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o" / "shards").glob("*.tar")}
    cfg = DataConfig(
        sources=[SourceConfig(name="msrvtt", shards=str(tmp_path / "o" / "manifest.json"), kind="video")],
        num_workers=0,
        image_size=32,
        num_frames=4,
    )
    batches = list(build_loader(cfg, tokenize=None, batch_size=2, train=False))
    assert [tuple(b["pixel_values"].shape) for b in batches] == [(2, 4, 3, 32, 32)] * 2
    assert batches[0]["captions"][0] == "a man does thing 0 0"


# ------------------------------------------------------------------- img2dataset end to end
def _www(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        h, w = (300 + 7 * i, 500) if i % 2 else (500, 420 + 3 * i)
        small = (rng.random((h // 20, w // 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((w, h)).save(folder / f"img{i}.jpg", quality=80)
        names.append(f"img{i}.jpg")
    Image.new("RGB", (2600, 2000), (9, 9, 9)).save(folder / "huge.png")  # 5.2 Mpx > --max-image-area
    return names


I2D_FLAGS = [
    "--processes",
    "1",
    "--threads",
    "8",
    "--samples-per-shard",
    "12",
    "--retries",
    "0",
    "--timeout",
    "30",
    "--max-image-area",
    "4e6",
]


@pytest.mark.slow
def test_img2dataset_end_to_end_with_broken_urls(tmp_path, capsys):
    names = _www(tmp_path / "www", 26)
    with serve_folder(tmp_path / "www") as srv:
        rows = [{"url": srv.url(n), "caption": f"Photo number {i}, a test."} for i, n in enumerate(names)]
        broken = [
            srv.broken("404"),
            srv.broken("500"),
            srv.broken("notimage"),
            srv.broken("truncated"),
            refused_url(),
            "htp://not-a-scheme/x.jpg",
            srv.url("huge.png"),
            srv.url("missing.jpg"),
            srv.broken("empty"),
        ]
        rows[5:5] = [{"url": u, "caption": "broken"} for u in broken]
        rows.append({"url": rows[0]["url"], "caption": "the same photo again"})  # counted, kept
        (tmp_path / "list.json").write_text(json.dumps(rows))
        out = tmp_path / "out"
        argv = ["urls", "--input", str(tmp_path / "list.json"), "--out", str(out), *I2D_FLAGS]
        rc, err = run_prep(argv, capsys)
        assert rc == 0, err
        m = json.loads((out / "manifest.json").read_text())
        assert m["complete"] and m["num_samples"] == 27 and m["counts"]["successes"] == 27
        assert m["num_shards"] == 3 and m["expected_shards"] == 3 and not m["mismatched_shards"]
        assert m["counts"]["attempted"] == 36 and m["counts"]["duplicate_urls"] == 1
        cats = m["counts"]["by_category"]
        assert cats == {
            "http_404": 2,
            "http_error": 1,
            "undecodable_image": 2,
            "connection_refused": 1,
            "bad_url": 1,
            "too_large": 1,
            "empty_response": 1,
        }, cats
        # the shards: jpg + txt + json, shorter side 384, aspect kept, captions carried
        cfg = DataConfig(
            sources=[SourceConfig(name="web", shards=str(out / "manifest.json"))],
            num_workers=0,
            image_size=64,
        )
        batches = list(build_loader(cfg, tokenize=None, batch_size=8, train=False))
        caps = sorted(c for b in batches for c in b["captions"])
        assert caps == sorted([f"photo number {i}, a test" for i in range(26)] + ["the same photo again"])
        from pipeline.data.formats.shards import iter_tar_samples

        sizes = []
        for s in iter_tar_samples(str(out / "shards" / "00000.tar")):
            with Image.open(io.BytesIO(s["jpg"])) as im:
                sizes.append(im.size)
        # shorter side brought down to 384 with the aspect kept; smaller images are never upscaled
        # (the sources are 500 px on their longer side, so an untouched one still measures 500)
        assert all(min(sz) == 384 and max(sz) > 384 or max(sz) == 500 for sz in sizes), sizes
        assert any(min(sz) == 384 for sz in sizes), sizes
        # re-run: nothing downloaded again, finished shards untouched
        tars = sorted((out / "shards").glob("*.tar"))
        mtimes = [p.stat().st_mtime_ns for p in tars]
        n_req = sum(srv.requests.values())
        rc, err = run_prep(argv, capsys)
        assert rc == 0 and "already finished" in err
        assert [p.stat().st_mtime_ns for p in tars] == mtimes and sum(srv.requests.values()) == n_req
        # a lost tar is redone by the next run; the other shards are not rewritten
        tars[1].unlink()
        rc, err = run_prep(argv, capsys)
        assert rc == 0, err
        assert tars[1].exists()
        assert tars[0].stat().st_mtime_ns == mtimes[0] and tars[2].stat().st_mtime_ns == mtimes[2]
        m2 = json.loads((out / "manifest.json").read_text())
        assert m2["num_samples"] == 27 and m2["complete"]
        # a garbled member header: the shard no longer counts as finished and is downloaded again
        with tarfile.open(tars[2]) as t:
            name = t.getmembers()[3].name
        garble_header(tars[2], name)
        rc, err = run_prep(argv, capsys)
        assert rc == 0 and "shard 2 will be redone" in err, err
        assert tars[0].stat().st_mtime_ns == mtimes[0]
        from pipeline.data.formats.shards import count_tar_samples

        m3 = json.loads((out / "manifest.json").read_text())
        assert m3["complete"] and m3["num_samples"] == 27 and count_tar_samples(str(tars[2])) > 0


@pytest.mark.slow
def test_slurm_array_split_run_merge(tmp_path, capsys):
    names = _www(tmp_path / "www", 10)
    with serve_folder(tmp_path / "www") as srv:
        rows = [{"url": srv.url(n), "caption": f"image {i}"} for i, n in enumerate(names)]
        rows.append({"url": srv.broken("404"), "caption": "gone"})
        (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "big"
        assert (
            prep.main(
                ["split", "urls", "--input", str(tmp_path / "list.jsonl"), "--parts", "2", "--out", str(out)]
            )
            == 0
        )
        assert sorted(p.name for p in (out / "parts").glob("*.parquet")) == [
            "part_00000.parquet",
            "part_00001.parquet",
        ]
        env = {
            **os.environ,
            "PYTHON": sys.executable,
            "SLURM_CPUS_PER_TASK": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        for task in (0, 1):
            r = subprocess.run(
                [
                    "bash",
                    str(REPO / "data_prep" / "prep_slurm_array.sbatch"),
                    str(out),
                    "--threads",
                    "4",
                    "--samples-per-shard",
                    "4",
                    "--retries",
                    "0",
                ],
                env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=240,
            )
            assert r.returncode == 0, r.stderr[-2000:]
        r = subprocess.run(
            ["bash", str(REPO / "data_prep" / "prep_slurm_array.sbatch"), str(out)],
            env={**env, "SLURM_ARRAY_TASK_ID": "7"},
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and "no " in r.stderr
    assert prep.main(["merge", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    # 6 + 5 rows -> shards of <= 4: part 0 gives 4 + 2, part 1 gives 4 + (the 404 alone: empty, left out);
    # merged names are global and contiguous
    assert m["num_samples"] == 10 and m["num_shards"] == 3
    assert m["shards_relative"] == "shards/{000000..000002}.tar"
    assert m["counts"]["by_category"] == {"http_404": 1} and m["complete"]
    cfg = DataConfig(sources=[SourceConfig(name="m", shards=str(out))], num_workers=0, image_size=32)
    keys = [k for b in build_loader(cfg, tokenize=None, batch_size=4, train=False) for k in b["keys"]]
    assert len(keys) == 10
