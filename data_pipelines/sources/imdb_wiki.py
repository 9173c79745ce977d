"""IMDB-WIKI: celebrity photos with age from date of birth and photo year (MATLAB metadata).

Expected layout (the ``imdb_crop.tar`` / ``wiki_crop.tar`` archives, unpacked)::

    input_dir/                   e.g. imdb_crop/
        imdb.mat                 # or wiki.mat (choose with mat_name= when both exist)
        00/nm0000100_rm..._1955-1-6_2011.jpg
        ...
        99/...

The ``.mat`` file holds one struct (``imdb`` or ``wiki``) with parallel 1xN arrays: ``dob`` (MATLAB
datenum of the birth date), ``photo_taken`` (year), ``full_path`` (image path relative to
``input_dir``), ``gender`` (1 male, 0 female, NaN unknown), ``name``, ``face_score`` (-inf when no face
was detected) and ``second_face_score`` (NaN when there is no second face). Reading it needs
``scipy`` (``pip install scipy``).

Labels: ``age`` in whole years, computed as the authors did: the photo is assumed taken on 1 July of
``photo_taken`` and the age is the number of whole years completed by then (the authors' MATLAB
``datevec(datenum(photo_taken,7,1) - dob)``, up to a day at birthdays; the same rule as the common
Python ports). A fractional ``dob`` is floored to its day. ``sex`` converted to our coding (0 male / 1 female,
``None`` when NaN); ``face_score`` and ``second_face_score`` (``None`` when NaN). ``person_id`` is the
celebrity ``name`` (an image with no name is its own person: its ``full_path``). ``source_id`` is
``full_path``; records are yielded sorted by it.

Optional filters (off by default): ``min_face_score`` rejects ``face:score`` below it (including
-inf), ``max_second_face_score`` rejects ``face:multiple`` above it. Other rejections: ``label:dob``
(unusable birth date), ``label:photo_taken``, ``label:age`` (outside 0-120, frequent in IMDB-WIKI),
``label:sex`` (a value other than 0/1/NaN), ``image:missing``, ``image:unreadable``, ``image:path``,
``duplicate``.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from data_pipelines.sources.folder import parse_age, read_image, reject, require_dir
from fahr.boundary import FileRefused, InputError, read_regular_file

#: largest .mat metadata file read (bytes); imdb.mat is ~60 MB
MAX_MAT_BYTES = 1024 * 1024 * 1024
FIELDS = ("dob", "photo_taken", "full_path", "gender", "name", "face_score", "second_face_score")
MATLAB_TO_PYTHON_ORDINAL = 366  # datenum(1,1,1) == 367, date(1,1,1).toordinal() == 1


def age_at_photo(dob: float, photo_taken: float) -> int:
    """Whole years completed on 1 July of ``photo_taken`` by someone born on MATLAB datenum ``dob``."""
    if dob is None or not math.isfinite(dob):
        raise RejectedError("label:dob", f"not a number: {dob!r}")
    if photo_taken is None or not math.isfinite(photo_taken) or not 1 <= photo_taken <= 9999:
        raise RejectedError("label:photo_taken", f"not a year: {photo_taken!r}")
    try:
        birth = date.fromordinal(int(math.floor(dob)) - MATLAB_TO_PYTHON_ORDINAL)
    except (ValueError, OverflowError):
        raise RejectedError("label:dob", f"datenum out of range: {dob!r}") from None
    year = int(photo_taken)
    return year - birth.year - (1 if (birth.month, birth.day) > (7, 1) else 0)


def load_mat(path: Path) -> dict[str, list[Any]]:
    """The metadata struct of ``imdb.mat``/``wiki.mat`` as plain per-field lists (needs scipy)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise InputError("source=imdb_wiki reads its .mat metadata with scipy, which is not installed: "
                         "pip install scipy (or fahr[pipelines])") from None
    try:
        data = read_regular_file(path, MAX_MAT_BYTES)
    except FileRefused as refused:
        raise InputError(f"IMDB-WIKI metadata {path}: {refused.detail}") from None
    try:
        mat = loadmat(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 - scipy raises many types for a corrupt file
        raise InputError(f"IMDB-WIKI metadata {path}: not a readable MATLAB .mat file ({type(error).__name__})") from None
    keys = [k for k in mat if not k.startswith("__")]
    if len(keys) != 1:
        raise InputError(f"{path}: expected one struct (imdb or wiki), found {len(keys)} variables")
    try:
        struct = mat[keys[0]][0, 0]
        names = struct.dtype.names or ()
    except (IndexError, TypeError, AttributeError):
        raise InputError(f"{path}: variable {keys[0]!r} is not a 1x1 MATLAB struct") from None
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise InputError(f"{path}: struct {keys[0]!r} lacks field(s) {missing} (has {list(names)})")
    return {f: [_unwrap(v) for v in np.ravel(struct[f])] for f in FIELDS}


def _unwrap(value: Any) -> Any:
    """loadmat wraps strings/cells in arrays: array(['x']) -> 'x', empty -> None, numbers -> float."""
    while isinstance(value, np.ndarray):
        if value.size == 0:
            return None
        if value.size != 1:
            return value
        value = value.reshape(-1)[0]
    if isinstance(value, (np.floating, np.integer, float, int)):
        return float(value)
    return str(value)


def iter_records(input_dir: str | Path, mat_name: str | None = None, min_face_score: float | None = None,
                 max_second_face_score: float | None = None) -> Iterator[Record | Rejection]:
    """Yield IMDB-WIKI records (see the module docstring)."""
    root = require_dir(input_dir)
    if mat_name is None:
        found = [n for n in ("imdb.mat", "wiki.mat") if os.path.lexists(root / n)]
        if len(found) != 1:
            raise InputError(f"expected exactly one of imdb.mat / wiki.mat in {root} (found {found}); "
                                    "pass mat_name=")
        mat_name = found[0]
    if not os.path.lexists(root / mat_name):
        raise InputError(f"metadata not found: {root / mat_name}")
    yield from iter_records_from_meta(root, load_mat(root / mat_name), min_face_score, max_second_face_score)


def iter_records_from_meta(root: Path, meta: Mapping[str, Sequence[Any]], min_face_score: float | None = None,
                           max_second_face_score: float | None = None) -> Iterator[Record | Rejection]:
    """Records from already-loaded metadata (per-field lists as returned by :func:`load_mat`)."""
    missing = [f for f in FIELDS if f not in meta]
    if missing:
        raise InputError(f"IMDB-WIKI metadata lacks field(s) {missing}")
    n = len(meta["full_path"])
    uneven = [f for f in FIELDS if len(meta[f]) != n]
    if uneven:
        raise InputError(f"IMDB-WIKI metadata fields {uneven} do not have {n} entries like full_path")
    order = sorted(range(n), key=lambda i: str(meta["full_path"][i] or ""))
    seen: set[str] = set()
    for i in order:
        source_id = str(meta["full_path"][i] or "")
        if source_id in seen:
            yield Rejection(source_id, "duplicate", "full_path listed twice")
            continue
        seen.add(source_id)
        try:
            face_score = _number(meta["face_score"][i])
            second = _number(meta["second_face_score"][i])
            if min_face_score is not None and (face_score is None or face_score < min_face_score):
                raise RejectedError("face:score", f"face_score {face_score} < {min_face_score}")
            if max_second_face_score is not None and second is not None and second > max_second_face_score:
                raise RejectedError("face:multiple", f"second_face_score {second} > {max_second_face_score}")
            age = parse_age(age_at_photo(_number(meta["dob"][i]), _number(meta["photo_taken"][i])))
            gender = _number(meta["gender"][i])
            if gender is None:
                sex = None
            elif gender in (0.0, 1.0):
                sex = 0 if gender == 1.0 else 1  # IMDB-WIKI: 1 male, 0 female -> ours: 0 male, 1 female
            else:
                raise RejectedError("label:sex", f"gender {gender!r} not in 0/1/NaN")
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        labels = {"age": age, "sex": sex, "face_score": face_score, "second_face_score": second}
        name = meta["name"][i]
        person = str(name).strip() if name is not None and str(name).strip() else source_id
        yield Record(source_id=source_id, person_id=person, image=image, labels=labels)


def _number(value: Any) -> float | None:
    """float, or None for NaN/missing (keeps -inf, which IMDB-WIKI uses for 'no face')."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number
