"""`fahr pretrain`: MAE pretraining from a composed ``PretrainConfig``.

The run directory is derived from the config (see :mod:`fahr.utils.run`); if it already holds
``checkpoints/last.ckpt`` the run resumes from it (global step, optimiser, schedule, W&B id).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fahr.config.schema import validate
from fahr.data.build import build_datamodule, ensure_synthetic_shards
from fahr.tasks.callbacks import ThroughputMonitor
from fahr.tasks.pretrain import MAEPretrainTask
from fahr.utils.atomic import atomic_write_json
from fahr.utils.checkpoint_io import AtomicCheckpointIO
from fahr.utils.loggers import build_loggers
from fahr.utils.run import LAST_CHECKPOINT, find_resume_checkpoint, prepare_run_dir, read_run_info, run_dir_for

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    global_step: int
    resumed_from: Path | None
    metrics: dict[str, float]


class _SessionSteps(Callback):
    """Counts the training batches run in this session (0 when re-running a finished run)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


class RunInfoInCheckpoint(Callback):
    """Stores the run identity (run id, W&B id) inside every checkpoint."""

    def __init__(self, run_info: dict[str, Any]) -> None:
        self.run_info = run_info

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["fahr_run"] = dict(self.run_info)


def build_callbacks(cfg: DictConfig, run_dir: Path, run_info: dict[str, Any]) -> list[Callback]:
    c = cfg.callbacks
    every = c.checkpoint.every_n_train_steps
    callbacks: list[Callback] = [
        # Recovery: last.ckpt every N steps, unconditionally. Kept apart from the monitored saver
        # because Lightning defers a monitored saver's `last` until its metric exists.
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=every, save_last=True,
                        save_top_k=0, monitor=None),
        # Best: top-k by the monitored metric, as step*.ckpt.
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:07d}",
                        auto_insert_metric_name=False, every_n_train_steps=every, save_last=False,
                        monitor=c.checkpoint.monitor, mode=c.checkpoint.mode, save_top_k=c.checkpoint.save_top_k),
        RunInfoInCheckpoint(run_info),
    ]
    if c.throughput:
        callbacks.append(ThroughputMonitor())
    return callbacks


def _final_metrics(trainer: L.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        v = float(value)
        out[key] = v if math.isfinite(v) else str(v)
    return out


def _silence_known_warnings() -> None:
    """Lightning warnings that do not apply to the shard stream (each checked by a test instead)."""
    # The stream sizes every worker's share itself (tests/test_shards.py checks exact coverage).
    warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
    # Device-side normalisation lives in the task on purpose; the datamodule has no such hook.
    warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer` in `LightningModule`.*")


def _finish_trackers(loggers: list) -> None:
    """Close W&B runs so a later run in the same process (a notebook, a test) starts its own."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            lg.experiment.finish()


def pretrain(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train (or resume) the MAE run that ``cfg`` describes; returns where it is and how it ended."""
    validate(cfg)
    L.seed_everything(cfg.seed, workers=True)
    if rank_zero_only.rank == 0:
        ensure_synthetic_shards(cfg.data, cfg.model.img_size)
    run_dir = run_dir_for(cfg)
    resume_from = find_resume_checkpoint(run_dir) if cfg.resume else None
    if rank_zero_only.rank == 0:
        run_info = prepare_run_dir(cfg, run_dir)
    else:
        run_info = read_run_info(run_dir) if (run_dir / "run.json").is_file() else {"run_id": run_dir.name, "wandb_id": None}
    log.info("run directory: %s%s", run_dir, f" (resuming from {resume_from.name})" if resume_from else "")

    datamodule = build_datamodule(cfg.data)
    task = MAEPretrainTask(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        task=OmegaConf.to_container(cfg.task, resolve=True),
        mean=list(cfg.data.mean), std=list(cfg.data.std),
        image_dir=str(run_dir / "figures"),
        allow_image_logging=(not cfg.data.clinical) or cfg.task.log_clinical_images,
    )
    loggers = build_loggers(cfg, run_dir, run_info)
    session = _SessionSteps()
    callbacks = build_callbacks(cfg, run_dir, run_info) + [session] + list(extra_callbacks)
    if cfg.callbacks.lr_monitor and any(not type(lg).__name__.endswith("CSVLogger") for lg in loggers):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.data.val_shards is None:
        trainer_args["limit_val_batches"] = 0  # no validation data: no empty validation loop
    _silence_known_warnings()
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the shard stream splits data by rank itself
    )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
        if session.steps == 0:
            log.info("run already complete at step %d (trainer.max_steps=%d): nothing to train",
                     trainer.global_step, cfg.trainer.max_steps)
        elif not cfg.trainer.fast_dev_run and not trainer.interrupted:
            # ModelCheckpoint saves every N steps; make sure `last` holds the final step too.
            trainer.save_checkpoint(str(run_dir / "checkpoints" / LAST_CHECKPOINT), weights_only=False)
        metrics_file = run_dir / "metrics.json"
        previous = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics = {**previous, **_final_metrics(trainer), "global_step": trainer.global_step}
        if trainer.is_global_zero:
            atomic_write_json(metrics_file, metrics)
    finally:
        _finish_trackers(loggers)
    return RunResult(run_dir=run_dir, global_step=trainer.global_step, resumed_from=resume_from, metrics=metrics)
