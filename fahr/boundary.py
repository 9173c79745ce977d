"""The input boundary: every file, table and output path a user hands a ``fahr`` command crosses here.

Bad input becomes an :class:`InputError` whose message is one line: the file, row, column or key at
fault and what was expected. Messages name what the *user* typed (paths, option keys, column names
they configured) and counts or row numbers, never cell values: clinical tables hold identifiers.

What this module guarantees, for every command that reads through it:

- only regular files are read (a FIFO, a device such as ``/dev/zero``, a directory or a socket is
  refused before a byte is read: no hang, no endless read), and never more than a byte cap;
- text files (CSV, JSON) must be UTF-8 (a leading BOM is accepted) without NUL bytes;
- CSV tables have a header row, the required columns, no duplicated column names, and fields no
  longer than :data:`MAX_CSV_FIELD` characters;
- an output path is checked before any work: not a directory where a file is meant (or the
  reverse), not one of the command's inputs, and its folder can really be written to (a probe file
  is created and removed, which also holds for root, for whom permission bits say nothing);
- text written to output CSV cells is neutralised for spreadsheets (:func:`spreadsheet_safe`) and
  made encodable (:func:`printable_path`).

This module imports nothing heavy (no torch, numpy or pandas), so the command line can use it early.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CsvTable",
    "InputError",
    "MAX_CSV_BYTES",
    "MAX_CSV_FIELD",
    "MAX_JSON_BYTES",
    "MAX_PHOTO_BYTES",
    "FileRefused",
    "check_output_dir",
    "check_regular_file",
    "check_output_file",
    "printable_path",
    "header_hint",
    "read_csv_lines",
    "read_csv_table",
    "read_json_file",
    "read_regular_file",
    "read_text_file",
    "spreadsheet_safe",
]

#: largest photo file read (bytes): a 100-megapixel JPEG is ~30 MB; a bigger "photo" is refused
#: unread (``image:too_large``), before any decoding
MAX_PHOTO_BYTES = 64 * 1024 * 1024
#: largest CSV table read (bytes): 10 million rows of a typical cohort table
MAX_CSV_BYTES = 2 * 1024**3
#: largest JSON file read (model cards, shard indexes, chunk marks), bytes
MAX_JSON_BYTES = 256 * 1024 * 1024
#: longest CSV field (characters); Python's csv module refuses longer fields with this limit
MAX_CSV_FIELD = 1 << 20


class InputError(ValueError):
    """Bad input from the user: a file, row, column, key or option that is not what fahr expects.

    ``fahr <command>`` prints the message as one line (``fahr predict: error: ...``) and exits with
    status 2; other exceptions are fahr's own bugs. A subclass of ``ValueError``, so Python callers
    that caught ``ValueError`` keep working.
    """


class FileRefused(Exception):
    """A file that cannot be read as asked. ``reason`` is a short id (``missing``, ``not_regular``,
    ``too_large``, ``unreadable``, ``empty``); ``detail`` is one human line without file contents."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str | os.PathLike, max_bytes: int) -> int:
    """The size in bytes of ``path`` after checking (without opening it) that it is a regular file of
    at most ``max_bytes``; for readers that open the file themselves (e.g. safetensors, tarfile).

    Raises:
        FileRefused: as :func:`read_regular_file`.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileRefused("missing", "no such file") from None
    except OSError as err:
        raise FileRefused("unreadable", f"cannot stat: {err.strerror or type(err).__name__}") from None
    if not stat.S_ISREG(info.st_mode):
        raise FileRefused("not_regular", f"is {_kind(info.st_mode)}, not a regular file")
    if info.st_size > max_bytes:
        raise FileRefused("too_large", f"{info.st_size:,} bytes, more than the {max_bytes:,}-byte limit")
    return info.st_size


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (check the file first where it is an input:
    :func:`check_regular_file`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` bytes.

    The file is opened non-blocking (opening a FIFO never waits for a writer) and its type checked
    on the open descriptor (no race between a check and the read); at most ``max_bytes + 1`` bytes
    are read, so a file that grows while read is still refused.

    Raises:
        FileRefused: ``missing`` (does not exist, or a path component is not a directory),
            ``not_regular`` (directory, FIFO, device, socket), ``too_large``, ``unreadable``
            (permission or I/O error).
    """
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise FileRefused("missing", "no such file") from None
    except NotADirectoryError:
        raise FileRefused("missing", "a parent of the path is not a directory") from None
    except IsADirectoryError:
        raise FileRefused("not_regular", "is a directory") from None
    except OSError as err:
        if err.errno == errno.ENXIO:  # a FIFO or socket without a peer
            raise FileRefused("not_regular", "not a regular file (FIFO or socket)") from None
        raise FileRefused("unreadable", f"cannot open: {err.strerror or type(err).__name__}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused("not_regular", f"is {_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise FileRefused("too_large", f"{info.st_size:,} bytes, more than the {max_bytes:,}-byte limit")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while True:
            block = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not block:
                break
            chunks.append(block)
            total += len(block)
            if total > max_bytes:
                raise FileRefused("too_large", f"more than the {max_bytes:,}-byte limit (still growing)")
        return b"".join(chunks)
    except OSError as err:
        raise FileRefused("unreadable", f"read error: {err.strerror or type(err).__name__}") from None
    finally:
        os.close(fd)


def _where(path: str | os.PathLike, what: str) -> str:
    return f"{what} {printable_path(path)}" if what else printable_path(path)


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """A UTF-8 text file as ``str`` (BOM dropped, newlines kept).

    ``what`` names the file's role in messages (``"input CSV"``, ``"model card"``).

    Raises:
        InputError: missing, not a regular file, larger than ``max_bytes``, not UTF-8, or holding NUL
            bytes (a binary file), each naming the file and what is expected.
    """
    try:
        data = read_regular_file(path, max_bytes)
    except FileRefused as err:
        raise InputError(f"{_where(path, what)}: {err.detail}") from None
    if b"\x00" in data:
        raise InputError(f"{_where(path, what)}: holds NUL bytes; expected a UTF-8 text file, not a binary one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{_where(path, what)}: not UTF-8 (invalid byte in line {line}, at byte {err.start}); "
                         "save it as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet)") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_json_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file (strict: no NaN/Infinity constants, no duplicate keys, UTF-8).

    Raises:
        InputError: as :func:`read_text_file`, or not valid JSON (naming the line and column).
    """
    return parse_json_text(read_text_file(path, what, max_bytes), _where(path, what))


def parse_json_text(text: str, where: str) -> Any:
    """JSON text, strictly: no NaN/Infinity constants, no duplicate keys. ``where`` names the source
    in messages (``"shard index data/x/index.json"``).

    Raises:
        InputError: not valid JSON (naming the line and column), a duplicated key or a constant.
    """

    def strict_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise InputError(f"{where}: key {key!r} appears twice in one object")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        raise InputError(f"{where}: {name} is not JSON (write null or a finite number)")

    try:
        return json.loads(text, object_pairs_hook=strict_pairs, parse_constant=no_constants)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: nested too deeply to be a fahr file") from None


@dataclass(frozen=True)
class CsvTable:
    """A CSV table as read by :func:`read_csv_lines`: ``columns`` (stripped names), ``rows`` (stripped
    cells, each row as long as the header) and ``lines`` (the file line each row starts on; the header
    is line 1), and ``hint``: what the header looks like when it does not look like column names."""

    columns: list[str]
    rows: list[list[str]]
    lines: list[int]
    hint: str


def header_hint(header: list[str]) -> str:
    """A hint for a header that does not look like column names (never its content): ``;`` or tab
    separated, or data in line 1. Empty when the header looks fine."""
    if len(header) == 1 and ";" in header[0]:
        return "; the file looks ';'-separated: save it comma-separated"
    if len(header) == 1 and "\t" in header[0]:
        return "; the file looks tab-separated: save it comma-separated"

    def number(text: str) -> bool:
        try:
            return math.isfinite(float(text))
        except ValueError:
            return False

    if header and all(number(c) for c in header if c.strip()):
        return "; line 1 looks like data: the first line must hold the column names"
    return ""


def read_csv_lines(path: str | os.PathLike, what: str, max_bytes: int = MAX_CSV_BYTES) -> CsvTable:
    """A CSV table with a header row, cell by cell, with the file line of every row.

    Column names and cells are stripped; blank rows (every cell empty) are skipped; a row shorter than
    the header is padded with ``""``; one longer than the header is an error unless the extra cells
    are empty (Excel's trailing commas). Quoting is strict.

    Raises:
        InputError: as :func:`read_text_file`; an Excel ``sep=`` line; no header; an empty or
            duplicated column name (by position); a row with more cells than the header; a field
            longer than :data:`MAX_CSV_FIELD`; malformed quoting. The message names file lines and
            column positions, never the file's content (a header-less clinical CSV has data in line 1).
    """
    text = read_text_file(path, what, max_bytes)
    where = _where(path, what)
    if text.lstrip().lower().startswith("sep="):
        raise InputError(f"{where}: line 1 is a spreadsheet 'sep=' line: delete it (fahr reads comma-separated CSV "
                         "with the column names in line 1)")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    limit = csv.field_size_limit()
    csv.field_size_limit(MAX_CSV_FIELD)
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        try:
            header = next(reader, None)
            if not header or not any(c.strip() for c in header):
                raise InputError(f"{where}: empty, or no header row (expected column names in line 1)")
            columns = [c.strip() for c in header]
            if "" in columns:
                raise InputError(f"{where}: column {columns.index('') + 1} of the header (line 1) has no name (a row "
                                 "index exported with the table?): name it or delete it")
            for i, name in enumerate(columns):
                if columns.index(name) != i:  # positions, not names: a header-less file has data in line 1
                    raise InputError(f"{where}: columns {columns.index(name) + 1} and {i + 1} of the header have the "
                                     "same name: every column needs its own name")
            width = len(columns)
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue
                if len(cells) > width and any(c.strip() for c in cells[width:]):
                    raise InputError(f"{where}: line {reader.line_num} has {len(cells)} cells, the header {width} "
                                     "(an unquoted comma?)")
                rows.append([c.strip() for c in cells[:width]] + [""] * (width - len(cells)))
                lines.append(reader.line_num)
        except csv.Error as err:
            problem = "a field is too long" if "field larger" in str(err) else "malformed quoting"
            raise InputError(f"{where}: line {reader.line_num} is not valid CSV ({problem})") from None
    finally:
        csv.field_size_limit(limit)
    return CsvTable(columns, rows, lines, header_hint(header))


def read_csv_table(path: str | os.PathLike, what: str, required: tuple[str, ...] = (),
                   max_bytes: int = MAX_CSV_BYTES) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV table with a header row (:func:`read_csv_lines`) as (column names, rows as
    ``{column: stripped text}``), after checking the ``required`` columns are there.

    Raises:
        InputError: as :func:`read_csv_lines`, or missing ``required`` columns (named, with the
            header's column count and a :func:`header_hint`, never its names).
    """
    table = read_csv_lines(path, what, max_bytes)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{_where(path, what)}: missing required column(s) {missing} (the header has "
                         f"{len(table.columns)} column(s)){table.hint}")
    return table.columns, [dict(zip(table.columns, row)) for row in table.rows]


# ---- outputs --------------------------------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in ``folder`` (creating the folder if needed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"{what}: {printable_path(folder)} exists and is not a directory") from None
    except OSError as err:
        raise InputError(f"{what}: cannot create folder {printable_path(folder)} ({err.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".fahr-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise InputError(f"{what}: cannot write in {printable_path(folder)} ({err.strerror})") from None


def check_output_file(path: str | os.PathLike, what: str = "output",
                      inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Check, before any work, that a result file can be written at ``path``.

    Raises:
        InputError: ``path`` is empty, an existing directory, one of ``inputs`` (a file the command
            reads: it would be overwritten), or its folder cannot be created or written to.
    """
    if not str(path).strip():
        raise InputError(f"{what}: empty path; give a file name, e.g. {what}=results.csv")
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what}={printable_path(p)} is a directory; give a file path")
    if p.exists() and not p.is_file():
        raise InputError(f"{what}={printable_path(p)} exists and is not a regular file")
    for source in inputs:
        if source is not None and (_same_file(p, Path(source)) or p.resolve() == Path(source).resolve()):
            raise InputError(f"{what}={printable_path(p)} is also an input of this command; "
                             "refusing to overwrite it: choose another output path")
    _probe_writable(p.parent if str(p.parent) else Path("."), f"{what}={printable_path(p)}")
    return p


def check_output_dir(path: str | os.PathLike, what: str = "output",
                     inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Check, before any work, that results can be written into the directory ``path`` (created if
    missing). Raises :class:`InputError` if it is a file, an input, or not writable."""
    if not str(path).strip():
        raise InputError(f"{what}: empty path; give a directory, e.g. {what}=report/")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what}={printable_path(p)} exists and is not a directory")
    for source in inputs:
        if source is not None and (_same_file(p, Path(source)) or p.resolve() == Path(source).resolve()):
            raise InputError(f"{what}={printable_path(p)} is also an input of this command; choose another directory")
    _probe_writable(p, f"{what}={printable_path(p)}")
    return p


# ---- text that leaves fahr ------------------------------------------------------------------------

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that spreadsheets will not run as a formula (OWASP "CSV injection").

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
    apostrophe, which spreadsheets show as text; numbers (``-3.5``) pass unchanged, as does any
    non-string value.
    """
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    if value[0] in "+-":
        try:
            float(value)
            return value
        except ValueError:
            pass
    return "'" + value


def printable_path(path: str | os.PathLike) -> str:
    """A path as encodable text: bytes that are not UTF-8 (``surrogateescape``) become ``\\xNN``."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
