"""`fahr predict`: a ``PredictConfig`` -> one CSV row per input photo (FaceAge, corrected, risk).

The CSV is streamed into a temporary file and renamed at the end (atomic); a summary (counts by
status, photos/s) is logged. Paths are logged, image content never.
"""

from __future__ import annotations

import contextvars
import csv
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError, check_output_file, printable_path, spreadsheet_safe
from fahr.config.inference_schema import PredictConfig
from fahr.config.schema import validate
from fahr.utils.atomic import atomic_write

log = logging.getLogger("fahr.predict")


def format_value(value: Any) -> Any:
    """CSV cell: None -> empty, floats to 4 decimals (years / log-hazard), text neutralised for
    spreadsheets (:func:`fahr.boundary.spreadsheet_safe`), others unchanged."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4f}"
    return spreadsheet_safe(value)


def write_csv(path: str, columns: list[str], rows: Iterable[dict[str, Any]]) -> int:
    """Stream ``rows`` into ``path`` atomically; returns the number of rows written."""
    written = 0

    def write(f) -> None:
        nonlocal written
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: format_value(row.get(k)) for k in columns})
            written += 1

    atomic_write(path, write, mode="w")
    return written


def preprocessing_overrides(cfg: DictConfig) -> dict[str, Any]:
    """The non-null ``preprocessing.*`` keys of the config."""
    return {k: v for k, v in OmegaConf.to_container(cfg.preprocessing).items() if v is not None}


def detects_faces(cfg: DictConfig) -> bool:
    """Whether the run detects faces, known before the model card is read (the workers start first):
    only ``preprocessing.detect=false`` turns detection off, as a model trained on crops made elsewhere
    needs it said (:func:`fahr.inference.predict.resolve_preprocessing`)."""
    return preprocessing_overrides(cfg).get("detect", True) is not False


def resolve_runtime(export_dir: str, runtime: str = "auto", device: str = "auto") -> str:
    """``"torch"`` or ``"onnx"``. ``auto``: ONNX where it is the faster choice, i.e. the export has an
    ONNX graph (``fahr export format=onnx``: an ``onnx`` record in its card), onnxruntime is installed
    and the model runs on the CPU (``device=cpu``, or ``auto`` without a visible GPU); else PyTorch.
    The two agree to 1e-4 years / log-hazard (tests/test_onnx.py)."""
    if runtime != "auto":
        return runtime
    import importlib.util

    import torch

    from fahr.models.weights import read_any_card

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    has_graph = "onnx" in read_any_card(export_dir)
    return "onnx" if on_cpu and has_graph and importlib.util.find_spec("onnxruntime") is not None else "torch"


def load_model(export_dir: str, runtime: str = "torch"):
    """(model, card) from an export directory: a ``FaceModel`` (``runtime="torch"``) or its
    ``model.onnx`` in onnxruntime (``"onnx"``, :func:`fahr.models.onnx_export.load_onnx_model`);
    :class:`InputError` when it is not a valid one (for ONNX: also missing, stale or unloadable).
    ``runtime="auto"``: :func:`resolve_runtime` on the CPU."""
    if runtime == "auto":
        runtime = resolve_runtime(export_dir, runtime, "cpu")
    if runtime == "onnx":
        from fahr.models.onnx_export import load_onnx_model

        return load_onnx_model(export_dir)
    if runtime != "torch":
        raise InputError(f"runtime must be auto, torch or onnx, got {runtime!r}")
    from fahr.models.face_model import load_face_model

    return load_face_model(export_dir)


#: most photos decoded and aligned per step (peak memory is this many decoded photos)
MAX_BATCH_SIZE = 4096


def check_inference_options(cfg: DictConfig) -> None:
    """The options ``predict`` and ``far`` share, checked before any work."""
    from fahr.models.weights import check_preprocessing

    if not 1 <= cfg.batch_size <= MAX_BATCH_SIZE:
        raise InputError(f"batch_size must be in [1, {MAX_BATCH_SIZE}], got {cfg.batch_size}")
    if cfg.device not in ("auto", "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    check_preprocessing(preprocessing_overrides(cfg), "preprocessing")
    if cfg.get("runtime", "torch") == "onnx" and cfg.device not in ("auto", "cpu"):  # robustness, saliency: torch
        raise InputError(f"runtime=onnx runs on the CPU (onnxruntime's CPU provider): use device=cpu or auto, "
                         f"not {cfg.device!r}")


def model_files(export_dir: str) -> tuple[str, ...]:
    """The files of an export directory (inputs that an output must never overwrite)."""
    from fahr.models.onnx_export import ONNX_FILE
    from fahr.models.weights import CARD_FILE, WEIGHTS_FILE

    return tuple(str(Path(export_dir) / name) for name in (CARD_FILE, WEIGHTS_FILE, ONNX_FILE))


#: torch's thread count when the running command began (or first imported torch): what it restores
_THREADS_BEFORE: contextvars.ContextVar[int | None] = contextvars.ContextVar("fahr_threads_before", default=None)


def model_threads(threads: int | None, workers: int) -> int:
    """The model's threads, set as torch's thread count (onnxruntime sessions created afterwards
    follow it; the commands restore it when they end: :func:`torch_threads_restored`): ``threads``,
    or (None) torch's count (``OMP_NUM_THREADS``, else the cores) less one per detection worker, at
    least 1, so the model does not fight the workers for cores (oversubscribed OpenMP threads wait
    on each other). The workers run at a lower priority, so the model gets its core when it has work."""
    import torch

    if _THREADS_BEFORE.get() is None:
        _THREADS_BEFORE.set(torch.get_num_threads())
    n_threads = int(threads) if threads else max(1, torch.get_num_threads() - workers)
    torch.set_num_threads(n_threads)
    return n_threads


def torch_threads_restored(command):
    """``command`` that leaves torch's thread count as it found it (:func:`model_threads` changes it), so a
    caller that goes on in the same process (the demo, a notebook) keeps its own. It does not import
    torch itself: the detection workers start before the command's first torch import (~1 s)."""
    import functools

    @functools.wraps(command)
    def run(cfg):
        torch = sys.modules.get("torch")
        token = _THREADS_BEFORE.set(torch.get_num_threads() if torch is not None else None)
        try:
            return command(cfg)
        finally:
            before, torch = _THREADS_BEFORE.get(), sys.modules.get("torch")
            if before is not None and torch is not None:
                torch.set_num_threads(before)
            _THREADS_BEFORE.reset(token)

    return run


@torch_threads_restored
def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fahr predict``; returns ``{"output", "photos", "counts", "seconds", "photos_per_second",
    "runtime"}``. ``cfg.runtime`` picks PyTorch or the export's ONNX graph (``auto``:
    :func:`resolve_runtime`); only the model forward differs."""
    from fahr.inference.align_stream import resolve_workers, start_workers
    from fahr.inference.photos import list_photos

    validate(cfg, PredictConfig)
    photos = list_photos(cfg.input)
    t0 = time.perf_counter()
    workers = resolve_workers(cfg.workers, len(photos), detects_faces(cfg))
    # the workers' start-up (seconds of imports) overlaps this process's own: checks, imports, model load
    pool = start_workers(workers)
    try:
        check_inference_options(cfg)
        check_output_file(cfg.output, "output", inputs=(cfg.input, *model_files(cfg.model)))
        from tqdm import tqdm

        from fahr.inference.predict import iter_predictions, output_columns, resolve_preprocessing, summarize
        from fahr.models.weights import read_any_card

        read_any_card(cfg.model)  # a wrong model is the first thing to say, before the photos
        if not photos:
            raise InputError(f"no photos in {printable_path(cfg.input)} (image extensions: jpg, jpeg, png, bmp, "
                             "gif, tif(f), webp, ppm, pgm)")

        threads = model_threads(cfg.threads, workers)  # before the model: ONNX fixes its threads
        runtime = resolve_runtime(cfg.model, cfg.runtime, cfg.device)
        model, card = load_model(cfg.model, runtime)
        overrides = preprocessing_overrides(cfg)
        log.info("%d photos from %s; runtime %s, %d thread(s); %d detection worker(s); preprocessing %s",
                 len(photos), cfg.input, runtime, threads, workers, resolve_preprocessing(card, overrides))
        counts: Counter = Counter()

        def rows():
            for row in iter_predictions(model, card, photos, batch_size=cfg.batch_size, device=cfg.device,
                                        preprocessing=overrides, progress=bar.update, pool=pool):
                counts[row["status"]] += 1
                yield row

        with tqdm(total=len(photos), desc="predict", unit="photo", disable=None) as bar:
            written = write_csv(cfg.output, output_columns(model, card), rows())
    finally:
        if pool is not None:
            pool.terminate()
    seconds = time.perf_counter() - t0
    assert written == len(photos), "one output row per input photo"
    log.info("fahr predict: %s -> %s", summarize(counts, seconds), cfg.output)
    return {"output": cfg.output, "photos": written, "counts": dict(counts), "seconds": seconds,
            "photos_per_second": written / seconds if seconds > 0 else float("nan"), "runtime": runtime}
