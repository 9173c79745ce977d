"""ONNX for fine-tuned face models: ``model.onnx`` beside ``model.safetensors``, and its checked loading.

:func:`export_onnx` turns the :class:`~fahr.models.face_model.FaceModel` of a ``fahr-model/1`` export
directory into one ONNX graph, ``model.onnx`` in that directory. The graph is ``FaceModel.forward`` in
eval mode, so nothing of the model is left for a caller to re-implement:

- input ``images``: uint8 (batch, 3, S, S) RGB crops, S = the card's ``backbone.img_size``; the
  normalisation ``(x / 255 - mean) / std`` and, when the card's ``flip_average`` is true, the mean of
  the features of each photo and its mirror image happen inside the graph;
- input ``covariates``: float32 (batch, C), only when the risk head takes C clinical covariates
  (standardised as the card's ``covariates`` scaler says, exactly what the PyTorch head takes);
- outputs, those ``FaceModel.forward`` returns: ``features`` (batch, D), ``age`` (batch,) years and
  ``logits`` (batch, K) for an age head (``logits`` for distribution heads only), ``risk`` (batch,)
  log-hazard for a risk head;
- the batch axis is dynamic (one graph for batch 1 and batch N).

Before anything is written the graph is run in onnxruntime on a check batch and compared with
PyTorch (:data:`PARITY_TOLERANCE`); ``model.onnx`` is written atomically, then the card gains an
``onnx`` record: the file, its opset and sha256, the sha256 of the ``model.safetensors`` it was made
from, a sha256 of the card facts baked into the graph (backbone, heads, normalisation,
flip_average), the graph's inputs and outputs, and the check's differences. :func:`load_onnx_model`
refuses a ``model.onnx`` that no longer matches (weights re-exported, card edited, file replaced or
damaged) with one line saying what to run. A backbone-only export (``fahr-backbone/1``) is refused:
the ONNX graph is for FaceAge and FaceSurvival models.

onnx, onnxscript (export) and onnxruntime (loading) are optional (``pip install 'fahr[onnx]'``) and
imported only here, inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fahr import boundary
from fahr.boundary import FileRefused, InputError, check_regular_file, printable_path, read_regular_file
from fahr.models.face_model import FaceModel, load_face_model
from fahr.models.weights import CARD_FILE, MAX_WEIGHTS_BYTES, MODEL_FORMAT, WEIGHTS_FILE, read_any_card
from fahr.utils.atomic import atomic_write, atomic_write_json

#: the graph's file name inside the export directory
ONNX_FILE = "model.onnx"
#: ONNX opset of the export: the lowest the torch.export-based exporter writes natively (opset 18 is
#: run by onnxruntime >= 1.14)
DEFAULT_OPSET = 18
#: opsets the export accepts (the exporter's own translation starts at 18)
OPSET_RANGE = (18, 23)
#: largest difference allowed between the graph's and PyTorch's outputs on the check batch: years
#: (age) and log-hazard (risk); for features and logits, times their largest magnitude (if above 1)
PARITY_TOLERANCE = 1e-4
#: largest ``model.onnx`` read (bytes): one protobuf holds at most 2 GiB
MAX_ONNX_BYTES = 2 * 1024**3
#: the card facts a graph bakes in: a change to any of them makes ``model.onnx`` stale
GRAPH_CARD_KEYS = ("format", "backbone", "heads", "normalization", "flip_average")
#: photos in the export's check batch (>= 2: torch.export specialises a batch of 1 to a constant)
CHECK_BATCH = 3

_INSTALL_HINT = "pip install 'fahr[onnx]'"


def export_command(export_dir: str | Path) -> str:
    """The command that (re)writes ``model.onnx`` for ``export_dir``, for messages."""
    return f"`fahr export format=onnx model={printable_path(export_dir)}`"


def file_sha256(path: str | Path, max_bytes: int, what: str) -> str:
    """Hex sha256 of a regular file of at most ``max_bytes`` (read in 1 MiB blocks).

    Raises:
        InputError: missing, not a regular file, or too large (naming ``what`` and the path).
    """
    try:
        check_regular_file(path, max_bytes)
    except FileRefused as err:
        raise InputError(f"{what} {printable_path(path)}: {err.detail}") from None
    return boundary.file_sha256(path)


def graph_card_sha256(card: dict[str, Any]) -> str:
    """sha256 of the card facts the graph bakes in (:data:`GRAPH_CARD_KEYS`), as canonical JSON."""
    facts = {key: card.get(key, False if key == "flip_average" else None) for key in GRAPH_CARD_KEYS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def graph_io(model: FaceModel) -> tuple[list[str], list[str]]:
    """(input names, output names) of ``model``'s graph: ``images`` [+ ``covariates``]; ``features``
    then each head's outputs in ``FaceModel.forward``'s order."""
    risk = model.heads["risk"] if "risk" in model.heads else None
    inputs = ["images"] + (["covariates"] if risk is not None and risk.num_covariates else [])
    outputs = ["features"]
    for name, head in model.heads.items():
        if name == "age":
            outputs += ["age"] + (["logits"] if head.kind == "distribution" else [])
        else:
            outputs.append(name)
    return inputs, outputs


class _FaceModelGraph(nn.Module):
    """``FaceModel.forward`` with positional inputs and a tuple of outputs, as the exporter traces it."""

    def __init__(self, model: FaceModel, outputs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, images: torch.Tensor, covariates: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.model(images, covariates)
        return tuple(out[name] for name in self.outputs)


def check_inputs(model: FaceModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random uint8 images (``batch``, 3, S, S) [+ float32 covariates (``batch``, C)] for ``model``."""
    gen = torch.Generator().manual_seed(seed)
    size = int(model.backbone.patch_embed.img_size[0])
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
    risk = model.heads["risk"] if "risk" in model.heads else None
    if risk is not None and risk.num_covariates:
        return images, torch.randn(batch, risk.num_covariates, generator=gen)
    return (images,)


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The graph optimiser logs every pass at INFO (hundreds of lines under the CLI's INFO logging):
    warnings and errors only, while it runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_bytes(model: FaceModel, opset: int = DEFAULT_OPSET) -> bytes:
    """The serialised ONNX graph of ``model`` (in eval mode) with a dynamic batch axis.

    The torch.export-based exporter (``dynamo=True``, needs onnxscript) and not the legacy TorchScript
    one: on torch 2.14 the TorchScript exporter gave features off by up to 0.78 for a model with
    ``flip_average`` (the mirrored branch traced wrong; measured on vit_test), while this one matches
    PyTorch to ~1e-6; the TorchScript exporter is also deprecated ("will be removed").
    """
    try:
        import onnx  # noqa: F401 - the exporter's own dependencies, checked here for a one-line error
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise InputError(f"ONNX export needs the onnx and onnxscript packages ({err.name} is not installed): "
                         f"{_INSTALL_HINT}") from None
    model = model.eval()
    inputs, outputs = graph_io(model)
    example = check_inputs(model, 2)
    batch = torch.export.Dim("batch", min=1)
    graph = _FaceModelGraph(model, outputs).eval()
    with warnings.catch_warnings(), _quiet_loggers("onnxscript", "onnx_ir"):
        # two inputs share the batch axis: the exporter says it names it once ("batch"), which is what we want
        warnings.filterwarnings("ignore", message=r".*axis name: batch will not be used.*")
        program = torch.onnx.export(graph, example, dynamo=True, opset_version=opset, input_names=inputs,
                                    output_names=outputs, dynamic_shapes={k: {0: batch} for k in inputs},
                                    optimize=True, verbose=False, report=False)
    return program.model_proto.SerializeToString()


def _session_options(threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # as many threads as torch uses (OMP_NUM_THREADS, else the cores; torch.set_num_threads applies),
    # so the two runtimes are compared on equal terms; one graph at a time, no inter-op pool
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # fatal only: a graph it cannot load becomes fahr's one-line InputError, and its own coloured log
    # line would be a second line on stderr; its warnings are about graph optimisations, not the user's
    options.log_severity_level = 4
    # model.onnx is an ONNX protobuf, never onnxruntime's own (flatbuffer) format
    options.add_session_config_entry("session.load_model_format", "ONNX")
    return options


def _session(data: bytes, path: Path, threads: int | None):
    """An onnxruntime CPU session on the graph ``data`` (read from ``path``); :class:`InputError` when
    onnxruntime is missing or cannot load it.

    The graph is handed over as bytes, never as a path: onnxruntime then resolves no file beside it, so
    a ``model.onnx`` naming external data (``../secret``, ``/dev/zero``) is refused, not read."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError(f"runtime=onnx needs onnxruntime, which is not installed: {_INSTALL_HINT} "
                         "(or use runtime=torch)") from None
    try:
        return ort.InferenceSession(data, sess_options=_session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for a bad graph
        raise InputError(f"{printable_path(path)}: onnxruntime cannot load it as an ONNX model ({type(err).__name__}); "
                         f"re-create it with {export_command(path.parent)}") from None


def _max_differences(ours: dict[str, np.ndarray], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(np.abs(ours[name].astype(np.float64) - ref[name].double().numpy()).max()) for name in ours}


def export_onnx(export_dir: str | Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write ``export_dir/model.onnx`` for the fine-tuned model in ``export_dir`` and record it in the
    card (see the module docstring); returns the card's new ``onnx`` record.

    Raises:
        InputError: not a fine-tuned model export (a backbone, a table model, a missing or broken
            card or weights file), an opset outside :data:`OPSET_RANGE`, the export packages missing,
            or a graph whose outputs differ from PyTorch's by more than :data:`PARITY_TOLERANCE` on
            the check batch (then nothing is written).
    """
    export_dir = Path(export_dir)
    lo, hi = OPSET_RANGE
    if not lo <= int(opset) <= hi:
        raise InputError(f"opset must be in [{lo}, {hi}], got {opset}")
    card = read_any_card(export_dir)
    if card["format"] != MODEL_FORMAT:
        raise InputError(f"{printable_path(export_dir)} holds a backbone ({card['format']}) without task heads: ONNX "
                         "export is for fine-tuned FaceAge / FaceSurvival models (`fahr finetune-age`, "
                         "`fahr finetune-survival`)")
    weights_sha256 = file_sha256(export_dir / WEIGHTS_FILE, MAX_WEIGHTS_BYTES, "weights")
    model, card = load_face_model(export_dir)
    inputs, outputs = graph_io(model)
    data = onnx_bytes(model, opset)
    path = export_dir / ONNX_FILE
    session = _session(data, path, threads=None)
    example = check_inputs(model, CHECK_BATCH, seed=1)
    with torch.inference_mode():
        ref = model(*example)
    got = dict(zip(outputs, session.run(outputs, {k: v.numpy() for k, v in zip(inputs, example)})))
    diffs = _max_differences(got, ref)
    for name, diff in diffs.items():
        # years and log-hazard: the absolute tolerance; features and logits: relative to their scale
        scale = 1.0 if name in ("age", "risk") else max(1.0, float(ref[name].abs().max()))
        allowed = PARITY_TOLERANCE * scale
        if not diff <= allowed:
            raise InputError(f"{printable_path(export_dir)}: the ONNX graph's {name} differs from PyTorch's by "
                             f"{diff:.3g} (> {allowed:.3g}) on a check batch; nothing was written")
    record = {
        "file": ONNX_FILE, "opset": int(opset), "sha256": hashlib.sha256(data).hexdigest(),
        "weights_sha256": weights_sha256, "card_sha256": graph_card_sha256(card),
        "inputs": inputs, "outputs": outputs, "dynamic_axes": {name: {"0": "batch"} for name in inputs + outputs},
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__.split('+')[0]}",
        "check": {"photos": CHECK_BATCH, "inputs": "random uint8 images", "max_abs_diff": diffs},
    }
    atomic_write(path, lambda f: f.write(data), mode="wb")
    atomic_write_json(export_dir / CARD_FILE, {**card, "onnx": record})
    return record


def check_onnx_record(card: dict[str, Any], export_dir: Path) -> dict[str, Any]:
    """The card's ``onnx`` record after checking its fields' types; :class:`InputError` when there is
    none (no ONNX export yet) or it is malformed."""
    record = card.get("onnx")
    where = printable_path(export_dir / CARD_FILE)
    if record is None:
        raise InputError(f"{where} records no ONNX graph: run {export_command(export_dir)} first")
    hexes = ("sha256", "weights_sha256", "card_sha256")
    ok = (isinstance(record, dict) and record.get("file") == ONNX_FILE
          and all(isinstance(record.get(k), str) and len(record[k]) == 64 for k in hexes)
          and isinstance(record.get("inputs"), list) and isinstance(record.get("outputs"), list)
          and record["inputs"][:1] == ["images"] and set(record["inputs"]) <= {"images", "covariates"}
          and "features" in record["outputs"] and set(record["outputs"]) <= {"features", "age", "logits", "risk"})
    if not ok:
        raise InputError(f"{where}: onnx must be the record {export_command(export_dir)} writes "
                         f"(file {ONNX_FILE}, sha256s, inputs, outputs); run it again")
    return record


class OnnxFaceModel:
    """A fine-tuned model's ``model.onnx`` in an onnxruntime CPU session: the ONNX counterpart of
    :class:`~fahr.models.face_model.FaceModel` in eval mode.

    Attributes:
        img_size: S, the side of the uint8 crops the graph takes.
        heads: the card's head configs (name -> config), as ``FaceModel.heads`` for the head names.
        inputs, outputs: the graph's input and output names.
        threads: onnxruntime's intra-op threads.
    """

    def __init__(self, session, card: dict[str, Any], record: dict[str, Any], threads: int) -> None:
        self.session = session
        self.img_size = int(card["backbone"]["img_size"])
        self.heads = dict(card["heads"])
        self.inputs = list(record["inputs"])
        self.outputs = list(record["outputs"])
        self.threads = threads
        risk = self.heads.get("risk") or {}
        self.num_covariates = int(risk.get("num_covariates", 0))

    def __call__(self, images: np.ndarray, covariates: np.ndarray | None = None,
                 outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """uint8 (B, 3, S, S) [+ float32 covariates (B, C)] -> ``{output name: float32 array}``, the
        ``outputs`` asked for (default: all). Without covariates a covariate risk head's ``risk``
        cannot be asked for; the other outputs do not depend on them."""
        names = list(outputs or self.outputs)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, self.img_size, self.img_size):
            raise TypeError(f"OnnxFaceModel takes uint8 images (B, 3, {self.img_size}, {self.img_size}), "
                            f"got {images.dtype} {images.shape}")
        feeds = {"images": np.ascontiguousarray(images)}
        if self.num_covariates:
            if covariates is None:
                if "risk" in names:
                    raise InputError(f"the risk head takes {self.num_covariates} clinical covariates per photo; "
                                     "none were given")
                # the graph needs the input; features and age do not depend on it
                covariates = np.zeros((len(images), self.num_covariates), dtype=np.float32)
            feeds["covariates"] = np.ascontiguousarray(covariates, dtype=np.float32)
        return dict(zip(names, self.session.run(names, feeds)))


def _check_graph(session, record: dict[str, Any], img_size: int, path: Path) -> None:
    """The loaded graph has the inputs and outputs the card records, uint8 images of the card's size."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    images = inputs.get("images")
    fits = (sorted(inputs) == sorted(record["inputs"]) and outputs == record["outputs"] and images is not None
            and images.type == "tensor(uint8)" and list(images.shape[1:]) == [3, img_size, img_size])
    if not fits:
        raise InputError(f"{printable_path(path)}: its inputs/outputs do not match the card (expected uint8 images "
                         f"(batch, 3, {img_size}, {img_size}) -> {record['outputs']}); re-create it with "
                         f"{export_command(path.parent)}")


def load_onnx_model(export_dir: str | Path, threads: int | None = None) -> tuple[OnnxFaceModel, dict[str, Any]]:
    """(the export's ``model.onnx`` in an onnxruntime CPU session, the card), after checking that it is
    the graph of these weights and this card.

    Args:
        export_dir: a ``fahr-model/1`` export directory on which ``fahr export format=onnx`` ran.
        threads: onnxruntime intra-op threads (None: ``torch.get_num_threads()``).

    Raises:
        InputError (one line saying what to run): not a fine-tuned model export; no ``onnx`` record in
            the card; ``model.onnx`` missing, too large, replaced or damaged (sha256), stale (the
            safetensors or the graph's card facts changed since the export); onnxruntime missing or
            unable to load it; a graph whose inputs/outputs differ from the card's.
    """
    export_dir = Path(export_dir)
    card = read_any_card(export_dir)
    if card["format"] != MODEL_FORMAT:
        raise InputError(f"{printable_path(export_dir)} holds a backbone ({card['format']}) without task heads: "
                         "runtime=onnx needs a fine-tuned model export")
    record = check_onnx_record(card, export_dir)
    rerun = f"run {export_command(export_dir)} again"
    if graph_card_sha256(card) != record["card_sha256"]:
        raise InputError(f"{printable_path(export_dir / ONNX_FILE)} is stale: the model card's backbone, heads, "
                         f"normalization or flip_average changed since it was exported; {rerun}")
    if file_sha256(export_dir / WEIGHTS_FILE, MAX_WEIGHTS_BYTES, "weights") != record["weights_sha256"]:
        raise InputError(f"{printable_path(export_dir / ONNX_FILE)} is stale: {WEIGHTS_FILE} changed since it was "
                         f"exported; {rerun}")
    path = export_dir / ONNX_FILE
    try:
        data = read_regular_file(path, MAX_ONNX_BYTES)
    except FileRefused as err:
        raise InputError(f"{printable_path(path)}: {err.detail}; {rerun}") from None
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise InputError(f"{printable_path(path)} is not the graph the card records (sha256 differs: replaced or "
                         f"damaged since the export); {rerun}")
    threads = int(threads or torch.get_num_threads())
    session = _session(data, path, threads)
    _check_graph(session, record, int(card["backbone"]["img_size"]), path)
    return OnnxFaceModel(session, card, record, threads), card


__all__ = ["DEFAULT_OPSET", "ONNX_FILE", "OnnxFaceModel", "export_onnx", "load_onnx_model"]
