"""Checks on survival data before any model sees it.

Every check raises ``ValueError`` with a message that names the problem and how many rows it touches.
Messages never contain patient identifiers (even pseudonyms): counts and row positions only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fahr.boundary import InputError


def _label(name: str) -> str:
    return f"{name}: " if name else ""


def check_survival_arrays(time: Any, event: Any, name: str = "", require_event: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Check follow-up times and event indicators; return them as float64 and int64 arrays.

    Args:
        time: follow-up time per subject, shape (n,), any non-negative unit (days in fahr).
        event: 1 = event observed, 0 = censored, shape (n,).
        name: prefix for error messages (e.g. the input file), so the user knows which data failed.

    Raises:
        ValueError: lengths differ, empty input, a time that is NaN, infinite or negative, an event not
            in {0, 1} (or missing), or (when ``require_event``) no event at all (every subject censored).
    """
    p = _label(name)
    t = np.asarray(time, dtype=float).reshape(-1) if _numeric(time) else None
    if t is None:
        raise InputError(f"{p}follow-up times must be numeric")
    e_raw = np.asarray(event)
    e_raw = e_raw.reshape(-1)
    if len(t) != len(e_raw):
        raise InputError(f"{p}length mismatch: {len(t)} times but {len(e_raw)} event indicators")
    if len(t) == 0:
        raise InputError(f"{p}no rows: survival data is empty")
    bad = ~np.isfinite(t)
    if bad.any():
        raise InputError(f"{p}{int(bad.sum())} follow-up time(s) are NaN or infinite (first at row {int(np.argmax(bad))})")
    neg = t < 0
    if neg.any():
        raise InputError(f"{p}{int(neg.sum())} follow-up time(s) are negative (first at row {int(np.argmax(neg))})")
    e = _events_as_int(e_raw, p)
    if require_event and e.sum() == 0:
        raise InputError(f"{p}all {len(e)} subjects are censored (no event): survival models cannot be fitted")
    return t, e


def _numeric(values: Any) -> bool:
    try:
        np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return True


def _events_as_int(event: np.ndarray, prefix: str) -> np.ndarray:
    """Event indicators -> int64 array; anything but 0/1 (booleans allowed) is an error."""
    if event.dtype == bool:
        return event.astype(np.int64)
    try:
        e = event.astype(float)
    except (TypeError, ValueError):
        raise InputError(f"{prefix}event indicators must be 0 or 1, got non-numeric values") from None
    bad = ~np.isin(e, (0.0, 1.0))  # NaN is not in {0, 1} either
    if bad.any():
        shown = sorted({repr(v) for v in e[bad].tolist()})[:5]
        raise InputError(
            f"{prefix}{int(bad.sum())} event indicator(s) are not 0 or 1 (values seen: {', '.join(shown)}; "
            f"first at row {int(np.argmax(bad))})"
        )
    return e.astype(np.int64)


def validate_survival_table(
    df: pd.DataFrame,
    time: str,
    event: str,
    patient: str | None = None,
    photo_date: str | None = None,
    event_date: str | None = None,
    name: str = "",
) -> None:
    """Check a survival table (one row per patient, or repeated rows that agree).

    Args:
        df: the table.
        time: column of follow-up times (days, from photo to event or last contact).
        event: column of event indicators (1 = event, 0 = censored).
        patient: optional patient id column; duplicate ids whose time/event disagree are an error.
        photo_date, event_date: optional date columns; a photo dated after the event / last contact is
            an error. Either may be absent from the table (the check is then skipped).
        name: prefix for error messages.

    Raises:
        ValueError: a column is missing, plus every failure of :func:`check_survival_arrays`,
            conflicting duplicate patients (counts only, never ids), photo after event.
    """
    p = _label(name)
    required = [c for c in (time, event, patient) if c is not None]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{p}missing column(s) {missing}; table has {list(df.columns)}")
    _check_photo_before_event(df, photo_date, event_date, p)
    check_survival_arrays(df[time].to_numpy(), df[event].to_numpy(), name=name)
    if patient is not None:
        _check_duplicate_patients(df, time, event, patient, p)


def _check_duplicate_patients(df: pd.DataFrame, time: str, event: str, patient: str, prefix: str) -> None:
    """Duplicate patient rows are tolerated only when their outcomes agree."""
    if df[patient].isna().any():
        raise InputError(f"{prefix}{int(df[patient].isna().sum())} row(s) have no patient id in column {patient!r}")
    counts = df.groupby(patient, sort=False)[[time, event]].nunique()
    conflicting = int(((counts[time] > 1) | (counts[event] > 1)).sum())
    if conflicting:
        raise InputError(
            f"{prefix}{conflicting} patient(s) have several rows with conflicting outcomes "
            f"({time!r}/{event!r} differ); give one row per patient"
        )


def _check_photo_before_event(df: pd.DataFrame, photo_date: str | None, event_date: str | None, prefix: str) -> None:
    """A photo taken after the event or last contact means the follow-up is wrong."""
    if photo_date is None or event_date is None or photo_date not in df.columns or event_date not in df.columns:
        return
    photo = pd.to_datetime(df[photo_date], errors="coerce")
    outcome = pd.to_datetime(df[event_date], errors="coerce")
    after = (photo > outcome).to_numpy()
    if after.any():
        raise InputError(
            f"{prefix}{int(after.sum())} row(s) have a photo ({photo_date!r}) dated after the event or last "
            f"contact ({event_date!r}); first at row {int(np.argmax(after))}"
        )


def duplicate_patient_count(df: pd.DataFrame, patient: str) -> int:
    """Number of patients with more than one row (outcomes may agree)."""
    return int((df.groupby(patient, sort=False).size() > 1).sum())
