"""FaceAge (and risk) for raw photos: decode -> detect + align as the model card says -> batched model.

:func:`predict_photos` is the Python API (``fahr predict``, ``fahr far``, the FaceAge benchmark and
the demo call it); :func:`iter_predictions` is the same thing streamed chunk by chunk, so 100k
photos never sit in memory; :func:`time_photos_per_second` measures throughput with and without
detection.

Every output row has ``path``, ``status`` (see :data:`fahr.inference.photos.STATUSES`) and ``faceage``
(years, never below 0; empty unless ok), plus ``faceage_corrected`` when the card has an
``age_calibration`` ``{"slope", "intercept"}`` (corrected = max(0, (faceage - intercept) / slope),
years; a fine-tune keeps one only where it lowered the held-out error) and ``risk``
(log-hazard) when the model has an image-only risk head.

Two runtimes run the model: a :class:`~fahr.models.face_model.FaceModel` (PyTorch) or an
:class:`~fahr.models.onnx_export.OnnxFaceModel` (its ``model.onnx`` in onnxruntime, CPU). Everything
else (decoding, detection, alignment, resizing, calibration, the rows) is the same code for both.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fahr.boundary import InputError
from fahr.inference.align_stream import aligned_stream, make_aligner, resolve_workers
from fahr.inference.photos import Photo
from fahr.metrics.age import apply_bias_correction
from fahr.models.face_model import DEFAULT_PREPROCESSING, FaceModel
from fahr.models.onnx_export import OnnxFaceModel

#: a model either runtime runs: PyTorch, or its ONNX graph in onnxruntime
Model = FaceModel | OnnxFaceModel

#: preprocessing keys a caller may override (anything else in the card is descriptive)
PREPROCESSING_KEYS = ("detect", "image_size", "margin", "multi_face", "min_confidence")


# ---------------------------------------------------------------- set-up


def card_preprocessing(card: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's ``preprocessing`` (defaults for keys it lacks) with non-None ``overrides`` applied,
    each value checked; no judgement of whether the result matches the training crops."""
    prep = {k: DEFAULT_PREPROCESSING[k] for k in PREPROCESSING_KEYS}
    prep.update({k: v for k, v in card.get("preprocessing", {}).items() if k in PREPROCESSING_KEYS})
    unknown = set(overrides or {}) - set(PREPROCESSING_KEYS)
    if unknown:
        raise InputError(f"unknown preprocessing override(s) {sorted(unknown)}; known: {list(PREPROCESSING_KEYS)}")
    prep.update({k: v for k, v in (overrides or {}).items() if v is not None})
    from fahr.models.weights import check_preprocessing

    check_preprocessing(prep, "preprocessing")
    return prep


def training_crops(card: dict[str, Any]) -> str:
    """How the model's training crops were made: ``"fahr"`` (fahr's detector + template, so raw
    photos can be aligned the same way), ``"external"`` (crops made elsewhere, e.g. a dataset's own
    crops built with ``align.skip_detection=true``, or synthetic faces) or ``"unknown"``. Cards
    written before the ``crops`` key existed are read from their ``detect`` flag."""
    prep = card.get("preprocessing", {})
    if prep.get("crops") is not None:
        return prep["crops"]
    return "fahr" if prep.get("detect", True) else "external"


def resolve_preprocessing(card: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """What to do to each input photo: :func:`card_preprocessing`, once the request is known to give
    the model crops like its training crops (the model is only valid on those).

    - trained on fahr's crops: raw photos are detected and aligned as in training; ``detect=False``
      states that the inputs are such crops already; a ``margin`` or ``image_size`` other than the
      training crops' is refused;
    - trained on crops made elsewhere (``external``) or on crops of unrecorded origin (``unknown``):
      fahr cannot remake them from raw photos, so the caller must say ``detect=False`` (the inputs
      are crops made the same way as the training crops); for ``unknown`` crops ``detect=True`` is
      accepted as the caller's statement that the training crops were fahr's.

    Raises:
        InputError: a mismatch, naming the option and how the training crops were made.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    prep = card_preprocessing(card, overrides)
    trained = card.get("preprocessing", {})
    crops = training_crops(card)
    if crops == "fahr":
        for key in ("margin", "image_size"):
            if key in overrides and key in trained and overrides[key] != trained[key]:
                raise InputError(f"preprocessing.{key}={overrides[key]} differs from the crops this model was trained on "
                                 f"({key} {trained[key]}): its FaceAge on crops made differently is not valid; "
                                 f"leave preprocessing.{key} unset")
        return prep
    made = trained.get("source") or ("crops of unrecorded origin" if crops == "unknown" else "crops made outside fahr")
    if "detect" not in overrides:
        raise InputError(f"this model was trained on {made}, not on crops made by fahr's face detector and template, "
                         "so fahr cannot prepare raw photos for it: if the photos are already crops made the same way, "
                         "say preprocessing.detect=false; for raw photos use a model fine-tuned on shards built with "
                         "detection (`fahr shards` without align.skip_detection)")
    if overrides["detect"] and crops == "external":
        raise InputError(f"preprocessing.detect=true: fahr's detector and template make crops this model never saw (it "
                         f"was trained on {made}); use a model fine-tuned on shards built with detection, or give "
                         "crops made like its training crops with preprocessing.detect=false")
    return prep


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device=cuda but no CUDA GPU is visible: use device=cpu or device=auto")
    return torch.device(device)


def output_columns(model: Model, card: dict[str, Any]) -> list[str]:
    """The CSV columns :func:`iter_predictions` fills for this model."""
    cols = ["path", "status"]
    if "age" in photo_outputs(model):
        cols.append("faceage")
        if card.get("age_calibration"):
            cols.append("faceage_corrected")
    if "risk" in photo_outputs(model):
        cols.append("risk")
    return cols


def photo_outputs(model: Model) -> list[str]:
    """What the model predicts from photos alone: ``"age"`` (an age head) and ``"risk"`` (a risk head
    without clinical covariates, which photos do not carry)."""
    if isinstance(model, OnnxFaceModel):
        covariates = {name: cfg.get("num_covariates", 0) for name, cfg in model.heads.items()}
    else:
        covariates = {name: getattr(head, "num_covariates", 0) for name, head in model.heads.items()}
    return [name for name in ("age", "risk") if name in covariates and not covariates[name]]


def model_image_size(model: Model) -> int:
    """S, the side of the crops the model takes."""
    return model.img_size if isinstance(model, OnnxFaceModel) else int(model.backbone.patch_embed.img_size[0])


def model_device(model: Model, device: str) -> torch.device:
    """The device the model runs on: :func:`resolve_device` for PyTorch; the CPU for onnxruntime
    (``device`` must be ``auto`` or ``cpu``)."""
    if not isinstance(model, OnnxFaceModel):
        return resolve_device(device)
    if device not in ("auto", "cpu"):
        raise InputError(f"runtime=onnx runs on the CPU (onnxruntime's CPU provider): use device=cpu or auto, "
                         f"not {device!r}")
    return torch.device("cpu")


# ---------------------------------------------------------------- model


def resize_crops(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (N, 3, H, W), uint8 or float -> (N, 3, size, size), same dtype: bilinear, antialiased, exactly as
    torchvision's ``transforms.v2.functional.resize(crops, [size, size], antialias=True)`` (what the
    training loaders do), without importing torchvision (~1 s of predict's start-up): uint8 is
    interpolated natively on CPUs where torchvision does so (AVX2/AVX512, ARM), otherwise in float32
    and rounded back. tests/test_predict.py checks it against torchvision."""
    import platform

    if tuple(crops.shape[-2:]) == (size, size) or crops.numel() == 0:
        return crops
    native = crops.dtype in (torch.float32, torch.float64) or (
        crops.dtype == torch.uint8 and crops.device.type == "cpu"
        and (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")))
    x = crops if native else crops.float()
    out = torch.nn.functional.interpolate(x, size=[size, size], mode="bilinear", align_corners=False, antialias=True)
    return out if native else out.round_().to(crops.dtype)


@torch.inference_mode()
def run_model(model: Model, crops: torch.Tensor, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """uint8 crops (N, 3, S, S) -> ``{"age": (N,) years, "risk": (N,) log-hazard}`` float64, each
    present when the model predicts it from photos (:func:`photo_outputs`).

    Crops whose side differs from the model's ``img_size`` are resized (bilinear, antialiased, as
    the training loaders do), for both runtimes. PyTorch: bf16 autocast on CUDA only (CPU bf16 is
    slow and less exact). ONNX: the graph in onnxruntime on the CPU (``device`` is the CPU).
    """
    size = model_image_size(model)
    wanted = photo_outputs(model)
    out: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    if not wanted:
        return {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for i in range(0, len(crops), batch_size):
        x = crops[i : i + batch_size].to(device, non_blocking=True)
        x = resize_crops(x, size)
        if isinstance(model, OnnxFaceModel):
            for name, values in model(x.numpy(), outputs=wanted).items():
                out[name].append(values)
            continue
        with autocast:
            feats = model.features(x)
            for name in wanted:
                out[name].append(model.heads[name](feats)[name].float().cpu().numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


# ---------------------------------------------------------------- photos -> rows


def _rows_for_chunk(photos: Sequence[Photo], aligned: list[np.ndarray | str], model: Model,
                    card: dict[str, Any], columns: list[str], batch_size: int,
                    device: torch.device) -> list[dict[str, Any]]:
    rows = [dict.fromkeys(columns) | {"path": p.label, "status": "ok"} for p in photos]
    ok = [j for j, a in enumerate(aligned) if not isinstance(a, str)]
    for j, a in enumerate(aligned):
        if isinstance(a, str):
            rows[j]["status"] = a
    if not ok:
        return rows
    crops = torch.from_numpy(np.stack([aligned[j] for j in ok])).permute(0, 3, 1, 2).contiguous()
    preds = run_model(model, crops, batch_size, device)
    for name, values in preds.items():
        if not np.isfinite(values).all():  # finite weights, finite inputs: only a broken model gets here
            raise InputError(f"the model gave a non-finite {name} for {int((~np.isfinite(values)).sum())} photo(s): "
                             "its weights or normalisation are broken; re-export it")
    cal = card.get("age_calibration")
    if "age" in preds:
        ages = np.maximum(preds["age"], 0.0)  # a regression head can go below 0; an age cannot
        corrected = apply_bias_correction(ages, cal) if cal else None
    for k, j in enumerate(ok):
        if "age" in preds:
            rows[j]["faceage"] = float(ages[k])
            if corrected is not None:
                rows[j]["faceage_corrected"] = float(corrected[k])
        if "risk" in preds:
            rows[j]["risk"] = float(preds["risk"][k])
    return rows


def _as_photos(paths: Iterable[str | Path | Photo]) -> list[Photo]:
    return [p if isinstance(p, Photo) else Photo(str(p), Path(p)) for p in paths]


def iter_predictions(model: Model, card: dict[str, Any], paths: Iterable[str | Path | Photo], *,
                     batch_size: int = 32, device: str = "auto", preprocessing: dict[str, Any] | None = None,
                     aligner=None, progress: Callable[[int], None] | None = None,
                     workers: int | None = 0, pool=None) -> Iterator[dict[str, Any]]:
    """Yield one row per input photo, in input order, ``batch_size`` photos decoded at a time.

    Args:
        model: a :class:`FaceModel` (moved to ``device`` and set to eval mode here) or an
            :class:`~fahr.models.onnx_export.OnnxFaceModel` (CPU).
        card: its model card (``preprocessing``, optional ``age_calibration``).
        paths: photo paths, or :class:`~fahr.inference.photos.Photo` (label, path) pairs.
        batch_size: photos decoded, aligned and run through the model per step (peak memory is
            this many decoded photos, per worker).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"auto"`` or ``"cpu"`` for ONNX).
        preprocessing: overrides of the card's preprocessing (``detect``, ``image_size``, ``margin``,
            ``multi_face``, ``min_confidence``; ``None`` values keep the card's).
        aligner: a ready ``FaceAligner`` (else built from the resolved preprocessing); in-process only.
            The caller answers for its crops matching the training crops: no check is made.
        progress: called with the number of photos done after each step.
        workers: processes that decode and align photos while this one runs the model (0: all in
            this process; None: :func:`resolve_workers` decides). The rows do not depend on it.
        pool: detection workers already started (:func:`fahr.inference.align_stream.start_workers`),
            used instead of ``workers`` and left open.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    dev = model_device(model, device)
    if isinstance(model, FaceModel):
        model = model.to(dev).eval()
    # a caller-made aligner vouches for its own crops (time_photos_per_second times both ways)
    prep = resolve_preprocessing(card, preprocessing) if aligner is None else card_preprocessing(card, preprocessing)
    columns = output_columns(model, card)
    photos = _as_photos(paths)
    n_workers = 0 if aligner is not None else resolve_workers(workers, len(photos), prep["detect"])
    for chunk, aligned in aligned_stream(photos, batch_size, prep, n_workers, aligner, pool):
        yield from _rows_for_chunk(chunk, aligned, model, card, columns, batch_size, dev)
        if progress is not None:
            progress(len(chunk))


def predict_photos(model: Model, card: dict[str, Any], paths: Iterable[str | Path | Photo],
                   **kwargs: Any) -> list[dict[str, Any]]:
    """One dict per photo, in input order: ``path``, ``status``, ``faceage`` (years, None unless ok)
    [, ``faceage_corrected``, ``risk``]. Keyword arguments as :func:`iter_predictions`."""
    return list(iter_predictions(model, card, paths, **kwargs))


# ---------------------------------------------------------------- reporting


def summarize(rows_status: Counter, seconds: float) -> str:
    """One line: photos, photos/s and counts by status."""
    n = sum(rows_status.values())
    rate = n / seconds if seconds > 0 else float("nan")
    counts = ", ".join(f"{s} {c}" for s, c in sorted(rows_status.items(), key=lambda kv: -kv[1]))
    return f"{n} photos in {seconds:.1f} s ({rate:.1f} photos/s): {counts or 'none'}"


def time_photos_per_second(model: Model, card: dict[str, Any], paths: Sequence[str | Path], *,
                           batch_size: int = 32, device: str = "auto", warmup: int = 2) -> dict[str, float]:
    """Photos/s of :func:`predict_photos` on ``paths`` (decode and model always included):

    - ``with_detection``: detection + alignment as the card says;
    - ``without_detection``: ``detect=False`` (photos only resized), i.e. decode + model;
    - ``model_only``: the model on ready uint8 crops.

    The first ``warmup`` photos are run once first (detector and model warm-up, not timed).
    """
    prep = card_preprocessing(card)  # both ways on purpose: this times the stages, it predicts nothing
    result: dict[str, float] = {"photos": float(len(paths))}
    for name, detect in (("with_detection", True), ("without_detection", False)):
        aligner = make_aligner({**prep, "detect": detect})
        kw = dict(batch_size=batch_size, device=device, aligner=aligner)
        predict_photos(model, card, list(paths)[:warmup], **kw)
        t0 = time.perf_counter()
        predict_photos(model, card, paths, **kw)
        result[name] = len(paths) / (time.perf_counter() - t0)
    dev = model_device(model, device)
    crops = torch.randint(0, 256, (len(paths), 3, prep["image_size"], prep["image_size"]), dtype=torch.uint8)
    run_model(model, crops[:warmup], batch_size, dev)
    t0 = time.perf_counter()
    run_model(model, crops, batch_size, dev)
    result["model_only"] = len(paths) / (time.perf_counter() - t0)
    return result
