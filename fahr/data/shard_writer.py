"""Write face crops + labels as webdataset tar shards with a checksummed ``index.json`` (fahr-shards/1).

Each sample is ``{key}.jpg`` (JPEG quality 95, RGB, no EXIF or other metadata) and ``{key}.json``
(UTF-8 label dict, e.g. ``{"age": 43.2, "sex": 1, "health": 0.71}``; age in years). Shards are named
``{prefix}-{shard:06d}.tar`` and ``index.json`` lists them with sample counts, byte sizes and sha256,
plus free-form provenance (e.g. ``"generator"``) and label summaries::

    "labels": {"present": {"age": n, "sex": n, ...},      # samples carrying each label
               "age": {"count", "mean", "std", "min", "max",
                       "histogram_by_decade": {"10-19": n, "20-29": n, ...}},
               "sex": {"0": n, "1": n, "null": n},
               "health": {"count", "mean", "std", "min", "max"}}

Writing is all-or-nothing: each shard is written under a temporary name and renamed when complete,
``index.json`` is written (atomically) last, and a writer that exits with an exception removes its
temporary file and the shards it already finished, so a directory with an ``index.json`` is always a
complete dataset. One writer per directory at a time.

Used by the synthetic generator (:func:`write_synthetic_shards`) and by the real-data pipelines.
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
from typing import Any

import numpy as np
import webdataset
from PIL import Image

from fahr.boundary import InputError, read_json_file
from fahr.data.synthetic import GENERATOR_VERSION, synthetic_face
from fahr.utils.atomic import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = "fahr-shards/1"
INDEX_NAME = "index.json"
JPEG_QUALITY = 95
_RESERVED_INDEX_KEYS = frozenset(
    {"format", "source", "synthetic", "image_size", "num_samples", "num_shards", "shards", "labels"}
)
_REQUIRED_INDEX_KEYS = ("format", "num_samples", "num_shards", "shards")
# a key becomes a tar member name "{key}.jpg"; webdataset splits the name at the first dot
_BAD_KEY = re.compile(r"[./\\\s]|^$")


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
    """Validate a label dict and encode it as compact UTF-8 JSON."""
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
    # the shared label conventions; None means "unknown"
    age, sex, health = clean.get("age"), clean.get("sex"), clean.get("health")
    if age is not None and not (_is_number(age) and age >= 0):
        raise InputError(f"labels for key {key!r}: age must be a non-negative number of years or null, got {age!r}")
    if sex is not None and (isinstance(sex, bool) or sex not in (0, 1)):
        raise InputError(f"labels for key {key!r}: sex must be 0 (male), 1 (female) or null, got {sex!r}")
    if health is not None and not (_is_number(health) and 0.0 <= health <= 1.0):
        raise InputError(f"labels for key {key!r}: health must be a number in [0, 1] or null, got {health!r}")
    return clean, json.dumps(clean, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")


class _LabelStats:
    """Running label summaries for index.json."""

    def __init__(self) -> None:
        self.present: dict[str, int] = {}
        self.age_hist: dict[int, int] = {}
        self.sex: dict[str, int] = {}
        self.moments = {name: [0, 0.0, 0.0, math.inf, -math.inf] for name in ("age", "health")}

    def add(self, labels: dict) -> None:
        for name in labels:
            self.present[name] = self.present.get(name, 0) + 1
        for name, m in self.moments.items():
            x = labels.get(name)
            if x is not None:
                m[0] += 1
                m[1] += x
                m[2] += x * x
                m[3] = min(m[3], x)
                m[4] = max(m[4], x)
        if labels.get("age") is not None:
            decade = int(labels["age"] // 10)
            self.age_hist[decade] = self.age_hist.get(decade, 0) + 1
        if "sex" in labels:
            s = "null" if labels["sex"] is None else str(labels["sex"])
            self.sex[s] = self.sex.get(s, 0) + 1

    def summary(self) -> dict:
        out: dict[str, Any] = {"present": dict(sorted(self.present.items()))}
        for name, (n, s, ss, lo, hi) in self.moments.items():
            if n:
                mean = s / n
                out[name] = {"count": n, "mean": mean, "std": math.sqrt(max(ss / n - mean * mean, 0.0)), "min": lo, "max": hi}
        if self.age_hist:
            out["age"]["histogram_by_decade"] = {f"{10 * d}-{10 * d + 9}": c for d, c in sorted(self.age_hist.items())}
        if self.sex:
            out["sex"] = dict(sorted(self.sex.items()))
        return out


class ShardWriter:
    """Context manager writing (key, image, labels) samples into webdataset shards + index.json.

    Args:
        out_dir: output directory (created if missing).
        prefix: shard name prefix; shards are ``{prefix}-{shard:06d}.tar``.
        samples_per_shard: samples per shard (the last one may hold fewer).
        source: dataset source recorded in index.json (e.g. "synthetic", "utkface").
        synthetic: whether the images are synthetic (recorded in index.json).
        image_size: required side of the square crops, in pixels.
        extra_index: extra top-level index.json entries (e.g. ``{"generator": {...}}``).
        overwrite: if False, refuse a directory that already holds an index.json or shards with this
            prefix; if True, the old index.json is removed at once and stale ``{prefix}-*.tar`` shards
            not in the new dataset are deleted on successful close.

    ``write(key, image, labels)`` takes an (image_size, image_size, 3) uint8 RGB array (encoded to
    JPEG q95) or already-encoded JPEG bytes (checked, metadata stripped). ``close()`` (or leaving the
    ``with`` block normally) finishes the last shard and writes index.json; leaving it with an
    exception calls ``abort()``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        source: str = "unknown",
        synthetic: bool = False,
        image_size: int = 112,
        extra_index: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        if not prefix or _BAD_KEY.search(prefix):
            raise InputError(f"shard prefix must be non-empty without '.', '/', '\\' or whitespace, got {prefix!r}")
        if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
            raise InputError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise InputError(f"image_size must be a positive int, got {image_size!r}")
        extra_index = dict(extra_index or {})
        clash = _RESERVED_INDEX_KEYS & extra_index.keys()
        if clash:
            raise InputError(f"extra_index may not set reserved index.json keys {sorted(clash)}")
        try:
            json.dumps(extra_index, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InputError(f"extra_index is not finite, JSON-serialisable data: {e}") from e

        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self.source = source
        self.synthetic = bool(synthetic)
        self.image_size = image_size
        self.extra_index = extra_index
        self._shard_re = re.compile(re.escape(prefix) + r"-\d{6}\.tar")

        self.out_dir.mkdir(parents=True, exist_ok=True)
        index_path = self.out_dir / INDEX_NAME
        existing = sorted(p.name for p in self.out_dir.iterdir() if self._shard_re.fullmatch(p.name))
        if not overwrite and (index_path.exists() or existing):
            raise InputError(
                f"{self.out_dir} already holds a dataset ({INDEX_NAME} or {prefix}-*.tar); "
                "pass overwrite=True to replace it"
            )
        if index_path.exists():
            index_path.unlink()  # the old dataset stops being valid before any of its shards is replaced

        self._keys: set[str] = set()
        self._shards: list[dict] = []
        self._stats = _LabelStats()
        self._tar: webdataset.TarWriter | None = None
        self._file = None
        self._hashing: _HashingFile | None = None
        self._tmp_path: Path | None = None
        self._in_shard = 0
        self._closed = False
        self.index: dict | None = None

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
        """Finish the last shard, delete stale shards of this prefix, write index.json; returns the index."""
        if self._closed:
            if self.index is None:
                raise RuntimeError("ShardWriter was aborted; there is no index")
            return self.index
        if self._tar is not None:
            self._finish_shard()
        names = {s["name"] for s in self._shards}
        for p in self.out_dir.iterdir():
            if self._shard_re.fullmatch(p.name) and p.name not in names:
                logger.info("removing stale shard %s", p)
                p.unlink()
        index = {
            "format": FORMAT,
            "source": self.source,
            "synthetic": self.synthetic,
            "image_size": self.image_size,
            "num_samples": len(self._keys),
            "num_shards": len(self._shards),
            "shards": self._shards,
            "labels": self._stats.summary(),
            **self.extra_index,
        }
        atomic_write_json(self.out_dir / INDEX_NAME, index)
        self._closed = True
        self.index = index
        logger.info("wrote %d samples in %d shards to %s", index["num_samples"], index["num_shards"], self.out_dir)
        return index

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


def read_index(out_dir: str | os.PathLike) -> dict:
    """Load and sanity-check ``out_dir/index.json`` (format fahr-shards/1)."""
    path = Path(out_dir) / INDEX_NAME
    if not path.exists():
        raise InputError(f"{path} not found: not a fahr shard directory, or writing did not finish")
    index = read_json_file(path, "shard index")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise InputError(f"{path}: expected format {FORMAT!r}, got {got!r}")
    missing = [k for k in _REQUIRED_INDEX_KEYS if k not in index]
    if missing:
        raise InputError(f"{path}: missing keys {missing}")
    return index


def verify_shards(out_dir: str | os.PathLike, check_hashes: bool = True) -> None:
    """Check every shard listed in index.json exists with the recorded size (and sha256).

    Raises FileNotFoundError for a missing shard and ValueError for an inconsistent index or a
    shard whose size or hash differs, naming the shard.
    """
    out_dir = Path(out_dir)
    index = read_index(out_dir)
    shards = index["shards"]
    if len(shards) != index["num_shards"]:
        raise InputError(f"{out_dir / INDEX_NAME}: num_shards={index['num_shards']} but {len(shards)} shards listed")
    total = sum(s["num_samples"] for s in shards)
    if total != index["num_samples"]:
        raise InputError(f"{out_dir / INDEX_NAME}: num_samples={index['num_samples']} but shards hold {total}")
    for s in shards:
        path = out_dir / s["name"]
        if not path.is_file():
            raise InputError(f"shard {path} listed in {INDEX_NAME} is missing")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise InputError(f"shard {path}: {size} bytes on disk, {s['bytes']} in {INDEX_NAME}")
        if check_hashes:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            if h.hexdigest() != s["sha256"]:
                raise InputError(f"shard {path}: sha256 {h.hexdigest()} does not match {INDEX_NAME} ({s['sha256']})")


def synthetic_generator(num_samples: int, samples_per_shard: int, seed: int, image_size: int) -> dict:
    """The generator parameters recorded in a synthetic index.json (equal parameters = same shards)."""
    return {"name": "fahr.data.synthetic", "version": GENERATOR_VERSION, "num_samples": num_samples,
            "samples_per_shard": samples_per_shard, "seed": seed, "image_size": image_size}


def synthetic_shards_ready(out_dir: str | os.PathLike, generator: dict) -> bool:
    """True if ``out_dir`` holds finished synthetic shards made with ``generator`` (sizes checked)."""
    try:
        index = read_index(out_dir)
        if index.get("generator") != generator:
            return False
        verify_shards(out_dir, check_hashes=False)
    except (FileNotFoundError, ValueError):
        return False
    return True


def write_synthetic_shards(
    out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int, seed: int = 0, image_size: int = 112
) -> dict:
    """Write (or reuse) SYNTHETIC face shards ``synthetic-{i:06d}.tar`` with keys ``"%09d" % index``.

    An existing index.json with the same generator parameters (num_samples, samples_per_shard, seed,
    image_size, generator version) whose shards exist with the recorded sizes is reused as is; other
    synthetic shards in ``out_dir`` are replaced, but a directory whose index.json describes a
    non-synthetic dataset raises InputError. Returns the index dict.
    """
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    generator = synthetic_generator(num_samples, samples_per_shard, seed, image_size)
    try:
        index = read_index(out_dir)
    except InputError as e:  # none yet, or unreadable: (re)write
        index = None
        logger.info("writing synthetic shards: %s", e)
    if index is not None:
        if index.get("source") != "synthetic":
            raise InputError(
                f"{out_dir} holds a non-synthetic dataset (source={index.get('source')!r}); refusing to overwrite it"
            )
        if index.get("generator") == generator:
            try:
                verify_shards(out_dir, check_hashes=False)
                logger.info("reusing %d synthetic samples in %s", index["num_samples"], out_dir)
                return index
            except InputError as e:
                logger.warning("regenerating synthetic shards in %s: %s", out_dir, e)
        else:
            logger.info("synthetic shards in %s have other parameters: regenerating", out_dir)
    with ShardWriter(
        out_dir,
        prefix="synthetic",
        samples_per_shard=samples_per_shard,
        source="synthetic",
        synthetic=True,
        image_size=image_size,
        extra_index={"generator": generator},
        overwrite=True,
    ) as writer:
        for i in range(num_samples):
            image, labels = synthetic_face(i, seed, image_size)
            writer.write(f"{i:09d}", image, labels)
    assert writer.index is not None
    return writer.index
