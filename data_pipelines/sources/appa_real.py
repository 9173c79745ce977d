"""APPA-REAL: real and apparent age, per split.

Expected layout (the ``appa-real-release`` archive)::

    input_dir/
        gt_avg_train.csv      # file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age
        gt_avg_valid.csv
        gt_avg_test.csv
        train/NNNNNN.jpg      # the photo named in file_name, e.g. 000000.jpg
        train/NNNNNN.jpg_face.jpg   # the authors' face crop: skipped (never read)
        valid/...
        test/...

By default every split whose ``gt_avg_<split>.csv`` exists is read (``splits=("train", ...)`` to
choose; a requested split whose CSV is missing, or a split name not among these three, raises
:class:`~fahr.boundary.InputError`). Only files named in the
CSVs are read, so the ``_face.jpg`` crops and any other file are ignored; a CSV row naming a
``_face.jpg`` file is skipped too (not counted).

Labels: ``age`` = ``real_age``; ``apparent_age`` = ``apparent_age_avg``; ``apparent_age_std``;
``num_ratings``; ``split`` (the original split name). APPA-REAL has no identities: ``person_id`` is the
file stem (``000000``; stems are unique across the three splits), so person-disjoint splitting is
image-level. ``source_id`` is ``<split>/<file_name>``; records are yielded split by split (train, valid,
test), each sorted by file name. Rejections: ``label:age`` (real age missing/out of range),
``label:apparent_age``, ``label:apparent_age_std``, ``label:num_ratings``, ``image:missing``,
``image:not_regular``, ``image:too_large``, ``image:unreadable``, ``image:path``, ``duplicate``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from data_pipelines.sources.folder import parse_age, parse_float, read_csv, read_image, reject, require_dir
from fahr.boundary import InputError

SPLITS = ("train", "valid", "test")
COLUMNS = ("file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age")
FACE_SUFFIX = "_face.jpg"


def check_options(splits: Iterable[str] | None = None) -> None:
    """The source's options, before any work (``fahr shards`` calls this with ``source_options``)."""
    unknown = [s for s in (splits or ()) if s not in SPLITS]
    if unknown:
        raise InputError(f"APPA-REAL splits {unknown} are not among {list(SPLITS)}")


def iter_records(input_dir: str | Path, splits: Iterable[str] | None = None) -> Iterator[Record | Rejection]:
    """Yield APPA-REAL records (see the module docstring)."""
    check_options(splits)
    root = require_dir(input_dir)
    if splits is None:
        splits = [s for s in SPLITS if (root / f"gt_avg_{s}.csv").is_file()]
        if not splits:
            raise InputError(f"no gt_avg_{{train,valid,test}}.csv in {root}")
    for split in splits:
        _, rows = read_csv(root / f"gt_avg_{split}.csv", required=COLUMNS, what="APPA-REAL CSV")
        seen: set[str] = set()
        for row in sorted(rows, key=lambda r: r["file_name"]):
            name = row["file_name"]
            if name.endswith(FACE_SUFFIX):
                continue
            source_id = f"{split}/{name}"
            if source_id in seen:
                yield Rejection(source_id, "duplicate", "file_name listed twice")
                continue
            seen.add(source_id)
            try:
                labels = {
                    "age": parse_age(row["real_age"], required=True),
                    "apparent_age": parse_age(row["apparent_age_avg"], "apparent_age"),
                    "apparent_age_std": _non_negative(row["apparent_age_std"], "apparent_age_std"),
                    "num_ratings": _non_negative(row["num_ratings"], "num_ratings"),
                    "split": split,
                }
                image = read_image(root, source_id)
            except RejectedError as error:
                yield reject(source_id, error)
                continue
            yield Record(source_id=source_id, person_id=Path(name).stem, image=image, labels=labels)


def _non_negative(value: str, field: str) -> float | None:
    number = parse_float(value, field)
    if number is not None and (math.isnan(number) or number < 0):
        raise RejectedError(f"label:{field}", f"must be >= 0: {value!r}")
    return number
