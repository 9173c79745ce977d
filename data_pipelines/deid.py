"""De-identification of clinical cohort records before anything is written.

- Patient ids become keyed hashes: HMAC-SHA256 with a secret salt from the environment
  (``FAHR_DEID_SALT``) or a key file. The salt is never written into shards, indexes or logs;
  without it the mapping cannot be recomputed, with it the same patient always maps to the same id
  (so longitudinal photos and later cohorts link up).
- Dates become whole days relative to a per-patient anchor (the patient's earliest photo date), so
  intervals (follow-up, years between photos) survive and calendar dates do not.
- Only whitelisted label keys pass; free-text columns never do unless the caller lists them.
Image metadata (EXIF, GPS, XMP, ICC, comments) is stripped by re-encoding the aligned crop
(``fahr.data.shard_writer``), not here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Iterable
from typing import Any

from data_pipelines.records import Record
from fahr.boundary import FileRefused, InputError, printable_path, read_regular_file

SALT_ENV = "FAHR_DEID_SALT"
MIN_SALT_BYTES = 16
#: largest key file read (bytes): a salt is a line of hex
MAX_KEY_FILE_BYTES = 64 * 1024
#: Labels that may pass de-identification by default (dates are converted, not passed).
DEFAULT_ALLOWED = frozenset({"age", "sex", "race", "followup_days", "event", "diagnosis"})


def load_salt(key_file: str | os.PathLike | None = None) -> bytes:
    """The de-identification salt: the key file's content if given, else ``$FAHR_DEID_SALT``.

    Raises InputError (without echoing any of it) when it is missing or shorter than 16 bytes, or
    when the key file is not a regular file of at most :data:`MAX_KEY_FILE_BYTES` bytes.
    """
    if key_file is not None:
        try:
            salt = read_regular_file(key_file, MAX_KEY_FILE_BYTES).strip()
        except FileRefused as refused:
            raise InputError(f"deid.key_file {printable_path(key_file)}: {refused.detail}; expected a file "
                             "holding the secret salt") from None
        origin = f"key file {printable_path(key_file)}"
    else:
        salt = os.environ.get(SALT_ENV, "").encode()
        origin = f"${SALT_ENV}"
    if len(salt) < MIN_SALT_BYTES:
        raise InputError(
            f"de-identification salt from {origin} is missing or shorter than {MIN_SALT_BYTES} bytes; "
            f"create one with `python -c 'import secrets; print(secrets.token_hex(32))'` and keep it secret"
        )
    return salt


def pseudonym(person_id: str, salt: bytes, length: int = 20) -> str:
    """Keyed hash of a raw identifier: ``"p"`` + ``length`` hex characters (80 bits by default)."""
    digest = hmac.new(salt, str(person_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return "p" + digest[:length]


def patient_anchors(records: Iterable[Record], date_key: str = "photo_date") -> dict[str, dt.date]:
    """Earliest ``date_key`` per raw person id (the zero of that patient's relative days)."""
    anchors: dict[str, dt.date] = {}
    for r in records:
        d = r.labels.get(date_key)
        if isinstance(d, dt.date) and (r.person_id not in anchors or d < anchors[r.person_id]):
            anchors[r.person_id] = d
    return anchors


def deidentify(
    record: Record, salt: bytes, anchor: dt.date | None, allowed: Iterable[str] = DEFAULT_ALLOWED,
) -> Record:
    """A copy of ``record`` safe to write: hashed ids, dates as ``<name>_day`` (days from the patient's
    anchor, int), only ``allowed`` labels, no landmarks-free change to the image bytes.

    ``source_id`` (often a path holding a name or MRN) is replaced by a hash as well.
    """
    allowed = set(allowed)
    labels: dict[str, Any] = {}
    for key, value in record.labels.items():
        if isinstance(value, dt.date):
            if anchor is None:
                raise InputError(f"{key}: a date label needs the patient's anchor date")
            labels[f"{key.removesuffix('_date')}_day"] = (value - anchor).days
        elif key in allowed:
            labels[key] = value
    return Record(
        source_id=pseudonym(record.source_id, salt, length=24),
        person_id=pseudonym(record.person_id, salt),
        image=record.image,
        labels=labels,
        landmarks=record.landmarks,
    )
