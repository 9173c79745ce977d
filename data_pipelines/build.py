"""Raw photos -> detected, aligned, de-identified, split webdataset shards (`fahr shards`).

Two passes over the source (both in the source's deterministic order):

1. **Plan**: every record's bytes are hashed and decoded once (to a thumbnail) for perceptual
   hashes, in ``processes`` worker processes in rounds of ``PLAN_BATCH`` photos; then, in the main
   process and in source order, exact and near duplicates are decided, persons are assigned to splits
   (person-disjoint, stratified) and cohort anchors (first photo date per patient) are collected.
2. **Write**: records are cut into fixed chunks of ``chunk_size`` source items. Each chunk is
   decoded, aligned, de-identified and written to ``parts/c<chunk>/<split>/`` by
   :class:`fahr.data.shard_writer.ShardWriter` (temp file + rename per shard); then
   ``parts/c<chunk>.json`` records its counts and shards (bytes, sha256). A rerun skips every chunk
   that has that file, so a crash costs at most the chunks in flight. Chunks run in ``processes``
   worker processes, each building its face aligner once.

Finally, once every chunk is finished, the shards are renamed (``os.replace``) into one flat series
per split, the webdataset convention: ``<output>/<split>-000000.tar``, ``<split>-000001.tar``, ...
(chunks in order, each chunk's shards in order), so ``<output>/train-{000000..000012}.tar`` works
too. The move is idempotent: a destination whose source is gone was moved by an earlier run, a
rerun after a crash finishes it, and a destination holding a different file than the chunk mark
records is never overwritten. The chunk marks stay in ``parts/`` (so reruns still skip every chunk);
the emptied chunk directories are removed. Then ``index.json`` sums the chunks: ``read`` (items the
source yielded), ``written``, ``rejected`` (reason -> count; ``read == written + sum(rejected)``) and
``splits`` (split -> count, shards with their flat names, bytes and sha256, label histograms). The
trainer streams a split with ``data.train_shards=<output>/index.json#train``.

Rerunning into a finished output directory reuses every chunk mark as it is, whatever the options
(the marks decide), and rewrites the same ``index.json``. A changed source is caught only by the
count check above (``read == written + sum(rejected)``): build it into a new directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.records import Record, RejectedError, Rejection
from fahr.boundary import InputError
from fahr.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)

INDEX_FORMAT = "fahr-shards-splits/1"


@dataclass(frozen=True)
class AlignOptions:
    image_size: int = 112
    margin: float = 0.0
    multi_face: str = "reject"
    min_confidence: float = 0.95
    skip_detection: bool = False


@dataclass
class BuildOptions:
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    split_seed: str = "fahr"
    stratify: str = "age"  # "age" (decade of the person's first photo), "event", or "none"
    dedup: bool = True
    near_threshold: int = 6
    deidentify: bool = False  # cohorts: hashed ids, relative days, whitelisted labels
    salt_key_file: str | None = None
    allowed_labels: tuple[str, ...] = ("age", "sex", "race", "followup_days", "event", "diagnosis")
    samples_per_shard: int = 1000
    chunk_size: int = 2000
    processes: int = 1
    align: AlignOptions = field(default_factory=AlignOptions)


# ---- pass 1: plan ---------------------------------------------------------------------------------

@dataclass
class Plan:
    read: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # item id -> reason (pass 1)
    split_of_person: dict[str, str] = field(default_factory=dict)
    anchors: dict[str, Any] = field(default_factory=dict)


def _item_id(position: int) -> str:
    return f"{position:09d}"


def _stratum(record: Record, stratify: str) -> Any:
    from data_pipelines.splits import age_bin

    if stratify == "age" and record.labels.get("age") is not None:
        return age_bin(float(record.labels["age"]))
    if stratify == "event":
        return record.labels.get("event")
    return None


PLAN_BATCH = 1024  # photos hashed per round in pass 1: bounds the image bytes held in memory


def _fingerprint(data: bytes, hashes: bool = True) -> tuple[str, int | None, int | None] | str:
    """Pass-1 work for one photo (in a worker process when ``processes > 1``): its
    :func:`~data_pipelines.dedup.fingerprint` (SHA-256 and, if ``hashes``, pHashes of a thumbnail),
    or the rejection reason if it does not decode."""
    from data_pipelines.dedup import fingerprint
    from data_pipelines.imageio import decode_photo

    try:
        image = decode_photo(data)
    except RejectedError as err:
        return err.reason
    return fingerprint(data, _thumbnail(image) if hashes else None)


def plan(items: Iterable[Record | Rejection], options: BuildOptions, pool: Any = None) -> Plan:
    """Pass 1 over the source: duplicates, split per person, cohort anchors.

    Decoding and hashing (the slow part) run on ``pool`` (a ``multiprocessing`` pool) if given, in
    rounds of :data:`PLAN_BATCH` photos; the decisions are made here, in source order, so they do not
    depend on the number of processes."""
    from data_pipelines.dedup import Deduplicator
    from data_pipelines.deid import patient_anchors
    from data_pipelines.splits import split_persons

    result = Plan()
    dedup = Deduplicator(options.near_threshold)
    strata: dict[str, Any] = {}
    kept: list[Record] = []
    batch: list[tuple[str, Record]] = []

    work = functools.partial(_fingerprint, hashes=options.dedup)  # without dedup: decode check only

    def decide_batch() -> None:
        data = [item.image for _, item in batch]
        fps = pool.map(work, data, chunksize=32) if pool is not None else [work(d) for d in data]
        for (item_id, item), fp in zip(batch, fps):
            if isinstance(fp, str):
                result.rejected[item_id] = fp
                continue
            if options.dedup:
                dedup.add_fingerprint(item_id, item.person_id, fp)
            strata.setdefault(item.person_id, _stratum(item, options.stratify))
            kept.append(Record(item_id, item.person_id, b"", item.labels))
        batch.clear()

    for position, item in enumerate(items):
        result.read += 1
        item_id = _item_id(position)
        if isinstance(item, Rejection):
            result.rejected[item_id] = item.reason
            continue
        batch.append((item_id, item))
        if len(batch) >= PLAN_BATCH:
            decide_batch()
    decide_batch()
    if options.dedup:
        result.rejected.update(dedup.decide())
    result.split_of_person = split_persons(strata, options.fractions, options.split_seed)
    if options.deidentify:
        result.anchors = patient_anchors(r for r in kept if r.source_id not in result.rejected)
    return result


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """At most 64x64: pHash works on 32x32, and hashing full-size photos is the slow part of pass 1."""
    im = Image.fromarray(image)
    im.thumbnail((64, 64))
    return np.asarray(im)


# ---- pass 2: one chunk ----------------------------------------------------------------------------

_ALIGNERS: dict[AlignOptions, Any] = {}


def _aligner(options: AlignOptions):
    """One aligner per process and options: building MTCNN costs more than aligning a photo."""
    if options not in _ALIGNERS:
        from data_pipelines.align import FaceAligner

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


def _histograms(labels: dict[str, Any], counters: dict[str, Counter]) -> None:
    from data_pipelines.splits import age_bin

    if labels.get("age") is not None:
        counters["age_decade"][str(age_bin(float(labels["age"])) * 10)] += 1
    for key in ("sex", "race", "event"):
        if labels.get(key) is not None:
            counters[key][str(labels[key])] += 1


def write_chunk(chunk: int, records: list[tuple[str, Record]], plan_: Plan, options: BuildOptions,
                output: str, source: str, salt: bytes | None) -> dict[str, Any]:
    """Decode, align, de-identify and write one chunk; returns (and stores) its counts."""
    from data_pipelines.deid import deidentify
    from data_pipelines.imageio import decode_photo
    from fahr.data.shard_writer import ShardWriter

    out = Path(output)
    chunk_dir = out / "parts" / f"c{chunk:06d}"
    if chunk_dir.exists():  # an interrupted earlier attempt at this chunk
        shutil.rmtree(chunk_dir)
    rejected: Counter = Counter()
    images, kept = [], []
    for item_id, record in records:
        try:
            images.append(decode_photo(record.image))
            kept.append((item_id, record))
        except RejectedError as err:
            rejected[err.reason] += 1
    aligned = _aligner(options.align).align(images) if images else []
    writers: dict[str, ShardWriter] = {}
    hist: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    written: Counter = Counter()
    try:
        for (item_id, record), face in zip(kept, aligned):
            if isinstance(face, RejectedError):
                rejected[face.reason] += 1
                continue
            split = plan_.split_of_person[record.person_id]
            if options.deidentify:
                record = deidentify(record, salt, plan_.anchors.get(record.person_id), options.allowed_labels)
                key = record.source_id
            else:
                key = hashlib.sha256(f"{source}\x00{record.source_id}".encode()).hexdigest()[:24]
            labels = {**_labels_for_shard(record), "person": record.person_id}
            if split not in writers:
                writers[split] = ShardWriter(chunk_dir / split, prefix=split, samples_per_shard=options.samples_per_shard,
                                             source=source, image_size=options.align.image_size)
            writers[split].write(key, face.crop, labels)
            _histograms(labels, hist[split])
            written[split] += 1
        indexes = {split: w.close() for split, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    summary = {
        "chunk": chunk, "read": len(records), "rejected": dict(rejected), "written": dict(written),
        "shards": {split: [{**s, "name": f"parts/c{chunk:06d}/{split}/{s['name']}"} for s in idx["shards"]]
                   for split, idx in indexes.items()},
        "histograms": {split: {k: dict(v) for k, v in h.items()} for split, h in hist.items()},
    }
    atomic_write_json(out / "parts" / f"c{chunk:06d}.json", summary)  # the chunk's completion mark
    return summary


# ---- driver ---------------------------------------------------------------------------------------

def _chunks(items: Iterable[Record | Rejection], plan_: Plan, chunk_size: int) -> Iterator[tuple[int, list, int]]:
    """(chunk number, [(item id, record)] to write, items in the chunk) in source order."""
    chunk, batch, count = 0, [], 0
    for position, item in enumerate(items):
        item_id = _item_id(position)
        if not isinstance(item, Rejection) and item_id not in plan_.rejected:
            batch.append((item_id, item))
        count += 1
        if count == chunk_size:
            yield chunk, batch, count
            chunk, batch, count = chunk + 1, [], 0
    if count:
        yield chunk, batch, count


def build_shards(
    source: str, make_items: Callable[[], Iterable[Record | Rejection]], output: str | Path,
    options: BuildOptions, progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run both passes and write ``<output>/index.json``; returns the index.

    ``make_items`` must yield the same items in the same order each call (sources are deterministic).
    """
    from data_pipelines.deid import load_salt

    output = Path(output)
    (output / "parts").mkdir(parents=True, exist_ok=True)
    salt = load_salt(options.salt_key_file) if options.deidentify else None
    summaries: list[dict[str, Any]] = []

    def finished(summary: dict[str, Any], count: int) -> None:
        summaries.append(summary)
        if progress:
            progress(count)

    # spawn, not fork: the parent may already hold torch threads
    pool = multiprocessing.get_context("spawn").Pool(options.processes) if options.processes > 1 else None
    in_flight: list[tuple[Any, int]] = []
    try:
        plan_ = plan(make_items(), options, pool)
        for chunk, records, count in _chunks(make_items(), plan_, options.chunk_size):
            done = output / "parts" / f"c{chunk:06d}.json"
            if done.is_file():  # finished by an earlier run
                finished(json.loads(done.read_text()), count)
            elif pool is None:
                finished(write_chunk(chunk, records, plan_, options, str(output), source, salt), count)
            else:
                in_flight.append((pool.apply_async(
                    write_chunk, (chunk, records, plan_, options, str(output), source, salt)), count))
                while len(in_flight) >= 2 * options.processes:  # bounded: chunks carry image bytes
                    job, n = in_flight.pop(0)
                    finished(job.get(), n)
        for job, n in in_flight:
            finished(job.get(), n)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    moves = _flat_plan(summaries)
    index = _merge(source, plan_, summaries, options, moves)  # checks the counts before anything moves
    _move_shards(output, moves)
    atomic_write_json(output / "index.json", index)
    return index


# ---- final step: one flat series of shards per split ----------------------------------------------

_FLAT_NAME = re.compile(r"(.+)-\d{6}\.tar")


def _flat_plan(summaries: list[dict[str, Any]]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """split -> [(where its chunk wrote the shard, its index entry under the final name)]: chunks in
    order, each chunk's shards in order; the k-th shard of a split becomes ``<split>-{k:06d}.tar``."""
    moves: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for s in sorted(summaries, key=lambda s: s["chunk"]):
        for split, shards in s["shards"].items():
            series = moves.setdefault(split, [])
            for shard in shards:
                series.append((shard["name"], {**shard, "name": f"{split}-{len(series):06d}.tar"}))
    return moves


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _move_shards(output: Path, moves: dict[str, list[tuple[str, dict[str, Any]]]]) -> None:
    """Rename every chunk's shards to their flat names; idempotent, so a rerun finishes a crashed move.

    Per shard: source there and destination not -> move; source gone and destination there -> moved
    by an earlier run (its size is checked; hashing every shard on every rerun would read the whole
    data set); both there -> the destination must already hold the bytes the chunk mark records
    (sha256), else this refuses rather than overwrite a finished shard with a different one.
    """
    emptied: set[Path] = set()
    for split, series in moves.items():
        for source_name, entry in series:
            src, dst = output / source_name, output / entry["name"]
            if src.is_file():
                if dst.exists() and _sha256(dst) != entry["sha256"]:
                    raise InputError(
                        f"{dst} already holds a different shard than {src} (sha256 in the chunk mark); "
                        "refusing to overwrite it: the output directory holds another build, use a new one")
                os.replace(src, dst)  # same file system: atomic
            elif not dst.is_file():
                raise InputError(f"shard {src} (to become {dst}) is missing, and so is {dst}")
            if dst.stat().st_size != entry["bytes"]:
                raise InputError(f"shard {dst}: {dst.stat().st_size} bytes on disk, {entry['bytes']} in its chunk mark")
            emptied.add(src.parent)
    _fsync_dir(output)  # the renames are durable before index.json names the new files
    for split_dir in sorted(emptied):
        # the chunk writer's own index.json lists the shards under their old names: drop it with them
        (split_dir / "index.json").unlink(missing_ok=True)
    # parts/c<chunk>/<split>/, then parts/c<chunk>/; the marks parts/c<chunk>.json stay
    for d in [*sorted(emptied), *sorted({d.parent for d in emptied})]:
        try:
            d.rmdir()
        except FileNotFoundError:  # removed by an earlier run
            pass
        except OSError:
            log.warning("keeping %s: it holds files this build did not write", d)
    listed = {entry["name"] for series in moves.values() for _, entry in series}
    stale = sorted(p.name for p in output.iterdir()
                   if (m := _FLAT_NAME.fullmatch(p.name)) and m.group(1) in moves and p.name not in listed)
    if stale:  # left as they are: nothing here deletes shards it did not write in this build
        log.warning("%s holds %d shards index.json does not list (an earlier, larger build?): %s",
                    output, len(stale), ", ".join(stale[:5]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _merge(source: str, plan_: Plan, summaries: list[dict[str, Any]], options: BuildOptions,
           moves: dict[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, Any]:
    summaries = sorted(summaries, key=lambda s: s["chunk"])
    rejected = Counter(plan_.rejected.values())
    splits: dict[str, dict[str, Any]] = {}
    for s in summaries:
        rejected.update(s["rejected"])
        for split, n in s["written"].items():
            entry = splits.setdefault(split, {"count": 0, "shards": [], "labels": defaultdict(Counter)})
            entry["count"] += n
            for key, counts in s["histograms"].get(split, {}).items():
                entry["labels"][key].update(counts)
    for split, entry in splits.items():
        entry["shards"] = [shard for _, shard in moves.get(split, [])]  # under their final, flat names
        entry["labels"] = {k: dict(sorted(v.items())) for k, v in entry["labels"].items()}
    written = sum(e["count"] for e in splits.values())
    read = plan_.read
    if read != written + sum(rejected.values()):
        raise AssertionError(f"records lost: read {read} != written {written} + rejected {sum(rejected.values())}")
    return {
        "format": INDEX_FORMAT, "source": source, "image_size": options.align.image_size,
        "read": read, "written": written, "rejected": dict(sorted(rejected.items())), "splits": splits,
        "options": {"fractions": options.fractions, "stratify": options.stratify, "dedup": options.dedup,
                    "deidentified": options.deidentify, "skip_detection": options.align.skip_detection,
                    # what `fahr predict` must redo on new photos (recorded in fine-tuned model cards)
                    "align": {k: getattr(options.align, k) for k in ("image_size", "margin", "multi_face", "min_confidence")}},
    }
