"""`simvlg prep`: URL lists -> WebDataset shards + manifest.json, one command per recipe.

    simvlg prep cc3m --input Train_GCC-training.tsv --out data/cc3m
    simvlg prep list                               # recipes and the inputs each expects
    simvlg prep split laion115m_capfilt --input laion_synthetic_filtered_large.json --parts 64 --out D
    simvlg prep merge --out D                      # after the SLURM array (data_prep/)
    simvlg prep manifest --out D                   # rebuild D/manifest.json from the shards

Layout of --out DIR:
    DIR/input/part-NNNNN.parquet + _SOURCE.json   the validated list (url, caption[, captions])
    DIR/shards/NNNNN.tar, NNNNN_stats.json, NNNNN.parquet   img2dataset's output (per-URL status)
    DIR/manifest.json                              shard pattern, sample and failure counts
(The manifest is kept out of shards/: img2dataset's incremental mode takes every *.json there for a
shard's stats file.)

Steps: read the recipe's list -> validate every row (missing columns, empty captions, unreadable
files fail here, before any download) -> parquet -> img2dataset (webdataset output, jpg+txt+json,
shorter side 384 px kept aspect, never upscaled, retries, timeouts, max_image_area) -> check the
outputs (each expected shard has its stats file and a readable tar whose sample count matches) ->
manifest. A re-run reuses the converted input, redoes only shards that are not finished (no stats
file, or a stats file whose tar is missing or broken: that stats file is removed first so img2dataset
redoes it) and never rewrites a finished shard. Exit status: 0 when every shard is finished, 1 when
some are not (re-run the same command), 2 on bad input or usage.

Modules, in the order a run goes through them:
    recipes.py, lists.py   what each dataset's published list looks like, read as rows
    convert.py             validate the rows, write them as parquet (+ _SOURCE.json: the fingerprint)
    download.py            DownloadOptions (every option of a run, once) and img2dataset
    video_shards.py        local video files -> tar shards (the video recipes; no download)
    verify.py              which shards are finished; unfinished ones are reset so they are redone
    counts.py              failure causes in words; the manifest built from the shards folder
    slurm.py               split a list for a SLURM array, merge the parts' shards and manifests
    run.py, cli.py         the command
"""

from .cli import build_parser, main
from .counts import build_manifest, cause_category
from .download import DownloadOptions
from .run import PrepError, run_recipe
from .slurm import merge_parts, split_list
from .verify import reset_unfinished, verify_shards

__all__ = [
    "DownloadOptions",
    "PrepError",
    "build_manifest",
    "build_parser",
    "cause_category",
    "main",
    "merge_parts",
    "reset_unfinished",
    "run_recipe",
    "split_list",
    "verify_shards",
]
