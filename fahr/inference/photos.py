"""Input handling shared by `fahr predict` and `fahr far`: which photos, read how, and what status.

A photo list comes from a directory (scanned recursively for image extensions, sorted) or a CSV
with a ``path`` column (relative paths resolved against the CSV's folder). Each photo ends with one
status from a small vocabulary (:data:`STATUSES`); the pipeline's detailed rejection reasons
(``data_pipelines.records``) map onto it with :func:`status_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fahr.faces.decode import PHOTO_SUFFIXES, decode_photo
from fahr.faces.rejection import RejectedError
from fahr.boundary import (
    MAX_PHOTO_BYTES,
    FileRefused,
    InputError,
    printable_path,
    read_csv_table,
    read_regular_file,
)


#: status -> meaning (docs/predict.md repeats this table)
STATUSES: dict[str, str] = {
    "ok": "one face found and aligned; the prediction columns are filled",
    "no_face": "no face found, or only faces smaller than the minimum face size",
    "multiple_faces": "several faces and the multi_face policy is 'reject'",
    "low_confidence": "the best face's detector probability is below min_confidence",
    "unreadable": "missing, empty, undecodable or too large a file, or not a regular file (a folder, FIFO, device)",
}

# data_pipelines reason id -> status (unknown face:* reasons are no_face, unknown others unreadable)
_REASON_STATUS = {
    "face:none": "no_face",
    "face:too_small": "no_face",
    "face:multiple": "multiple_faces",
    "face:low_confidence": "low_confidence",
}


@dataclass(frozen=True)
class Photo:
    """One input photo: ``label`` as written in the output (the CSV's value, or the scanned path, as
    encodable text); ``path`` where to read it (None: the CSV row named no file)."""

    label: str
    path: Path | None


def status_of(reason: str) -> str:
    """Map a :class:`RejectedError` reason id (``"face:multiple"``, ``"image:empty"``) to a status."""
    if reason in _REASON_STATUS:
        return _REASON_STATUS[reason]
    return "no_face" if reason.startswith("face:") else "unreadable"


def scan_directory(root: str | Path) -> list[Photo]:
    """Every regular file under ``root`` (recursively; symlinked folders are not entered) with an
    image extension, sorted by path. File names that are not UTF-8 are labelled with ``\\xNN``
    escapes, so writing the output never fails on them."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    return [Photo(printable_path(p), p) for p in files]


def read_csv_rows(path: str | Path, required: tuple[str, ...] = ("path",)) -> list[dict[str, str]]:
    """Rows of an input CSV as ``{column: stripped text}``; :class:`InputError` naming the file for a
    missing, unreadable, non-UTF-8 or malformed table or missing columns (see
    :func:`fahr.boundary.read_csv_table`)."""
    return read_csv_table(path, "input CSV", required)[1]


def resolve(value: str, base: Path) -> Path:
    """A CSV path value, relative ones taken from the CSV's folder ``base``."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def list_photos(input_path: str | Path) -> list[Photo]:
    """The photos named by ``input_path``: a directory (recursive scan), one photo file (by its image
    extension), or a CSV with a ``path`` column (relative paths from the CSV's folder; an empty cell
    is a row without a photo, reported ``unreadable``)."""
    p = Path(input_path)
    if not str(input_path).strip():
        raise InputError("input: empty path; give a folder of photos, one photo, or a CSV with a `path` column")
    if p.is_dir():
        return scan_directory(p)
    if not p.exists():
        raise InputError(f"input {printable_path(p)}: no such file or directory")
    if p.suffix.lower() in PHOTO_SUFFIXES:
        return [Photo(printable_path(p), p)]
    rows = read_csv_rows(p)
    return [Photo(row["path"], resolve(row["path"], p.parent) if row["path"] else None) for row in rows]


_FILE_REASONS = {"missing": "image:missing", "not_regular": "image:not_regular", "too_large": "image:too_large",
                 "unreadable": "image:unreadable"}


def load_photo(path: str | Path | None) -> np.ndarray:
    """Read and decode one photo to (H, W, 3) uint8 RGB; raises :class:`RejectedError`:
    ``image:missing`` (no such file, or no path), ``image:not_regular`` (a folder, FIFO, device, ...),
    ``image:too_large`` (over :data:`fahr.boundary.MAX_PHOTO_BYTES` bytes, or too many pixels),
    else :func:`decode_photo`'s reasons. Only regular files are opened, never more than the cap read."""
    if path is None:
        raise RejectedError("image:missing", "empty path")
    try:
        data = read_regular_file(path, MAX_PHOTO_BYTES)
    except FileRefused as err:
        raise RejectedError(_FILE_REASONS[err.reason], err.detail) from None
    return decode_photo(data)
