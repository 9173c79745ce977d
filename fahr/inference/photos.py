"""Input handling shared by `fahr predict` and `fahr far`: which photos, read how, and what status.

A photo list comes from a directory (scanned recursively for image extensions, sorted) or a CSV
with a ``path`` column (relative paths resolved against the CSV's folder). Each photo ends with one
status from a small vocabulary (:data:`STATUSES`); the pipeline's detailed rejection reasons
(``data_pipelines.records``) map onto it with :func:`status_of`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.imageio import decode_photo
from data_pipelines.records import RejectedError
from fahr.boundary import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

#: status -> meaning (docs/predict.md repeats this table)
STATUSES: dict[str, str] = {
    "ok": "one face found and aligned; the prediction columns are filled",
    "no_face": "no face found, or only faces smaller than the minimum face size",
    "multiple_faces": "several faces and the multi_face policy is 'reject'",
    "low_confidence": "the best face's detector probability is below min_confidence",
    "unreadable": "missing, empty, undecodable or too large a file",
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
    """One input photo: ``label`` as written in the output (the CSV's value, or the scanned path);
    ``path`` where to read it."""

    label: str
    path: Path


def status_of(reason: str) -> str:
    """Map a :class:`RejectedError` reason id (``"face:multiple"``, ``"image:empty"``) to a status."""
    if reason in _REASON_STATUS:
        return _REASON_STATUS[reason]
    return "no_face" if reason.startswith("face:") else "unreadable"


def scan_directory(root: str | Path) -> list[Photo]:
    """Every file under ``root`` (recursively) with an image extension, sorted by path."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return [Photo(str(p), p) for p in files]


def read_csv_rows(path: str | Path, required: tuple[str, ...] = ("path",)) -> list[dict[str, str]]:
    """Rows of a CSV as dicts; a ``ValueError`` naming the missing columns."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; it has {columns}")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def resolve(value: str, base: Path) -> Path:
    """A CSV path value, relative ones taken from the CSV's folder ``base``."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def list_photos(input_path: str | Path) -> list[Photo]:
    """The photos named by ``input_path``: a directory (recursive scan) or a CSV with a ``path`` column."""
    p = Path(input_path)
    if p.is_dir():
        return scan_directory(p)
    if not p.is_file():
        raise InputError(f"input {str(input_path)!r} is neither a directory nor a CSV file")
    rows = read_csv_rows(p)
    return [Photo(row["path"], resolve(row["path"], p.parent)) for row in rows]


def load_photo(path: str | Path) -> np.ndarray:
    """Read and decode one photo to (H, W, 3) uint8 RGB; raises :class:`RejectedError`
    (``image:missing`` when it cannot be read, else :func:`decode_photo`'s reasons)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise RejectedError("image:missing", f"{type(e).__name__}") from e
    return decode_photo(data)
