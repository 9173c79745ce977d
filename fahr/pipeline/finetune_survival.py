"""`fahr finetune-survival`: FAHR-FaceSurvival, a DeepSurv-style Cox head on face features or on a table.

- ``data.mode=images``: the backbone (``backbone=EXPORT_DIR``: an MAE export or a FaceAge model) plus
  a risk head, trained per photo; evaluated per person (mean risk over a person's photos, or the
  photo nearest baseline), because outcomes belong to patients, not photos.
- ``data.mode=table`` (``data=table data.train=CSV data.test=CSV``): the same head on feature rows,
  every column but ``time`` and ``event`` being a feature (the DeepSurv benchmark format).

Writes ``metrics.json`` (``test_c_index`` = Harrell's C on the test set, Uno's C, time-dependent AUC,
integrated Brier score), ``predictions_test.csv`` (per person), and an export whose card stores the
Breslow baseline hazard, so S(t | x) = exp(-H0(t) exp(risk)) can be produced later.

Runs as a :class:`fahr.job.TrainingJob`. Images mode streams the training photos from their shards
(one process or one per GPU; the covariates' scaler and the outcome checks come from one pass over
the training labels, ``<run_dir>/train_labels.npz``) and evaluates every photo once over all ranks.
Table mode trains full-batch in one process on the CPU (srun/torchrun with several processes is
refused: a table fits in one), in a plain loop (:mod:`fahr.tasks.table_training`): Lightning's
per-step bookkeeping was about half of a fit that takes seconds. A stop (SIGUSR1/SIGTERM) ends the command
with ``preempted``; the same command resumes: images mode from its last checkpoint, table mode by
fitting again from the start (to the same weights); after training it redoes only the evaluation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from fahr.boundary import InputError, read_json_file
from fahr.config.finetune_schema import FinetuneSurvivalConfig
from fahr.job import TrainingJob
from fahr.models.face_model import FaceModel, save_face_model
from fahr.models.heads import RiskHead
from fahr.models.table_model import TableRiskModel, save_table_model
from fahr.pipeline.finetune_age import load_task_weights, predict_split, split_shards, train_label_columns, training_data
from fahr.stats.validation import check_survival_arrays
from fahr.tasks.survival import SurvivalTask, predict_risk
from fahr.utils.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class SurvivalResult:
    """How a fine-tune ended; ``preempted``: stopped by a signal (re-run the same command)."""
    run_dir: Path
    export_dir: Path
    metrics: dict[str, Any]
    preempted: bool = False


@dataclass
class Split:
    """One split: outcome arrays (days, 0/1), person ids (images) and, in table mode, its rows."""
    dataset: Dataset | None
    time: np.ndarray
    event: np.ndarray
    persons: list[str] | None = None


# ---- table mode -----------------------------------------------------------------------------------


#: fewest rows and events a training table (after the validation part is held out) may have
MIN_TABLE_ROWS, MIN_TABLE_EVENTS = 10, 2


def read_table(path: str, time: str, event: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """(features, time, event) from a CSV; every column but ``time`` and ``event`` is a feature.

    Read through the input boundary (regular UTF-8 file, size cap); errors name the file and the
    configured column, never cell values or the table's header (a header-less clinical CSV would
    have data there).

    Raises:
        InputError: unreadable or malformed CSV, no rows, missing ``time``/``event`` column, no feature
            column, non-numeric, missing or infinite feature values, and every check of
            :func:`fahr.stats.validation.check_survival_arrays`.
    """
    import csv
    import io

    from fahr.boundary import MAX_CSV_BYTES, read_text_file

    name = os.path.basename(str(path))
    text = read_text_file(path, "survival table", MAX_CSV_BYTES)
    header = next(csv.reader(io.StringIO(text)), [])
    names = [c.strip() for c in header]
    if len(set(names)) != len(names):  # pandas would rename the second "x" to "x.1" and go on
        raise InputError(f"survival table {path}: {len(names) - len(set(names))} duplicated column name(s) in the header")
    try:
        df = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"survival table {path}: not a readable CSV ({first[:120]})") from None
    if len(df) == 0:
        raise InputError(f"survival table {path}: no rows under the header")
    missing = [c for c in (time, event) if c not in df.columns]
    if missing:
        raise InputError(f"survival table {path}: missing column(s) {missing} (data.time / data.event); "
                         f"it has {len(df.columns)} column(s)")
    if df.columns.duplicated().any():
        raise InputError(f"survival table {path}: {int(df.columns.duplicated().sum())} duplicated column name(s)")
    feats = df.drop(columns=[time, event])
    if feats.shape[1] == 0:
        raise InputError(f"survival table {path}: no feature columns (every column but {time!r} and {event!r} is one)")
    bad = [c for c in feats.columns if not pd.api.types.is_numeric_dtype(feats[c])]
    if bad:
        raise InputError(f"survival table {path}: {len(bad)} non-numeric feature column(s) (first: column "
                         f"{list(df.columns).index(bad[0]) + 1}): encode them as numbers first")
    if feats.isna().any().any():
        raise InputError(f"survival table {path}: {int(feats.isna().any(axis=1).sum())} rows have missing feature values")
    infinite = ~np.isfinite(feats.to_numpy(np.float64))
    if infinite.any():
        raise InputError(f"survival table {path}: {int(infinite.any(axis=1).sum())} rows have infinite feature values")
    t, e = check_survival_arrays(df[time].to_numpy(), df[event].to_numpy(), name=name)
    return feats, t, e


def check_enough(t: np.ndarray, e: np.ndarray, what: str, rows: int, events: int) -> None:
    """At least ``rows`` rows and ``events`` events (a Cox fit on fewer is noise or undefined)."""
    if len(t) < rows or int(e.sum()) < events:
        raise InputError(f"{what}: {len(t)} rows with {int(e.sum())} events; at least {rows} rows and {events} events "
                         "are needed")


def holdout(n: int, event: np.ndarray, fraction: float, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of a held-out part, stratified by event, deterministic in ``seed``.

    ``groups`` (one id per row; rows of a group must share the event) keeps each group wholly on one
    side: groups are drawn in shuffled order until ``round(fraction * n_stratum)`` rows are held out.
    With every group of size one this is exactly the ungrouped split."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    mask = np.zeros(n, dtype=bool)
    for value in (0, 1):
        rows = np.flatnonzero(event == value)
        ids, first, sizes = np.unique(groups[rows], return_index=True, return_counts=True)
        order = np.argsort(first)  # groups in order of first appearance, so size-one groups = rows
        ids, sizes = ids[order], sizes[order]
        perm = rng.permutation(len(ids))
        target = int(round(fraction * len(rows)))
        taken = int(np.searchsorted(np.cumsum(sizes[perm]), target)) + 1 if target else 0
        mask[rows[np.isin(groups[rows], ids[perm[:taken]])]] = True
    return mask


def copy_groups(x: pd.DataFrame, t: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Group id per row; rows with identical features, time and event (copies of one record) share it.

    DeepSurv's WHAS table is such a resample: 1,310 rows hold 640 distinct records, so a row-wise
    split puts copies of a record on both sides and rewards memorising it."""
    full = x.assign(__time=t, __event=e)
    return full.groupby(list(full.columns), sort=False).ngroup().to_numpy()


def rows_copied_from(x: pd.DataFrame, t: np.ndarray, e: np.ndarray, ref: pd.DataFrame, ref_t: np.ndarray, ref_e: np.ndarray) -> int:
    """How many rows of (x, t, e) have an identical row (features, time, event) in the reference."""
    key = lambda f, tt, ee: pd.util.hash_pandas_object(f.assign(__time=tt, __event=ee), index=False)  # noqa: E731
    return int(key(x, t, e).isin(set(key(ref, ref_t, ref_e))).sum())


def table_splits(cfg: DictConfig) -> tuple[dict[str, Split], dict[str, Any], dict[str, int]]:
    """train/val(/test) splits of the feature tables, the training-set scaler, and copy counts: rows
    of ``data.train`` that repeat another row, validation rows identical to a fitted row, and test
    rows identical to a row of ``data.train``."""
    d = cfg.data
    table = x_train, t_train, e_train = read_table(d.train, d.time, d.event)
    groups = copy_groups(*table)
    notes = {"train_copies": int(len(groups) - len(np.unique(groups)))}
    if notes["train_copies"]:
        log.warning("%s: %d of %d rows are exact copies of another row (features, time and event: a resampled "
                    "table, or patients alike in every column); the validation split keeps them together",
                    d.train, notes["train_copies"], len(groups))
    if d.val:
        x_val, t_val, e_val = read_table(d.val, d.time, d.event)
    else:
        mask = holdout(len(t_train), e_train, d.val_fraction, cfg.seed, groups)
        x_val, t_val, e_val = x_train[mask], t_train[mask], e_train[mask]
        x_train, t_train, e_train = x_train[~mask], t_train[~mask], e_train[~mask]
    check_enough(t_train, e_train, f"the training part of {d.train}", MIN_TABLE_ROWS, MIN_TABLE_EVENTS)
    check_enough(t_val, e_val, "the validation part" + (f" ({d.val})" if d.val else f" (data.val_fraction={d.val_fraction})"),
                 2, 1)
    columns = list(x_train.columns)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the InputError below, not a warning
        mean = x_train.mean().to_numpy(np.float64)
        std = x_train.std(ddof=0).replace(0, 1.0).to_numpy(np.float64)
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise InputError(f"{d.train}: feature values too large to standardise (their mean or SD overflows)")
    scaler = {"features": columns, "mean": mean.tolist(), "std": std.tolist()}

    def make(x: pd.DataFrame, t: np.ndarray, e: np.ndarray, source: str) -> Split:
        if list(x.columns) != columns:
            extra, lacking = len(set(x.columns) - set(columns)), len(set(columns) - set(x.columns))
            raise InputError(f"survival table {source}: its feature columns differ from {d.train}'s: {extra} extra, "
                             f"{lacking} missing" + ("" if extra or lacking else ", or in another order"))
        z = torch.tensor((x.to_numpy(np.float64) - mean) / std, dtype=torch.float32)
        if not torch.isfinite(z).all():
            raise InputError("standardised feature values overflow float32: rescale the features")
        ds = _TableRows(z, torch.tensor(t, dtype=torch.float32), torch.tensor(e, dtype=torch.float32))
        return Split(ds, t, e)

    splits = {"train": make(x_train, t_train, e_train, d.train), "val": make(x_val, t_val, e_val, d.val or d.train)}
    held_out = {"val": ((x_val, t_val, e_val), (x_train, t_train, e_train))}
    if d.test:
        test = read_table(d.test, d.time, d.event)
        splits["test"] = make(*test, d.test)
        held_out["test"] = (test, table)
    for name, ((x, t, e), reference) in held_out.items():
        copied = rows_copied_from(x, t, e, *reference)
        notes[f"{name}_rows_copied_from_train"] = copied
        if copied:
            log.warning("%d of %d %s rows have an identical row in the training data: their C-index "
                        "rewards memorising, not generalising", copied, len(t), name)
    return splits, scaler, notes


class _TableRows(Dataset):
    def __init__(self, x: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> None:
        self.x, self.time, self.event = x, time, event

    def __len__(self) -> int:
        return len(self.time)

    def __getitem__(self, i: int | list[int]) -> dict[str, torch.Tensor]:
        """One row, or a batch of rows (``i`` a list of indices: (B, F), (B,), (B,))."""
        if isinstance(i, list):
            i = torch.tensor(i)  # one conversion for the three lookups
        return {"x": self.x[i], "time": self.time[i], "event": self.event[i]}


# ---- image mode -----------------------------------------------------------------------------------


def image_scaler(cfg: DictConfig, job: TrainingJob, shards: list[str]) -> tuple[dict[str, Any], int]:
    """The covariates' scaler (training mean and SD) and the number of training photos, from one
    pass over the training labels; the outcomes are checked there, before any training."""
    d = cfg.data
    cov = list(d.covariates)
    train = train_label_columns(job, shards, [d.time, d.event, *cov], [])
    missing = sum(n for reason, n in train.skipped.items() if reason in {f"label:{c}" for c in cov})
    if missing:
        raise InputError(f"covariates {cov} have missing values in {missing} training photos")
    check_survival_arrays(train.labels[d.time], train.labels[d.event], name="train shards")
    scaler: dict[str, Any] = {"features": cov}
    if cov:
        values = np.stack([train.labels[c] for c in cov], axis=1)
        scaler["mean"] = values.mean(0).tolist()
        scaler["std"] = np.where(values.std(0) > 0, values.std(0), 1.0).tolist()
    return scaler, len(train)


def image_split(job: TrainingJob, model: torch.nn.Module, cfg: DictConfig, shards: list[str],
                scaler: dict[str, Any], name: str) -> tuple[Split, np.ndarray]:
    """Every usable photo of a split through ``model`` (over all ranks): (outcomes and persons, risks)."""
    d = cfg.data
    cov = list(d.covariates)
    covariates = (cov, np.asarray(scaler["mean"]), np.asarray(scaler["std"])) if cov else None
    out = predict_split(job, model, shards, cfg, "risk", (d.time, d.event, *cov), text=("person",), covariates=covariates)
    t, e = check_survival_arrays(out[d.time], out[d.event], name=f"{name} shards")
    return Split(None, t, e, out["person"]), out["pred"]


def person_level(split: Split, risk: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per-person (time, event, risk, person): follow-up from the person's earliest photo (the
    longest follow-up), risk = mean over photos or that earliest photo's."""
    if split.persons is None:
        return split.time, split.event, risk, [str(i) for i in range(len(risk))]
    if how not in ("mean", "first"):
        raise InputError(f"task.person_aggregation must be mean or first, got {how!r}")
    df = pd.DataFrame({"person": split.persons, "time": split.time, "event": split.event, "risk": risk})
    if (df["person"] == "").any():
        raise InputError("photos without a person id: person-level evaluation needs `person` in the shard json")
    conflicting = df.groupby("person")["event"].nunique().gt(1).sum()
    if conflicting:
        raise InputError(f"{conflicting} persons have photos with conflicting events")
    first = df.loc[df.groupby("person")["time"].idxmax()].set_index("person")
    if how == "mean":
        first["risk"] = df.groupby("person")["risk"].mean()
    return first["time"].to_numpy(), first["event"].to_numpy(), first["risk"].to_numpy(), list(first.index)


# ---- training -------------------------------------------------------------------------------------


def build_model(cfg: DictConfig, num_features: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    h = cfg.task.head
    if cfg.data.mode == "table":
        return TableRiskModel(num_features, list(h.hidden), h.dropout), {"backbone": None}
    from fahr.pipeline.finetune_age import backbone_for

    backbone, init, mean, std = backbone_for(cfg, cfg.task.drop_path_rate)
    head = RiskHead(backbone.num_features, num_covariates=num_features, hidden=list(h.hidden), dropout=h.dropout)
    return FaceModel(backbone, {"risk": head}, mean, std), init


def table_loaders(cfg: DictConfig, splits: dict[str, Split]) -> dict[str, DataLoader]:
    d = cfg.data
    full = d.batch_size == 0
    train_bs = len(splits["train"].dataset) if full else d.batch_size
    if train_bs > len(splits["train"].dataset):
        raise InputError(f"{len(splits['train'].dataset)} training rows are fewer than one batch ({train_bs})")
    out = {"train": table_loader(splits["train"].dataset, train_bs, torch.Generator().manual_seed(cfg.seed))}
    for name in ("val", "test"):
        if name in splits:
            out[name] = table_loader(splits[name].dataset, len(splits[name].dataset))
    return out


def table_loader(rows: "_TableRows", batch_size: int, shuffle: torch.Generator | None = None) -> DataLoader:
    """Batches of table rows fetched by one tensor index each, not row by row and collated (which
    cost ~1,000 Python calls per full-batch step). The same batches, in the same order, as
    ``DataLoader(rows, batch_size, shuffle=shuffle is not None, drop_last=shuffle is not None, generator=shuffle)``."""
    order = RandomSampler(rows, generator=shuffle) if shuffle is not None else SequentialSampler(rows)
    # the generator also goes to the loader: its iterator draws a base seed from it, as the plain one does
    return DataLoader(rows, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=shuffle is not None),
                      generator=shuffle)


def train(job: TrainingJob, cfg: DictConfig, model: torch.nn.Module, scaler: dict[str, Any],
          train_dataloaders: Any = None, val_dataloaders: Any = None, datamodule: Any = None) -> dict[str, Any] | None:
    """Train (or skip a finished training); leaves the best weights in ``model``. Returns the
    summary (``train_done.json``), or None when a signal stopped it. Images mode trains under
    Lightning (:meth:`TrainingJob.fit`); table mode with :func:`train_table`."""
    t = cfg.task
    run_dir = job.run_dir
    done_file = run_dir / "train_done.json"
    if done_file.is_file():
        done = read_json_file(done_file, "training summary")
        load_task_weights(model, run_dir / done["best"])
        log.info("training already finished (best val loss %.4f): skipped", done["best_val_loss"])
        return done
    if cfg.data.mode == "table":
        return train_table(job, cfg, model, train_dataloaders, val_dataloaders.dataset)
    columns = {"time": cfg.data.time, "event": cfg.data.event, **scaler}
    task = SurvivalTask(model, OmegaConf.to_container(t, resolve=True), cfg.data.batch_size, columns=columns)
    ckpt_dir = run_dir / "checkpoints"
    every = min(t.val_every_n_steps, t.max_steps)
    best = ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor="val/loss", mode="min", save_top_k=1,
                           save_last=False, auto_insert_metric_name=False)
    callbacks = [best]
    if t.early_stopping_patience:
        # the kept weights are still the best checkpoint's; stopping forgoes only a new low > K validations later
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=t.early_stopping_patience,
                                       check_on_train_epoch_end=False))
    outcome = job.fit(task, ckpt_dir=ckpt_dir, max_steps=t.max_steps, batch_size=max(1, cfg.data.batch_size),
                      datamodule=datamodule, train_dataloaders=train_dataloaders, val_dataloaders=val_dataloaders,
                      checkpoint_every=every, val_every=every, callbacks=callbacks, default_root_dir=run_dir)
    if outcome.preempted:
        return None
    if not best.best_model_path:
        raise InputError("no validation loss was computed: the validation part has no usable event")
    load_task_weights(model, Path(best.best_model_path))
    done = {"steps": outcome.global_step, "stopped_early": outcome.global_step < t.max_steps,
            "best": os.path.relpath(Path(best.best_model_path).resolve(), run_dir.resolve()),
            "best_val_loss": float(best.best_model_score)}
    if job.is_rank_zero:
        atomic_write_json(done_file, done)
    return done


def train_table(job: TrainingJob, cfg: DictConfig, model: torch.nn.Module, train_batches: DataLoader,
                val_rows: "_TableRows") -> dict[str, Any] | None:
    """DeepSurv mode: :func:`fahr.tasks.table_training.fit_table` (a plain loop, not Lightning), the
    kept weights saved as ``checkpoints/best.ckpt`` (the Lightning checkpoint layout: ``state_dict``
    with ``model.*`` keys, ``global_step``). Returns the summary, or None when a signal stopped it
    (nothing is saved: the rerun fits again from the start, to the same weights)."""
    from fahr.tasks.table_training import fit_table
    from fahr.utils.atomic import atomic_write

    t, tr = OmegaConf.to_container(cfg.task, resolve=True), cfg.trainer
    ignored = {k: tr.get(k) for k in ("accelerator", "devices", "precision")
               if str(tr.get(k)) not in ("auto", "cpu", "1", "32-true", "32", "None")}
    if ignored:
        log.warning("table mode trains in one process on the CPU in float32; %s not used",
                    ", ".join(f"trainer.{k}={v}" for k, v in ignored.items()))
    for lg in job.loggers:
        lg.log_hyperparams({"lr/base": t["base_lr"], "lr/peak": t["base_lr"],
                            "batch/effective": cfg.data.batch_size or len(train_batches.dataset)})

    def send(metrics: dict[str, float], step: int) -> None:
        for lg in job.loggers:
            lg.log_metrics(metrics, step=step)

    fit = fit_table(model, t, train_batches, {"x": val_rows.x, "time": val_rows.time, "event": val_rows.event}, seed=cfg.seed,
                    gradient_clip_val=tr.get("gradient_clip_val"),
                    gradient_clip_algorithm=tr.get("gradient_clip_algorithm") or "norm",
                    log_every=max(1, int(tr.get("log_every_n_steps") or 1)), log=send,
                    should_stop=lambda: bool(job.preemption.pending))
    if fit.interrupted:
        job.stop_if_requested("training")  # raises Preempted: leaves the job's `with` quietly
    model.load_state_dict(fit.best_state)
    best = job.run_dir / "checkpoints" / "best.ckpt"
    if job.is_rank_zero:
        best.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {"state_dict": {f"model.{k}": v for k, v in fit.best_state.items()}, "global_step": fit.best_step}
        atomic_write(best, lambda f: torch.save(checkpoint, f), mode="wb")
    done = {"steps": fit.steps, "stopped_early": fit.stopped_early, "best": os.path.relpath(best, job.run_dir),
            "best_val_loss": fit.best_val_loss}
    if job.is_rank_zero:
        atomic_write_json(job.run_dir / "train_done.json", done)
    return done


# ---- evaluation and export ------------------------------------------------------------------------


def survival_metrics(train: tuple[np.ndarray, np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray, np.ndarray],
                     horizons: list[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Harrell's and Uno's C, time-dependent AUC and integrated Brier score of test risks; the
    Breslow baseline (fitted on the training risks) is returned for the export."""
    from fahr.metrics.survival import (
        BreslowBaseline,
        harrell_c,
        integrated_brier,
        time_dependent_auc,
        uno_c,
    )

    (tr_t, tr_e, tr_r), (te_t, te_e, te_r) = train, test
    out: dict[str, Any] = {"test_c_index": float(harrell_c(te_t, te_e, te_r)),
                           "test_n": int(len(te_t)), "test_events": int(te_e.sum())}
    baseline = BreslowBaseline().fit(tr_r, tr_t, tr_e)
    lo, hi = float(te_t[te_e == 1].min()), float(min(te_t.max(), tr_t.max()))
    try:
        out["test_uno_c"] = float(uno_c(tr_t, tr_e, te_t, te_e, te_r))
        valid = [h for h in horizons if lo < h < hi]
        if valid:
            aucs, mean_auc = time_dependent_auc(tr_t, tr_e, te_t, te_e, te_r, valid)
            out.update({f"test_auc@{h:g}d": float(a) for h, a in zip(valid, aucs)})
            out["test_mean_auc"] = mean_auc
        grid = np.quantile(te_t[(te_t >= lo) & (te_t < hi)], np.linspace(0.05, 0.95, 20))
        grid = np.unique(grid)
        if len(grid) >= 2:
            out["test_integrated_brier"] = float(integrated_brier(tr_t, tr_e, te_t, te_e, baseline.survival(te_r, grid), grid))
    except ValueError as err:  # e.g. test follow-up beyond training follow-up for IPCW
        log.warning("some survival metrics were not computed: %s", err)
    return out, baseline.to_dict()


def finetune_survival(cfg: DictConfig) -> SurvivalResult:
    """Train (or resume) the survival model ``cfg`` describes, evaluate per person, export."""
    from fahr.pipeline.finetune_common import check_finetune

    run_dir, export_dir = check_finetune(cfg, FinetuneSurvivalConfig, "finetune-survival", "task.max_steps")
    result = SurvivalResult(run_dir=run_dir, export_dir=export_dir, metrics={}, preempted=True)
    table = cfg.data.mode == "table"
    with TrainingJob(cfg, run_dir) as job:
        if table and job.world_size > 1:
            raise InputError(f"table mode trains full-batch in one process, but {job.env.launcher} started "
                             f"{job.world_size}: run `fahr finetune-survival data=table ...` without srun/torchrun")
        L.seed_everything(cfg.seed, workers=True)
        job.prepare_once("making the cohort shards", lambda: ensure_cohort(cfg))
        run_info = job.prepare_run_dir()
        log.info("run directory: %s", run_dir)
        notes: dict[str, int] = {}
        if table:
            splits, scaler, notes = table_splits(cfg)
            for name, sp in splits.items():
                log.info("%s: %d rows, %d events", name, len(sp.time), int(sp.event.sum()))
            model, init = build_model(cfg, len(scaler["features"]))
            dl = table_loaders(cfg, splits)
            job.build_loggers()
            done = train(job, cfg, model, scaler, train_dataloaders=dl["train"], val_dataloaders=dl["val"])
        else:
            if cfg.data.val is None:
                raise InputError("data.val is required in images mode (a person-disjoint split from `fahr shards`)")
            shards = {split: split_shards(cfg.data[split]) for split in ("train", "val")}
            shards["test"] = split_shards(cfg.data.test) if cfg.data.test is not None else None
            scaler, n_train = image_scaler(cfg, job, shards["train"])
            model, init = build_model(cfg, len(scaler["features"]))
            keys = (cfg.data.time, cfg.data.event, *cfg.data.covariates)
            if n_train < cfg.data.batch_size:
                raise InputError(f"{n_train} training photos are fewer than one batch ({cfg.data.batch_size})")
            job.build_loggers()
            done = train(job, cfg, model, scaler, datamodule=training_data(cfg, shards, n_train, keys))
        if done is None:
            return result  # preempted: the job requeues on leaving the `with`
        job.stop_if_requested("the evaluation")
        how = cfg.task.person_aggregation
        metrics: dict[str, Any] = {"training": done, "init": init}
        if table:
            evaluated = {name: (sp, predict_risk(model, table_loader(sp.dataset, len(sp.dataset))))
                         for name, sp in splits.items()}
        else:
            evaluated = {name: image_split(job, model, cfg, shards[name], scaler, name)
                         for name in ("train", "val", "test") if shards.get(name) is not None}
        metrics["rows"] = {k: len(sp.time) for k, (sp, _) in evaluated.items()}
        if notes:
            metrics["copies"] = notes
        tr = person_level(*evaluated["train"], how)
        va = person_level(*evaluated["val"], how)
        from fahr.metrics.survival import harrell_c

        metrics["val_c_index"] = float(harrell_c(va[0], va[1], va[2]))
        baseline = None
        if "test" in evaluated:
            te = person_level(*evaluated["test"], how)
            m, baseline = survival_metrics(tr[:3], te[:3], list(cfg.task.horizons_days))
            metrics.update(m)
            if job.is_rank_zero:
                rows = ["person,time,event,risk"] + [f"{p},{t:g},{int(e)},{r:.6f}" for t, e, r, p in zip(*te)]
                atomic_write_text(run_dir / "predictions_test.csv", "\n".join(rows) + "\n")
        card = {"task": "facesurvival", "mode": cfg.data.mode, "covariates": scaler, "init": init,
                "baseline_hazard": baseline,
                "metrics": {k: v for k, v in metrics.items() if k.startswith(("test_", "val_"))},
                "run_id": run_info["run_id"], "training_data": {"name": cfg.data.name, "synthetic": bool(cfg.data.synthetic)}}
        if job.is_rank_zero:
            atomic_write_json(run_dir / "metrics.json", metrics)
            if table:
                save_table_model(export_dir, model, card)
            else:
                from fahr.pipeline.finetune_age import preprocessing_of

                save_face_model(export_dir, model, {**card, "preprocessing": preprocessing_of(cfg.data.train, cfg.data.image_size)})
            log.info("test C-index %s; exported to %s",
                     f"{metrics['test_c_index']:.4f}" if "test_c_index" in metrics else "-", export_dir)
        job.log_final({k.replace("_", "/", 1): v for k, v in metrics.items() if k.startswith(("test_", "val_"))},
                      export_dir=export_dir, step=done["steps"])
        job.barrier()
        result = SurvivalResult(run_dir=run_dir, export_dir=export_dir, metrics=metrics)
    return result


def ensure_cohort(cfg: DictConfig) -> None:
    """The demo's semi-synthetic cohort: generated by fahr.data.cohort_simulator when ``data.generate`` is set."""
    if cfg.data.get("generate") is None:
        return
    from fahr.pipeline.cohort_shards import ensure_cohort_shards

    ensure_cohort_shards(**OmegaConf.to_container(cfg.data.generate, resolve=True))
