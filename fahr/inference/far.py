"""Face Aging Rate (FAR): how fast a person's FaceAge changes per year of calendar time.

FAR = (FaceAge_last - FaceAge_first) / interval, interval in years (days / 365.25), from the two
photos furthest apart in time (``method="pair"``, as in the FAHR-Face FAR analysis, which bins the
interval into 10-365 / 366-730 / 731-1460 days), or the least-squares slope of FaceAge on
time over all the person's usable photos (``method="slope"``). A FAR of 1 means the face ages one
year per calendar year.

Pure maths on rows that already carry a FaceAge: no model, no images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import date, timedelta
from typing import Any

import numpy as np

from fahr.boundary import InputError

DAYS_PER_YEAR = 365.25
#: interval bins in days, inclusive (label, low, high)
INTERVAL_BINS = (("10-365", 10, 365), ("366-730", 366, 730), ("731-1460", 731, 1460))
METHODS = ("pair", "slope")

#: person status -> meaning (docs/predict.md repeats this table)
FAR_STATUSES: dict[str, str] = {
    "ok": "FAR computed",
    "no_usable_photos": "no photo of the person has a face (all no_face / multiple_faces / unreadable ...)",
    "missing_dates": "fewer than 2 usable photos once photos without a valid date (or age) are dropped",
    "mixed_time_kinds": "some photos give a date and others only an age_at_photo: the two cannot be combined",
    "one_photo": "only one usable photo",
    "zero_interval": "all usable photos were taken on the same day",
}

OUTPUT_COLUMNS = ["person", "path_first", "path_last", "date_first", "date_last", "interval_days",
                  "faceage_first", "faceage_last", "far", "interval_bin", "n_photos", "n_used", "status"]


def interval_bin(days: float | None) -> str:
    """The bin label of an interval in days (``"10-365"``, ``"366-730"``, ``"731-1460"``), else ``"other"``.

    Fractional days (intervals from ``age_at_photo``) are rounded half up to whole days first, so
    no interval falls between two bins."""
    if days is None or not math.isfinite(days):
        return "other"
    whole = math.floor(days + 0.5)
    for label, low, high in INTERVAL_BINS:
        if low <= whole <= high:
            return label
    return "other"


#: plausible photo dates: no photograph of a living person predates this, none postdates today
EARLIEST_PHOTO_DATE = date(1900, 1, 1)
#: plausible ages at a photo, years
AGE_RANGE = (0.0, 120.0)


def photo_time(row: dict[str, Any]) -> tuple[str | None, float | None, str]:
    """A photo's time on its person's axis: ``(kind, days, problem)``.

    ``kind`` is ``"date"`` (days since 0001-01-01 from an ISO ``date``, or a ``date``/``datetime``
    value; a time part after the day is ignored) or ``"age"`` (``age_at_photo`` years x 365.25);
    the ``date`` column wins when both are filled. ``(None, None, problem)`` when the row has no usable
    time, ``problem`` saying why in a few words (``"no date or age_at_photo"``, ``"date not ISO
    YYYY-MM-DD"``, ``"date before 1900 or in the future"``, ``"age_at_photo not a number in [0,
    120]"``). A bad date never falls back to the age: the two are on different axes.
    """
    value = row.get("date")
    if value not in (None, ""):
        if isinstance(value, date):
            d = value
        else:
            text = str(value).strip()
            try:
                if len(text) > 10 and text[10] not in "T ":
                    raise ValueError
                d = date.fromisoformat(text[:10])
            except ValueError:
                return None, None, "date not ISO YYYY-MM-DD"
        if not EARLIEST_PHOTO_DATE <= d <= date.today() + timedelta(days=1):
            return None, None, "date before 1900 or in the future"
        return "date", float(d.toordinal()), ""
    age = row.get("age_at_photo")
    if age in (None, ""):
        return None, None, "no date or age_at_photo"
    try:
        years = float(age)
    except (TypeError, ValueError):
        years = math.nan
    if not (math.isfinite(years) and AGE_RANGE[0] <= years <= AGE_RANGE[1]):
        return None, None, "age_at_photo not a number in [0, 120]"
    return "age", years * DAYS_PER_YEAR, ""


def photo_days(row: dict[str, Any]) -> float | None:
    """A photo's time in days on its person's axis (see :func:`photo_time`), None if unusable."""
    return photo_time(row)[1]


def _usable(row: dict[str, Any]) -> bool:
    age = row.get("faceage")
    return row.get("status") == "ok" and age is not None and math.isfinite(float(age))


def _empty(rows: list[dict[str, Any]], status: str, n_used: int) -> dict[str, Any]:
    out = dict.fromkeys(OUTPUT_COLUMNS)
    out.update(person=rows[0].get("person") if rows else None, n_photos=len(rows), n_used=n_used, status=status)
    out["interval_bin"] = "other"
    return out


def far_from_photos(rows: Iterable[dict[str, Any]], method: str = "pair") -> dict[str, Any]:
    """The FAR of one person.

    Args:
        rows: the person's photos, each a dict with ``status`` (``"ok"`` when usable), ``faceage``
            (years), ``path`` and a time: ``date`` (ISO date) or ``age_at_photo`` (years); ``person``
            is copied to the output.
        method: ``"pair"`` (first and last photo in time) or ``"slope"`` (least squares over all).

    Returns:
        A dict with :data:`OUTPUT_COLUMNS`: first/last usable photo (by time; ties keep input order),
        ``interval_days`` between them, ``far`` in FaceAge years per year (None unless ok),
        ``interval_bin``, ``n_photos`` (rows given), ``n_used`` (photos in the estimate), ``status``.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    rows = list(rows)
    kinds = {photo_time(r)[0] for r in rows} - {None}
    if len(kinds) > 1:  # days since year 1 against years of age x 365.25: no interval exists
        return _empty(rows, "mixed_time_kinds", 0)
    faces = [r for r in rows if _usable(r)]
    timed = [(photo_days(r), i, r) for i, r in enumerate(faces)]
    timed = sorted((t for t in timed if t[0] is not None), key=lambda t: (t[0], t[1]))
    if not faces:
        return _empty(rows, "no_usable_photos", 0)
    if len(timed) < 2:
        return _empty(rows, "missing_dates" if len(faces) > len(timed) else "one_photo", len(timed))
    (d0, _, first), (d1, _, last) = timed[0], timed[-1]
    interval = d1 - d0
    out = _empty(rows, "ok", len(timed))
    out.update(path_first=first.get("path"), path_last=last.get("path"),
               date_first=first.get("date") or None, date_last=last.get("date") or None,
               interval_days=interval, faceage_first=float(first["faceage"]),
               faceage_last=float(last["faceage"]), interval_bin=interval_bin(interval))
    if interval <= 0:
        out["status"] = "zero_interval"
        return out
    if method == "pair":
        out["far"] = (out["faceage_last"] - out["faceage_first"]) / (interval / DAYS_PER_YEAR)
    else:
        years = np.array([t[0] for t in timed]) / DAYS_PER_YEAR
        ages = np.array([float(t[2]["faceage"]) for t in timed])
        out["far"] = float(np.polyfit(years - years.mean(), ages, 1)[0])
    return out


def far_table(rows: Iterable[dict[str, Any]], method: str = "pair") -> list[dict[str, Any]]:
    """One :func:`far_from_photos` result per ``person``, in order of first appearance. Rows whose
    ``person`` is empty (None or blank text) belong to nobody and are left out (the caller counts
    them): merging them into one "person" would compare strangers' photos."""
    by_person: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        if r["person"] is None or (isinstance(r["person"], str) and not r["person"].strip()):
            continue
        by_person.setdefault(r["person"], []).append(r)
    return [far_from_photos(group, method) for group in by_person.values()]
