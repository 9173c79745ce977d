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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError
from fahr.config.schema import validate
from fahr.data.datamodule import datamodule_from_config
from fahr.data.synthetic_shards import ensure_synthetic_shards
from fahr.job import TrainingJob
from fahr.tasks.pretrain import MAEPretrainTask
from fahr.utils.atomic import atomic_write_json
from fahr.utils.run import run_dir_for

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


def _final_metrics(trainer: L.Trainer) -> dict[str, float]:
    out = {}
    for key, value in trainer.callback_metrics.items():
        v = float(value)
        out[key] = v if math.isfinite(v) else str(v)
    return out


def adopt_init_from(cfg: DictConfig) -> None:
    """``task.init_from``: the export's architecture (``model.arch``, ``patch_size`` and size facts), its
    decoder's facts (``task.decoder_*``, when it has a decoder) and its normalisation (``data.mean``,
    ``data.std``) replace the config's, so the run trains, records and later exports what the export
    holds. ``model.img_size`` stays the config's (position embeddings are resampled to it). The run id
    is derived before (from ``task.init_from`` as given), so the same command finds the same run."""
    from fahr.models.backbone import backbone_args
    from fahr.models.mae import decoder_args
    from fahr.models.weights import CARD_FILE, CARD_FORMAT, read_card

    card = read_card(cfg.task.init_from)
    args = backbone_args(card)
    cfg.model.arch, cfg.model.patch_size = args["arch"], args["patch_size"]
    for key in ("embed_dim", "depth", "num_heads", "mlp_ratio", "norm_eps", "qkv_bias"):
        cfg.model[key] = args.get(key)
    norm = card.get("normalization")
    if norm is not None:
        cfg.data.mean, cfg.data.std = list(norm["mean"]), list(norm["std"])
    decoder = card.get("decoder") if card["format"] == CARD_FORMAT else None
    if decoder is not None:
        for key, value in decoder_args(decoder, f"{cfg.task.init_from}/{CARD_FILE}: decoder.").items():
            cfg.task[key] = value
        if decoder.get("norm_pix_loss") is not None and decoder["norm_pix_loss"] != cfg.task.norm_pix_loss:
            log.warning("task.init_from: the decoder was trained with norm_pix_loss=%s, this run uses %s "
                        "(task.norm_pix_loss): its first steps re-learn the target", decoder["norm_pix_loss"],
                        cfg.task.norm_pix_loss)
    log.info("task.init_from: %s (arch %s, %d px patches%s); its architecture and normalisation replace the "
             "config's", cfg.task.init_from, args["arch"], args["patch_size"],
             ", with its MAE decoder" if decoder is not None else ", new decoder")


def pretrain(cfg: DictConfig, extra_callbacks: Sequence[Callback] = ()) -> RunResult:
    """Train (or resume) the MAE run that ``cfg`` describes; returns where it is and how it ended."""
    validate(cfg)
    if cfg.trainer.max_steps is None:
        raise InputError("trainer.max_steps is required: the length of pretraining (its LR schedule counts steps)")
    run_dir = run_dir_for(cfg)  # the command as typed: `fahr export` / `fahr run-dir` with it find this run
    if cfg.task.init_from:
        adopt_init_from(cfg)  # config.yaml records the architecture trained, for `fahr export`
        validate(cfg)
    metrics: dict[str, float] = {}
    with TrainingJob(cfg, run_dir) as job:
        L.seed_everything(cfg.seed, workers=True)
        job.prepare_once("synthetic shards", lambda: ensure_synthetic_shards(cfg.data, cfg.model.img_size))
        job.prepare_run_dir()
        log.info("run directory: %s", run_dir)
        datamodule = datamodule_from_config(cfg.data)
        task = MAEPretrainTask(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            task=OmegaConf.to_container(cfg.task, resolve=True),
            mean=list(cfg.data.mean), std=list(cfg.data.std),
            image_dir=str(run_dir / "figures"),
            allow_image_logging=(not cfg.data.clinical) or cfg.task.log_clinical_images,
        )
        job.build_loggers()
        c = cfg.callbacks
        # top-k by the monitored metric, as step*.ckpt (last.ckpt is the job's)
        best = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:07d}",
                               auto_insert_metric_name=False, every_n_train_steps=c.checkpoint.every_n_train_steps,
                               save_last=False, monitor=c.checkpoint.monitor, mode=c.checkpoint.mode,
                               save_top_k=c.checkpoint.save_top_k)
        outcome = job.fit(task, ckpt_dir=run_dir / "checkpoints", max_steps=cfg.trainer.max_steps,
                          batch_size=cfg.data.batch_size, datamodule=datamodule,
                          checkpoint_every=c.checkpoint.every_n_train_steps, callbacks=[best, *extra_callbacks],
                          # no validation data: no empty validation loop
                          trainer_overrides={"limit_val_batches": 0} if cfg.data.val_shards is None else None,
                          throughput=c.throughput, lr_monitor=c.lr_monitor, default_root_dir=run_dir)
        trainer = outcome.trainer
        if outcome.session_steps == 0:
            log.info("run already complete at step %d (trainer.max_steps=%d): nothing to train",
                     trainer.global_step, cfg.trainer.max_steps)
        metrics_file = run_dir / "metrics.json"
        previous = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics = {**previous, **_final_metrics(trainer), "global_step": trainer.global_step}
        if job.is_rank_zero and not outcome.preempted:
            atomic_write_json(metrics_file, metrics)
    return RunResult(run_dir=run_dir, global_step=outcome.global_step, resumed_from=outcome.resumed_from,
                     metrics=metrics, preempted=outcome.preempted)
