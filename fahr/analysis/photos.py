"""Photos -> aligned crops for the analysis commands, prepared exactly as ``fahr predict`` prepares them.

The input is what ``fahr predict`` takes (:func:`fahr.inference.photos.list_photos`): a folder, one
photo, or a CSV with a ``path`` column; a CSV may also have an ``age`` column (years; empty where
unknown). Photos that cannot be read or aligned are counted by status, never named in logs.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fahr.boundary import InputError, printable_path


@dataclass
class AlignedPhotos:
    """``crops`` (N, S, S, 3) uint8 of the photos that aligned; ``ages`` (N,) years, NaN where unknown
    (all NaN without an ``age`` column); ``counts``: status -> photos (of the ``considered`` first
    photos); ``prep``: the preprocessing applied; ``points``: the crops' (5, 2) template landmarks."""

    crops: np.ndarray
    ages: np.ndarray
    counts: Counter
    considered: int
    prep: dict[str, Any]
    points: np.ndarray


def _read_ages(input_path: str, n: int) -> np.ndarray:
    """The ``age`` column of an input CSV (NaN for an empty cell; all NaN without the column)."""
    from fahr.faces.decode import PHOTO_SUFFIXES
    from fahr.inference.photos import read_csv_rows

    p = Path(input_path)
    if p.is_dir() or p.suffix.lower() in PHOTO_SUFFIXES:
        return np.full(n, np.nan)
    rows = read_csv_rows(p)
    ages = np.full(len(rows), np.nan)
    if not rows or "age" not in rows[0]:
        return ages[:n]
    for i, row in enumerate(rows[:n]):
        text = row["age"]
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or not 0 <= value <= 150:
            raise InputError(f"input CSV {printable_path(p)}, row {i + 2}: age must be a number of years in "
                             "[0, 150] or empty")
        ages[i] = value
    return ages[:n]


def load_aligned(input_path: str, card: dict[str, Any], overrides: dict[str, Any], max_photos: int) -> AlignedPhotos:
    """The first ``max_photos`` photos of ``input_path``, detected and aligned as the card says
    (:func:`fahr.inference.predict.resolve_preprocessing`; ``overrides`` as ``fahr predict`` takes them).

    Raises:
        InputError: no photos, or none of them could be aligned.
    """
    from fahr.faces.align import template
    from fahr.faces.rejection import RejectedError
    from fahr.inference.photos import list_photos, load_photo, status_of
    from fahr.inference.predict import make_aligner, resolve_preprocessing

    photos = list_photos(input_path)
    if not photos:
        raise InputError(f"no photos in {printable_path(input_path)} (image extensions: jpg, jpeg, png, bmp, gif, "
                         "tif(f), webp, ppm, pgm)")
    photos = photos[:max_photos]
    ages = _read_ages(input_path, len(photos))
    prep = resolve_preprocessing(card, overrides)
    aligner = make_aligner(prep)
    crops, kept, counts = [], [], Counter()
    for i, photo in enumerate(photos):
        try:
            (result,) = aligner.align([load_photo(photo.path)])
        except RejectedError as err:
            result = err
        if isinstance(result, RejectedError):
            counts[status_of(result.reason)] += 1
            continue
        counts["ok"] += 1
        crops.append(result.crop)
        kept.append(i)
    if not crops:
        raise InputError(f"none of the {len(photos)} photos in {printable_path(input_path)} could be aligned "
                         f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    size = int(prep["image_size"])
    return AlignedPhotos(np.stack(crops), ages[kept], counts, len(photos), prep, template(size, float(prep["margin"])))
