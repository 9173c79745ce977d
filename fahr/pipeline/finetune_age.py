"""`fahr finetune-age`: two-stage, age-balanced FAHR-FaceAge fine-tuning, evaluation and export.

One command runs both stages in one run directory (derived from the config like pretraining):

    <run_dir>/stage1/checkpoints/{last,best}.ckpt   head on the frozen backbone
    <run_dir>/stage2/checkpoints/{last,best}.ckpt   full fine-tune, initialised from stage 1's best
    <run_dir>/metrics.json, predictions_test.csv, figures/*.png, age_balance.json
    <run_dir>/export/                              model.safetensors + model_card.json (fahr-model/1)

Runs as a :class:`fahr.job.TrainingJob` (one process, or one per GPU under srun/torchrun). The
training split streams from its shards (:class:`fahr.data.shard_reader.ShardStream`; memory per rank does
not grow with the data), age-balanced by per-sample acceptance: a photo in age bin ``b`` is kept with
probability ``w_b / max w`` (``w`` from :func:`fahr.data.labelled.balancing_weights`), which draws bins
as weighted sampling does. The bin counts come from one pass over the split's labels (json only,
``<run_dir>/train_labels.npz``, written by rank 0). Validation and test stream every photo exactly
once over all ranks and are gathered before any metric is computed.

Re-running the same command resumes: a finished stage (``stageN/done.json``) is skipped, an
interrupted one resumes from its ``last.ckpt`` at the same step and batch; a stop during the
evaluation redoes the evaluation only. SIGUSR1/SIGTERM (SLURM preemption) save and stop; the result
then says ``preempted`` and nothing is exported.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError, printable_path, read_json_file
from fahr.config.finetune_schema import FinetuneAgeConfig
from fahr.data.shard_index import resolve_shard_spec
from fahr.data.datamodule import ShardDataModule
from fahr.data.labelled import (
    LabelColumns,
    bin_weights,
    effective_histogram,
    keep_probabilities,
    load_label_columns,
    read_label_columns,
    save_label_columns,
)
from fahr.data.shard_reader import EvalStream, LabelAcceptance, eval_loader, expand_shards
from fahr.job import TrainingJob
from fahr.metrics.age import age_metrics, apply_bias_correction, decide_bias_correction
from fahr.models.backbone import create_backbone
from fahr.models.face_model import DEFAULT_PREPROCESSING, FaceModel, save_face_model
from fahr.models.heads import AgeHead
from fahr.models.weights import load_backbone
from fahr.tasks.finetune_age import AgeTask
from fahr.utils.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
TRAIN_LABELS = "train_labels.npz"


@dataclass
class FinetuneResult:
    """How a fine-tune ended. ``preempted``: stopped by a signal (re-run the same command to go on);
    ``metrics`` and the export are then not written."""
    run_dir: Path
    export_dir: Path
    metrics: dict[str, Any]
    preempted: bool = False


# ---- data -----------------------------------------------------------------------------------------


def ensure_synthetic_splits(data: DictConfig) -> None:
    """Generate (or reuse) synthetic train/val/test shards, one generator seed per split."""
    if data.get("generate") is None:
        return
    from fahr.data.synthetic_shards import write_synthetic_shards

    g = data.generate
    for i, split in enumerate(("train", "val", "test")):
        write_synthetic_shards(Path(g.out_dir) / split, num_samples=int(g[split]), samples_per_shard=g.samples_per_shard,
                               seed=g.seed * 1000 + i, image_size=data.image_size, split=split)


def split_shards(spec: Any) -> list[str]:
    """The shard URLs of one split (``index.json[#split]``, a brace pattern or a list)."""
    resolved = resolve_shard_spec(OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec)
    return expand_shards(resolved)


def train_label_columns(job: TrainingJob, shards: list[str], required: list[str], optional: list[str]) -> LabelColumns:
    """The training split's labels, read once by rank 0 into ``<run_dir>/train_labels.npz``."""
    path = job.run_dir / TRAIN_LABELS
    job.prepare_once("reading the training labels",
                     lambda: save_label_columns(path, read_label_columns(shards, required, optional)))
    return load_label_columns(path)


def age_balance(ages: np.ndarray, balance: DictConfig) -> tuple[dict[str, Any], LabelAcceptance | None,
                                                                 tuple[float, dict[int, float]] | None]:
    """The report of ``task.balance`` (data and effective age histograms), the training stream's
    acceptance (mode ``sampler``) and the loss weights per bin (mode ``loss``)."""
    if balance.mode not in ("sampler", "loss", "none"):
        raise InputError(f"task.balance.mode must be sampler, loss or none, got {balance.mode!r}")
    width = float(balance.bin_width)
    weights = bin_weights(ages, width, balance.max_weight) if balance.mode != "none" else {}
    per_sample = (np.asarray([weights[int(b)] for b in np.floor(ages / width)]) if weights
                  else np.ones(len(ages)))
    report = {"mode": balance.mode, "bin_width": width, "max_weight": balance.max_weight,
              "how": {"sampler": "per-photo acceptance in the stream: kept with probability w_bin / max w",
                      "loss": "per-photo loss weight w_bin", "none": "the data as it is"}[balance.mode],
              "data_histogram": effective_histogram(ages, np.ones(len(ages)), width),
              "effective_histogram": effective_histogram(ages, per_sample, width)}
    if balance.mode == "sampler":
        probabilities = keep_probabilities(weights)
        report["keep_probability"] = {f"{b * width:g}-{(b + 1) * width:g}": p for b, p in sorted(probabilities.items())}
        report["photos_read_per_kept"] = float(len(ages) / sum(probabilities[int(b)] for b in np.floor(ages / width)))
        return report, LabelAcceptance("age", width, probabilities), None
    if balance.mode == "loss":
        return report, None, (width, weights)
    return report, None, None


def training_data(cfg: DictConfig, shards: dict[str, list[str]], samples: int, label_keys: tuple[str, ...],
                  accept: LabelAcceptance | None = None, val_optional: tuple[str, ...] = ()) -> ShardDataModule:
    """Streamed training batches (``samples`` per epoch, over all ranks) and exactly-once validation."""
    d = cfg.data
    return ShardDataModule(train_shards=shards["train"], samples_per_epoch=samples, batch_size=d.batch_size,
                           num_workers=d.num_workers, seed=cfg.seed, shuffle_buffer=d.shuffle_buffer,
                           interleave=d.interleave, label_keys=label_keys, image_size=d.image_size, val_shards=shards["val"],
                           persistent_workers=d.num_workers > 0, accept=accept, val_exact=True, decode=d.decode,
                           val_batch_size=d.eval_batch_size, val_required=label_keys, val_optional=val_optional)


def predict_split(job: TrainingJob, model: torch.nn.Module, shards: list[str], cfg: DictConfig,
                  output: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
                  text: tuple[str, ...] = (), covariates: tuple[list[str], np.ndarray, np.ndarray] | None = None
                  ) -> dict[str, Any]:
    """``model``'s ``output`` for every usable sample of ``shards``, each rank predicting its share,
    gathered and put in the shards' order. Returns ``{"pred": float64 (N,), <label>: float64 (N,),
    <text key>: list[str], "__key__": list[str], "skipped": int}``. ``covariates`` = (label keys,
    already in ``required``; training mean; SD): standardised, they go to the model as its second input."""
    d = cfg.data
    stream = EvalStream(shards, d.eval_batch_size, d.image_size, required=required, optional=optional, text=text,
                        world_size=job.world_size, rank=job.rank, num_workers=d.num_workers)
    device = job.device
    model.eval().to(device)
    columns: dict[str, list] = {"pred": [], "position": [], "__key__": [],
                                **{k: [] for k in (*required, *optional, *text)}}
    skipped = 0
    with torch.inference_mode():
        for batch in eval_loader(stream):
            skipped += int(batch["n_skipped"])
            if batch["image"].shape[0] == 0:
                continue
            extra = None
            if covariates:
                keys, mean, std = covariates
                raw = torch.stack([batch[k] for k in keys], 1).double()
                extra = ((raw - torch.as_tensor(mean)) / torch.as_tensor(std)).float().to(device)
            out = model(batch["image"].to(device), extra) if extra is not None else model(batch["image"].to(device))
            columns["pred"].append(out[output].float().cpu())
            columns["position"].append(batch["position"])
            for k in (*required, *optional):
                columns[k].append(batch[k])
            for k in (*text, "__key__"):
                columns[k].extend(batch[k])
    model.cpu()
    local = {k: (torch.cat(v) if v else torch.zeros(0)) if k not in (*text, "__key__") else v for k, v in columns.items()}
    local["position"] = local["position"].long() if len(columns["position"]) else torch.zeros(0, dtype=torch.int64)
    local["n_skipped"] = torch.tensor([skipped])
    gathered = job.gather_rows(local)
    order = torch.argsort(gathered.pop("position")).numpy()
    out: dict[str, Any] = {"skipped": int(gathered.pop("n_skipped").sum())}
    for k, v in gathered.items():
        out[k] = [v[i] for i in order] if isinstance(v, list) else v.numpy().astype(np.float64)[order]
    return out


def preprocessing_of(spec: Any, image_size: int) -> dict[str, Any]:
    """How the training crops were made, for the model card's ``preprocessing`` (``fahr predict``
    reads it: see :func:`fahr.inference.predict.resolve_preprocessing`), from the ``index.json`` of
    the training shards ``spec`` names:

    - built by ``fahr shards`` with detection: ``crops: fahr`` + the detector, template, size,
      margin, multi-face policy and confidence, which predict redoes on raw photos;
    - built from a dataset's own crops (``align.skip_detection=true``) or synthetic faces:
      ``crops: external`` and a ``source`` line saying which;
    - no index (shards given as tar paths elsewhere): ``crops: unknown``.
    """
    from fahr.data.shard_index import index_location, read_index

    path = index_location(spec)
    if path is None:
        return {"crops": "unknown", "detect": False, "image_size": image_size,
                "source": "shards without an index.json, so the cropping is not recorded"}
    index = read_index(path)
    name = str(index.get("source", "unnamed"))[:40]
    if index.get("synthetic") or index.get("source") == "synthetic":
        return {"crops": "external", "detect": False, "image_size": image_size,
                "source": "synthetic faces, generated already centred"}
    opts = index.get("options", {}) if isinstance(index.get("options"), dict) else {}
    if opts.get("skip_detection", False) is not False or not isinstance(opts.get("align"), dict):
        return {"crops": "external", "detect": False, "image_size": image_size,
                "source": f"{name} photos taken as crops and resized (fahr shards align.skip_detection=true)"}
    prep = dict(DEFAULT_PREPROCESSING)
    prep.update({k: v for k, v in opts["align"].items() if k in ("margin", "multi_face", "min_confidence")})
    prep.update(crops="fahr", detect=True, image_size=index.get("image_size", opts["align"].get("image_size", image_size)))
    from fahr.models.weights import check_preprocessing

    check_preprocessing(prep, f"{printable_path(path)}: options.align")  # a card predict could not load: refused now
    return prep


# ---- model ----------------------------------------------------------------------------------------


def backbone_for(cfg: DictConfig, drop_path_rate: float) -> tuple[torch.nn.Module, dict[str, Any], list, list]:
    """The backbone a fine-tune starts from: ``cfg.backbone`` (an export: MAE backbone or a fine-tuned
    model, resized to ``data.image_size``) or a new one from ``cfg.model``. Returns (backbone, init
    facts for the card, mean, std): an export's normalisation wins over the data config's."""
    if cfg.backbone:
        backbone, card = load_backbone(cfg.backbone, img_size=cfg.data.image_size, drop_path_rate=drop_path_rate,
                                       global_pool=cfg.model.global_pool)
        init = {"backbone": str(cfg.backbone), "backbone_task": card.get("task"), "arch": card["arch"],
                "backbone_step": card.get("global_step")}
        norm = card.get("normalization", {})
        return backbone, init, list(norm.get("mean", cfg.data.mean)), list(norm.get("std", cfg.data.std))
    backbone = create_backbone(arch=cfg.model.arch, img_size=cfg.data.image_size, patch_size=cfg.model.patch_size,
                               drop_path_rate=drop_path_rate, global_pool=cfg.model.global_pool)
    return backbone, {"backbone": None, "arch": cfg.model.arch}, list(cfg.data.mean), list(cfg.data.std)


def build_model(cfg: DictConfig) -> tuple[FaceModel, dict[str, Any]]:
    """Backbone (from ``cfg.backbone`` or from scratch) + age head; returns (model, init facts)."""
    backbone, init, mean, std = backbone_for(cfg, cfg.task.stage2.drop_path_rate)
    kind = "distribution" if cfg.task.loss == "distribution" else "regression"
    head = AgeHead(backbone.num_features, kind=kind, **OmegaConf.to_container(cfg.task.head))
    return FaceModel(backbone, {"age": head}, mean, std, flip_average=cfg.task.flip_average), init


def load_task_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load a task checkpoint's ``model.*`` weights into ``model`` (weights only: no pickle)."""
    from fahr.models.weights import load_state_dict_checked
    from fahr.utils.checkpoint_io import load_checkpoint_file

    state = load_checkpoint_file(ckpt)["state_dict"]
    load_state_dict_checked(model, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, Path(ckpt))


# ---- stages ---------------------------------------------------------------------------------------


def run_stage(job: TrainingJob, stage: int, cfg: DictConfig, model: FaceModel, data: ShardDataModule,
              loss_weights: tuple[float, dict[int, float]] | None,
              extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any] | None:
    """Train one stage (or skip a finished one); leaves the stage's best weights in ``model``.
    Returns the stage's summary (``stageN/done.json``), or None when a signal stopped it.
    ``extra_callbacks`` join the stage's trainer (benchmarks and tests)."""
    s = cfg.task[f"stage{stage}"]
    stage_dir = job.run_dir / f"stage{stage}"
    done_file = stage_dir / "done.json"
    if s.max_steps <= 0:
        return {"steps": 0, "skipped": "max_steps=0"}
    if done_file.is_file():
        done = read_json_file(done_file, "stage summary")
        load_task_weights(model, job.run_dir / done["best"])
        log.info("stage %d already finished (best val MAE %.3f): skipped", stage, done["best_val_mae"])
        return done
    task = AgeTask(model, OmegaConf.to_container(cfg.task, resolve=True), stage, OmegaConf.to_container(s, resolve=True),
                   cfg.data.batch_size, loss_weights=loss_weights, metric_prefix=f"stage{stage}/")
    every = min(s.val_every_n_steps, s.max_steps)
    best = ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), filename="best", monitor=f"stage{stage}/val/mae",
                           mode="min", save_top_k=1, save_last=False, auto_insert_metric_name=False)
    outcome = job.fit(task, ckpt_dir=stage_dir / "checkpoints", max_steps=s.max_steps, batch_size=cfg.data.batch_size,
                      datamodule=data, checkpoint_every=every, val_every=every, callbacks=[best, *extra_callbacks],
                      default_root_dir=stage_dir)
    if outcome.preempted:
        return None
    if not best.best_model_path:
        raise InputError(f"stage {stage}: no validation MAE was computed (no usable validation photo)")
    best_path = Path(best.best_model_path)
    load_task_weights(model, best_path)
    done = {"steps": outcome.global_step, "best": os.path.relpath(best_path.resolve(), job.run_dir.resolve()),
            "best_val_mae": float(best.best_model_score)}
    if job.is_rank_zero:
        atomic_write_json(done_file, done)
    return done


# ---- evaluation -----------------------------------------------------------------------------------


def evaluate(job: TrainingJob, model: FaceModel, cfg: DictConfig, shards: dict[str, list[str]],
             run_dir: Path) -> tuple[dict[str, Any], dict[str, float] | None, dict[str, Any] | None]:
    """Metrics on val and test (every photo once, over all ranks), raw and bias-corrected; figures
    and the test predictions CSV (rank 0). Returns (metrics, the bias correction if kept, the
    decision: see :func:`decide_bias_correction`)."""
    from fahr.utils.plots import age_error_by_decade_png, age_scatter_png

    groups_keys = ("sex", "race")
    metrics: dict[str, Any] = {}
    val = predict_split(job, model, shards["val"], cfg, "age", ("age",), groups_keys)
    metrics.update({f"val/{k}": v for k, v in age_metrics(val["pred"], val["age"], {k: val[k] for k in groups_keys}).items()})
    metrics["val/skipped"] = val["skipped"]
    correction, decision = None, None
    if cfg.task.bias_correction:
        correction, decision = decide_bias_correction(val["pred"], val["age"])
        if "reason" in decision:
            log.warning("no bias correction: %s", decision["reason"])
        else:
            log.info("bias correction %s: val MAE %.3f as predicted, %.3f corrected (held out by cross-fitting)",
                     "kept" if decision["kept"] else "not kept", decision["val_mae"],
                     decision["val_mae_corrected_heldout"])
            metrics["val/mae_corrected_heldout"] = decision["val_mae_corrected_heldout"]
    if shards.get("test") is None:
        return metrics, correction, decision
    job.stop_if_requested("the test evaluation")
    test = predict_split(job, model, shards["test"], cfg, "age", ("age",), groups_keys)
    tp, tt = test["pred"], test["age"]
    groups = {k: test[k] for k in groups_keys}
    metrics.update({f"test/{k}": v for k, v in age_metrics(tp, tt, groups).items()})
    metrics["test/skipped"] = test["skipped"]
    # reported even when not kept, so the decision can be checked against the test set afterwards
    fitted = {k: decision[k] for k in ("slope", "intercept")} if decision and "slope" in decision else None
    corrected = apply_bias_correction(tp, fitted) if fitted else None
    if corrected is not None:
        metrics.update({f"test_corrected/{k}": v for k, v in age_metrics(corrected, tt, groups).items()})
    if job.is_rank_zero:
        figures = run_dir / "figures"
        age_scatter_png(tp, tt, figures / "faceage_scatter.png", corrected=corrected)
        age_error_by_decade_png(tp, tt, figures / "faceage_error_by_decade.png")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["key", "age", "faceage"] + (["faceage_corrected"] if corrected is not None else []))
        for i in range(len(tp)):
            row = [test["__key__"][i], f"{tt[i]:.3f}", f"{tp[i]:.3f}"]
            w.writerow(row + ([f"{corrected[i]:.3f}"] if corrected is not None else []))
        atomic_write_text(run_dir / "predictions_test.csv", buf.getvalue())
    return metrics, correction, decision


# ---- the command ----------------------------------------------------------------------------------


def finetune_age(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> FinetuneResult:
    """Run (or resume) both stages of the FaceAge fine-tune ``cfg`` describes, evaluate, export.
    ``extra_callbacks`` join both stages' trainers (benchmarks and tests)."""
    from fahr.pipeline.finetune_common import check_finetune

    run_dir, export_dir = check_finetune(cfg, FinetuneAgeConfig, "finetune-age",
                                         "task.stage1.max_steps and task.stage2.max_steps")
    result = FinetuneResult(run_dir=run_dir, export_dir=export_dir, metrics={}, preempted=True)
    with TrainingJob(cfg, run_dir) as job:
        L.seed_everything(cfg.seed, workers=True)
        job.prepare_once("generating the synthetic splits", lambda: ensure_synthetic_splits(cfg.data))
        run_info = job.prepare_run_dir()
        log.info("run directory: %s", run_dir)
        shards = {split: split_shards(cfg.data[split]) for split in ("train", "val")}
        shards["test"] = split_shards(cfg.data.test) if cfg.data.test is not None else None
        train = train_label_columns(job, shards["train"], ["age"], [])
        if len(train) < cfg.data.batch_size:
            raise InputError(f"{len(train)} training photos are fewer than one batch ({cfg.data.batch_size})")
        balance, accept, loss_weights = age_balance(train.labels["age"], cfg.task.balance)
        balance.update(photos=len(train), skipped=train.skipped)
        if job.is_rank_zero:
            atomic_write_json(run_dir / "age_balance.json", balance)
        log.info("age balancing (%s): effective histogram %s", balance["mode"],
                 {k: round(v, 3) for k, v in balance["effective_histogram"].items()})
        loggers = job.build_loggers()
        for lg in loggers:
            lg.log_hyperparams({"age_balance": balance})
        data = training_data(cfg, shards, len(train), ("age",), accept)
        model, init = build_model(cfg)
        stages = {}
        for stage in (1, 2):
            done = run_stage(job, stage, cfg, model, data, loss_weights, extra_callbacks)
            if done is None:
                return result  # preempted: the job requeues on leaving the `with`
            stages[f"stage{stage}"] = done
        job.stop_if_requested("the evaluation")
        metrics, correction, calibration_decision = evaluate(job, model, cfg, shards, run_dir)
        summary = {**metrics, "stages": stages, "init": init,
                   "photos": {"train": len(train), "val": metrics["val/n"], "test": metrics.get("test/n", 0)},
                   "skipped": {"train": train.skipped, "val": metrics["val/skipped"],
                               "test": metrics.get("test/skipped", 0)}}
        card: dict[str, Any] = {
            "task": "faceage",
            "preprocessing": preprocessing_of(cfg.data.train, cfg.data.image_size),
            "init": init,
            "training_data": {"name": cfg.data.name, "photos": summary["photos"], "synthetic": bool(cfg.data.synthetic)},
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))},  # groups too
            "run_id": run_info["run_id"],
        }
        if correction:
            card["age_calibration"] = correction
        if calibration_decision:
            card["age_calibration_decision"] = calibration_decision
        if job.is_rank_zero:
            atomic_write_json(run_dir / "metrics.json", summary)
            save_face_model(export_dir, model, card)
            log.info("exported FaceAge model to %s (test MAE %s)", export_dir, _fmt(metrics.get("test/mae")))
        job.log_final({k: v for k, v in metrics.items() if k.count("/") == 1},
                      figures=sorted((run_dir / "figures").glob("faceage_*.png")), export_dir=export_dir)
        job.barrier()  # every rank returns once the export exists
        result = FinetuneResult(run_dir=run_dir, export_dir=export_dir, metrics=summary)
    return result


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} years"
