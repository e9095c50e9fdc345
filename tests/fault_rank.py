"""One training rank with a fault injected, for tests/test_train.py: the DataLoader worker of rank
FAULT_RANK raises while it builds its FAULT_BATCH-th batch. Workers are forked from this process, so
the patch below reaches them. Run by the deepspeed launcher in place of `-m pipeline.train`."""

import os
import runpy
import sys

from pipeline.data import worker

RANK, BATCH = int(os.environ["FAULT_RANK"]), int(os.environ["FAULT_BATCH"])
_collate = worker.MixedStream._collate


def _faulty_collate(self, items, lw, epoch, n, *rest):
    if self.rank == RANK and n == BATCH:
        raise RuntimeError(f"injected fault in a DataLoader worker of rank {RANK} at batch {n}")
    return _collate(self, items, lw, epoch, n, *rest)


worker.MixedStream._collate = _faulty_collate
sys.argv[0] = "pipeline.train"
runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)
