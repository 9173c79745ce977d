"""Checks on survival data before any model sees it.

Every check raises :class:`fahr.boundary.InputError` (a ``ValueError``) with a message that names the
problem, the column and how many rows it touches. Messages never contain a cell's value (patient
identifiers, even pseudonyms, or anything else a misconfigured column may hold): counts and row
positions only. Given ``lines`` (the file line of each row), positions are file lines.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from fahr.boundary import InputError


def _label(name: str) -> str:
    return f"{name}: " if name else ""


def first_at(mask: np.ndarray, lines: Sequence[int] | None = None) -> str:
    """'first at row 3' (0-based position) or, given the file line of each row, 'first at line 5'."""
    pos = int(np.argmax(mask))
    return f"first at line {int(lines[pos])}" if lines is not None else f"first at row {pos}"


def check_survival_arrays(time: Any, event: Any, name: str = "", require_event: bool = True,
                          lines: Sequence[int] | None = None, time_column: str | None = None,
                          event_column: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Check follow-up times and event indicators; return them as float64 and int64 arrays.

    Args:
        time: follow-up time per subject, shape (n,), any non-negative unit (days in fahr).
        event: 1 = event observed, 0 = censored (booleans allowed), shape (n,).
        name: prefix for error messages (e.g. the input file), so the user knows which data failed.
        lines: optional file line of each subject, for "first at line L" in messages.
        time_column, event_column: the table columns they come from, named in messages.

    Raises:
        InputError: lengths differ, empty input, a time that is missing, non-numeric, infinite or
            negative, an event not in {0, 1} (or missing), or (when ``require_event``) no event at all
            (every subject censored). Counts and positions only, never values.
    """
    p = _label(name)
    tw = f" in column {time_column!r}" if time_column else ""
    t = _floats_or_error(time, f"{p}follow-up times{tw} must be numeric", lines)
    e_raw = np.asarray(event)
    e_raw = e_raw.reshape(-1)
    if len(t) != len(e_raw):
        raise InputError(f"{p}length mismatch: {len(t)} times but {len(e_raw)} event indicators")
    if len(t) == 0:
        raise InputError(f"{p}no rows: survival data is empty")
    missing = np.isnan(t)
    if missing.any():
        raise InputError(f"{p}{int(missing.sum())} follow-up time(s){tw} are missing (NaN), {first_at(missing, lines)}")
    bad = ~np.isfinite(t)
    if bad.any():
        raise InputError(f"{p}{int(bad.sum())} follow-up time(s){tw} are NaN or infinite, {first_at(bad, lines)}")
    neg = t < 0
    if neg.any():
        raise InputError(f"{p}{int(neg.sum())} follow-up time(s){tw} are negative, {first_at(neg, lines)}")
    e = _events_as_int(e_raw, p, lines, event_column)
    if require_event and e.sum() == 0:
        raise InputError(f"{p}all {len(e)} subjects are censored (no event): survival models cannot be fitted")
    return t, e


def _as_float(values: Any) -> np.ndarray | None:
    try:
        return np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        return None


def _floats_or_error(values: Any, message: str, lines: Sequence[int] | None) -> np.ndarray:
    """``values`` as float64 (N,), or InputError(``message``) counting the cells that are not numbers and
    saying where the first is (never showing them)."""
    floats = _as_float(values)
    if floats is None:
        bad = _not_numbers(values)
        where = f" ({int(bad.sum())} cell(s) are not numbers, {first_at(bad, lines)})" if bad is not None and bad.any() else ""
        raise InputError(f"{message}{where}")
    return floats


def _not_numbers(values: Any) -> np.ndarray | None:
    """Mask of present cells that are not numbers (None if it cannot be computed)."""
    try:
        s = pd.Series(np.asarray(values, dtype=object).reshape(-1))
        return (pd.to_numeric(s, errors="coerce").isna() & s.notna()).to_numpy()
    except (TypeError, ValueError):
        return None


def _events_as_int(event: np.ndarray, prefix: str, lines: Sequence[int] | None = None,
                   column: str | None = None) -> np.ndarray:
    """Event indicators -> int64 array; anything but 0/1 (booleans allowed) is an error.

    The message counts the bad cells and says where the first is; it never shows them (a
    misconfigured event column may hold identifiers).
    """
    what = f"event indicator(s){f' in column {column!r}' if column else ''}"
    if event.dtype == bool:
        return event.astype(np.int64)
    if event.dtype == object and all(isinstance(v, (bool, np.bool_)) for v in event):
        return event.astype(bool).astype(np.int64)
    e = _floats_or_error(event, f"{prefix}{what} must be 0 or 1 (or true/false), got non-numeric values", lines)
    missing = np.isnan(e)
    if missing.any():
        raise InputError(f"{prefix}{int(missing.sum())} {what} are missing, {first_at(missing, lines)}: "
                         "every row needs 0 (censored) or 1 (event)")
    bad = ~np.isin(e, (0.0, 1.0))
    if bad.any():
        hint = ("; the column looks coded 1/2 (as R's Surv: 1 = censored, 2 = event): recode it as 0/1"
                if np.isin(e, (1.0, 2.0)).all() else "")
        raise InputError(f"{prefix}{int(bad.sum())} {what} are not 0 or 1, {first_at(bad, lines)}{hint}")
    return e.astype(np.int64)


def validate_survival_table(
    df: pd.DataFrame,
    time: str,
    event: str,
    patient: str | None = None,
    photo_date: str | None = None,
    event_date: str | None = None,
    name: str = "",
    lines: Sequence[int] | None = None,
) -> None:
    """Check a survival table (one row per patient, or repeated rows that agree).

    Args:
        df: the table.
        time: column of follow-up times (days, from photo to event or last contact).
        event: column of event indicators (1 = event, 0 = censored).
        patient: optional patient id column; duplicate ids whose time/event disagree are an error.
        photo_date, event_date: optional date columns (ISO 8601, year first); a photo dated after the
            event / last contact is an error, and so is a missing or unparsable date. Either may be
            absent from the table (the check is then skipped).
        name: prefix for error messages.
        lines: optional file line of each row of ``df`` (messages then say "line L").

    Raises:
        InputError: a column is missing (named; the table's own column names are never listed: a
            header-less file has data there), every failure of :func:`check_survival_arrays`,
            follow-up times all equal, conflicting duplicate patients (counts only, never ids),
            a missing or unparsable date, a photo after the event.
    """
    p = _label(name)
    required = [c for c in (time, event, patient) if c is not None]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{p}missing column(s) {missing} (the table has {len(df.columns)} column(s))")
    if pd.api.types.is_bool_dtype(df[time]):
        raise InputError(f"{p}follow-up times in column {time!r} must be numbers, not true/false")
    _check_photo_before_event(df, photo_date, event_date, p, lines)
    t, _ = check_survival_arrays(df[time].to_numpy(), df[event].to_numpy(), name=name, lines=lines,
                                 time_column=time, event_column=event)
    if len(t) > 1 and np.all(t == t[0]):
        raise InputError(f"{p}all {len(t)} follow-up times (column {time!r}) are equal ({'0' if t[0] == 0 else 'one value'}): "
                         "survival cannot be estimated; check that the column holds the follow-up in days")
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


def parse_dates(values: pd.Series) -> pd.Series:
    """Dates as ISO 8601 text (``2021-03-04``, optionally with a time) -> timestamps; NaT if not."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return values
    text = values.astype("string")
    return pd.to_datetime(text, format="ISO8601", errors="coerce")


def _check_photo_before_event(df: pd.DataFrame, photo_date: str | None, event_date: str | None, prefix: str,
                              lines: Sequence[int] | None = None) -> None:
    """A photo taken after the event or last contact means the follow-up is wrong; a date that is
    missing or not a date means the check cannot be made (an error, not a silent skip)."""
    if photo_date is None or event_date is None or photo_date not in df.columns or event_date not in df.columns:
        return
    parsed = {}
    for column in (photo_date, event_date):
        dates = parse_dates(df[column])
        empty = df[column].isna().to_numpy()
        bad = (dates.isna().to_numpy() & ~empty)
        if empty.any() or bad.any():
            parts = [f"{int(n.sum())} {what}" for n, what in ((empty, "empty"), (bad, "not dates")) if n.any()]
            raise InputError(f"{prefix}date column {column!r}: {' and '.join(parts)} cell(s), "
                             f"{first_at(empty | bad, lines)}; dates must be ISO 8601 (YYYY-MM-DD) in every row")
        parsed[column] = dates
    after = (parsed[photo_date] > parsed[event_date]).to_numpy()
    if after.any():
        raise InputError(
            f"{prefix}{int(after.sum())} row(s) have a photo ({photo_date!r}) dated after the event or last "
            f"contact ({event_date!r}); {first_at(after, lines)}"
        )


def duplicate_patient_count(df: pd.DataFrame, patient: str) -> int:
    """Number of patients with more than one row (outcomes may agree)."""
    return int((df.groupby(patient, sort=False).size() > 1).sum())
