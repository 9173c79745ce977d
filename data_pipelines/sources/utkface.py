"""UTKFace: age, sex and race from the file names (or a manifest), no identities.

Two layouts are read.

1. The original distribution (``UTKFace.tar.gz``, "aligned & cropped faces"): one flat folder::

       input_dir/
           <age>_<gender>_<race>_<datetime>.jpg      e.g. 26_0_2_20170104023102422.jpg
           <age>_<gender>_<datetime>.jpg             race missing, e.g. 39_1_20170116174525125.jpg
           (the ``.jpg.chip.jpg`` suffix of some copies is accepted)

   Only image files directly in ``input_dir`` are read (sub-folders and files without an image
   suffix are ignored).
   ``gender`` is 0 male / 1 female, ``race`` 0 White, 1 Black, 2 Asian, 3 Indian, 4 other; a name
   that does not have this form is rejected as ``label:filename``.

2. The cleaned layout of ``../shared/data/utkface`` (used whenever ``manifest.csv`` exists)::

       input_dir/
           manifest.csv     # file,age,gender,race[,sha1]; file relative to input_dir
           images/<age>_<gender>_<race>_<datetime>.jpg

   The manifest's labels are used (an empty ``race`` cell is unknown). In the shared copy the three
   race-less files carry their datetime in the ``race`` column; that value (equal to the file name's
   datetime field) is read as "race unknown". When ``sha1`` is present it is checked against the
   bytes (mismatch -> ``image:checksum``).

Labels: ``age`` (float years), ``sex`` (0 male / 1 female, from ``gender``), ``race`` (0-4 or None).
UTKFace has no person identifiers: ``person_id`` is the SHA-1 of the image bytes, so exact duplicates
share a "person" but person-disjoint splitting is image-level for UTKFace (the same person may appear
in train and test under different photos). Records are yielded sorted by ``source_id`` (the file
name, or the manifest's ``file`` value). Rejections: ``label:filename``, ``label:age``, ``label:sex``,
``label:race``, ``image:missing``, ``image:not_regular`` (a FIFO, device or dangling link named like a
photo: never read), ``image:too_large`` (over the photo byte cap: never read), ``image:unreadable``,
``image:path``, ``image:checksum``, ``duplicate``.
"""

from __future__ import annotations

import os
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from data_pipelines.sources.folder import (
    is_image, parse_age, parse_int_code, parse_race, read_csv, read_image, reject, require_dir,
    unique_manifest_rows,
)

MANIFEST = "manifest.csv"


def parse_filename(name: str) -> dict[str, Any]:
    """``26_0_2_20170104023102422.jpg`` -> {"age": 26.0, "sex": 0, "race": 2, "datetime": "2017..."}."""
    stem = Path(name).name.split(".")[0]
    parts = stem.split("_")
    if not all(part.isdigit() for part in parts) or len(parts) not in (3, 4):
        raise RejectedError("label:filename", f"expected age_gender_race_datetime.jpg: {name}")
    if len(parts) == 3:  # race field missing
        if len(parts[2]) < 8:
            raise RejectedError("label:filename", f"expected age_gender_race_datetime.jpg: {name}")
        age, gender, race, stamp = parts[0], parts[1], None, parts[2]
    else:
        age, gender, race, stamp = parts
    return {"age": parse_age(age), "sex": parse_int_code(gender, "sex", (0, 1)),
            "race": parse_race(race), "datetime": stamp}


def _labels_from_manifest(row: dict[str, str]) -> dict[str, Any]:
    race_cell = row["race"]
    try:
        race = parse_race(race_cell)
    except RejectedError:
        # The shared manifest stores the datetime in `race` for race-less names: treat as unknown.
        try:
            from_name = parse_filename(row["file"])
        except RejectedError:
            from_name = {}
        if from_name.get("race", 0) is None and race_cell == from_name.get("datetime"):
            race = None
        else:
            raise
    age = parse_age(row["age"], required=True)
    sex = parse_int_code(row["gender"], "sex", (0, 1))
    if sex is None:
        raise RejectedError("label:sex", "missing")
    return {"age": age, "sex": sex, "race": race}


def iter_records(input_dir: str | Path, verify_sha1: bool = True) -> Iterator[Record | Rejection]:
    """Yield UTKFace records (see the module docstring for the two layouts)."""
    root = require_dir(input_dir)
    if os.path.lexists(root / MANIFEST):  # a FIFO or dangling link here is an error, not another layout
        yield from _from_manifest(root, verify_sha1)
    else:
        yield from _from_flat_folder(root)


def _from_manifest(root: Path, verify_sha1: bool) -> Iterator[Record | Rejection]:
    _, rows = read_csv(root / MANIFEST, required=["file", "age", "gender", "race"], what="manifest")
    for source_id, row in unique_manifest_rows(rows):
        if row is None:
            yield Rejection(source_id, "duplicate", "file listed twice in the manifest")
            continue
        try:
            labels = _labels_from_manifest(row)
            image = read_image(root, source_id)
            digest = hashlib.sha1(image).hexdigest()
            expected = row.get("sha1", "").lower()
            if verify_sha1 and expected and expected != digest:
                raise RejectedError("image:checksum", f"sha1 {digest} != manifest {expected}")
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        yield Record(source_id=source_id, person_id=digest, image=image, labels=labels)


def _from_flat_folder(root: Path) -> Iterator[Record | Rejection]:
    for path in sorted((p for p in root.iterdir() if is_image(p)), key=lambda p: p.name):
        source_id = path.name
        try:
            parsed = parse_filename(source_id)
            labels = {"age": parsed["age"], "sex": parsed["sex"], "race": parsed["race"]}
            if labels["age"] is None or labels["sex"] is None:
                raise RejectedError("label:filename", f"age or gender missing: {source_id}")
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        yield Record(source_id=source_id, person_id=hashlib.sha1(image).hexdigest(), image=image,
                     labels=labels)
