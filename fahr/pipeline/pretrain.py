"""`fahr pretrain`: MAE pretraining from a composed ``PretrainConfig``.

The run directory is derived from the config (see :mod:`fahr.utils.run`); if it already holds
``checkpoints/last.ckpt`` the run resumes from it (global step, optimiser, schedule, W&B id, and the
position in the current epoch of the shard stream).

Preemption (:mod:`fahr.utils.preemption`): SIGUSR1 or SIGTERM saves ``last.ckpt`` at the next batch
end and stops (SIGUSR1 under SLURM also requeues the job); the result then has ``preempted=True``
and ``metrics.json`` is not written: the run is finished only at ``trainer.max_steps``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fahr.config.schema import validate
from fahr.data.build import build_datamodule, ensure_synthetic_shards, wait_for_synthetic_shards
from fahr.tasks.callbacks import ThroughputMonitor
from fahr.tasks.pretrain import MAEPretrainTask
from fahr.utils.atomic import atomic_write_json
from fahr.utils.checkpoint_io import AtomicCheckpointIO
from fahr.utils.distributed_env import distributed_env, trainer_topology
from fahr.utils.loggers import build_loggers, finish_trackers
from fahr.utils.preemption import PreemptionCheckpoint, cluster_plugins
from fahr.utils.run import LAST_CHECKPOINT, find_resume_checkpoint, prepare_run_dir, read_run_info, run_dir_for
from fahr.utils.strategies import build_strategy

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """How a ``pretrain`` call ended. ``preempted``: stopped by a signal before ``max_steps``
    (checkpoint saved; re-run the same command to continue); ``metrics`` are then not final."""
    run_dir: Path
    global_step: int
    resumed_from: Path | None
    metrics: dict[str, float]
    preempted: bool = False


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


class _RecoveryCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N steps, and never at train end: Lightning's train-end save holds the loop
    state after fit stopped (epoch already advanced), from which a resume continues in the wrong
    epoch. The batch-end saves at max_steps and on preemption (PreemptionCheckpoint) replace it."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass


def build_callbacks(cfg: DictConfig, run_dir: Path, run_info: dict[str, Any]) -> list[Callback]:
    c = cfg.callbacks
    every = c.checkpoint.every_n_train_steps
    callbacks: list[Callback] = [
        # Recovery: last.ckpt every N steps, unconditionally. Kept apart from the monitored saver
        # because Lightning defers a monitored saver's `last` until its metric exists.
        # No version counter: a resumed session would otherwise write last-v1.ckpt beside a last.ckpt
        # it did not write itself, and resume reads only last.ckpt.
        _RecoveryCheckpoint(dirpath=str(run_dir / "checkpoints"), every_n_train_steps=every, save_last=True,
                            save_top_k=0, monitor=None, enable_version_counter=False),
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
    # The shard stream does resume mid-epoch, from the restored loop state (ShardDataModule.train_dataloader;
    # tests/test_preemption.py compares the batches with an uninterrupted run's).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def _trainer_topology(trainer_args: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Trainer arguments with ``num_nodes``/``devices`` filled from srun/torchrun where the config
    says "auto", and ``strategy`` built from its config (a name or a mapping with options)."""
    args = trainer_topology(trainer_args, distributed_env(os.environ))
    args["strategy"] = build_strategy(args.get("strategy"), batch_size=batch_size)
    return args


def pretrain(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train (or resume) the MAE run that ``cfg`` describes; returns where it is and how it ended."""
    validate(cfg)
    run_dir = run_dir_for(cfg)
    # first, so that a preemption signal during start-up is not fatal (acted on at the first batch end)
    preemption = PreemptionCheckpoint(run_dir / "checkpoints" / LAST_CHECKPOINT)
    preemption.install()
    try:
        return _pretrain(cfg, run_dir, preemption, extra_callbacks)
    finally:
        preemption.uninstall()


def _pretrain(cfg: DictConfig, run_dir: Path, preemption: PreemptionCheckpoint,
              extra_callbacks: Sequence[Callback]) -> RunResult:
    L.seed_everything(cfg.seed, workers=True)
    if rank_zero_only.rank == 0:
        ensure_synthetic_shards(cfg.data, cfg.model.img_size)
    else:
        wait_for_synthetic_shards(cfg.data, cfg.model.img_size)
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
    # the preemption saver after the ModelCheckpoints: it skips a save they just made at the same step
    callbacks = build_callbacks(cfg, run_dir, run_info) + [preemption, session] + list(extra_callbacks)
    if cfg.callbacks.lr_monitor and any(not type(lg).__name__.endswith("CSVLogger") for lg in loggers):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer_args = _trainer_topology(OmegaConf.to_container(cfg.trainer, resolve=True), cfg.data.batch_size)
    if cfg.data.val_shards is None:
        trainer_args["limit_val_batches"] = 0  # no validation data: no empty validation loop
    _silence_known_warnings()
    trainer = L.Trainer(
        **trainer_args,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *cluster_plugins()],
        use_distributed_sampler=False,  # the shard stream splits data by rank itself
    )
    try:
        trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None,
                    weights_only=True)
        if session.steps == 0:
            log.info("run already complete at step %d (trainer.max_steps=%d): nothing to train",
                     trainer.global_step, cfg.trainer.max_steps)
        # `last.ckpt` at max_steps is written by `preemption` at that batch end
        metrics_file = run_dir / "metrics.json"
        previous = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics = {**previous, **_final_metrics(trainer), "global_step": trainer.global_step}
        if trainer.is_global_zero and not preemption.stopped:
            atomic_write_json(metrics_file, metrics)
    finally:
        finish_trackers(loggers)
        preemption.requeue_if_requested()  # last: a requeue makes SLURM stop every process of the job
    return RunResult(run_dir=run_dir, global_step=trainer.global_step, resumed_from=resume_from, metrics=metrics,
                     preempted=preemption.stopped)
