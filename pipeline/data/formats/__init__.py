"""The data contracts, each defined once: what one room writes and another reads.

    shards.py       WebDataset tar shards: names, specs (patterns, manifests), reading, writing,
                    media extensions
    manifest.py     manifest.json: the typed Manifest `simvlg prep` and its SLURM merge write and the
                    loader, preflight, eval and the demo read (old version-1 files still load)
    annotations.py  the datasets' published annotation files (COCO/LAVIS, Karpathy, NoCaps, Flickr30K,
                    VQA, GQA, MSR-VTT, MSVD), read by the prep recipes and the eval tasks alike
    splits.py       the standard splits of those datasets
    jsonfile.py     atomic JSON writes

Nothing here imports torch or another room of the pipeline.
"""
