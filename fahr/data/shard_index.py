"""``index.json``, the description of a shard folder: the one module that reads or writes it.

A shard folder holds webdataset tars and one ``index.json`` (format ``fahr-shards/2``)::

    {"format": "fahr-shards/2",
     "source": "utkface",            # who made the samples ("synthetic", a data set, "cohort")
     "synthetic": false,
     "image_size": 112,              # side of the square crops, pixels
     "splits": {"train": {"count": 14697,
                          "shards": [{"name": "train-000000.tar", "num_samples": 256,
                                      "bytes": 3801600, "sha256": "..."}, ...],
                          "labels": {...}},        # summaries, see fahr.data.shard_writer
                "val": {...}, "test": {...}},
     ...}                            # provenance: "read", "written", "rejected", "options", "generator"

Older files are read as this format: ``fahr-shards/1`` (one unnamed set of shards, written by the
synthetic generator: split ``all``) and ``fahr-shards-splits/1`` (``fahr shards`` output).

Shards are named in an index by plain file names in the index's own folder: an index is data, and a
name such as ``pipe:curl ... | sh``, ``../secret.tar`` or ``http://elsewhere/x.tar`` would make the
reader run a command or read elsewhere, so it is refused (:func:`shard_urls`). ``DIR/index.json``
stands for every shard of every split in the order the index lists them, ``DIR/index.json#train``
for one split (:func:`resolve_shard_spec`); a local index, or an http(s) URL whose shards are read
from the same folder of the same server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from fahr.boundary import InputError, file_sha256, printable_path

FORMAT = "fahr-shards/2"
FLAT_FORMAT = "fahr-shards/1"          # read only: one set of shards (split "all")
SPLITS_FORMAT = "fahr-shards-splits/1"  # read only: `fahr shards` output before fahr-shards/2
INDEX_NAME = "index.json"
#: the split name a fahr-shards/1 index's shards get
FLAT_SPLIT = "all"
MAX_INDEX_BYTES = 256 * 1024 * 1024
#: a shard name inside an index.json: a plain file name (no folder, no scheme, no shell, no braces)
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
#: a split name becomes a file name prefix (``<split>-000000.tar``) and the ``#<split>`` of a spec
SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
_SHARD_KEYS = ("name", "num_samples", "bytes", "sha256")


# ---- locations ------------------------------------------------------------------------------------


def index_path(folder: str | os.PathLike) -> Path:
    """``folder/index.json``."""
    return Path(folder) / INDEX_NAME


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def _read_text(location: str) -> str:
    from fahr.boundary import read_text_file

    if not _is_url(location):
        return read_text_file(location, "shard index", MAX_INDEX_BYTES)
    from urllib.request import urlopen

    try:
        with urlopen(location, timeout=60) as response:
            data = response.read(MAX_INDEX_BYTES + 1)
    except (OSError, ValueError) as err:
        raise InputError(f"shard index not readable: {location}: {err}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise InputError(f"shard index {location}: larger than {MAX_INDEX_BYTES:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"shard index {location}: not UTF-8 text") from None


# ---- reading ----------------------------------------------------------------------------------------


def read_index(location: str | os.PathLike) -> dict[str, Any]:
    """The index at ``location`` (a shard folder, its ``index.json``, or an http(s) URL of one), in
    the ``fahr-shards/2`` form whatever format it was written in.

    Raises:
        InputError: missing, unreadable, not strict JSON, not a fahr shard index, or malformed
            (each split must list its shards with name, num_samples, bytes and sha256, and the
            split's count must be their sum).
    """
    from fahr.boundary import parse_json_text

    location = str(location)
    if not _is_url(location) and (Path(location).is_dir() or not location.endswith(".json")):
        location = str(index_path(location))
    where = location if _is_url(location) else printable_path(location)
    if not _is_url(location) and not Path(location).exists():
        raise InputError(f"shard index not found: {where} (not a fahr shard folder, or writing did not finish)")
    raw = parse_json_text(_read_text(location), f"shard index {where}")
    return normalise(raw, where)


def normalise(raw: Any, where: str) -> dict[str, Any]:
    """An index object of any readable format as ``fahr-shards/2`` (checked; see :func:`read_index`)."""
    if not isinstance(raw, dict):
        raise InputError(f"shard index {where}: expected a JSON object, got {type(raw).__name__}")
    fmt = raw.get("format")
    if fmt == FLAT_FORMAT:
        index = {k: v for k, v in raw.items() if k not in ("num_samples", "num_shards", "shards", "labels")}
        index["splits"] = {FLAT_SPLIT: {"count": raw.get("num_samples"), "shards": raw.get("shards"),
                                        "labels": raw.get("labels", {})}}
    elif fmt in (SPLITS_FORMAT, FORMAT):
        index = dict(raw)
    else:
        raise InputError(f"shard index {where}: format {fmt!r} is not a fahr shard index "
                         f"(reads {FORMAT}, {SPLITS_FORMAT}, {FLAT_FORMAT})")
    index["format"] = FORMAT
    index.setdefault("synthetic", False)
    check_index(index, where)
    return index


def check_index(index: Mapping[str, Any], where: str) -> None:
    """Raise :class:`InputError` naming the first problem of a ``fahr-shards/2`` index object."""
    splits = index.get("splits")
    if not isinstance(splits, dict):  # empty when every photo was rejected
        raise InputError(f"shard index {where}: 'splits' must be an object of split name -> shards")
    size = index.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InputError(f"shard index {where}: image_size must be a positive integer, got {size!r}")
    for split, entry in splits.items():
        if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
            raise InputError(f"shard index {where}: split name {str(split)[:40]!r} is not a plain name "
                             "(a letter, then letters, digits or '_')")
        if not isinstance(entry, dict):
            raise InputError(f"shard index {where}: split {split!r} must be an object")
        shards = entry.get("shards")
        _check_names(shards, f"{where}#{split}")
        total = 0
        for i, s in enumerate(shards):
            bad = [k for k in _SHARD_KEYS[1:3] if isinstance(s.get(k), bool) or not isinstance(s.get(k), int)
                   or s.get(k) < 0]
            if bad or not isinstance(s.get("sha256"), str):
                raise InputError(f"shard index {where}#{split}: shard {i} needs num_samples, bytes (integers >= 0) "
                                 "and sha256")
            total += s["num_samples"]
        count = entry.get("count")
        if count != total:
            raise InputError(f"shard index {where}#{split}: count {count!r} but its shards hold {total} samples")


def _check_names(entries: Any, where: str) -> list[str]:
    """The ``name`` of each shard entry, each a plain file name in the index's folder."""
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: expected a non-empty list of shards")
    names = []
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or name in (".", ".."):
            shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
            raise InputError(f"{where}: shard {i} has the name {shown}: shard names in an index must be plain file "
                             "names in the index's own folder (letters, digits, '.', '_', '-'); commands, "
                             "folders and URLs are only accepted where you type them (data.train_shards=...)")
        names.append(name)
    return names


def split_names(index: Mapping[str, Any], split: str | None) -> list[str]:
    """Shard file names of ``split`` (None: every split, in the index's order)."""
    splits = index["splits"]
    if split is None:
        if not splits:
            raise InputError("the shard index lists no shards (every photo was rejected?)")
        return [s["name"] for entry in splits.values() for s in entry["shards"]]
    if split not in splits:
        raise InputError(f"the shard index has no split {split!r}; it has {sorted(splits)}")
    return [s["name"] for s in splits[split]["shards"]]


def shard_urls(location: str | os.PathLike, split: str | None = None) -> list[str]:
    """The shards an index lists (of ``split``, or of all splits), as absolute paths in the index's
    folder or as URLs in the same folder of the same server."""
    location = str(location)
    index = read_index(location)
    try:
        names = split_names(index, split)
    except InputError as err:
        raise InputError(f"{location}: {err}") from None
    if _is_url(location):
        base = location.rsplit("/", 1)[0]
        return [f"{base}/{name}" for name in names]
    folder = (Path(location) if Path(location).is_dir() else Path(location).parent).absolute()
    return [str(folder / name) for name in names]


def resolve_shard_spec(spec: Any) -> Any:
    """A shard spec with its index references resolved: ``.../index.json`` stands for every shard it
    lists, ``.../index.json#<split>`` for one split (also as entries of a list, which is flattened);
    anything else (paths, brace patterns, URLs and ``pipe:`` commands the user typed) is returned as
    it is."""
    if isinstance(spec, (list, tuple)):
        out: list = []
        for item in spec:
            resolved = resolve_shard_spec(item)
            out.extend(resolved if isinstance(resolved, list) else [resolved])
        return out
    if not isinstance(spec, str) or spec.startswith("pipe:"):
        return spec
    if "index.json#" in spec:
        location, split = spec.rsplit("#", 1)
        return shard_urls(location, split)
    if spec.endswith(INDEX_NAME):
        if not _is_url(spec) and not Path(spec).exists():
            raise InputError(f"shard index not found: {spec}")
        return shard_urls(spec)
    return spec


def index_location(spec: Any) -> Path | None:
    """The local ``index.json`` a shard spec names (``DIR/index.json[#split]``, ``DIR``) or whose tar
    paths sit beside it (one folder); None when there is none or several."""
    specs = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else []
    candidates = set()
    for item in specs:
        if not isinstance(item, str) or "://" in item or item.startswith("pipe:"):
            return None
        path = Path(item.split("#")[0])
        candidates.add(path if path.name == INDEX_NAME else index_path(path) if path.is_dir() else path.parent / INDEX_NAME)
    if len(candidates) != 1:
        return None
    (path,) = candidates
    return path if path.is_file() else None


def sample_counts(shards: list[str]) -> dict[str, int] | None:
    """Samples per local shard path according to the ``index.json`` beside it, or None when a shard
    is not local or not listed by such an index."""
    counts: dict[str, int] = {}
    by_folder: dict[str, dict[str, int]] = {}
    for url in shards:
        if url.startswith("pipe:") or "://" in url:
            return None
        path = url[len("file:"):] if url.startswith("file:") else url
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in by_folder:
            if not index_path(folder).is_file():
                return None
            index = read_index(folder)
            by_folder[folder] = {s["name"]: int(s["num_samples"]) for e in index["splits"].values()
                                 for s in e["shards"]}
        n = by_folder[folder].get(os.path.basename(path))
        if n is None:
            return None
        counts[url] = n
    return counts


def is_shard_index(path: str | os.PathLike) -> bool:
    """True if ``path`` is a readable fahr shard index (of any format)."""
    try:
        read_index(path)
    except InputError:
        return False
    return True


def verify_shards(folder: str | os.PathLike, check_hashes: bool = True) -> dict[str, Any]:
    """The index of ``folder`` after checking that every shard it lists exists with the recorded size
    (and sha256). Raises :class:`InputError` naming the first shard that does not."""
    folder = Path(folder)
    index = read_index(folder)
    for entry in index["splits"].values():
        for s in entry["shards"]:
            path = folder / s["name"]
            if not path.is_file():
                raise InputError(f"shard {path} listed in {INDEX_NAME} is missing")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise InputError(f"shard {path}: {size} bytes on disk, {s['bytes']} in {INDEX_NAME}")
            if check_hashes:
                digest = file_sha256(path)
                if digest != s["sha256"]:
                    raise InputError(f"shard {path}: sha256 {digest} does not match {INDEX_NAME} ({s['sha256']})")
    return index


# ---- writing ----------------------------------------------------------------------------------------


def make_index(source: str, image_size: int, splits: Mapping[str, Mapping[str, Any]], synthetic: bool = False,
               **provenance: Any) -> dict[str, Any]:
    """A ``fahr-shards/2`` index object: ``splits`` maps split names to ``{"count", "shards", "labels"}``
    (what :meth:`fahr.data.shard_writer.ShardWriter.close` returns); ``provenance`` adds top-level
    facts (JSON data) such as ``read``, ``rejected``, ``options`` or ``generator``."""
    reserved = {"format", "source", "synthetic", "image_size", "splits"} & provenance.keys()
    if reserved:
        raise InputError(f"index provenance may not set {sorted(reserved)}")
    index = {"format": FORMAT, "source": source, "synthetic": bool(synthetic), "image_size": image_size,
             "splits": {name: dict(entry) for name, entry in splits.items()}, **provenance}
    try:
        json.dumps(index, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InputError(f"shard index: not finite JSON data ({err})") from None
    return index


def write_index(folder: str | os.PathLike, index: Mapping[str, Any]) -> Path:
    """Check ``index`` and write it atomically as ``folder/index.json`` (the last step of writing a
    shard folder: a folder with an index is complete)."""
    from fahr.utils.atomic import atomic_write_json

    check_index(index, str(index_path(folder)))
    return atomic_write_json(index_path(folder), dict(index))


def remove_index(folder: str | os.PathLike) -> None:
    """Delete ``folder/index.json`` (the first step of replacing a shard folder: the old data set stops
    being valid before any of its shards is replaced)."""
    index_path(folder).unlink(missing_ok=True)


__all__ = ["FORMAT", "INDEX_NAME", "read_index", "normalise", "check_index", "shard_urls", "resolve_shard_spec",
           "index_location", "sample_counts", "is_shard_index", "verify_shards", "make_index", "write_index",
           "remove_index", "index_path", "split_names"]
