"""Generic source: a folder of photos described by a CSV manifest.

Expected layout::

    input_dir/
        manifest.csv          # one row per photo
        <any/relative/path>.jpg

``manifest.csv`` (UTF-8, header row) columns:

- ``file`` (required): the photo's path relative to ``input_dir`` (it may not leave ``input_dir``).
- ``person_id`` (optional): who is in the photo. When the column is absent, or a cell is empty, each
  file is its own person (``person_id`` = the ``file`` value), so person-disjoint splits are then
  image-level.
- ``age`` (optional): years, 0-120; ``sex`` (optional): 0 male / 1 female (``m``/``male``/``f``/``female``
  are accepted); ``race`` (optional): the UTKFace coding 0-4. An empty cell means "unknown" (``None``).
- any other column must be listed in ``keep_columns=[...]``; it is copied verbatim (a string, ``None``
  when empty) into ``labels``. An unlisted column raises ``ValueError`` naming it, so nothing
  unexpected (free text, identifiers) slips into the shards.

Rows are yielded sorted by ``file``. Rejections: ``label:age`` / ``label:sex`` / ``label:race`` for
unparsable or out-of-range labels, ``image:missing`` for a listed file that does not exist,
``image:not_regular`` for one that is a directory, FIFO, device or socket (never opened for
reading: no hang), ``image:too_large`` for one over :data:`MAX_PHOTO_BYTES` (not read),
``image:unreadable`` for one that cannot be read, ``image:path`` for a path outside ``input_dir``,
``duplicate`` for a second row naming the same file.

The manifest is read through :func:`fahr.boundary.read_csv_table`: a regular UTF-8 file with a
header row; a missing, binary, non-UTF-8, header-less or ``;``-separated manifest is an
:class:`~fahr.boundary.InputError` naming the file (and never quoting its cells).

This module also holds the small parsing helpers the other sources share.
"""

from __future__ import annotations

import contextvars

import math
import os
from collections.abc import Iterable, Iterator
from datetime import date
from pathlib import Path
from typing import Any

from data_pipelines.records import Record
from fahr.faces.rejection import RejectedError, Rejection
from fahr.faces.decode import is_photo_name
from fahr.boundary import MAX_PHOTO_BYTES, FileRefused, InputError, read_csv_table, read_regular_file

MANIFEST = "manifest.csv"
LABEL_COLUMNS = ("age", "sex", "race")


# --------------------------------------------------------------------------- shared helpers

def require_dir(input_dir: str | Path) -> Path:
    path = Path(input_dir)
    if not path.is_dir():
        if path.exists():
            raise InputError(f"input {path} is not a directory; give the folder that holds the data set")
        raise InputError(f"input directory not found: {path}")
    return path


def read_csv(path: Path, required: Iterable[str], allowed: Iterable[str] | None = None, what: str = "CSV",
             ) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV with a header row; cells are stripped strings ('' when empty).

    Goes through :func:`fahr.boundary.read_csv_table` (a regular UTF-8 file under the CSV byte cap,
    a header row, no duplicated column names, no row longer than the header). Raises
    :class:`InputError` naming the file: missing or unreadable, not a CSV, the required columns
    that are missing and, when ``allowed`` is given, the columns that are neither required nor
    allowed. Messages name files and columns, never cell values.
    """
    required = list(required)
    header, rows = read_csv_table(path, what, tuple(required))
    if allowed is not None:
        known = set(required) | set(allowed)
        unknown = [name for name in header if name not in known]
        if unknown:
            raise InputError(f"{what} {path}: unexpected column(s) {unknown}; allowed: {sorted(known)}")
    return header, rows


def parse_float(value: Any, field: str) -> float | None:
    """'' / None -> None; otherwise a float (NaN kept so the caller's range check rejects it)."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RejectedError(f"label:{field}", f"not a number: {value!r}") from None


def parse_age(value: Any, field: str = "age", required: bool = False) -> float | None:
    age = parse_float(value, field)
    if age is None:
        if required:
            raise RejectedError(f"label:{field}", "missing")
        return None
    if math.isnan(age) or not 0.0 <= age <= 120.0:
        raise RejectedError(f"label:{field}", f"age out of range [0, 120]: {value!r}")
    return age


_SEX = {"0": 0, "1": 1, "m": 0, "male": 0, "f": 1, "female": 1}


def parse_sex(value: Any) -> int | None:
    """0 male / 1 female; also accepts m/male/f/female and 0.0/1.0; '' -> None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "":
        return None
    if text in ("0.0", "1.0"):
        text = text[0]
    if text not in _SEX:
        raise RejectedError("label:sex", f"expected 0 (male) / 1 (female): {value!r}")
    return _SEX[text]


def parse_int_code(value: Any, field: str, allowed: Iterable[int]) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    number = parse_float(value, field)
    if number is None or math.isnan(number) or number != int(number) or int(number) not in set(allowed):
        raise RejectedError(f"label:{field}", f"expected one of {sorted(set(allowed))}: {value!r}")
    return int(number)


def parse_race(value: Any) -> int | None:
    return parse_int_code(value, "race", range(5))


def parse_date(value: Any, field: str) -> date | None:
    """ISO YYYY-MM-DD -> datetime.date; '' -> None."""
    if value is None or str(value).strip() == "":
        return None
    text = str(value).strip()
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise RejectedError(f"label:{field}", f"not an ISO date YYYY-MM-DD: {value!r}") from None


def unique_manifest_rows(rows: list[dict[str, str]], column: str = "file") -> Iterator[tuple[str, dict[str, str] | None]]:
    """(source id, row) in source-id order; a repeated source id comes with ``None`` (a duplicate row)."""
    seen: set[str] = set()
    for row in sorted(rows, key=lambda r: r[column]):
        source_id = row[column]
        yield source_id, (None if source_id in seen else row)
        seen.add(source_id)


def _inside(relative: str) -> bool:
    """Lexical check (symlinked image folders are fine): not absolute, not escaping with ".."."""
    normal = os.path.normpath(relative)
    return not (os.path.isabs(relative) or normal == ".." or normal.startswith(".." + os.sep))


def read_input_file(input_dir: Path, relative: str, kind: str, max_bytes: int) -> bytes:
    """The bytes of ``input_dir/relative``, a regular file of at most ``max_bytes`` bytes.

    Raises RejectedError ``<kind>:path`` (outside ``input_dir``), ``<kind>:missing``,
    ``<kind>:not_regular`` (directory, FIFO, device, socket: refused without reading, so no hang),
    ``<kind>:too_large`` (refused before reading), ``<kind>:unreadable``. The detail names no path
    (paths of cohort photos may hold names; the rejection's ``source_id`` says which row it is).
    """
    if not relative:
        raise RejectedError(f"{kind}:missing", "empty path")
    if not _inside(relative):
        raise RejectedError(f"{kind}:path", "outside the input directory")
    try:
        return read_regular_file(input_dir / relative, max_bytes)
    except FileRefused as refused:
        raise RejectedError(f"{kind}:{refused.reason}", refused.detail) from None


#: set (by ``data_pipelines.build``) while a source is advanced past items another task reads: the
#: item still counts (its position), its bytes are not read. Sources yield one item per row or file
#: whatever the bytes hold, so positions do not depend on it.
SKIP_IMAGE_BYTES: contextvars.ContextVar[bool] = contextvars.ContextVar("fahr_skip_image_bytes", default=False)


def read_image(input_dir: Path, relative: str) -> bytes:
    """The bytes of ``input_dir/relative`` (not decoded); RejectedError ``image:*`` when unusable
    (see :func:`read_input_file`; the cap is :data:`MAX_PHOTO_BYTES`, looked up at each call).
    Empty, unread, while :data:`SKIP_IMAGE_BYTES` is set."""
    if SKIP_IMAGE_BYTES.get():
        return b""
    return read_input_file(input_dir, relative, "image", MAX_PHOTO_BYTES)


def is_image(path: Path) -> bool:
    """A photo by its name, in a folder listing: an image suffix, not hidden, not a directory.

    Not-regular entries named like photos (a FIFO, a device, a dangling symlink) count: reading them
    gives a counted rejection (``image:not_regular``, ``image:missing``) instead of a silent skip.
    """
    return is_photo_name(path.name) and not path.is_dir()


def reject(source_id: str, error: RejectedError) -> Rejection:
    return Rejection(source_id, error.reason, error.detail)


# --------------------------------------------------------------------------- the source

def iter_records(input_dir: str | Path, keep_columns: Iterable[str] = (),
                 manifest: str = MANIFEST) -> Iterator[Record | Rejection]:
    """Yield one Record or Rejection per manifest row, sorted by ``file`` (see the module docstring)."""
    root = require_dir(input_dir)
    keep = list(keep_columns)
    clash = [name for name in keep if name in ("file", "person_id", *LABEL_COLUMNS)]
    if clash:
        raise InputError(f"keep_columns {clash} are standard columns, not extras")
    header, rows = read_csv(root / manifest, required=["file"], allowed=["person_id", *LABEL_COLUMNS, *keep],
                            what="manifest")
    for source_id, row in unique_manifest_rows(rows):
        if row is None:
            yield Rejection(source_id, "duplicate", "file listed twice in the manifest")
            continue
        try:
            labels: dict[str, Any] = {}
            if "age" in header:
                labels["age"] = parse_age(row["age"])
            if "sex" in header:
                labels["sex"] = parse_sex(row["sex"])
            if "race" in header:
                labels["race"] = parse_race(row["race"])
            for name in keep:
                labels[name] = row.get(name) or None
            image = read_image(root, source_id)
        except RejectedError as error:
            yield reject(source_id, error)
            continue
        person = row.get("person_id") or source_id
        yield Record(source_id=source_id, person_id=person, image=image, labels=labels)
