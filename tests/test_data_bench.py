"""`simvlg bench data` runs end to end on synthetic shards and reports rates."""

import json

from pipeline.data import bench


def test_bench_data_synthetic(capsys):
    rc = bench.main(
        [
            "--synthetic",
            "64",
            "--workers",
            "0,1",
            "--seconds",
            "0.5",
            "--batch-size",
            "8",
            "--image-size",
            "64",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decode"]["decode_augment_per_s"] > 0
    assert [r["workers"] for r in out["loader"]] == [0, 1]
    assert all(r["samples_per_s"] > 0 and 0 <= r["wait_fraction"] <= 1.0 for r in out["loader"])


def test_bench_data_side_by_side_with_webdataset_and_the_float32_path(capsys):
    rc = bench.main(
        [
            "--synthetic",
            "48",
            "--workers",
            "0",
            "--seconds",
            "0.3",
            "--batch-size",
            "8",
            "--image-size",
            "32",
            "--vs",
            "webdataset,float32",
            "--json",
        ]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out)["loader"][0]
    assert r["samples_per_s"] > 0 and r["vs"]["webdataset"]["samples_per_s"] > 0
    # uint8 through the worker queue: a quarter of the float32 path's pixel bytes
    assert r["bytes_per_sample"] == 3 * 32 * 32 + 8  # + source_idx (int64)
    assert r["vs"]["float32"]["bytes_per_sample"] == 4 * 3 * 32 * 32 + 8
