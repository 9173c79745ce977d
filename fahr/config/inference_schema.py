"""Structured schemas for ``conf/predict.yaml`` (``fahr predict``), ``conf/far.yaml`` (``fahr far``) and
``conf/export_onnx.yaml`` (``fahr export format=onnx``): the commands that take an export directory.

Each CLI module registers its schema with Hydra's ConfigStore (``predict_schema`` / ``far_schema``),
so a misspelt key (``batchsize=8``) fails at start-up naming the key.

The YAML file itself is also put in the ConfigStore (:func:`register_yaml_config`) and the app is
composed from there, not from ``conf/``: ``conf/`` has a ``model`` config group (backbone sizes), and
Hydra reads ``model=EXPORT_DIR`` as a choice from a group whenever one of that name is on its search
path ("Could not override 'model'. No match in the defaults list").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from fahr.config.schema import bounded


@dataclass
class PreprocessingOverrides:
    """Overrides of the model card's ``preprocessing``; null keeps the card's value."""

    detect: Optional[bool] = None  # false: inputs are already aligned crops, only resized
    image_size: Optional[int] = None  # side of the aligned crop, pixels
    margin: Optional[float] = None  # template zoom-out, e.g. 0.25
    multi_face: Optional[str] = None  # "reject", "largest", "central"
    min_confidence: Optional[float] = None  # detector probability, 0-1


@dataclass
class PredictConfig:
    model: str = MISSING  # export directory: model.safetensors + model_card.json (fahr-model/1)
    input: str = MISSING  # directory (scanned recursively) or CSV with a `path` column
    output: str = MISSING  # CSV, one row per input photo
    batch_size: int = 32  # photos decoded + aligned + inferred per step
    device: str = "auto"  # auto, cpu, cuda
    # torch: the FaceModel in PyTorch; onnx: the export's model.onnx in onnxruntime, CPU (`fahr export format=onnx`);
    # auto: onnx when the export has one, onnxruntime is installed and the model runs on the CPU, else torch
    runtime: str = bounded("auto", choices=("auto", "torch", "onnx"))
    workers: Optional[int] = bounded(None, lo=0, hi=64)  # decoding + detection processes; null: 0 below 1000 photos or without detection, else 1 per CPU (<= 8)
    # the model's threads (torch intra-op, or onnxruntime's); null: torch's count (OMP_NUM_THREADS, else the
    # cores) less one per detection worker, at least 1: the workers already keep those cores busy
    threads: Optional[int] = bounded(None, lo=1, hi=256)
    preprocessing: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)


@dataclass
class OnnxExportConfig:
    """``fahr export format=onnx model=EXPORT_DIR``: the fine-tuned model's ``model.onnx``, written
    beside its ``model.safetensors`` (:func:`fahr.models.onnx_export.export_onnx`)."""

    format: str = bounded("onnx", choices=("onnx",))
    model: str = MISSING  # export directory of a fine-tuned model: model.safetensors + model_card.json (fahr-model/1)
    opset: int = bounded(18, lo=18, hi=23)  # ONNX opset (18: onnxruntime >= 1.14)


@dataclass
class FarConfig:
    model: str = MISSING
    input: str = MISSING  # CSV: person, path, and date (ISO) or age_at_photo (years)
    output: str = MISSING  # CSV, one row per person
    method: str = "pair"  # "pair" (widest gap, as in the FAR study) or "slope" (least squares)
    # null: FaceAge corrected when the card keeps an age_calibration (a fine-tune keeps one only where it
    # lowered the held-out error: age_calibration_decision), else as predicted; true / false force it
    # (true needs a card with a calibration). The correction divides every change by its slope.
    use_corrected: Optional[bool] = None
    photos_output: Optional[str] = None  # optional CSV of the per-photo predictions
    batch_size: int = 32
    device: str = "auto"
    runtime: str = bounded("auto", choices=("auto", "torch", "onnx"))  # as for predict
    workers: Optional[int] = bounded(None, lo=0, hi=64)  # as for predict
    threads: Optional[int] = bounded(None, lo=1, hi=256)  # as for predict
    preprocessing: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)


def register_predict_schema() -> None:
    """Register ``PredictConfig`` as ``predict_schema`` (idempotent)."""
    ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


def register_far_schema() -> None:
    """Register ``FarConfig`` as ``far_schema`` (idempotent)."""
    ConfigStore.instance().store(name="far_schema", node=FarConfig)


def register_yaml_config(name: str) -> None:
    """Store ``conf/<name>.yaml`` (its defaults list included) in the ConfigStore under ``name``."""
    from fahr.cli._hydra import config_dir

    ConfigStore.instance().store(name=name, node=OmegaConf.load(Path(config_dir()) / f"{name}.yaml"))


def register_export_onnx() -> None:
    """``OnnxExportConfig`` as ``export_onnx_schema`` + ``conf/export_onnx.yaml``, for
    ``@hydra.main(config_path=None, config_name="export_onnx")`` (``model=`` is a path here, not the
    ``model`` group of the pretraining configs)."""
    ConfigStore.instance().store(name="export_onnx_schema", node=OnnxExportConfig)
    register_yaml_config("export_onnx")


def register_predict() -> None:
    """Schema + ``conf/predict.yaml``, for ``@hydra.main(config_path=None, config_name="predict")``."""
    register_predict_schema()
    register_yaml_config("predict")


def register_far() -> None:
    """Schema + ``conf/far.yaml``, for ``@hydra.main(config_path=None, config_name="far")``."""
    register_far_schema()
    register_yaml_config("far")
