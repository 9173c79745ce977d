"""`fahr far`: a ``FarConfig`` -> one CSV row per person with their Face Aging Rate.

Input CSV columns: ``person``, ``path``, and ``date`` (ISO) or ``age_at_photo`` (years). Each
distinct photo is predicted once (:func:`fahr.inference.predict.predict_photos`); the FAR maths are
:func:`fahr.inference.far.far_from_photos`.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fahr.boundary import InputError, check_output_file, printable_path
from fahr.config.inference_schema import FarConfig
from fahr.config.schema import validate
from fahr.pipeline.predict import (
    check_inference_options,
    detects_faces,
    load_model,
    model_files,
    model_threads,
    preprocessing_overrides,
    resolve_runtime,
    torch_threads_restored,
    write_csv,
)

log = logging.getLogger("fahr.far")


def read_far_input(path: str) -> list[dict[str, Any]]:
    """The input rows, each with ``file`` (the photo's resolved Path, None for an empty cell) added.

    Raises:
        InputError: not a readable UTF-8 CSV, a missing ``person``/``path`` column, neither ``date``
            nor ``age_at_photo``, or no rows.
    """
    from fahr.boundary import read_csv_table
    from fahr.inference.photos import resolve

    p = Path(path)
    if p.is_dir():
        raise InputError(f"input {printable_path(p)} is a folder; give a CSV (columns: person, path, "
                         "date or age_at_photo)")
    columns, rows = read_csv_table(p, "input CSV", required=("person", "path"))
    if "date" not in columns and "age_at_photo" not in columns:
        raise InputError(f"input CSV {printable_path(p)}: needs a `date` (ISO, e.g. 2019-05-31) or `age_at_photo` "
                         "(years) column")
    if not rows:
        raise InputError(f"input CSV {printable_path(p)} has no rows")
    for row in rows:
        row["file"] = resolve(row["path"], p.parent) if row["path"] else None
    return rows


def input_problems(rows: list[dict[str, Any]]) -> Counter:
    """Rows that cannot count fully, by problem: an empty ``person`` (left out) or no usable time
    (kept as a photo without a date: it cannot set an interval). Counts only, never values."""
    from fahr.inference.far import photo_time

    problems: Counter = Counter()
    for row in rows:
        if not row["person"].strip():
            problems["empty person"] += 1
        elif photo_time(row)[0] is None:
            problems[photo_time(row)[2]] += 1
    return problems


def corrected_faceage(card: dict[str, Any], use_corrected: bool | None) -> bool:
    """Whether FAR uses the card's bias-corrected FaceAge: as asked, or (None) when the fine-tune kept
    the correction because it lowered the held-out error. Cards from before that decision existed
    default to FaceAge as predicted."""
    has = bool(card.get("age_calibration"))
    if use_corrected is None:
        return has and bool((card.get("age_calibration_decision") or {}).get("kept"))
    if use_corrected and not has:
        raise InputError("use_corrected=true but the model card has no age_calibration (its fine-tune found the "
                         "correction did not lower the held-out error, or it was trained without one)")
    return bool(use_corrected)


def attach_predictions(rows: list[dict[str, Any]], model, card: dict[str, Any], cfg: DictConfig,
                       workers: int | None = None) -> list[dict[str, Any]]:
    """Predict each distinct photo once; set ``status`` and ``faceage`` (corrected if configured) on
    every row. Returns the per-photo predictions, in input order of first appearance."""
    from fahr.inference.photos import Photo
    from fahr.inference.predict import predict_photos

    key = "faceage_corrected" if corrected_faceage(card, cfg.use_corrected) else "faceage"  # before any work
    files = list(dict.fromkeys(row["file"] for row in rows))
    labels = {row["file"]: row["path"] for row in reversed(rows)}
    preds = predict_photos(model, card, [Photo(labels[f], f) for f in files], batch_size=cfg.batch_size,
                           device=cfg.device, preprocessing=preprocessing_overrides(cfg), workers=workers)
    by_file = dict(zip(files, preds))  # one None key at most: every row with an empty path
    for row in rows:
        pred = by_file[row["file"]]
        row["status"], row["faceage"] = pred["status"], pred.get(key)
    return preds


@torch_threads_restored
def far(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fahr far``; returns ``{"output", "persons", "counts"}`` (counts by person status)."""
    from fahr.inference.far import METHODS, OUTPUT_COLUMNS, far_table
    from fahr.inference.predict import output_columns

    validate(cfg, FarConfig)
    if cfg.method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {cfg.method!r}")
    check_inference_options(cfg)
    inputs = (cfg.input, *model_files(cfg.model))
    check_output_file(cfg.output, "output", inputs=inputs)
    if cfg.photos_output:
        check_output_file(cfg.photos_output, "photos_output", inputs=(*inputs, cfg.output))
    rows = read_far_input(cfg.input)
    problems = input_problems(rows)
    if problems:
        log.warning("%d of %d rows: %s (an empty person is left out; a photo without a usable time cannot set "
                    "an interval)", sum(problems.values()), len(rows),
                    ", ".join(f"{n} {what}" for what, n in problems.most_common()))
    from fahr.inference.align_stream import resolve_workers

    workers = resolve_workers(cfg.workers, len({row["file"] for row in rows}), detects_faces(cfg))
    model_threads(cfg.threads, workers)
    model, card = load_model(cfg.model, resolve_runtime(cfg.model, cfg.runtime, cfg.device))
    if "age" not in model.heads:
        raise InputError(f"{cfg.model} has no FaceAge head (heads: {list(model.heads)}): FAR needs a FaceAge model")
    preds = attach_predictions(rows, model, card, cfg, workers)
    if cfg.photos_output:
        write_csv(cfg.photos_output, output_columns(model, card), preds)
    table = far_table(rows, cfg.method)
    write_csv(cfg.output, OUTPUT_COLUMNS, table)
    counts = Counter(r["status"] for r in table)
    log.info("fahr far: %d photos, %d persons (%s) -> %s", len(rows), len(table),
             ", ".join(f"{s} {n}" for s, n in counts.most_common()), cfg.output)
    return {"output": cfg.output, "persons": len(table), "counts": dict(counts)}
