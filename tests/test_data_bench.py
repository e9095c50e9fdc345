"""`simvlg bench data` runs end to end on synthetic shards and reports rates."""

import json

from pipeline.data import bench


def test_bench_data_synthetic(capsys):
    rc = bench.main(["--synthetic", "64", "--workers", "0,1", "--seconds", "0.5", "--batch-size", "8",
                     "--image-size", "64", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decode"]["decode_augment_per_s"] > 0
    assert [r["workers"] for r in out["loader"]] == [0, 1]
    assert all(r["samples_per_s"] > 0 and 0 <= r["wait_fraction"] <= 1.0 for r in out["loader"])
