"""Pre-emption: SLURM sends SIGUSR1 (`--signal=USR1@120`) or SIGTERM before it kills a job. We only
set a flag here; the training loop checkpoints at the next step boundary, exits 0, and asks SLURM to
requeue the job, which then resumes from that checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger("simvlg.signals")


class StopFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame):
        if self.signum is None:
            log.warning(
                "received %s: will checkpoint at the next step boundary and exit", signal.Signals(signum).name
            )
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def requeue_slurm_job() -> bool:
    """Requeue this SLURM job (if we are in one). Returns whether a requeue was requested."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and (
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    )
    job = job or os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, out.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True
