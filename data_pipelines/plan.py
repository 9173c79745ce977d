"""Pass 1 of ``fahr shards`` (the plan), cut into tasks whose results do not depend on the cut.

The build is a graph of five stages, each ``tasks`` independent tasks (the last one task); the
one-process build runs the same stages one after another (``tasks=1``), a SLURM build runs each
stage as an array job (:mod:`fahr.pipeline.shards`). Work files live in ``<output>/parts/plan/``
and are written atomically (temp file + rename); every stage checks that the stage before it
finished for this run (``run.json``: a run id, the number of tasks, a digest of the options).

1. **hash** (task ``t``): reads the items of the chunks ``c`` with ``c % tasks == t`` (items are cut
   into chunks of ``chunk_size`` by their position in the source; the other items are counted, their
   bytes not read), decodes each photo once and computes its SHA-256 and pHashes
   (:func:`data_pipelines.dedup.fingerprint`). It appends, per bucket ``b`` of the next stage,
   fixed-size rows to ``h<t>/d<b>.bin`` (duplicate candidates: one row for the exact bucket of its
   SHA-256, one per 8-bit band of its pHash, :func:`dedup_bucket`) and JSON lines to
   ``h<t>/p<b>.jsonl`` (the person, by :func:`~data_pipelines.splits.rank_key`, bucketed by the leading
   bits of that key: the buckets are ranges, in rank order). Memory: one round of
   :data:`PLAN_BATCH` photos.
2. **group** (task ``b``): bucket ``b`` of the duplicate candidates: every pair sharing a SHA-256, or
   a pHash band and within the thresholds (:class:`~data_pipelines.dedup.Deduplicator`'s test), is an
   edge ``g<b>/edges.bin``; bucket ``b`` of the persons: each person's stratum (of its first photo)
   and photos, sorted by rank key (``g<b>/persons.jsonl``), and the persons per stratum
   (``g<b>/counts.json``). Memory: the bucket (about ``9 N / tasks`` candidate rows of 105 bytes and
   ``N / tasks`` persons' photos).
3. **assign** (task ``b``): the duplicate decision (union-find over all edges: few, one per
   duplicate pair), then the split of each person of bucket ``b``: its rank in its stratum is the
   persons of that stratum in the buckets before ``b`` (the counts) plus its place in ``b``, cut at
   the cumulative fractions exactly as :func:`~data_pipelines.splits.split_persons` cuts the whole
   list; and (de-identifying) each person's anchor date. It writes, per write task ``t``, the plan of
   each photo of its persons (``a<b>/i<t>.jsonl``).
4. **write** (task ``t``, :mod:`data_pipelines.build`): pass 2 for the chunks of task ``t``.
5. **final** (one task): the flat shard series and ``index.json``.

Why the result does not depend on ``tasks``: a duplicate group is a connected component of the
"same SHA-256 or near pHash" graph, and every edge of it is found in exactly the bucket that holds
its SHA-256 or shared band, whatever the number of buckets; within a group the first item (by
position) is kept; an item is ``duplicate:exact`` if an earlier item has its SHA-256, else
``duplicate:near``. A person's split depends only on its rank in its stratum, and the buckets are
ranges of the rank key. So 1, 3 or 50 tasks give the same plan (tests/test_shards_partitioned.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.options import BuildOptions
from data_pipelines.records import Record
from fahr.boundary import InputError, read_json_file
from fahr.faces.rejection import Rejection
from fahr.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)

PLAN_BATCH = 1024  # photos hashed per round in pass 1: bounds the image bytes held in memory
PROGRESS_SECONDS = 30.0  # a task's counts go to its log this often
#: a duplicate candidate: ``band`` -1 for the exact (SHA-256) bucket, else the pHash byte 0..7 it shares
CANDIDATE = np.dtype([("pos", "<i8"), ("band", "i1"), ("person", "u1", 32), ("sha", "u1", 32),
                      ("coarse", "<u8"), ("fine", "u1", 32)])
EDGE = np.dtype([("i", "<i8"), ("j", "<i8"), ("exact", "i1"), ("pi", "u1", 32), ("pj", "u1", 32)])
_END = object()


# ---- layout ---------------------------------------------------------------------------------------

def plan_dir(output: Path) -> Path:
    return Path(output) / "parts" / "plan"


def task_of(position: int, chunk_size: int, tasks: int) -> int:
    """The hash and write task of the item at ``position``: its chunk modulo ``tasks``."""
    return (position // chunk_size) % tasks


def _prefix_bucket(key: bytes, tasks: int) -> int:
    """Bucket of a uniform key by its leading 32 bits: ranges, in key order."""
    return (int.from_bytes(key[:4], "big") * tasks) >> 32


def dedup_bucket(band: int, sha: bytes, coarse: int, tasks: int) -> int:
    """The group task of a candidate row: by SHA-256 prefix (exact, ``band`` -1) or by (band, byte value)."""
    if band < 0:
        return _prefix_bucket(sha, tasks)
    return (((band << 8) | ((coarse >> (8 * band)) & 0xFF)) * tasks) >> 11


def options_digest(source: str, options: BuildOptions) -> str:
    return hashlib.sha256(json.dumps([source, asdict(options)], sort_keys=True, default=str).encode()).hexdigest()


def start_run(output: Path, source: str, options: BuildOptions, tasks: int, run: str) -> None:
    """``parts/plan/run.json``: what every task of this run checks it belongs to."""
    plan_dir(output).mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan_dir(output) / "run.json",
                      {"run": run, "tasks": tasks, "options": options_digest(source, options)})


def read_run(output: Path) -> dict[str, Any]:
    """``parts/plan/run.json`` of the build started in ``output`` (InputError if there is none)."""
    path = plan_dir(output) / "run.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; no build was started in this output (start it with all stages)")
    return read_json_file(path, "plan run")


def check_run(output: Path, source: str, options: BuildOptions, tasks: int, run: str) -> None:
    """InputError unless ``output``'s current run is ``run`` with these options and ``tasks``."""
    path = plan_dir(output) / "run.json"
    info = read_run(output)
    want = {"run": run, "tasks": tasks, "options": options_digest(source, options)}
    if info != want:
        raise InputError(f"{path}: this task belongs to another run (run, tasks or options differ from "
                         "the command that started the build); start the build again")


def _done(path: Path, run: str, what: str) -> dict[str, Any]:
    """The ``done.json`` of a finished task of this run, or InputError naming what is missing."""
    info = read_json_file(path, f"{what} result") if path.is_file() else None
    if not isinstance(info, dict) or info.get("run") != run:
        raise InputError(f"{what} has not finished for this run ({path} missing or from another run); "
                         "run or rerun that task first")
    return info


def _atomic_rename_all(tmp_files: Iterable[Path]) -> None:
    for tmp in tmp_files:
        os.replace(tmp, tmp.with_suffix(""))


def _fresh_dir(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)  # an earlier (killed) attempt of this task
    path.mkdir(parents=True)
    return path


class Progress:
    """Counts of one task, to a callback (a progress bar) and, every ``every`` seconds (:data:`PROGRESS_SECONDS`), to the log (what a
    SLURM job's log shows): ``<what>: <n> items (<rate>/s)``. Counts only, never ids."""

    def __init__(self, what: str, callback: Callable[[int], None] | None = None, every: float | None = None) -> None:
        self.what, self.callback = what, callback
        self.every = PROGRESS_SECONDS if every is None else every
        self.count, self.start = 0, time.monotonic()
        self.last = self.start

    def __call__(self, n: int) -> None:
        self.count += n
        if self.callback:
            self.callback(n)
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.report()

    def report(self, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        log.info("%s: %s%s items (%.1f/s)", self.what, "done, " if final else "", f"{self.count:,}",
                 self.count / elapsed)


def iter_positions(make_items: Callable[[], Iterable[Record | Rejection]], owned: Callable[[int], bool],
                   ) -> Iterator[tuple[int, Record | Rejection | None]]:
    """Every position of the source in order, with its item if ``owned(position)``, else None (the
    source is advanced without reading that item's image bytes: see
    :data:`data_pipelines.sources.folder.SKIP_IMAGE_BYTES`)."""
    from data_pipelines.sources.folder import SKIP_IMAGE_BYTES

    items = iter(make_items())
    position = 0
    while True:
        own = owned(position)
        token = SKIP_IMAGE_BYTES.set(not own)
        try:
            item = next(items, _END)
        finally:
            SKIP_IMAGE_BYTES.reset(token)
        if item is _END:
            return
        yield position, (item if own else None)
        position += 1


# ---- per-item values ------------------------------------------------------------------------------

def stratum_key(record: Record, stratify: str) -> str:
    """The person's stratum (of one photo) as a JSON string; numbers equal as Python keys (1, 1.0,
    True) are one stratum, as they are in :func:`~data_pipelines.splits.split_persons`."""
    from data_pipelines.splits import age_bin

    value: Any = None
    if stratify == "age" and record.labels.get("age") is not None:
        value = age_bin(float(record.labels["age"]))
    elif stratify == "event":
        value = record.labels.get("event")
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, (bool, int, float)) and float(value).is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True, default=str)


def _date_json(value: Any) -> list[str] | None:
    if isinstance(value, dt.datetime):
        return ["datetime", value.isoformat()]
    if isinstance(value, dt.date):
        return ["date", value.isoformat()]
    return None


def date_from_json(value: list[str] | None) -> dt.date | None:
    if value is None:
        return None
    kind, text = value
    return dt.datetime.fromisoformat(text) if kind == "datetime" else dt.date.fromisoformat(text)


def _fingerprint(data: bytes, hashes: bool = True) -> tuple[str, int | None, int | None] | str:
    """Decode one photo and hash it (in a worker process when ``processes > 1``): its
    :func:`~data_pipelines.dedup.fingerprint`, or the rejection reason if it does not decode."""
    from data_pipelines.dedup import fingerprint
    from fahr.faces.decode import decode_photo
    from fahr.faces.rejection import RejectedError

    try:
        image = decode_photo(data)
    except RejectedError as err:
        return err.reason
    return fingerprint(data, _thumbnail(image) if hashes else None)


def _thumbnail(image: np.ndarray) -> np.ndarray:
    """At most 64x64: pHash works on 32x32, and hashing full-size photos is the slow part of pass 1."""
    from PIL import Image

    im = Image.fromarray(image)
    im.thumbnail((64, 64))
    return np.asarray(im)


# ---- stage 1: hash --------------------------------------------------------------------------------

def hash_task(make_items: Callable[[], Iterable[Record | Rejection]], options: BuildOptions, output: Path,
              task: int, tasks: int, run: str, pool: Any = None,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Stage 1 for task ``task`` (see the module docstring); returns its ``done.json``."""
    from data_pipelines.splits import rank_key

    out = _fresh_dir(plan_dir(output) / f"h{task:04d}")
    (plan_dir(output) / f"w{task:04d}.json").unlink(missing_ok=True)  # this task's pass 2 is to be redone
    tmp = {}
    for b in range(tasks):
        for kind in ("d", "p"):
            path = out / (f"d{b:04d}.bin.tmp" if kind == "d" else f"p{b:04d}.jsonl.tmp")
            path.touch()
            tmp[kind, b] = path
    rejected: dict[int, str] = {}
    work = functools.partial(_fingerprint, hashes=options.dedup.enabled)  # without dedup: decode check only
    batch: list[tuple[int, Record]] = []
    meter = Progress(f"pass 1, hash task {task + 1}/{tasks}", progress)
    read = own = 0

    def flush() -> None:
        data = [item.image for _, item in batch]
        fps = pool.map(work, data, chunksize=32) if pool is not None else [work(d) for d in data]
        rows: dict[int, list[tuple]] = defaultdict(list)
        lines: dict[int, list[str]] = defaultdict(list)
        for (position, item), fp in zip(batch, fps):
            if isinstance(fp, str):
                rejected[position] = fp
                continue
            sha, coarse, fine = fp
            rk = rank_key(item.person_id, options.split.seed)
            person = bytes.fromhex(rk)
            lines[_prefix_bucket(person, tasks)].append(json.dumps(
                [rk, position, stratum_key(item, options.split.stratify),
                 _date_json(item.labels.get("photo_date")), sha]))
            if options.dedup.enabled:
                sha_b, fine_b = bytes.fromhex(sha), np.frombuffer(fine.to_bytes(32, "big"), np.uint8)
                for band in range(-1, 8):
                    rows[dedup_bucket(band, sha_b, coarse, tasks)].append(
                        (position, band, np.frombuffer(person, np.uint8), np.frombuffer(sha_b, np.uint8), coarse, fine_b))
        for b, r in rows.items():
            with open(tmp["d", b], "ab") as f:
                f.write(np.array(r, dtype=CANDIDATE).tobytes())
        for b, ls in lines.items():
            with open(tmp["p", b], "a") as f:
                f.write("\n".join(ls) + "\n")
        meter(len(batch))
        batch.clear()

    for position, item in iter_positions(make_items, lambda p: task_of(p, options.chunk_size, tasks) == task):
        read += 1
        if item is None:
            continue
        own += 1
        if isinstance(item, Rejection):
            rejected[position] = item.reason
            meter(1)
            continue
        batch.append((position, item))
        if len(batch) >= PLAN_BATCH:
            flush()
    flush()
    _atomic_rename_all(tmp.values())
    atomic_write_json(out / "rejected.json", {str(p): r for p, r in sorted(rejected.items())})
    done = {"run": run, "read": read, "own": own, "rejected": dict(sorted(Counter(rejected.values()).items()))}
    atomic_write_json(out / "done.json", done)
    meter.report(final=True)
    return done


def hash_result(output: Path, task: int, run: str) -> tuple[dict[str, Any], dict[int, str]]:
    """(``done.json``, {position: rejection reason}) of hash task ``task``."""
    out = plan_dir(output) / f"h{task:04d}"
    done = _done(out / "done.json", run, f"pass 1 hash task {task}")
    rejected = read_json_file(out / "rejected.json", "pass 1 rejections")
    return done, {int(p): r for p, r in rejected.items()}


# ---- stage 2: group -------------------------------------------------------------------------------

def near_edges(rows: np.ndarray, threshold: int, confirm_threshold: int) -> list[tuple[int, int]]:
    """(i, j) positions, i < j, of the candidate rows (one band each) sharing a band byte whose pHashes
    are within ``threshold`` bits and whose 255-bit pHashes are within ``confirm_threshold``."""
    key = rows["band"].astype(np.int64) * 256 + ((rows["coarse"] >> (8 * rows["band"].astype(np.uint64))) & 0xFF
                                                   ).astype(np.int64)
    order = np.lexsort((rows["pos"], key))
    rows, key = rows[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)]
    edges = []
    for s, e in zip(starts, ends):
        if e - s < 2:
            continue
        pos, coarse, fine = rows["pos"][s:e], rows["coarse"][s:e], rows["fine"][s:e]
        for a in range(e - s - 1):
            close = np.flatnonzero(np.bitwise_count(coarse[a] ^ coarse[a + 1:]) <= threshold)
            if close.size:
                fine_bits = np.bitwise_count(fine[a] ^ fine[a + 1 + close]).sum(axis=1)
                for b in close[fine_bits <= confirm_threshold]:
                    edges.append((int(pos[a]), int(pos[a + 1 + b])))
    return edges


def group_task(options: BuildOptions, output: Path, task: int, tasks: int, run: str) -> dict[str, Any]:
    """Stage 2 for bucket ``task`` (see the module docstring); returns its ``done.json``."""
    for t in range(tasks):
        _done(plan_dir(output) / f"h{t:04d}" / "done.json", run, f"pass 1 hash task {t}")
    out = _fresh_dir(plan_dir(output) / f"g{task:04d}")
    meter = Progress(f"pass 1, group task {task + 1}/{tasks}")
    rows = np.concatenate([np.fromfile(plan_dir(output) / f"h{t:04d}" / f"d{task:04d}.bin", dtype=CANDIDATE)
                           for t in range(tasks)])
    edges: list[tuple] = []
    by_sha: dict[bytes, list[tuple[int, bytes]]] = defaultdict(list)
    exact = rows[rows["band"] == -1]
    for r in exact:
        by_sha[r["sha"].tobytes()].append((int(r["pos"]), r["person"].tobytes()))
    for members in by_sha.values():
        members.sort()
        edges += [(members[0][0], j, 1, members[0][1], pj) for j, pj in members[1:]]
    near = rows[rows["band"] >= 0]
    person_of = {int(p): q.tobytes() for p, q in zip(near["pos"], near["person"])}
    edges += [(i, j, 0, person_of[i], person_of[j]) for i, j in
              near_edges(near, options.dedup.near_threshold, _confirm_threshold())]
    n_candidates = len(exact)
    meter(n_candidates)
    edge_rows = np.array([(i, j, k, np.frombuffer(pi, np.uint8), np.frombuffer(pj, np.uint8))
                          for i, j, k, pi, pj in sorted(set(edges))], dtype=EDGE)
    (out / "edges.bin.tmp").write_bytes(edge_rows.tobytes())
    os.replace(out / "edges.bin.tmp", out / "edges.bin")
    del rows, exact, near, person_of, by_sha
    photos: dict[str, list[list[Any]]] = defaultdict(list)
    for t in range(tasks):
        with open(plan_dir(output) / f"h{t:04d}" / f"p{task:04d}.jsonl") as f:
            for line in f:
                rk, position, stratum, date, sha = json.loads(line)
                photos[rk].append([position, stratum, date, sha])
    counts: Counter = Counter()
    with open(out / "persons.jsonl.tmp", "w") as f:
        for rk in sorted(photos):
            items = sorted(photos[rk])
            stratum = items[0][1]  # of the person's first photo
            counts[stratum] += 1
            f.write(json.dumps([rk, stratum, [[p, d, s] for p, _, d, s in items]]) + "\n")
    os.replace(out / "persons.jsonl.tmp", out / "persons.jsonl")
    atomic_write_json(out / "counts.json", dict(sorted(counts.items())))
    done = {"run": run, "candidates": n_candidates, "edges": len(edge_rows), "persons": sum(counts.values())}
    atomic_write_json(out / "done.json", done)
    meter.report(final=True)
    return done


def _confirm_threshold() -> int:
    from data_pipelines.dedup import CONFIRM_THRESHOLD

    return CONFIRM_THRESHOLD


# ---- stage 3: assign ------------------------------------------------------------------------------

def duplicate_decisions(edges: np.ndarray) -> dict[int, str]:
    """Position -> rejection reason from all edges: per connected component (a duplicate group), all
    rejected if it spans several persons (``duplicate:conflicting_persons``), else all but the first
    (``duplicate:exact`` if an earlier item has the same SHA-256, else ``duplicate:near``); the same
    decisions as :meth:`data_pipelines.dedup.Deduplicator.decide` over the whole input."""
    parent: dict[int, int] = {}
    person: dict[int, bytes] = {}

    def find(i: int) -> int:
        root = i
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    exact_later = set()
    for e in edges:
        i, j = int(e["i"]), int(e["j"])
        person[i], person[j] = e["pi"].tobytes(), e["pj"].tobytes()
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
        if e["exact"]:
            exact_later.add(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in parent:
        groups[find(i)].append(i)
    rejected: dict[int, str] = {}
    for members in groups.values():
        members.sort()
        if len({person[i] for i in members}) > 1:
            rejected.update({i: "duplicate:conflicting_persons" for i in members})
        else:
            rejected.update({i: "duplicate:exact" if i in exact_later else "duplicate:near" for i in members[1:]})
    return rejected


def assign_task(options: BuildOptions, output: Path, task: int, tasks: int, run: str) -> dict[str, Any]:
    """Stage 3 for bucket ``task`` (see the module docstring); returns its ``done.json``."""
    from data_pipelines.splits import split_at, split_ends

    counts = []
    for b in range(tasks):
        _done(plan_dir(output) / f"g{b:04d}" / "done.json", run, f"pass 1 group task {b}")
        counts.append(read_json_file(plan_dir(output) / f"g{b:04d}" / "counts.json", "pass 1 person counts"))
    out = _fresh_dir(plan_dir(output) / f"a{task:04d}")
    meter = Progress(f"pass 1, assign task {task + 1}/{tasks}")
    edges = np.concatenate([np.fromfile(plan_dir(output) / f"g{b:04d}" / "edges.bin", dtype=EDGE)
                            for b in range(tasks)])
    duplicates = duplicate_decisions(edges)
    del edges
    totals: Counter = Counter()
    for c in counts:
        totals.update(c)
    rank = Counter()  # stratum -> persons ranked before this bucket's next person
    for c in counts[:task]:
        rank.update(c)
    ends = {stratum: split_ends(n, options.split.fractions) for stratum, n in totals.items()}
    files = {t: open(out / f"i{t:04d}.jsonl.tmp", "w") for t in range(tasks)}
    try:
        with open(plan_dir(output) / f"g{task:04d}" / "persons.jsonl") as f:
            for line in f:
                rk, stratum, photos = json.loads(line)
                split = split_at(rank[stratum], ends[stratum])
                rank[stratum] += 1
                anchor = None
                if options.deid.enabled:
                    dates = [date_from_json(d) for p, d, _ in photos if p not in duplicates and d is not None]
                    anchor = _date_json(min(dates)) if dates else None
                for position, _, sha in photos:
                    files[task_of(position, options.chunk_size, tasks)].write(
                        json.dumps([position, rk, sha, split, anchor, duplicates.get(position)]) + "\n")
                meter(len(photos))
    finally:
        for f in files.values():
            f.close()
    _atomic_rename_all(out / f"i{t:04d}.jsonl.tmp" for t in range(tasks))
    done = {"run": run}
    atomic_write_json(out / "done.json", done)
    meter.report(final=True)
    return done


def item_plans(output: Path, task: int, tasks: int, run: str) -> dict[int, list[Any]]:
    """Position -> [rank key, image SHA-256, split, anchor (JSON), duplicate reason or None] for every
    photo of write task ``task`` that pass 1 decoded. Memory: about 300 bytes per photo of the task."""
    plans: dict[int, list[Any]] = {}
    for b in range(tasks):
        _done(plan_dir(output) / f"a{b:04d}" / "done.json", run, f"pass 1 assign task {b}")
        with open(plan_dir(output) / f"a{b:04d}" / f"i{task:04d}.jsonl") as f:
            for line in f:
                position, *rest = json.loads(line)
                plans[position] = rest
    return plans
