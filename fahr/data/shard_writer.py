"""Write face crops + labels as webdataset tar shards: one split of a shard folder.

Each sample is ``{key}.jpg`` (JPEG quality 95, RGB, no EXIF or other metadata) and ``{key}.json``
(the sample's labels as compact UTF-8 JSON, e.g. ``{"age": 43.2, "sex": 1}``). Shards are named
``{prefix}-{shard:06d}.tar``; each is written under a temporary name and renamed when complete, and
a writer that exits with an exception removes its temporary file and the shards it already
finished. :meth:`ShardWriter.close` returns the split's entry of the folder's ``index.json``
(``{"count", "shards", "labels"}``), which the caller writes with :mod:`fahr.data.shard_index` once
every split is done: a folder with an ``index.json`` is always a complete data set.

The writer knows no label names: labels are any JSON data, checked by the caller's ``check_labels``
if given, and summarised as the caller asks (``summaries``, see :class:`LabelSummary`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import webdataset
from PIL import Image

from fahr.boundary import InputError

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95
# a key becomes a tar member name "{key}.jpg"; webdataset splits the name at the first dot
_BAD_KEY = re.compile(r"[./\\\s]|^$")
#: the summaries a label can ask for (see LabelSummary)
SUMMARY_KINDS = ("moments", "decades", "counts")


class _HashingFile:
    """Write-only file wrapper that hashes and counts what passes through (what tarfile writes)."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.discard = False  # set on abort: let tarfile finish without touching the (deleted) file

    def write(self, data) -> int:
        if self.discard:
            return len(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)


def _strip_jpeg_metadata(data: bytes) -> bytes:
    """Drop APP1-APP13/APP15 (EXIF, XMP, ICC, IPTC, ...) and COM segments from a JPEG, losslessly.

    APP0 (JFIF) and APP14 (Adobe; it fixes the colour transform) are kept; the entropy-coded data
    after SOS is copied verbatim.
    """
    out = bytearray(data[:2])
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise InputError("corrupt JPEG: expected a segment marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the rest is image data
            out += data[i:]
            return bytes(out)
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            out += data[i : i + 2]
            i += 2
            continue
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if not (0xE1 <= marker <= 0xEF and marker != 0xEE) and marker != 0xFE:
            out += data[i:end]
        i = end
    raise InputError("corrupt JPEG: no start-of-scan segment")


def _jpeg_bytes(key: str, image: Any, image_size: int) -> bytes:
    """Encode (H, W, 3) uint8 RGB as JPEG q95, or check and strip already-encoded JPEG bytes."""
    want = (image_size, image_size)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if data[:2] != b"\xff\xd8":
            raise InputError(f"image for key {key!r}: bytes are not a JPEG (no SOI marker)")
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode, size = im.format, im.mode, im.size
                im.load()  # catches truncated / undecodable data now rather than at training time
        except (OSError, SyntaxError) as e:
            raise InputError(f"image for key {key!r}: undecodable JPEG bytes ({e})") from e
        if fmt != "JPEG" or mode != "RGB" or size != want:
            raise InputError(
                f"image for key {key!r}: expected a {want[0]}x{want[1]} RGB JPEG, got {fmt} {mode} {size[0]}x{size[1]}"
            )
        try:
            return _strip_jpeg_metadata(data)
        except ValueError as e:
            raise InputError(f"image for key {key!r}: {e}") from e
    if not isinstance(image, np.ndarray):
        raise InputError(f"image for key {key!r}: expected a uint8 ndarray or JPEG bytes, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.shape != (*want, 3):
        raise InputError(
            f"image for key {key!r}: expected uint8 array of shape {(*want, 3)}, got {image.dtype} {image.shape}"
        )
    buf = io.BytesIO()
    # Pillow writes no EXIF/XMP/ICC unless asked to; only the JFIF header
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (json cannot encode np.float32 / np.int64)."""
    return value.item() if isinstance(value, np.generic) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _labels_json(key: str, labels: Any) -> tuple[dict, bytes]:
    """Validate a label dict as finite JSON data and encode it as compact UTF-8 JSON."""
    if not isinstance(labels, dict):
        raise InputError(f"labels for key {key!r} must be a dict, got {type(labels).__name__}")
    clean: dict[str, Any] = {}
    for name, value in labels.items():
        if not isinstance(name, str):
            raise InputError(f"labels for key {key!r}: label names must be strings, got {name!r}")
        value = _plain(value)
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InputError(
                f"labels for key {key!r}: label {name!r}={value!r} is not finite, JSON-serialisable data ({e})"
            ) from e
        clean[name] = value
    return clean, json.dumps(clean, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


class LabelSummary:
    """Summaries of the labels written, for ``index.json``, as the caller asks: ``spec`` maps a label
    name to kinds among ``moments`` (count, mean, std, min, max of a number), ``decades`` (counts per
    10-unit bin, ``"20-29"``) and ``counts`` (counts per value, ``"null"`` for None). Every label name
    seen is counted in ``present``. Summaries of ``counts`` and ``decades`` (and ``present``) add up
    exactly over writers (:meth:`merge`); ``moments`` do not and are refused there."""

    def __init__(self, spec: Mapping[str, Sequence[str]] | None = None) -> None:
        self.spec = {name: tuple(kinds) for name, kinds in (spec or {}).items()}
        for name, kinds in self.spec.items():
            unknown = sorted(set(kinds) - set(SUMMARY_KINDS))
            if unknown:
                raise InputError(f"label summary of {name!r}: unknown kind(s) {unknown} (known: {SUMMARY_KINDS})")
        self.present: dict[str, int] = {}
        self.moments: dict[str, list[float]] = {n: [0, 0.0, 0.0, math.inf, -math.inf]
                                                for n, k in self.spec.items() if "moments" in k}
        self.tallies: dict[tuple[str, str], dict[str, int]] = {}

    def add(self, labels: Mapping[str, Any]) -> None:
        for name in labels:
            self.present[name] = self.present.get(name, 0) + 1
        for name, kinds in self.spec.items():
            x = labels.get(name)
            if "counts" in kinds and name in labels:
                self._tally(name, "counts", "null" if x is None else str(x))
            if x is None or not _is_number(x):
                continue
            if "moments" in kinds:
                m = self.moments[name]
                m[0] += 1
                m[1] += x
                m[2] += x * x
                m[3] = min(m[3], x)
                m[4] = max(m[4], x)
            if "decades" in kinds:
                d = int(x // 10)
                self._tally(name, "decades", f"{10 * d}-{10 * d + 9}")

    def _tally(self, name: str, kind: str, value: str) -> None:
        table = self.tallies.setdefault((name, kind), {})
        table[value] = table.get(value, 0) + 1

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"present": dict(sorted(self.present.items()))}
        for name, (n, total, squares, lo, hi) in self.moments.items():
            if n:
                mean = total / n
                out.setdefault(name, {}).update(count=n, mean=mean, std=math.sqrt(max(squares / n - mean * mean, 0.0)),
                                                min=lo, max=hi)
        for (name, kind), table in sorted(self.tallies.items()):
            out.setdefault(name, {})[kind] = dict(sorted(table.items(), key=lambda kv: _bin_order(kv[0])))
        return out

    @staticmethod
    def merge(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One summary of several writers' summaries of ``counts`` / ``decades`` kinds."""
        out: dict[str, Any] = {"present": {}}
        for summary in summaries:
            for name, n in summary.get("present", {}).items():
                out["present"][name] = out["present"].get(name, 0) + n
            for name, kinds in summary.items():
                if name == "present":
                    continue
                if set(kinds) - {"counts", "decades"}:
                    raise InputError(f"label summary of {name!r}: only counts and decades can be merged")
                for kind, table in kinds.items():
                    target = out.setdefault(name, {}).setdefault(kind, {})
                    for value, n in table.items():
                        target[value] = target.get(value, 0) + n
        out["present"] = dict(sorted(out["present"].items()))
        for name, kinds in out.items():
            if name != "present":
                for kind in kinds:
                    kinds[kind] = dict(sorted(kinds[kind].items(), key=lambda kv: _bin_order(kv[0])))
        return out


def _bin_order(value: str) -> tuple:
    """Numeric order for "20-29" / "3" / "0.5" values, then the rest ("null", text) by name."""
    head = value.split("-", 1)[0] if value[:1] != "-" else value
    try:
        return (0, float(head), value)
    except ValueError:
        return (1, 0.0, value)


class ShardWriter:
    """Context manager writing (key, image, labels) samples into webdataset shards ``{prefix}-*.tar``.

    Args:
        out_dir: the shard folder (created if missing).
        prefix: shard name prefix (the split's name in a ``fahr shards`` folder); shards are
            ``{prefix}-{shard:06d}.tar``.
        samples_per_shard: samples per shard (the last one may hold fewer).
        image_size: required side of the square crops, in pixels.
        summaries: label name -> summary kinds for the index (:class:`LabelSummary`).
        check_labels: called as ``check_labels(key, labels)`` for every sample before it is written;
            raises :class:`InputError` for labels the caller's conventions refuse.
        overwrite: if False, refuse a folder that already holds an ``index.json`` or shards with this
            prefix; if True, stale ``{prefix}-*.tar`` shards not in the new data set are deleted on a
            successful close (the caller removes the old ``index.json`` first).

    ``write(key, image, labels)`` takes an (image_size, image_size, 3) uint8 RGB array (encoded to
    JPEG q95) or already-encoded JPEG bytes (checked, metadata stripped). ``close()`` (or leaving the
    ``with`` block normally) finishes the last shard and returns the split's index entry; leaving it
    with an exception calls ``abort()``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        image_size: int = 112,
        summaries: Mapping[str, Sequence[str]] | None = None,
        check_labels: Callable[[str, dict], None] | None = None,
        overwrite: bool = False,
    ) -> None:
        from fahr.data.shard_index import index_path

        if not prefix or _BAD_KEY.search(prefix):
            raise InputError(f"shard prefix must be non-empty without '.', '/', '\\' or whitespace, got {prefix!r}")
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise InputError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise InputError(f"image_size must be a positive int, got {image_size!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.image_size = image_size
        self.check_labels = check_labels
        self._shard_re = re.compile(re.escape(prefix) + r"-\d{6}\.tar")

        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(p.name for p in self.out_dir.iterdir() if self._shard_re.fullmatch(p.name))
        if not overwrite and (index_path(self.out_dir).exists() or existing):
            raise InputError(
                f"{self.out_dir} already holds a data set (index.json or {prefix}-*.tar); "
                "pass overwrite=True to replace it"
            )

        self._keys: set[str] = set()
        self._shards: list[dict] = []
        self._stats = LabelSummary(summaries)
        self._tar: webdataset.TarWriter | None = None
        self._file = None
        self._hashing: _HashingFile | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0
        self._closed = False
        self.entry: dict | None = None

    # -- context manager ------------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    @property
    def num_written(self) -> int:
        """Samples accepted so far."""
        return len(self._keys)

    def _shard_name(self, i: int) -> str:
        return f"{self.prefix}-{i:06d}.tar"

    def _open_shard(self) -> None:
        name = self._shard_name(len(self._shards))
        self._tmp_path = self.out_dir / f".{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        self._hashing = _HashingFile(self._file)
        # fixed owner and an *int* mtime: identical samples give byte-identical shards, and no
        # per-member PAX header (tarfile writes one for a float mtime, doubling small members)
        self._tar = webdataset.TarWriter(self._hashing, encoder=False, user="fahr", group="fahr", mtime=0)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._hashing is not None
        self._tar.close()  # writes the tar end blocks; leaves our file open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name(len(self._shards))
        os.replace(self._tmp_path, self.out_dir / name)
        self._shards.append(
            {"name": name, "num_samples": self._in_shard, "bytes": self._hashing.bytes, "sha256": self._hashing.sha256.hexdigest()}
        )
        logger.debug("wrote %s (%d samples, %d bytes)", name, self._in_shard, self._hashing.bytes)
        self._tar = self._file = self._hashing = self._tmp_path = None

    def write(self, key: str, image: np.ndarray | bytes, labels: dict) -> None:
        """Add one sample. Raises ValueError (naming the key) on a bad key, image or labels."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not isinstance(key, str) or _BAD_KEY.search(key):
            raise InputError(f"sample key must be a non-empty string without '.', '/', '\\' or whitespace, got {key!r}")
        if key in self._keys:
            raise InputError(f"duplicate sample key {key!r}")
        clean, label_bytes = _labels_json(key, labels)
        if self.check_labels is not None:
            self.check_labels(key, clean)
        jpg = _jpeg_bytes(key, image, self.image_size)
        if self._tar is None:
            self._open_shard()
        self._tar.write({"__key__": key, "jpg": jpg, "json": label_bytes})
        self._keys.add(key)
        self._stats.add(clean)
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish_shard()

    def close(self) -> dict:
        """Finish the last shard and delete stale shards of this prefix; returns the split's index
        entry ``{"count", "shards": [{"name", "num_samples", "bytes", "sha256"}], "labels"}``."""
        if self._closed:
            if self.entry is None:
                raise RuntimeError("ShardWriter was aborted; there is nothing to index")
            return self.entry
        if self._tar is not None:
            self._finish_shard()
        names = {s["name"] for s in self._shards}
        for p in self.out_dir.iterdir():
            if self._shard_re.fullmatch(p.name) and p.name not in names:
                logger.info("removing stale shard %s", p)
                p.unlink()
        self.entry = {"count": len(self._keys), "shards": self._shards, "labels": self._stats.summary()}
        self._closed = True
        logger.info("wrote %d samples in %d shards to %s", len(self._keys), len(self._shards), self.out_dir)
        return self.entry

    def abort(self) -> None:
        """Discard everything this writer wrote: the open temp shard and the finished shards."""
        if self._closed:
            return
        self._closed = True
        if self._tar is not None:
            self._hashing.discard = True
            self._tar.close()
        if self._file is not None:
            self._file.close()
        for path in [self._tmp_path] + [self.out_dir / s["name"] for s in self._shards]:
            if path is not None and path.exists():
                path.unlink()
        self._tar = self._file = self._hashing = self._tmp_path = None
        self._shards = []
        logger.warning("aborted writing %s: removed partial output", self.out_dir)


__all__ = ["ShardWriter", "LabelSummary", "JPEG_QUALITY", "SUMMARY_KINDS"]
