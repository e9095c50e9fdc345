"""Run tracking on rank 0: MLflow (params, metrics, artifacts) plus a plain `metrics.jsonl`.

MLflow is best effort: any failure (server down, network error) becomes one warning, the metrics are
kept and retried with the next call, and training never stops for it. `metrics.jsonl` is always
written, so runs can be compared with plain tools even when MLflow was unreachable throughout.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

from pipeline.config import Config, dump_yaml, flatten

log = logging.getLogger("simvlg.tracking")


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    return (
        cfg.tracking.uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    )


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None = None, enabled: bool = True):
        self.run_dir = run_dir
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.enabled = enabled and cfg.tracking.enabled
        self.run_id = run_id
        self.pending: list = []  # metrics not yet accepted by MLflow
        self.failures = 0
        self._last_failure = 0.0
        if self.enabled:
            self._start(cfg)

    # -- MLflow, guarded ------------------------------------------------------------------------
    def _guard(self, what: str, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # tracking must never stop training
            self.failures += 1
            self._last_failure = time.time()
            log.warning(
                "MLflow %s failed (%s: %s); will retry later",
                what,
                type(e).__name__,
                str(e).splitlines()[0][:200] if str(e) else "",
            )
            return False

    def _start(self, cfg: Config) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.mlflow = mlflow
        # Fail fast instead of MLflow's default minutes of HTTP retries; we retry ourselves.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        uri = tracking_uri(cfg, self.run_dir)
        local = uri.startswith("sqlite:") and not cfg.tracking.uri
        self.client = MlflowClient(tracking_uri=uri)

        def start():
            if self.run_id is None:
                exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
                # A local store keeps its artifacts in the run dir, not in the working directory.
                where = (self.run_dir / "mlartifacts").resolve().as_uri() if local else None
                exp_id = (
                    exp.experiment_id
                    if exp
                    else self.client.create_experiment(cfg.tracking.experiment, artifact_location=where)
                )
                run = self.client.create_run(
                    exp_id, run_name=cfg.run.name, tags={"run_dir": str(self.run_dir.resolve())}
                )
                self.run_id = run.info.run_id
                params = flatten(cfg.to_dict())
                items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
                for i in range(0, len(items), 100):
                    self.client.log_batch(self.run_id, params=items[i : i + 100])
                self.client.log_dict(self.run_id, cfg.to_dict(), "config.json")
                self.client.log_text(self.run_id, dump_yaml(cfg), "config.yaml")
                self.client.log_dict(self.run_id, system_info(), "system.json")

        if not self._guard("start", start):
            self._retry_start = start
        else:
            self._retry_start = None

    def _flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        if self._retry_start is not None:
            if not self._guard("start (retry)", self._retry_start):
                return
            self._retry_start = None
        batch, self.pending = self.pending[:1000], self.pending[1000:]
        if not self._guard("log_batch", lambda: self.client.log_batch(self.run_id, metrics=batch)):
            self.pending = batch + self.pending
            self.pending = self.pending[-100_000:]  # bounded memory during a long outage

    # -- public ---------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.enabled:
            now = int(time.time() * 1000)
            self.pending += [self.mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()]
            if time.time() - self._last_failure > 30:  # back off after a failure
                self._flush()

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.enabled and self.run_id:
            self._guard(
                f"log_artifact {path.name}", lambda: self.client.log_artifact(self.run_id, str(path), folder)
            )

    def table(self, rows: list[dict], name: str) -> None:
        if self.enabled and self.run_id:
            self._guard(
                f"log_table {name}",
                lambda: self.client.log_table(
                    self.run_id, data={k: [r[k] for r in rows] for k in rows[0]}, artifact_file=name
                ),
            )

    def close(self, status: str = "FINISHED") -> None:
        self.metrics_file.close()
        if self.enabled:
            self._flush()
            if self.run_id and self._retry_start is None:
                self._guard("terminate", lambda: self.client.set_terminated(self.run_id, status))


def system_info() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "world_size": os.environ.get("WORLD_SIZE"),
    }
