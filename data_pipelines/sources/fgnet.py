"""FG-NET: longitudinal faces (person and age from the file name) with 68-point landmarks.

Two layouts are read.

1. The original distribution (``FGNET.zip``)::

       input_dir/
           images/<PPP>A<AA>[x].JPG     e.g. 001A02.JPG (person 001 at age 2), 001A43a.JPG
           points/<ppp>a<aa>[x].pts     e.g. 001a02.pts (same stem, any case)

   File names are matched case-insensitively; a name not of this form is rejected as
   ``label:filename``. A photo without a ``.pts`` file gets ``landmarks=None``.

2. The layout of ``../shared/data/fgnet`` (used whenever ``manifest.csv`` exists)::

       input_dir/
           manifest.csv    # file,subject,age[,landmarks]; paths relative to input_dir
           images/003A18.JPG
           points/003a18.pts

   The manifest's ``subject`` and ``age`` are used; a ``landmarks`` path that is listed but absent is
   rejected as ``landmarks:missing``.

``.pts`` format (IBUG)::

    version: 1
    n_points: 68
    {
    x y
    ... (68 lines)
    }

Labels: ``age`` (float years). ``person_id`` is the three-digit subject number (``"003"``) in both
layouts. ``landmarks`` is a (68, 2) float array of (x, y) pixel coordinates in the raw photo.
Records are yielded sorted by ``source_id`` (``images/<file name>``). Rejections: ``label:filename``,
``label:age``, ``label:subject``, ``landmarks:missing``, ``landmarks:malformed``, ``landmarks:path``
(outside ``input_dir``), ``landmarks:not_regular`` / ``landmarks:too_large`` / ``landmarks:unreadable``
(a FIFO, device or directory, a file over 64 kB, an I/O error: never read), ``image:missing``,
``image:not_regular``, ``image:too_large``, ``image:unreadable``, ``image:path``, ``duplicate``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from data_pipelines.sources.folder import (
    _inside,
    is_image,
    parse_age,
    parse_int_code,
    read_csv,
    read_image,
    reject,
    require_dir,
    unique_manifest_rows,
)
from fahr.boundary import FileRefused, InputError, read_regular_file

MANIFEST = "manifest.csv"
NUM_POINTS = 68
#: largest .pts file read (bytes); 68 points take about 1 kB
MAX_PTS_BYTES = 64 * 1024
_NAME = re.compile(r"^(\d{3})a(\d{2})([a-z]?)\.jpe?g$", re.IGNORECASE)


def parse_filename(name: str) -> tuple[str, float]:
    """``001A43a.JPG`` -> ("001", 43.0)."""
    match = _NAME.match(Path(name).name)
    if not match:
        raise RejectedError("label:filename", f"expected PPPAaa[x].JPG: {name}")
    return match.group(1), parse_age(match.group(2))


def read_pts(path: Path, num_points: int = NUM_POINTS) -> np.ndarray:
    """Parse an IBUG ``.pts`` file into a (num_points, 2) float array.

    Raises RejectedError ``landmarks:missing`` / ``landmarks:not_regular`` (a directory, FIFO or
    device: never read, so no hang) / ``landmarks:too_large`` (over :data:`MAX_PTS_BYTES`) /
    ``landmarks:unreadable``, or ``landmarks:malformed`` (not ASCII, not the IBUG layout, not
    ``num_points`` finite points).
    """
    try:
        data = read_regular_file(path, MAX_PTS_BYTES)
    except FileRefused as refused:
        raise RejectedError(f"landmarks:{refused.reason}", refused.detail) from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as error:
        raise RejectedError("landmarks:malformed", f"not ASCII text (byte {error.start})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        header = {}
        index = 0
        while index < len(lines) and lines[index] != "{":
            key, _, value = lines[index].partition(":")
            header[key.strip()] = value.strip()
            index += 1
        end = lines.index("}", index)
        points = np.array([[float(v) for v in line.split()] for line in lines[index + 1:end]], dtype=np.float64)
        declared = int(header.get("n_points", num_points))
    except (ValueError, OverflowError) as error:
        raise RejectedError("landmarks:malformed", f"{path.name}: {error}") from None
    if declared != num_points or points.shape != (num_points, 2) or not np.isfinite(points).all():
        raise RejectedError("landmarks:malformed",
                            f"{path.name}: expected {num_points} finite (x, y) points, got {points.shape}")
    return points


def _pts_index(points_dir: Path) -> dict[str, Path]:
    """Lower-cased stem -> .pts path (FG-NET mixes 001A02.JPG with 001a02.pts)."""
    if not points_dir.is_dir():
        return {}
    return {p.stem.lower(): p for p in sorted(points_dir.iterdir()) if p.suffix.lower() == ".pts"}


def iter_records(input_dir: str | Path) -> Iterator[Record | Rejection]:
    """Yield FG-NET records (see the module docstring for the two layouts)."""
    root = require_dir(input_dir)
    if os.path.lexists(root / MANIFEST):  # a FIFO or dangling link here is an error, not another layout
        yield from _from_manifest(root)
    else:
        yield from _from_original(root)


def _from_manifest(root: Path) -> Iterator[Record | Rejection]:
    header, rows = read_csv(root / MANIFEST, required=["file", "subject", "age"], what="manifest")
    for source_id, row in unique_manifest_rows(rows):
        if row is None:
            yield Rejection(source_id, "duplicate", "file listed twice in the manifest")
            continue
        try:
            subject = parse_int_code(row["subject"], "subject", range(1000))
            if subject is None:
                raise RejectedError("label:subject", "missing")
            labels = {"age": parse_age(row["age"], required=True)}
            landmarks = None
            if row.get("landmarks"):
                if not _inside(row["landmarks"]):
                    raise RejectedError("landmarks:path", "outside the input directory")
                landmarks = read_pts(root / row["landmarks"])
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        yield Record(source_id=source_id, person_id=f"{subject:03d}", image=image, labels=labels,
                     landmarks=landmarks)


def _from_original(root: Path) -> Iterator[Record | Rejection]:
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise InputError(f"FG-NET layout expects {images_dir} (or a manifest.csv in {root})")
    pts_index = _pts_index(root / "points")
    for path in sorted((p for p in images_dir.iterdir() if is_image(p)), key=lambda p: p.name):
        source_id = f"images/{path.name}"
        try:
            person, age = parse_filename(path.name)
            pts = pts_index.get(path.stem.lower())
            landmarks = read_pts(pts) if pts is not None else None
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        yield Record(source_id=source_id, person_id=person, image=image, labels={"age": age},
                     landmarks=landmarks)
