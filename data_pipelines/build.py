"""Raw photos -> detected, aligned, de-identified, split webdataset shards (`fahr shards`).

Before any work, the options are checked (:func:`data_pipelines.options.check_options`, one-line
errors naming the config key) and so is the output (:func:`check_output`): it must be a new or empty
directory, or an earlier ``fahr shards`` output (a ``parts/`` folder or an ``index.json`` a ``fahr
shards`` run wrote);
a file, a non-empty foreign directory, one of the inputs, a folder holding an input, and a folder
that cannot be written are refused. Entries named like shards or chunk marks that are not regular
files (a directory ``train-000000.tar``, ``index.json`` as a folder) are refused too. A lock
on ``parts/`` keeps a second ``fahr shards`` out of the same output while one runs.

Two passes over the source (both in the source's deterministic order), as the stages of
:mod:`data_pipelines.plan`, each cut into ``tasks`` tasks with results independent of the cut (one
process runs them in turn: :func:`build_shards`; SLURM runs them as array jobs: :func:`run_task`):

1. **Plan** (stages hash, group, assign): every record's bytes are hashed and decoded once (to a
   thumbnail) for perceptual hashes, in ``processes`` worker processes in rounds of ``PLAN_BATCH``
   photos; exact and near duplicates are decided per hash bucket, persons are assigned to splits
   (person-disjoint, stratified) by their rank in a keyed-hash order and cohort anchors (first photo
   date per patient) are collected. Chunk ``c`` belongs to task ``c % tasks`` in both passes.
2. **Write**: records are cut into fixed chunks of ``chunk_size`` source items. Each chunk is
   decoded, aligned, de-identified and written to ``parts/c<chunk>/<split>/`` by
   :class:`fahr.data.shard_writer.ShardWriter` (temp file + rename per shard); then
   ``parts/c<chunk>.json`` (the chunk mark) records its counts, its shards (bytes, sha256 and the
   file's identity: inode and mtime, which a rename keeps) and the chunk's **fingerprint**. Chunks
   run in ``processes`` worker processes, each building its face aligner once.

**The fingerprint** (:func:`chunk_fingerprint`) is a SHA-256 over a canonical JSON stream of
everything that shapes the chunk's shards: a format constant (:data:`CHUNK_FORMAT`, bumped whenever
the writer's output changes) and the versions of the libraries that encode and resize (Pillow,
NumPy, torch, webdataset, Python), the source name, the chunk number, the options (every align
option, ``deidentify``, ``allowed_labels``, ``samples_per_shard``), and every item of the chunk's
range in order: its item id, whether the source or the plan rejected it (and why), else its source
id, person id, the SHA-256 of its image bytes, its labels (dates included), its landmarks, its
person's split and (cohorts) anchor date. With de-identification on, ids enter the stream as their
keyed pseudonyms and the digest is an HMAC keyed by ``HMAC(salt, "fahr-chunk-fingerprint")``: the
mark holds no identifier, no date and nothing that tests a guess without the salt, and another salt
gives another fingerprint. A rerun reuses a finished chunk only if its mark's fingerprint equals the
one computed now *and* every shard of it is still on disk (in ``parts/``, in ``parts/staging/``, or
as a flat shard: found by its identity, else by size and SHA-256); otherwise the chunk is rebuilt.
An edited label, a changed photo, an added or removed row (every later chunk's range moves), another
split decision, ``align.image_size`` or ``samples_per_shard`` all change fingerprints.

Finally (stage final, :func:`final_task`), once every chunk is finished, the shards are placed into one flat series per split, the
webdataset convention: ``<output>/<split>-000000.tar``, ``<split>-000001.tar``, ... (chunks in
order, each chunk's shards in order), so ``<output>/train-{000000..000012}.tar`` works too. Flat
names shift when an earlier chunk gains or loses shards, so the placement (:func:`_place`) works
from where each needed shard *is* (the inventory above), never from names: if anything is to change,
``index.json`` is removed first (a half-placed output has no index); needed shards sitting at another
flat name are moved to ``parts/staging/<sha256>.tar`` (so shifting never clobbers one with another);
every shard is renamed (``os.replace``) to its flat name; flat ``<split>-NNNNNN.tar`` files the new
index does not list are deleted, as are chunk directories, staging leftovers and chunk marks beyond
the current number of chunks; then ``index.json`` is written atomically. Each step is a rename or an
unlink and the chunk marks do not change while shards move, so a crash anywhere followed by a rerun
(with the same or a changed input) converges to what a fresh build of that input gives, byte for
byte: shards and ``index.json``. (Marks whose shards were found only by hashing, e.g. in a copied
output folder, are rewritten with the new identities once everything is placed.) A rerun of an
unchanged input over a finished output moves and rewrites nothing. An input that changes between
the two passes of one run is an :class:`InputError` (rerun when it is stable). ``index.json`` sums the chunks: ``read`` (items the source yielded), ``written``,
``rejected`` (reason -> count; ``read == written + sum(rejected)``) and ``splits`` (split -> count,
shards with their flat names, bytes and sha256, label histograms). The trainer streams a split with
``data.train_shards=<output>/index.json#train``.

Not detected: a shard file edited in place that keeps its size and modification time.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import hashlib
import hmac
import json
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import stat
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.options import AlignOptions, BuildOptions, check_options
from data_pipelines.records import Record, check_labels
from fahr.faces.rejection import RejectedError, Rejection
from fahr.boundary import InputError, check_output_dir, file_sha256, printable_path, read_json_file
from fahr.data import shard_index
from fahr.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)

#: the chunk marks' format; part of every fingerprint: bump it when the written shards change
CHUNK_FORMAT = "fahr-shards-chunk/3"

# ---- checks before any work -----------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: flat shard names in the output folder: ``<split>-NNNNNN.tar``
_FLAT_NAME = re.compile(r"([A-Za-z0-9_]{1,64})-\d{6}\.tar")
_MARK_NAME = re.compile(r"c(\d{6})\.json")
_CHUNK_DIR = re.compile(r"c\d{6}")
STAGING = "staging"


def _is_our_index(path: Path) -> bool:
    """A ``fahr shards`` output's index (a fahr shard index with this module's counts)."""
    try:
        index = shard_index.read_index(path)
    except InputError:
        return False
    return all(k in index for k in ("read", "written", "rejected"))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def check_output(output: str | os.PathLike, inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Check, before any work, that ``output`` can take a ``fahr shards`` build; returns it as a Path.

    Raises:
        InputError: ``output`` is a file; is one of ``inputs`` or holds one; is a non-empty directory
            that is not a ``fahr shards`` output (no ``parts/`` folder and no ``index.json`` a ``fahr
            shards`` run wrote); holds an ``index.json``, a ``parts`` entry, a chunk mark or a
            flat shard name that is not what this command writes there (a directory named
            ``train-000000.tar``, a symbolic link, ...); or cannot be created or written to.
    """
    out = Path(output)
    where = f"output={printable_path(out)}"
    if not str(output).strip():
        raise InputError("output: empty path; give a directory, e.g. output=data/shards")
    if os.path.lexists(out) and not out.is_dir():
        raise InputError(f"{where} exists and is not a directory")
    for source in inputs:
        if source is None or not str(source).strip():
            continue
        resolved_in, resolved_out = Path(source).resolve(), out.resolve()
        if resolved_in == resolved_out:
            raise InputError(f"{where} is also the input of this command; refusing to write into it: "
                             "choose another output directory")
        if resolved_out in resolved_in.parents:
            raise InputError(f"{where} holds the input {printable_path(source)}; refusing to write around "
                             "the input: choose an output directory outside it")
    if out.is_dir():
        entries = {p.name: p for p in out.iterdir()}
        parts, index = out / "parts", out / "index.json"
        ours = parts.is_dir() and not parts.is_symlink() or (index.is_file() and _is_our_index(index))
        if entries and not ours:
            raise InputError(f"{where} is a non-empty directory that is not a `fahr shards` output (no parts/ "
                             "folder, no index.json written by `fahr shards`); refusing to write into it: "
                             "choose a new or empty directory")
        if os.path.lexists(index) and not stat.S_ISREG(os.lstat(index).st_mode):
            raise InputError(f"{printable_path(index)} is {_kind(os.lstat(index).st_mode)}; `fahr shards` writes "
                             "its index there: remove it")
        if os.path.lexists(parts) and (parts.is_symlink() or not parts.is_dir()):
            raise InputError(f"{printable_path(parts)} is not a folder; `fahr shards` keeps its chunks there: "
                             "remove it")
        odd = [p for name, p in entries.items() if _FLAT_NAME.fullmatch(name)
               and not stat.S_ISREG(os.lstat(p).st_mode)]
        if parts.is_dir():
            odd += [p for p in parts.iterdir() if _MARK_NAME.fullmatch(p.name) and not stat.S_ISREG(os.lstat(p).st_mode)]
            staging = parts / STAGING
            if os.path.lexists(staging) and (staging.is_symlink() or not staging.is_dir()):
                odd.append(staging)
            elif staging.is_dir():
                odd += [p for p in staging.iterdir() if not stat.S_ISREG(os.lstat(p).st_mode)]
        if odd:
            raise InputError(f"{printable_path(sorted(odd)[0])} is {_kind(os.lstat(sorted(odd)[0]).st_mode)}, "
                             f"where `fahr shards` keeps its own files ({len(odd)} such entries); remove it")
    check_output_dir(out, "output", inputs=inputs)
    return out


class _Lock:
    """An exclusive ``flock`` on the ``parts/`` folder, held while a build runs: a second ``fahr shards``
    into the same output is refused (no lock file is left behind)."""

    def __init__(self, parts: Path) -> None:
        self.fd: int | None = os.open(parts, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return  # a file system without locks: go on unlocked
            self.release()
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(f"another `fahr shards` is writing into {printable_path(parts.parent)} (its "
                                 "parts/ folder is locked); wait for it to finish, or choose another output") from None
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None


# ---- the plan of a chunk ---------------------------------------------------------------------------------

@dataclass
class Plan:
    read: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # item id -> reason (pass 1)
    split_of_person: dict[str, str] = field(default_factory=dict)
    anchors: dict[str, Any] = field(default_factory=dict)


def _item_id(position: int) -> str:
    return f"{position:09d}"


# ---- pass 2: one chunk ----------------------------------------------------------------------------

_ALIGNERS: dict[AlignOptions, Any] = {}


def _aligner(options: AlignOptions):
    """One aligner per process and options: building MTCNN costs more than aligning a photo."""
    if options not in _ALIGNERS:
        from fahr.faces.align import FaceAligner

        _ALIGNERS[options] = FaceAligner(
            image_size=options.image_size, margin=options.margin, multi_face=options.multi_face,
            min_confidence=options.min_confidence, skip_detection=options.skip_detection)
    return _ALIGNERS[options]


def _labels_for_shard(record: Record) -> dict[str, Any]:
    out = {}
    for key, value in record.labels.items():
        if hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


#: what each split's index entry summarises of the labels (counts only: they add up over chunks)
LABEL_SUMMARIES = {"age": ("decades",), "sex": ("counts",), "race": ("counts",), "event": ("counts",)}


def write_chunk(chunk: int, records: list[tuple[str, Record]], plan_: Plan, options: BuildOptions,
                output: str, source: str, salt: bytes | None, fingerprint: str | None = None) -> dict[str, Any]:
    """Decode, align, de-identify and write one chunk; returns (and stores, as the chunk mark) its
    counts, its shards (with each file's identity) and ``fingerprint``.

    ``plan_`` needs only the split (and, de-identifying, the anchor) of the chunk's persons.
    """
    from data_pipelines.deid import deidentify
    from fahr.faces.decode import decode_photo
    from fahr.data.shard_writer import ShardWriter

    out = Path(output)
    chunk_dir = out / "parts" / f"c{chunk:06d}"
    if chunk_dir.is_dir() and not chunk_dir.is_symlink():  # an interrupted earlier attempt at this chunk
        shutil.rmtree(chunk_dir)
    elif os.path.lexists(chunk_dir):
        chunk_dir.unlink()
    rejected: Counter = Counter()
    images, kept = [], []
    for item_id, record in records:
        try:
            images.append(decode_photo(record.image))
            kept.append((item_id, record))
        except RejectedError as err:
            rejected[err.reason] += 1
    aligned = _aligner(options.align).align(images) if images else []
    del images
    writers: dict[str, ShardWriter] = {}
    written: Counter = Counter()
    try:
        for (item_id, record), face in zip(kept, aligned):
            if isinstance(face, RejectedError):
                rejected[face.reason] += 1
                continue
            split = plan_.split_of_person[record.person_id]
            if options.deid.enabled:
                record = deidentify(record, salt, plan_.anchors.get(record.person_id), options.deid.allowed_labels)
                key = record.source_id
            else:
                key = hashlib.sha256(f"{source}\x00{record.source_id}".encode()).hexdigest()[:24]
            labels = {**_labels_for_shard(record), "person": record.person_id}
            if split not in writers:
                writers[split] = ShardWriter(chunk_dir / split, prefix=split, samples_per_shard=options.samples_per_shard,
                                             image_size=options.align.image_size, summaries=LABEL_SUMMARIES,
                                             check_labels=check_labels)
            writers[split].write(key, face.crop, labels)
            written[split] += 1
        entries = {split: w.close() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    shards: dict[str, list[dict[str, Any]]] = {}
    for split, entry in entries.items():
        shards[split] = []
        for s in entry["shards"]:
            info = os.stat(chunk_dir / split / s["name"])  # the identity a rename keeps: how reruns find it
            shards[split].append({**s, "name": f"parts/c{chunk:06d}/{split}/{s['name']}",
                                  "ino": info.st_ino, "mtime_ns": info.st_mtime_ns})
    summary = {
        "format": CHUNK_FORMAT, "fingerprint": fingerprint,
        "chunk": chunk, "read": len(records), "rejected": dict(rejected), "written": dict(written),
        "shards": shards,
        "labels": {split: entry["labels"] for split, entry in entries.items()},
    }
    atomic_write_json(out / "parts" / f"c{chunk:06d}.json", summary)  # the chunk's completion mark
    return summary


# ---- fingerprints ---------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    """Versions of what encodes, resizes, detects and packs the crops: a part of every fingerprint."""
    from importlib import metadata

    out = {"python": "%d.%d" % sys.version_info[:2]}
    for dist in ("pillow", "numpy", "torch", "webdataset"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _canonical(value: Any) -> Any:
    """JSON for what labels and plans hold beyond JSON types (``json.dumps(default=...)``)."""
    if isinstance(value, dt.date):  # and datetime
        return {"date": value.isoformat()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot fingerprint a value of type {type(value).__name__}")


class _Digest:
    """SHA-256 (or, keyed, HMAC-SHA256) of a stream of length-prefixed canonical JSON values."""

    def __init__(self, key: bytes | None) -> None:
        self._h = hmac.new(key, digestmod=hashlib.sha256) if key is not None else hashlib.sha256()

    def add(self, value: Any) -> None:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=_canonical).encode("ascii")
        self._h.update(b"%d:" % len(data))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def chunk_fingerprint(chunk: int, entries: list[tuple[str, Record | None]], plan_: Plan, options: BuildOptions,
                      source: str, salt: bytes | None, versions: dict[str, str]) -> str:
    """The fingerprint of one chunk (see the module docstring): ``entries`` are every item of the
    chunk's range in order, ``(item id, record)`` or ``(item id, None)`` for an item the source or
    the plan rejected."""
    from data_pipelines.deid import pseudonym

    key = hmac.new(salt, b"fahr-chunk-fingerprint", hashlib.sha256).digest() if options.deid.enabled else None
    digest = _Digest(key)
    digest.add({"format": CHUNK_FORMAT, "versions": versions, "source": source, "chunk": chunk,
                "align": asdict(options.align), "deidentify": options.deid.enabled,
                "allowed_labels": sorted(set(options.deid.allowed_labels)),
                "samples_per_shard": options.samples_per_shard})
    for item_id, record in entries:
        if record is None:
            digest.add({"id": item_id, "rejected": plan_.rejected[item_id]})
            continue
        person, source_id = record.person_id, record.source_id
        anchor = None
        if options.deid.enabled:
            anchor = plan_.anchors.get(person)
            person, source_id = pseudonym(person, salt), pseudonym(source_id, salt, length=24)
        digest.add({
            "id": item_id, "source_id": source_id, "person": person,
            "sha256": hashlib.sha256(record.image).hexdigest(), "labels": record.labels,
            "landmarks": None if record.landmarks is None else np.asarray(record.landmarks, np.float64).tolist(),
            "split": plan_.split_of_person[record.person_id], "anchor": anchor,
        })
    return digest.hexdigest()


# ---- chunk marks and where their shards are --------------------------------------------------------

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _mark_path(output: Path, chunk: int) -> Path:
    return output / "parts" / f"c{chunk:06d}.json"


def _valid_mark(mark: Any, chunk: int, splits: set[str]) -> bool:
    """A chunk mark this module wrote for ``chunk`` (format, types, names), whatever its fingerprint."""
    if not (isinstance(mark, dict) and mark.get("format") == CHUNK_FORMAT and mark.get("chunk") == chunk
            and isinstance(mark.get("fingerprint"), str) and isinstance(mark.get("rejected"), dict)
            and isinstance(mark.get("written"), dict) and isinstance(mark.get("shards"), dict)
            and isinstance(mark.get("labels"), dict)):
        return False
    if not all(isinstance(k, str) and _is_int(v) and v > 0 for k, v in mark["rejected"].items()):
        return False
    written, shards = mark["written"], mark["shards"]
    if set(written) != set(shards) or not set(written) <= splits or not set(mark["labels"]) <= set(written):
        return False
    for split, series in shards.items():
        if not isinstance(series, list) or not _is_int(written[split]):
            return False
        for i, s in enumerate(series):
            if not (isinstance(s, dict) and s.get("name") == f"parts/c{chunk:06d}/{split}/{split}-{i:06d}.tar"
                    and all(_is_int(s.get(k)) and s[k] >= 0 for k in ("num_samples", "bytes"))
                    and _is_int(s.get("ino")) and _is_int(s.get("mtime_ns"))
                    and isinstance(s.get("sha256"), str) and _SHA256.fullmatch(s["sha256"])):
                return False
        if sum(s["num_samples"] for s in series) != written[split]:
            return False
    for summary in mark["labels"].values():
        if not isinstance(summary, dict) or not all(
                isinstance(kinds, dict) and all(isinstance(table, dict) and all(isinstance(k, str) and _is_int(v)
                                                                             for k, v in table.items())
                                                for table in kinds.values()) if name != "present" else
                isinstance(kinds, dict) and all(isinstance(k, str) and _is_int(v) for k, v in kinds.items())
                for name, kinds in summary.items()):
            return False
    return True


def _load_mark(output: Path, chunk: int, fingerprint: str, splits: set[str]) -> dict[str, Any] | None:
    """The chunk's mark if it is valid and its fingerprint is ``fingerprint``, else None (rebuild)."""
    path = _mark_path(output, chunk)
    if not os.path.lexists(path):
        return None
    try:
        mark = read_json_file(path, "chunk mark")
    except InputError:
        log.warning("chunk %d: its mark is unreadable; rebuilding the chunk", chunk)
        return None
    if not _valid_mark(mark, chunk, splits):
        log.info("chunk %d: its mark is from another version of fahr shards; rebuilding the chunk", chunk)
        return None
    if mark["fingerprint"] != fingerprint:
        log.info("chunk %d: its input or options changed since it was written; rebuilding the chunk", chunk)
        return None
    return mark


class _Inventory:
    """Where shard files are now, taken before any work: the flat shards in the output folder and the
    files in ``parts/staging/``, by identity (inode, mtime, size: what a rename keeps) and by size.

    A chunk mark's shard is found in its chunk folder or here by the identity the mark recorded,
    else (e.g. the output folder was copied) among the files of its size by SHA-256."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.by_identity: dict[tuple[int, int, int], Path] = {}
        self.by_size: dict[int, list[Path]] = defaultdict(list)
        self._sha256: dict[Path, str] = {}
        for path in sorted(output.iterdir()):
            if _FLAT_NAME.fullmatch(path.name):
                self._add(path)
        staging = output / "parts" / STAGING
        if staging.is_dir():
            for path in sorted(staging.iterdir()):
                self._add(path)

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int] | None:
        try:
            info = os.lstat(path)
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size) if stat.S_ISREG(info.st_mode) else None

    def _add(self, path: Path) -> None:
        identity = self._identity(path)
        if identity is not None:
            self.by_identity[identity] = path
            self.by_size[identity[2]].append(path)

    def _hash(self, path: Path) -> str:
        if path not in self._sha256:
            self._sha256[path] = file_sha256(path)
        return self._sha256[path]

    def locate(self, shard: dict[str, Any]) -> tuple[Path | None, bool]:
        """(where the shard's bytes are, or None; whether it was found by hashing)."""
        recorded = (shard["ino"], shard["mtime_ns"], shard["bytes"])
        in_chunk = self.output / shard["name"]
        identity = self._identity(in_chunk)
        if identity == recorded:
            return in_chunk, False
        if recorded in self.by_identity:
            return self.by_identity[recorded], False
        candidates = ([in_chunk] if identity is not None and identity[2] == shard["bytes"] else [])
        for path in candidates + self.by_size.get(shard["bytes"], []):
            if self._hash(path) == shard["sha256"]:
                return path, True
        return None, False


def _locate_chunk(inventory: _Inventory, mark: dict[str, Any]) -> tuple[dict[str, list[Path]] | None, bool]:
    """Where every shard of a finished chunk is ({split: [path]}), or None if one is gone; and whether
    some were found only by hashing (their identity in the mark is then refreshed after placing)."""
    where: dict[str, list[Path]] = {}
    rehashed = False
    for split, series in mark["shards"].items():
        where[split] = []
        for shard in series:
            path, by_hash = inventory.locate(shard)
            if path is None:
                log.info("chunk %d: a shard of it is gone; rebuilding the chunk", mark["chunk"])
                return None, False
            where[split].append(path)
            rehashed |= by_hash
    return where, rehashed


# ---- driver ---------------------------------------------------------------------------------------

def _input_changed(position: int) -> InputError:
    return InputError(f"the input changed while `fahr shards` was reading it (its two passes differ at item "
                      f"{position + 1}); rerun when the input is stable")


def _chunks(make_items: Callable[[], Iterable[Record | Rejection]], options: BuildOptions, task: int, tasks: int,
            total: int, rejected: dict[int, str], plans: dict[int, list[Any]],
            ) -> Iterator[tuple[int, list[tuple[str, Record | None]], Plan]]:
    """(chunk number, [(item id, record, or None if rejected)] for every item of its range, the chunk's
    plan) for the chunks of write task ``task``, in source order. Raises InputError if the items are not
    those pass 1 planned (count, rejections, persons, image bytes)."""
    from data_pipelines.plan import date_from_json, iter_positions, task_of
    from data_pipelines.splits import rank_key

    current, entries, plan_, last = -1, [], Plan(), -1
    owned = functools.partial(lambda p, size: task_of(p, size, tasks) == task, size=options.chunk_size)
    for position, item in iter_positions(make_items, owned):
        last = position
        if position >= total:
            raise _input_changed(position)
        if item is None:
            continue
        chunk = position // options.chunk_size
        if chunk != current:
            if entries:
                yield current, entries, plan_
            current, entries, plan_ = chunk, [], Plan()
        item_id = _item_id(position)
        planned = plans.get(position)
        reason = rejected.get(position) or (planned[4] if planned is not None else None)
        if isinstance(item, Rejection) or reason is not None:
            if reason is None:
                raise _input_changed(position)
            plan_.rejected[item_id] = reason
            entries.append((item_id, None))
            continue
        if (planned is None or planned[0] != rank_key(item.person_id, options.split.seed)
                or planned[1] != hashlib.sha256(item.image).hexdigest()):
            raise _input_changed(position)
        plan_.split_of_person[item.person_id] = planned[2]
        anchor = date_from_json(planned[3])
        if anchor is not None:
            plan_.anchors[item.person_id] = anchor
        entries.append((item_id, item))
    if last + 1 != total:
        raise _input_changed(last + 1)
    if entries:
        yield current, entries, plan_


def _prepare(source: str, output: str | Path, options: BuildOptions,
             inputs: tuple[str | os.PathLike | None, ...]) -> tuple[BuildOptions, bytes | None, Path]:
    """Options, de-identification salt and output, checked before any work (InputError)."""
    from data_pipelines.deid import load_salt

    check_options(options)
    options = options.resolved(source)
    salt = load_salt(options.deid.key_file) if options.deid.enabled else None
    output = check_output(output, inputs)
    (output / "parts").mkdir(exist_ok=True)
    return options, salt, output


def _pool(options: BuildOptions) -> Any:
    # spawn, not fork: the parent may already hold torch threads
    return multiprocessing.get_context("spawn").Pool(options.processes) if options.processes > 1 else None


def build_shards(
    source: str, make_items: Callable[[], Iterable[Record | Rejection]], output: str | Path,
    options: BuildOptions, progress: Callable[[int], None] | None = None,
    inputs: tuple[str | os.PathLike | None, ...] = (), tasks: int = 1,
) -> dict[str, Any]:
    """Run both passes in this process and write ``<output>/index.json``; returns the index.

    The stages of :mod:`data_pipelines.plan` run one after another, each as ``tasks`` tasks (the
    result does not depend on ``tasks``; a SLURM build runs the same tasks as array jobs).
    ``make_items`` must yield the same items in the same order each call (sources are deterministic).
    ``inputs`` are the paths the source reads (the output may not be one of them, nor hold one).
    Options, output and de-identification salt are checked before any work (:class:`InputError`).
    ``progress`` is called with the number of items of each chunk pass 2 finishes.
    """
    from data_pipelines import plan

    options, salt, output = _prepare(source, output, options, inputs)
    lock = _Lock(output / "parts")
    pool = None
    try:
        run = secrets.token_hex(8)
        plan.start_run(output, source, options, tasks, run)
        pool = _pool(options)
        for t in range(tasks):
            plan.hash_task(make_items, options, output, t, tasks, run, pool)
        for t in range(tasks):
            plan.group_task(options, output, t, tasks, run)
        for t in range(tasks):
            plan.assign_task(options, output, t, tasks, run)
        for t in range(tasks):
            write_task(source, make_items, output, options, salt, t, tasks, run, pool, progress)
        return final_task(source, output, options, tasks, run)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        lock.release()


def run_task(stage: str, task: int, tasks: int, run: str, source: str,
             make_items: Callable[[], Iterable[Record | Rejection]], output: str | Path, options: BuildOptions,
             inputs: tuple[str | os.PathLike | None, ...] = ()) -> dict[str, Any]:
    """One task of one stage of a build started by :func:`data_pipelines.plan.start_run` (a SLURM array
    task); tasks of a stage run at once, so no lock is taken: each writes only its own files."""
    from data_pipelines import plan

    options, salt, output = _prepare(source, output, options, inputs)
    plan.check_run(output, source, options, tasks, run)
    if stage in ("group", "assign"):
        return getattr(plan, f"{stage}_task")(options, output, task, tasks, run)
    if stage == "final":
        return final_task(source, output, options, tasks, run)
    pool = _pool(options)
    try:
        if stage == "hash":
            return plan.hash_task(make_items, options, output, task, tasks, run, pool)
        return write_task(source, make_items, output, options, salt, task, tasks, run, pool)
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def write_task(source: str, make_items: Callable[[], Iterable[Record | Rejection]], output: Path,
               options: BuildOptions, salt: bytes | None, task: int, tasks: int, run: str, pool: Any = None,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Pass 2 for the chunks of task ``task`` (chunk % tasks == task): each is reused if its mark has
    the fingerprint computed now and its shards are on disk, else written; then ``parts/plan/w<task>.json``
    records the task's fingerprints and counts for :func:`final_task`. Returns that record."""
    from data_pipelines.plan import Progress, hash_result, item_plans, plan_dir

    done, rejected = hash_result(output, task, run)
    plans = item_plans(output, task, tasks, run)
    inventory = _Inventory(output)
    versions = library_versions()
    splits = set(options.split.fractions)
    fingerprints: dict[int, str] = {}
    planned_rejections: Counter = Counter()
    meter = Progress(f"pass 2, write task {task + 1}/{tasks}", progress)
    in_flight: list[tuple[Any, int]] = []
    own = 0
    for chunk, entries, plan_ in _chunks(make_items, options, task, tasks, done["read"], rejected, plans):
        own += len(entries)
        planned_rejections.update(plan_.rejected.values())
        fingerprint = fingerprints[chunk] = chunk_fingerprint(chunk, entries, plan_, options, source, salt, versions)
        mark = _load_mark(output, chunk, fingerprint, splits)
        if mark is not None and _locate_chunk(inventory, mark)[0] is not None:
            meter(len(entries))  # finished by an earlier run, for this very input and options
            continue
        records = [(item_id, r) for item_id, r in entries if r is not None]
        args = (chunk, records, plan_, options, str(output), source, salt, fingerprint)
        count = len(entries)
        del entries
        if pool is None:
            write_chunk(*args)
            meter(count)
        else:
            in_flight.append((pool.apply_async(write_chunk, args), count))
            while len(in_flight) >= 2 * options.processes:  # bounded: chunks carry image bytes
                job, n = in_flight.pop(0)
                job.get()
                meter(n)
    for job, n in in_flight:
        job.get()
        meter(n)
    result = {"run": run, "total": done["read"], "read": own, "rejected": dict(sorted(planned_rejections.items())),
              "chunks": {str(c): fp for c, fp in sorted(fingerprints.items())}}
    atomic_write_json(plan_dir(output) / f"w{task:04d}.json", result)
    meter.report(final=True)
    return result


def final_task(source: str, output: Path, options: BuildOptions, tasks: int, run: str) -> dict[str, Any]:
    """The last step: every chunk of this run finished (its mark has the fingerprint its write task
    computed, its shards are on disk), then the flat series and ``index.json`` (:func:`_place`); the
    plan's work files are removed. Returns the index."""
    from data_pipelines.plan import _done, plan_dir

    results = [_done(plan_dir(output) / f"w{t:04d}.json", run, f"pass 2 write task {t}") for t in range(tasks)]
    total = results[0]["total"]
    fingerprints = {int(c): fp for r in results for c, fp in r["chunks"].items()}
    n_chunks = -(-total // options.chunk_size)
    if sorted(fingerprints) != list(range(n_chunks)) or sum(r["read"] for r in results) != total:
        raise InputError(f"the write tasks of this run cover {len(fingerprints)} of {n_chunks} chunks; "
                         "rerun the build")
    planned_rejections: Counter = Counter()
    for r in results:
        planned_rejections.update(r["rejected"])
    inventory = _Inventory(output)
    splits = set(options.split.fractions)
    summaries, located, rehashed = [], {}, []
    for chunk in range(n_chunks):
        mark = _load_mark(output, chunk, fingerprints[chunk], splits)
        where, by_hash = _locate_chunk(inventory, mark) if mark is not None else (None, False)
        if where is None:
            raise InputError(f"chunk {chunk} is not finished (its mark is missing or stale, or a shard of it is "
                             f"gone); rerun write task {chunk % tasks}, then this step")
        summaries.append(mark)
        located[chunk] = where
        if by_hash:
            rehashed.append(chunk)
    moves = _flat_plan(summaries, located)
    index = _merge(source, total, planned_rejections, summaries, options, moves)  # checks the counts first
    _place(output, moves, index, n_chunks)
    for chunk in rehashed:  # found by hashing (a copied output folder): record the identities they have now
        _refresh_identities(output, summaries[chunk], index)
    shutil.rmtree(plan_dir(output))
    return index


# ---- final step: one flat series of shards per split ----------------------------------------------

def _flat_plan(summaries: list[dict[str, Any]], located: dict[int, dict[str, list[Path]]],
               ) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """split -> [(where the shard is now, its index entry under its flat name)]: chunks in order, each
    chunk's shards in order; the k-th shard of a split becomes ``<split>-{k:06d}.tar``."""
    moves: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for s in summaries:
        for split in sorted(s["shards"]):
            series = moves.setdefault(split, [])
            for shard, where in zip(s["shards"][split], located[s["chunk"]][split]):
                series.append((where, {"name": f"{split}-{len(series):06d}.tar", "num_samples": shard["num_samples"],
                                       "bytes": shard["bytes"], "sha256": shard["sha256"]}))
    return moves


def _place(output: Path, moves: dict[str, list[tuple[Path, dict[str, Any]]]], index: dict[str, Any],
           n_chunks: int) -> None:
    """Put every shard at its flat name, remove what the new index does not list, write ``index.json``.

    Crash-safe by construction: ``index.json`` goes first (if anything is to change), then only
    renames and unlinks; the marks are left as they are, so a rerun finds every needed shard again
    (by identity) wherever a crash left it.
    """
    parts, staging, index_path = output / "parts", output / "parts" / STAGING, output / "index.json"
    wanted = [(where, output / entry["name"], entry) for series in moves.values() for where, entry in series]
    shas = [entry["sha256"] for _, _, entry in wanted]
    if len(set(shas)) != len(shas):  # sample keys are unique, so shards are: two equal ones are a bug
        raise AssertionError("two shards of one build have the same sha256")
    targets = {dst.name for _, dst, _ in wanted}
    present = {p.name for p in output.iterdir() if _FLAT_NAME.fullmatch(p.name)}
    try:
        current = shard_index.read_index(output) if os.path.lexists(index_path) else None
    except InputError:
        current = None
    if any(where != dst for where, dst, _ in wanted) or present - targets or current != index:
        shard_index.remove_index(output)  # a half-placed output has no index
        _fsync_dir(output)
    # 1. needed shards at another flat name move aside, so that no rename below clobbers a needed one
    placed = []
    for where, dst, entry in wanted:
        if where.parent == output and where != dst:
            staging.mkdir(exist_ok=True)
            staged = staging / f"{entry['sha256']}.tar"
            os.replace(where, staged)
            where = staged
        placed.append((where, dst))
    # 2. every shard to its flat name (over a stale file, or none)
    for where, dst in placed:
        if where != dst:
            os.replace(where, dst)  # same file system: atomic
    _fsync_dir(output)  # the renames are durable before index.json names the new files
    # 3. what the new index does not list: stale flat shards, chunk folders, staging, extra marks
    for name in sorted(present - targets):
        (output / name).unlink(missing_ok=True)
    for path in sorted(parts.iterdir()):
        mark = _MARK_NAME.fullmatch(path.name)
        if _CHUNK_DIR.fullmatch(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif mark and int(mark.group(1)) >= n_chunks:
            path.unlink()
    if staging.is_dir():
        shutil.rmtree(staging)
    for path in output.glob(".index.json.*.tmp"):  # an atomic write killed before its rename
        path.unlink(missing_ok=True)
    if current != index or not index_path.is_file():
        shard_index.write_index(output, index)


def _refresh_identities(output: Path, mark: dict[str, Any], index: dict[str, Any]) -> None:
    """Rewrite a reused chunk mark with the identities its shards have now (they were found by hash)."""
    flat = {entry["sha256"]: output / entry["name"] for e in index["splits"].values() for entry in e["shards"]}
    for series in mark["shards"].values():
        for shard in series:
            info = os.stat(flat[shard["sha256"]])
            shard["ino"], shard["mtime_ns"] = info.st_ino, info.st_mtime_ns
    atomic_write_json(_mark_path(output, mark["chunk"]), mark)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _merge(source: str, read: int, planned_rejections: Counter, summaries: list[dict[str, Any]],
           options: BuildOptions, moves: dict[str, list[tuple[Path, dict[str, Any]]]]) -> dict[str, Any]:
    from fahr.data.shard_writer import LabelSummary

    rejected = Counter(planned_rejections)
    counts: Counter = Counter()
    labels: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        rejected.update(s["rejected"])
        counts.update(s["written"])
        for split, summary in s["labels"].items():
            labels[split].append(summary)
    splits = {split: {"count": counts[split],
                      "shards": [shard for _, shard in moves.get(split, [])],  # under their final, flat names
                      "labels": LabelSummary.merge(labels[split])}
              for split in sorted(counts)}
    written = sum(counts.values())
    if read != written + sum(rejected.values()):
        raise AssertionError(f"records lost: read {read} != written {written} + rejected {sum(rejected.values())}")
    return shard_index.make_index(
        source, options.align.image_size, splits, read=read, written=written, rejected=dict(sorted(rejected.items())),
        options={"fractions": options.split.fractions, "stratify": options.split.stratify, "dedup": options.dedup.enabled,
                 "deidentified": options.deid.enabled, "skip_detection": options.align.skip_detection,
                 # what `fahr predict` must redo on new photos (recorded in fine-tuned model cards)
                 "align": {k: getattr(options.align, k) for k in ("image_size", "margin", "multi_face", "min_confidence")}})
