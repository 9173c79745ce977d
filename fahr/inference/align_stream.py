"""Photos -> aligned crops, in this process or in detection worker processes, in input order.

This is the part of `fahr predict` / `fahr far` that decodes, detects and aligns; the model runs
elsewhere (:mod:`fahr.inference.predict`). It imports no model code (nor torch until a worker or an
aligner needs it), so the commands can start their workers before their own heavy imports, and a
spawned worker starts in the time it takes to import torch and the detector.

Each photo's crop depends on that photo alone (the detector runs per photo on one torch thread:
:mod:`fahr.faces.align`), so the crops are bit-identical in any batch, order or worker count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fahr.faces.rejection import RejectedError
from fahr.inference.photos import Photo, load_photo, status_of

#: with ``workers=None``, photos from which detection runs in worker processes
AUTO_WORKERS_FROM = 1000
#: detection workers run at this lower priority: the model (the consumer) gets a core whenever it has
#: crops to run and the workers take the rest, so neither a light nor a heavy model waits on the other
WORKER_NICENESS = 10
#: photos handed to the worker pool at a time (bounds the crops waiting for the model)
_WINDOW = 1024


def make_aligner(prep: dict[str, Any]):
    """A ``FaceAligner`` doing what ``prep`` (``fahr.inference.predict.resolve_preprocessing``) says:
    ``detect``, ``image_size``, ``margin``, ``multi_face``, ``min_confidence``."""
    from fahr.faces.align import FaceAligner

    return FaceAligner(image_size=int(prep["image_size"]), margin=float(prep["margin"]),
                       multi_face=prep["multi_face"], min_confidence=float(prep["min_confidence"]),
                       skip_detection=not prep["detect"])


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, e.g. a SLURM allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_workers(workers: int | None, photos: int, detect: bool = True) -> int:
    """Decoding (and detection) worker processes: the given number, or (None) none when faces are not
    detected or for fewer than :data:`AUTO_WORKERS_FROM` photos, and else one per usable CPU, at most 8.

    Without detection a photo costs its decoding and a resize, a fraction of the model's time (a
    200x200 JPEG: ~0.3 ms against ~2-9 ms of a ViT-Tiny on 2 threads): workers would take cores from the
    model and cost seconds to start (2,000 crops on 2 cores: 232 photos/s in one process against 191
    with 2 workers, 64 px; 112 against 71 at 112 px). With detection, starting workers costs about
    the time to align a few hundred photos in-process."""
    if workers is not None:
        return int(workers)
    if not detect or photos < AUTO_WORKERS_FROM:
        return 0
    return max(1, min(8, usable_cpus()))


def align_photo(photo: Photo, aligner) -> np.ndarray | str:
    """One photo -> its aligned crop (S, S, 3) uint8, or a status string
    (:data:`fahr.inference.photos.STATUSES`)."""
    try:
        image = load_photo(photo.path)
    except RejectedError as e:
        return status_of(e.reason)
    (res,) = aligner.align([image])
    return status_of(res.reason) if isinstance(res, RejectedError) else res.crop


#: a worker's aligners by preprocessing (one in practice; built on the first photo that needs it)
_WORKER_ALIGNERS: dict[tuple, Any] = {}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # the aligner runs on one thread anyway; the workers are the parallelism
    os.nice(WORKER_NICENESS)
    import fahr.faces.align  # noqa: F401 - the detector's imports are most of a worker's start-up: pay them now


def _align_in_worker(task: tuple[Photo, dict[str, Any]]) -> np.ndarray | str:
    photo, prep = task
    key = tuple(sorted(prep.items()))
    if key not in _WORKER_ALIGNERS:
        _WORKER_ALIGNERS[key] = make_aligner(prep)
    return align_photo(photo, _WORKER_ALIGNERS[key])


def start_workers(workers: int):
    """A pool of ``workers`` spawned detection processes (one torch thread each, lower priority),
    importing the detector as they start; None for 0. Start it early (before loading the model) so
    that start-up overlaps the caller's own; close it with ``terminate()`` (:func:`aligned_stream`
    does not close a pool it was given)."""
    if workers == 0:
        return None
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)


def aligned_stream(photos: Sequence[Photo], batch_size: int, prep: dict[str, Any], workers: int,
                   aligner=None, pool=None) -> Iterator[tuple[Sequence[Photo], list[np.ndarray | str]]]:
    """(chunk of ``batch_size`` photos, their crops or statuses), in input order.

    ``workers=0`` and no ``pool``: decoded and aligned here, by ``aligner`` (else one made from
    ``prep``). Else in ``pool`` (:func:`start_workers`), or in ``workers`` processes started here,
    while the caller runs the model on the previous chunk; at most ``_WINDOW`` photos are handed out
    ahead. Same crops either way."""
    if workers == 0 and pool is None:
        aligner = aligner or make_aligner(prep)
        for i in range(0, len(photos), batch_size):
            chunk = photos[i : i + batch_size]
            yield chunk, [align_photo(photo, aligner) for photo in chunk]
        return
    own = pool is None
    pool = start_workers(workers) if own else pool
    try:
        for start in range(0, len(photos), _WINDOW):
            window = photos[start : start + _WINDOW]
            results = pool.imap(_align_in_worker, [(photo, prep) for photo in window], chunksize=4)
            for i in range(0, len(window), batch_size):
                chunk = window[i : i + batch_size]
                yield chunk, [next(results) for _ in chunk]
    finally:
        if own:
            pool.terminate()
