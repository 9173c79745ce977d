"""`fahr finetune-age`: two-stage, age-balanced FAHR-FaceAge fine-tuning, evaluation and export.

One command runs both stages in one run directory (derived from the config like pretraining):

    <run_dir>/stage1/checkpoints/{last,best}.ckpt   head on the frozen backbone
    <run_dir>/stage2/checkpoints/{last,best}.ckpt   full fine-tune, initialised from stage 1's best
    <run_dir>/metrics.json, predictions_test.csv, figures/*.png, age_balance.json
    <run_dir>/export/                              model.safetensors + model_card.json (fahr-model/1)

Re-running the same command resumes: a finished stage (``stageN/done.json``) is skipped, an
interrupted one resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, WeightedRandomSampler

from fahr.boundary import InputError, check_output_dir, printable_path, read_json_file
from fahr.config.finetune_schema import FinetuneAgeConfig
from fahr.config.schema import validate
from fahr.data.build import resolve_train_shards
from fahr.data.labelled import LabelledFaces, balancing_weights, effective_histogram, load_labelled_faces
from fahr.metrics.age import age_metrics, apply_bias_correction, decide_bias_correction
from fahr.models.backbone import create_backbone
from fahr.models.face_model import DEFAULT_PREPROCESSING, FaceModel, save_face_model
from fahr.models.heads import AgeHead
from fahr.models.weights import load_backbone
from fahr.tasks.finetune_age import AgeTask
from fahr.utils.atomic import atomic_write_json, atomic_write_text
from fahr.utils.checkpoint_io import AtomicCheckpointIO
from fahr.utils.loggers import build_loggers, finish_trackers
from fahr.utils.run import prepare_run_dir, run_dir_for

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_dir: Path
    export_dir: Path
    metrics: dict[str, Any]


# ---- data -----------------------------------------------------------------------------------------


def ensure_synthetic_splits(data: DictConfig) -> None:
    """Generate (or reuse) synthetic train/val/test shards, one generator seed per split."""
    if data.get("generate") is None:
        return
    from fahr.data.shard_writer import write_synthetic_shards

    g = data.generate
    for i, split in enumerate(("train", "val", "test")):
        write_synthetic_shards(Path(g.out_dir) / split, num_samples=int(g[split]),
                               samples_per_shard=g.samples_per_shard, seed=g.seed * 1000 + i, image_size=data.image_size)


def load_split_labels(spec: Any, required: list[str], optional: list[str], image_size: int) -> LabelledFaces:
    """One split's photos and labels (``spec``: an ``index.json[#split]``, brace pattern or list)."""
    shards = resolve_train_shards(OmegaConf.to_container(spec) if not isinstance(spec, str) else spec)
    return load_labelled_faces(shards, required=required, optional=optional, image_size=image_size)


def load_split(spec: Any, image_size: int) -> LabelledFaces:
    return load_split_labels(spec, ["age"], ["sex", "race"], image_size)


class _Weighted(torch.utils.data.Dataset):
    """Adds ``weight`` (float32 ()) to each item: per-sample loss weights (balance.mode=loss)."""

    def __init__(self, base: LabelledFaces, weights: np.ndarray) -> None:
        self.base, self.weights = base, weights

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.base[i], "weight": torch.tensor(self.weights[i], dtype=torch.float32)}


def train_loader(ds: LabelledFaces, cfg: DictConfig, seed: int) -> tuple[DataLoader, dict[str, Any]]:
    """The training loader with the configured age balancing, and a report of its effect."""
    b = cfg.task.balance
    ages = ds.labels["age"]
    if b.mode not in ("sampler", "loss", "none"):
        raise InputError(f"task.balance.mode must be sampler, loss or none, got {b.mode!r}")
    weights = balancing_weights(ages, b.bin_width, b.max_weight) if b.mode != "none" else np.ones(len(ages))
    report = {"mode": b.mode, "bin_width": b.bin_width, "max_weight": b.max_weight,
              "data_histogram": effective_histogram(ages, np.ones(len(ages)), b.bin_width),
              "effective_histogram": effective_histogram(ages, weights, b.bin_width)}
    common = dict(batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers, drop_last=True,
                  persistent_workers=cfg.data.num_workers > 0)
    if len(ds) < cfg.data.batch_size:
        raise InputError(f"{len(ds)} training photos are fewer than one batch ({cfg.data.batch_size})")
    g = torch.Generator().manual_seed(seed)
    if b.mode == "sampler":
        sampler = WeightedRandomSampler(torch.as_tensor(weights), num_samples=len(ds), replacement=True, generator=g)
        return DataLoader(ds, sampler=sampler, **common), report
    dataset = _Weighted(ds, weights) if b.mode == "loss" else ds
    return DataLoader(dataset, shuffle=True, generator=g, **common), report


def eval_loader(ds: LabelledFaces, cfg: DictConfig) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.data.eval_batch_size, num_workers=min(cfg.data.num_workers, 1), shuffle=False)


def _index_path_of(spec: Any) -> Path | None:
    """The local ``index.json`` a training-shards spec names (``DIR/index.json[#split]``, ``DIR``)
    or sits beside (tar paths or brace patterns in one folder); None when there is none."""
    specs = [spec] if isinstance(spec, str) else list(spec) if spec is not None else []
    candidates = set()
    for item in specs:
        if not isinstance(item, str) or "://" in item or item.startswith("pipe:"):
            return None
        path = Path(item.split("#")[0])
        candidates.add(path if path.name == "index.json" else path / "index.json" if path.is_dir()
                       else path.parent / "index.json")
    if len(candidates) != 1:
        return None
    (path,) = candidates
    return path if path.is_file() else None


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
    path = _index_path_of(spec)
    if path is None:
        return {"crops": "unknown", "detect": False, "image_size": image_size,
                "source": "shards without an index.json, so the cropping is not recorded"}
    index = read_json_file(path, "shard index", 256 * 1024 * 1024)
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


def run_stage(stage: int, cfg: DictConfig, model: FaceModel, loaders: tuple[DataLoader, DataLoader],
              run_dir: Path, loggers: list) -> dict[str, Any]:
    """Train one stage (or skip a finished one); leaves the stage's best weights in ``model``."""
    s = cfg.task[f"stage{stage}"]
    stage_dir = run_dir / f"stage{stage}"
    done_file = stage_dir / "done.json"
    if s.max_steps <= 0:
        return {"steps": 0, "skipped": "max_steps=0"}
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        load_task_weights(model, run_dir / done["best"])
        log.info("stage %d already finished (best val MAE %.3f): skipped", stage, done["best_val_mae"])
        return done
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("max_steps")
    trainer_args.pop("val_check_interval", None)
    world = trainer_args.get("devices") if isinstance(trainer_args.get("devices"), int) else 1
    effective_batch = cfg.data.batch_size * world * trainer_args.get("num_nodes", 1) * trainer_args.get("accumulate_grad_batches", 1)
    task = AgeTask(model, OmegaConf.to_container(cfg.task, resolve=True), stage,
                   OmegaConf.to_container(s, resolve=True), effective_batch, metric_prefix=f"stage{stage}/")
    every = min(s.val_every_n_steps, s.max_steps)
    best = ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), filename="best", monitor=f"stage{stage}/val/mae",
                           mode="min", save_top_k=1, save_last=False, auto_insert_metric_name=False)
    recovery = ModelCheckpoint(dirpath=str(stage_dir / "checkpoints"), every_n_train_steps=every, save_last=True,
                               save_top_k=0, monitor=None)
    resume = stage_dir / "checkpoints" / "last.ckpt"
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")  # stage 1: on purpose
    trainer = L.Trainer(**trainer_args, max_steps=s.max_steps, val_check_interval=every,
                        check_val_every_n_epoch=None, default_root_dir=str(stage_dir), logger=loggers,
                        callbacks=[recovery, best], plugins=[AtomicCheckpointIO()])
    trainer.fit(task, train_dataloaders=loaders[0], val_dataloaders=loaders[1],
                ckpt_path=str(resume) if resume.is_file() else None, weights_only=True)
    if trainer.interrupted:
        raise RuntimeError(f"stage {stage} was interrupted at step {trainer.global_step}; rerun to resume")
    best_path = Path(best.best_model_path)
    load_task_weights(model, best_path)
    done = {"steps": trainer.global_step, "best": os.path.relpath(best_path.resolve(), run_dir.resolve()),
            "best_val_mae": float(best.best_model_score)}
    if trainer.is_global_zero:
        atomic_write_json(done_file, done)
    return done


# ---- evaluation -----------------------------------------------------------------------------------


def _predict(model: FaceModel, loader: DataLoader) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    model.eval()
    preds, labels = [], {}
    with torch.inference_mode():
        for batch in loader:
            preds.append(model(batch["image"])["age"].float())
            for k in ("age", "sex", "race", "index"):
                if k in batch:
                    labels.setdefault(k, []).append(torch.as_tensor(batch[k]))
    out = {k: torch.cat(v).numpy() for k, v in labels.items()}
    return torch.cat(preds).numpy().astype(np.float64), out.pop("age").astype(np.float64), out


def evaluate(model: FaceModel, cfg: DictConfig, val: LabelledFaces, test: LabelledFaces | None,
             run_dir: Path) -> tuple[dict[str, Any], dict[str, float] | None, dict[str, Any] | None]:
    """Metrics on val and test, raw and bias-corrected; figures; test predictions CSV. Returns
    (metrics, the bias correction if kept, the decision: see :func:`decide_bias_correction`)."""
    from fahr.utils.plots import age_error_by_decade_png, age_scatter_png

    metrics: dict[str, Any] = {}
    vp, vt, vl = _predict(model, eval_loader(val, cfg))
    metrics.update({f"val/{k}": v for k, v in age_metrics(vp, vt, {k: vl[k] for k in ("sex", "race") if k in vl}).items()})
    correction, decision = None, None
    if cfg.task.bias_correction:
        correction, decision = decide_bias_correction(vp, vt)
        if "reason" in decision:
            log.warning("no bias correction: %s", decision["reason"])
        else:
            log.info("bias correction %s: val MAE %.3f as predicted, %.3f corrected (held out by cross-fitting)",
                     "kept" if decision["kept"] else "not kept", decision["val_mae"],
                     decision["val_mae_corrected_heldout"])
            metrics["val/mae_corrected_heldout"] = decision["val_mae_corrected_heldout"]
    if test is None:
        return metrics, correction, decision
    tp, tt, tl = _predict(model, eval_loader(test, cfg))
    groups = {k: tl[k] for k in ("sex", "race") if k in tl}
    metrics.update({f"test/{k}": v for k, v in age_metrics(tp, tt, groups).items()})
    # reported even when not kept, so the decision can be checked against the test set afterwards
    fitted = {k: decision[k] for k in ("slope", "intercept")} if decision and "slope" in decision else None
    corrected = apply_bias_correction(tp, fitted) if fitted else None
    if corrected is not None:
        metrics.update({f"test_corrected/{k}": v for k, v in age_metrics(corrected, tt, groups).items()})
    figures = run_dir / "figures"
    age_scatter_png(tp, tt, figures / "faceage_scatter.png", corrected=corrected)
    age_error_by_decade_png(tp, tt, figures / "faceage_error_by_decade.png")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "age", "faceage"] + (["faceage_corrected"] if corrected is not None else []))
    for i in range(len(tp)):
        row = [test.keys[int(tl["index"][i])], f"{tt[i]:.3f}", f"{tp[i]:.3f}"]
        w.writerow(row + ([f"{corrected[i]:.3f}"] if corrected is not None else []))
    atomic_write_text(run_dir / "predictions_test.csv", buf.getvalue())
    return metrics, correction, decision


def _log_figures(loggers: list, run_dir: Path) -> None:
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            pngs = sorted((run_dir / "figures").glob("faceage_*.png"))
            lg.log_image(key="faceage/figures", images=[str(p) for p in pngs])


# ---- the command ----------------------------------------------------------------------------------


def finetune_age(cfg: DictConfig) -> FinetuneResult:
    """Run (or resume) both stages of the FaceAge fine-tune ``cfg`` describes, evaluate, export."""
    validate(cfg, FinetuneAgeConfig)
    from fahr.data.augment import augment_settings

    augment_settings(OmegaConf.to_container(cfg.task.augment))  # the rules a schema cannot say, before any work
    L.seed_everything(cfg.seed, workers=True)
    ensure_synthetic_splits(cfg.data)
    run_dir = run_dir_for(cfg)
    run_info = prepare_run_dir(cfg, run_dir)
    if cfg.export_dir:
        check_output_dir(cfg.export_dir, "export_dir")
    log.info("run directory: %s", run_dir)
    train = load_split(cfg.data.train, cfg.data.image_size)
    val = load_split(cfg.data.val, cfg.data.image_size)
    test = load_split(cfg.data.test, cfg.data.image_size) if cfg.data.test is not None else None
    log.info("photos: train %d, val %d, test %s", len(train), len(val), len(test) if test else "-")
    loader, balance = train_loader(train, cfg, cfg.seed)
    atomic_write_json(run_dir / "age_balance.json", balance)
    log.info("age balancing (%s): effective histogram %s", balance["mode"],
             {k: round(v, 3) for k, v in balance["effective_histogram"].items()})
    loggers = build_loggers(cfg, run_dir, run_info)
    for lg in loggers:
        lg.log_hyperparams({"age_balance": balance})
    model, init = build_model(cfg)
    try:
        stages = {}
        for stage in (1, 2):
            stages[f"stage{stage}"] = run_stage(stage, cfg, model, (loader, eval_loader(val, cfg)), run_dir, loggers)
        metrics, correction, calibration_decision = evaluate(model, cfg, val, test, run_dir)
        for lg in loggers:
            lg.log_metrics({k: v for k, v in metrics.items() if "/" in k and k.count("/") == 1}, step=0)
        _log_figures(loggers, run_dir)
    finally:
        finish_trackers(loggers)
    summary = {**metrics, "stages": stages, "init": init, "photos": {"train": len(train), "val": len(val),
               "test": len(test) if test else 0}, "skipped": {"train": train.skipped, "val": val.skipped}}
    atomic_write_json(run_dir / "metrics.json", summary)
    export_dir = Path(cfg.export_dir) if cfg.export_dir else run_dir / "export"
    card: dict[str, Any] = {
        "task": "faceage",
        "preprocessing": preprocessing_of(cfg.data.train, cfg.data.image_size),
        "init": init,
        "training_data": {"name": cfg.data.name, "photos": summary["photos"], "synthetic": bool(cfg.data.synthetic)},
        "metrics": {k: v for k, v in metrics.items() if k.count("/") == 1},
        "run_id": run_info["run_id"],
    }
    if correction:
        card["age_calibration"] = correction
    if calibration_decision:
        card["age_calibration_decision"] = calibration_decision
    save_face_model(export_dir, model, card)
    log.info("exported FaceAge model to %s (test MAE %s)", export_dir, _fmt(metrics.get("test/mae")))
    return FinetuneResult(run_dir=run_dir, export_dir=export_dir, metrics=summary)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} years"
