"""Clinical cohort: one CSV row per photo, with dates, outcomes and whitelisted covariates.

Expected layout::

    input_dir/
        cohort.csv            # name configurable: iter_records(input_dir, table="cohort.csv")
        <photo_path>          # photos, paths relative to input_dir (e.g. photos/p001_2015.jpg)

``cohort.csv`` (UTF-8, header row), one row per photo:

- required: ``patient_id``, ``photo_path`` (relative to ``input_dir``), ``photo_date``;
- required, at least one of: ``birth_date`` or ``age_at_photo`` (years);
- optional: ``sex`` (0 male / 1 female, or m/f), ``race`` (UTKFace coding 0-4), ``diagnosis`` (a code),
  ``last_contact_date``, ``death_date``, ``followup_days``, ``event`` (0 censored / 1 death);
- ``covariates=[...]``: further columns the caller whitelists (each must exist, else ``ValueError``);
  numeric cells become floats, others are kept as stripped strings;
- every other column is dropped unread (logged by name, never by value), so free-text notes never
  reach the shards.

Dates are ISO ``YYYY-MM-DD``. Derived labels:

- ``age`` = (photo_date - birth_date).days / 365.25 when ``birth_date`` is given, else ``age_at_photo``;
- ``followup_days`` = the given ``followup_days``, else (death_date or last_contact_date) - photo_date
  in days, else ``None``;
- ``event`` = 1 if ``death_date`` is given, else the given ``event``, else 0 when follow-up is known
  (``None`` when there is no follow-up information at all).

Dates stay ``datetime.date`` in ``labels`` (``photo_date``, ``birth_date``, ``last_contact_date``,
``death_date``; a later stage makes them relative); ``person_id`` is the raw ``patient_id`` (a later
stage hashes it). Rows are yielded sorted by ``photo_path`` (the ``source_id``).

Rejections: ``label:patient_id`` (empty), ``label:photo_date`` / ``label:birth_date`` /
``label:last_contact_date`` / ``label:death_date`` (unparsable, or out of order: birth after photo,
photo after death or last contact, last contact after death), ``label:age`` (missing, NaN, negative,
> 120), ``label:sex``, ``label:race``, ``label:followup_days`` (NaN or negative), ``label:event`` (not 0/1,
or 0 with a death date), ``label:<covariate>`` (a numeric cell that is NaN or infinite), ``image:missing``,
``image:not_regular`` (a directory, FIFO or device), ``image:too_large`` (over the photo byte cap,
not read), ``image:unreadable``, ``image:path``, ``duplicate`` (a second row with the same
``photo_path``).

The table is read through :func:`fahr.boundary.read_csv_table`; its errors name the file, line and
column, never a cell value (cells hold identifiers).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from data_pipelines.sources.folder import (
    parse_age,
    parse_date,
    parse_float,
    parse_int_code,
    parse_race,
    parse_sex,
    read_csv,
    read_image,
    reject,
    require_dir,
)
from fahr.boundary import InputError

log = logging.getLogger(__name__)

TABLE = "cohort.csv"
REQUIRED = ("patient_id", "photo_path", "photo_date")
AGE_COLUMNS = ("birth_date", "age_at_photo")
OPTIONAL = ("sex", "race", "diagnosis", "last_contact_date", "death_date", "followup_days", "event")
DAYS_PER_YEAR = 365.25


def iter_records(input_dir: str | Path, covariates: Iterable[str] = (), table: str = TABLE,
                 ) -> Iterator[Record | Rejection]:
    """Yield one Record or Rejection per cohort row (see the module docstring)."""
    root = require_dir(input_dir)
    covariates = list(covariates)
    # messages name the file and the columns the user configured, never the header's other names or
    # any cell: a header-less cohort table has patient data in its first line
    header, rows = read_csv(root / table, required=REQUIRED, what="cohort CSV")
    if not any(name in header for name in AGE_COLUMNS):
        raise InputError(f"cohort CSV {root / table}: needs one of the columns {list(AGE_COLUMNS)}")
    missing = [name for name in covariates if name not in header]
    if missing:
        raise InputError(f"cohort CSV {root / table}: covariate column(s) {missing} not found")
    reserved = [name for name in covariates if name in (*REQUIRED, *AGE_COLUMNS, *OPTIONAL)]
    if reserved:
        raise InputError(f"covariates {reserved} are standard cohort columns, not covariates")
    dropped = [name for name in header if name not in (*REQUIRED, *AGE_COLUMNS, *OPTIONAL, *covariates)]
    if dropped:
        log.warning("cohort: dropping %d column(s) not whitelisted: %s", len(dropped), dropped)

    seen: set[str] = set()
    for row in sorted(rows, key=lambda r: r["photo_path"]):
        source_id = row["photo_path"]
        if source_id in seen:
            yield Rejection(source_id, "duplicate", "photo_path listed twice")
            continue
        seen.add(source_id)
        try:
            labels = parse_row(row, covariates)
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        yield Record(source_id=source_id, person_id=row["patient_id"], image=image, labels=labels)


def parse_row(row: dict[str, str], covariates: Iterable[str] = ()) -> dict[str, Any]:
    """Validated labels of one cohort row; raises RejectedError("label:<field>", ...)."""
    if not row.get("patient_id"):
        raise RejectedError("label:patient_id", "empty")
    photo = parse_date(row["photo_date"], "photo_date")
    if photo is None:
        raise RejectedError("label:photo_date", "missing")
    birth = parse_date(row.get("birth_date"), "birth_date")
    last_contact = parse_date(row.get("last_contact_date"), "last_contact_date")
    death = parse_date(row.get("death_date"), "death_date")

    if birth is not None:
        if birth > photo:
            raise RejectedError("label:birth_date", f"birth {birth} after photo {photo}")
        age = parse_age((photo - birth).days / DAYS_PER_YEAR)
    else:
        age = parse_age(row.get("age_at_photo"), required=True)
    if death is not None and photo > death:
        raise RejectedError("label:death_date", f"photo {photo} after death {death}")
    if last_contact is not None and photo > last_contact:
        raise RejectedError("label:last_contact_date", f"photo {photo} after last contact {last_contact}")
    if death is not None and last_contact is not None and last_contact > death:
        raise RejectedError("label:last_contact_date", f"last contact {last_contact} after death {death}")

    followup = parse_float(row.get("followup_days"), "followup_days")
    if followup is not None and (math.isnan(followup) or followup < 0):
        raise RejectedError("label:followup_days", f"must be >= 0: {row.get('followup_days')!r}")
    if followup is None:
        end = death or last_contact
        followup = float((end - photo).days) if end is not None else None

    given_event = parse_int_code(row.get("event"), "event", (0, 1))
    if death is not None:
        if given_event == 0:
            raise RejectedError("label:event", f"event=0 but death_date {death} is set")
        event = 1
    elif given_event is not None:
        event = given_event
    else:
        event = 0 if followup is not None else None

    labels: dict[str, Any] = {
        "age": age, "sex": parse_sex(row.get("sex")), "race": parse_race(row.get("race")),
        "diagnosis": row.get("diagnosis") or None,
        "photo_date": photo, "birth_date": birth, "last_contact_date": last_contact, "death_date": death,
        "followup_days": followup, "event": event,
    }
    for name in covariates:
        labels[name] = _covariate(row.get(name, ""), name)
    return labels


def _covariate(value: str, name: str) -> float | str | None:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    if not math.isfinite(number):  # "nan", "inf": not a value a shard label may hold
        raise RejectedError(f"label:{name}", "not a finite number")
    return number
