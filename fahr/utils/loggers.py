"""Experiment loggers from config: CSV always, W&B and TensorBoard on request.

Imports of wandb/tensorboard happen only when they are configured.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; on resume we append to it instead."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class RunCSVLogger(CSVLogger):
    """Writes ``<run_dir>/metrics.csv`` and ``hparams.yaml``, appending across resumes."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(save_dir=str(run_dir), name="", version="")

    @property
    def log_dir(self) -> str:
        return self.root_dir

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.root_dir)
        return self._experiment


def build_loggers(cfg: DictConfig, run_dir: Path, run_info: dict[str, Any]) -> list[Logger]:
    loggers: list[Logger] = [RunCSVLogger(run_dir)]
    if cfg.logger.tensorboard is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name=cfg.logger.tensorboard.subdir, version=""))
    if cfg.logger.wandb is not None:
        from lightning.pytorch.loggers import WandbLogger

        w = cfg.logger.wandb
        kwargs: dict[str, Any] = {}
        if w.mode:
            kwargs["mode"] = w.mode
        loggers.append(WandbLogger(
            project=w.project, entity=w.entity, group=w.group, tags=list(w.tags),
            name=run_info["run_id"], id=run_info["wandb_id"], resume="allow",
            save_dir=str(run_dir), log_model=False,
            config=OmegaConf.to_container(cfg, resolve=True), **kwargs,
        ))
    return loggers


def finish_trackers(loggers: list) -> None:
    """Close W&B runs so a later run in the same process (a notebook, a test, the demo) starts its own,
    and return only once what they logged is on disk."""
    finished = False
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            try:
                lg.experiment.finish()
                finished = True
            except (ConnectionError, OSError) as exn:
                # SLURM's SIGTERM (scancel, requeue, preemption) also stops W&B's service process; what
                # it wrote before stays in the run, and the checkpoint is already saved
                log.warning("W&B run could not be closed (%s: %s): its service process has stopped; "
                            "the same command resumes the same W&B run", type(exn).__name__, exn)
    if finished:
        import wandb

        if wandb.run is None:  # never stop the service under a run the caller still has open
            try:
                # finish() returns before W&B's service has written the run file (seen: the last 15 of
                # 401 rows, final test metrics included, missing right after it); stopping the
                # service closes its streams and waits. The next wandb.init starts a new one.
                wandb.teardown()
            except (ConnectionError, OSError) as exn:
                log.warning("W&B's service did not stop cleanly (%s: %s)", type(exn).__name__, exn)
