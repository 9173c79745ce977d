"""Structured schemas for ``conf/robustness.yaml`` (``fahr robustness``) and ``conf/saliency.yaml``
(``fahr saliency``), composed from the ConfigStore like ``fahr predict`` (see
:mod:`fahr.config.inference_schema`: ``model=EXPORT_DIR`` must not be read as a config group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fahr.config.inference_schema import PreprocessingOverrides, register_yaml_config
from fahr.config.schema import bounded


@dataclass
class RobustnessConfig:
    model: str = MISSING  # export directory (fahr-model/1): FaceAge and/or risk heads
    input: str = MISSING  # folder of photos, one photo, or a CSV with `path` (and optional `age`, years)
    output: str = MISSING  # directory: robustness.csv/.md, one figure per family, summary.json
    perturbations: Optional[list[str]] = None  # names from fahr.analysis.perturbations.PERTURBATIONS; null: all
    max_photos: int = bounded(500, lo=1, hi=100_000)  # the first photos of the input, in its order
    threshold_years: float = bounded(5.0, above=0, hi=100)  # "moved" = |FaceAge change| above this
    seed: int = bounded(0, lo=0, hi=2**31 - 1)  # sensor noise of photo i is drawn from seed + i
    batch_size: int = bounded(32, lo=1, hi=4096)
    device: str = "auto"  # auto, cpu, cuda
    preprocessing: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)


@dataclass
class SaliencyConfig:
    model: str = MISSING  # FaceAge export (fahr-model/1 with an age head)
    input: str = MISSING  # as for robustness; ages (CSV `age`) give the per-decade maps
    output: str = MISSING  # directory
    risk_model: Optional[str] = None  # FaceSurvival export (image-only risk head); null: model's own risk head, if any
    methods: list[str] = field(default_factory=lambda: ["rollout", "integrated_gradients"])
    max_photos: int = bounded(64, lo=1, hi=10_000)
    ig_steps: int = bounded(32, lo=2, hi=1024)  # integration steps of integrated gradients
    baseline: str = bounded("mean", choices=("mean", "black"))  # IG baseline: the normalisation mean (grey) or black
    sanity_seed: int = bounded(0, lo=0, hi=2**31 - 1)  # seed of the weight-randomised model
    photo_figures: int = bounded(8, lo=0, hi=1000)  # per-photo figures of the first photos (0: none)
    batch_size: int = bounded(16, lo=1, hi=1024)
    device: str = "auto"
    preprocessing: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)


def register_robustness() -> None:
    """Schema + ``conf/robustness.yaml``, for ``@hydra.main(config_path=None, config_name="robustness")``."""
    ConfigStore.instance().store(name="robustness_schema", node=RobustnessConfig)
    register_yaml_config("robustness")


def register_saliency() -> None:
    """Schema + ``conf/saliency.yaml``, for ``@hydra.main(config_path=None, config_name="saliency")``."""
    ConfigStore.instance().store(name="saliency_schema", node=SaliencyConfig)
    register_yaml_config("saliency")
