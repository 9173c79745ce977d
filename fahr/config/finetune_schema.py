"""Schemas of the fine-tuning commands (``fahr finetune-age``, ``fahr finetune-survival``), strict like
fahr.config.schema, sharing its run and streamed-photo parts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from fahr.config.schema import ModelConfig, RunConfig, StreamedPhotosConfig, bounded


@dataclass
class SyntheticSplitsConfig:
    """Synthetic labelled faces, one generator seed per split (so no face is in two splits)."""
    out_dir: str = MISSING
    train: int = bounded(2048, lo=1)
    val: int = bounded(256, lo=1)
    test: int = bounded(256, lo=1)
    samples_per_shard: int = bounded(256, lo=1)
    seed: int = bounded(1, lo=0)


@dataclass
class LabelledDataConfig(StreamedPhotosConfig):
    """Labelled shards: each of train/val/test is an ``index.json#<split>`` of ``fahr shards``, an
    ``index.json``, a brace pattern or a list of URLs."""
    name: str = MISSING
    root: Optional[str] = None  # e.g. a `fahr shards` output dir that train/val/test interpolate
    train: Any = MISSING
    val: Any = MISSING
    test: Any = None
    eval_batch_size: int = bounded(128, lo=1, hi=65536)
    generate: Optional[SyntheticSplitsConfig] = None


@dataclass
class BalanceConfig:
    mode: str = bounded("sampler", choices=("sampler", "loss", "none"))  # weighted sampling, loss weights, or none
    bin_width: float = bounded(10.0, above=0.0, hi=120.0)  # years
    max_weight: float = bounded(10.0, lo=1.0, hi=1e6)  # cap, relative to the most frequent bin's weight


@dataclass
class AgeHeadConfig:
    min_age: float = bounded(0.0, lo=-50.0, hi=200.0)
    max_age: float = bounded(100.0, lo=-50.0, hi=200.0)
    bin_width: float = bounded(1.0, lo=0.05, hi=50.0)  # years per bin of the distribution head
    hidden: list[int] = bounded(lo=1, hi=65536, factory=list)
    dropout: float = bounded(0.0, lo=0.0, hi=0.95)


@dataclass
class StageConfig:
    max_steps: int = bounded(lo=0)  # 0 skips the stage
    base_lr: float = bounded(1e-3, lo=0.0, hi=1.0)  # LR = base_lr * effective_batch / 256 (0 freezes the stage)
    min_lr: float = bounded(1e-6, lo=0.0, hi=1.0)
    warmup_steps: int = bounded(0, lo=0)
    weight_decay: float = bounded(0.05, lo=0.0, hi=10.0)
    layer_decay: float = bounded(1.0, above=0.0, hi=1.0)  # stage 2: LR of block i scaled by layer_decay ** (depth + 1 - i)
    drop_path_rate: float = bounded(0.0, lo=0.0, hi=0.9)
    val_every_n_steps: int = bounded(100, lo=1)


@dataclass
class AugmentConfig:
    """Training augmentation (fahr.data.augment): alignment jitter and photometric, per sample, training only. Every
    probability defaults to 0 (off); the magnitudes are used only when their probability is above 0."""
    greyscale_p: float = bounded(0.0, lo=0.0, hi=1.0)  # greyscale (ITU-R 601), kept 3-channel: old scans
    lighting_p: float = bounded(0.0, lo=0.0, hi=1.0)  # brightness + contrast + gamma + colour temperature together
    brightness: float = bounded(0.3, lo=0.0, hi=0.9)  # factor uniform in [1 - b, 1 + b]
    contrast: float = bounded(0.3, lo=0.0, hi=0.9)  # factor uniform in [1 - c, 1 + c]
    gamma: float = bounded(0.3, lo=0.0, hi=1.0)  # gamma = exp(u), |u| <= this
    colour_temperature: float = bounded(0.1, lo=0.0, hi=0.5)  # red gain 1 + t, blue gain 1 - t, |t| <= this
    blur_p: float = bounded(0.0, lo=0.0, hi=1.0)
    blur_sigma: float = bounded(1.5, lo=0.1, hi=10.0)  # pixels: sigma uniform in [0.1, this]
    jpeg_p: float = bounded(0.0, lo=0.0, hi=1.0)
    jpeg_quality: list[int] = bounded(lo=1, hi=100, factory=lambda: [30, 90])  # [lo, hi], quality uniform in it
    noise_p: float = bounded(0.0, lo=0.0, hi=1.0)
    noise_std: float = bounded(5.0, lo=0.0, hi=64.0)  # Gaussian sensor noise, 0-255 units
    affine_p: float = bounded(0.0, lo=0.0, hi=1.0)  # alignment jitter: rotation + scale + shift together
    rotation: float = bounded(10.0, lo=0.0, hi=180.0)  # degrees: angle uniform in [-r, r]
    scale: float = bounded(0.1, lo=0.0, hi=0.9)  # factor uniform in [1 - s, 1 + s]
    shift: float = bounded(0.05, lo=0.0, hi=0.5)  # fraction of the side, uniform in [-s, s] in x and y


@dataclass
class AgeTaskConfig:
    loss: str = bounded("distribution", choices=("distribution", "l1"))  # softmax over bins (expectation), or L1
    label_sigma: float = bounded(2.0, lo=0.0, hi=50.0)  # years: Gaussian label distribution around the true age (0 = one-hot)
    head: AgeHeadConfig = field(default_factory=AgeHeadConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(max_steps=200, base_lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(
        max_steps=1000, base_lr=5e-4, warmup_steps=50, layer_decay=0.75, drop_path_rate=0.1))
    hflip: bool = True
    flip_average: bool = True  # validate, test and predict on the mean of photo + mirror features
    bias_correction: bool = True  # also report metrics after a linear correction fitted on val
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # alignment jitter + photometric, training only (after hflip)


@dataclass
class FinetuneConfig(RunConfig):
    """What both fine-tunes' configs hold besides the run: the backbone they start from and where the
    export goes. Their training length is in ``task`` (``trainer.max_steps`` stays unset)."""
    backbone: Optional[str] = None  # a `fahr export` directory; None trains from scratch (model.*)
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture when training from scratch
    export_dir: Optional[str] = None  # default: <run_dir>/export


@dataclass
class FinetuneAgeConfig(FinetuneConfig):
    experiment_name: str = "faceage"
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    task: AgeTaskConfig = field(default_factory=AgeTaskConfig)


@dataclass
class SimulatedCohortConfig:
    """``data.generate``: the demo's semi-synthetic cohort (fahr.data.cohort_simulator), written to
    ``out_dir`` once and reused while these settings stay the same."""
    out_dir: str = MISSING
    n_patients: int = bounded(600, lo=10, hi=1_000_000)
    seed: int = 0
    photos_per_patient: int = bounded(1, lo=1, hi=100)
    image_size: int = bounded(112, lo=16, hi=1024)
    samples_per_shard: int = bounded(256, lo=1, hi=1_000_000)


@dataclass
class SurvivalDataConfig(StreamedPhotosConfig):
    """``mode: images``: labelled shards (``fahr shards source=cohort``: json with ``followup_days``,
    ``event``, ``person``, covariates). ``mode: table``: CSVs where every column but ``time`` and
    ``event`` is a feature (DeepSurv mode)."""
    name: str = MISSING
    mode: str = bounded("images", choices=("images", "table"))
    root: Optional[str] = None
    train: Any = MISSING
    val: Any = None  # None: a deterministic val_fraction of train (table mode)
    test: Any = None
    val_fraction: float = bounded(0.2, above=0.0, hi=0.9)
    time: str = "followup_days"  # column / label of the follow-up time (days for cohorts)
    event: str = "event"  # 1 = death observed, 0 = censored
    covariates: list[str] = field(default_factory=list)  # images: clinical labels fed to the head too
    batch_size: int = bounded(64, lo=0, hi=65536)  # per device; table mode: 0 = the whole training table in one batch
    eval_batch_size: int = bounded(128, lo=1, hi=65536)
    clinical: bool = True
    generate: Optional[SimulatedCohortConfig] = None  # the demo's semi-synthetic cohort


@dataclass
class RiskHeadConfig:
    hidden: list[int] = bounded(lo=1, hi=65536, factory=lambda: [64])
    dropout: float = bounded(0.1, lo=0.0, hi=0.95)


@dataclass
class SurvivalTaskConfig:
    ties: str = bounded("efron", choices=("efron", "breslow"))
    head: RiskHeadConfig = field(default_factory=RiskHeadConfig)
    max_steps: int = bounded(1000, lo=1)
    base_lr: float = bounded(1e-3, above=0.0, hi=1.0)  # images: LR = base_lr * effective_batch / 256; table: the LR itself
    min_lr: float = bounded(1e-6, lo=0.0, hi=1.0)
    warmup_steps: int = bounded(0, lo=0)
    weight_decay: float = bounded(1e-4, lo=0.0, hi=10.0)
    layer_decay: float = bounded(0.75, above=0.0, hi=1.0)
    drop_path_rate: float = bounded(0.1, lo=0.0, hi=0.9)
    freeze_backbone: bool = False  # train the head only (a linear/MLP probe)
    val_every_n_steps: int = bounded(50, lo=1)
    early_stopping_patience: int = bounded(0, lo=0)  # stop after this many validations without a lower val/loss; 0 = never
    person_aggregation: str = bounded("mean", choices=("mean", "first"))  # per person: mean risk over photos, or the first photo's
    horizons_days: list[float] = bounded(above=0.0, factory=lambda: [365.0, 730.0, 1825.0])
    hflip: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # images mode: alignment jitter + photometric, training only


@dataclass
class FinetuneSurvivalConfig(FinetuneConfig):
    experiment_name: str = "facesurvival"
    data: SurvivalDataConfig = field(default_factory=SurvivalDataConfig)
    task: SurvivalTaskConfig = field(default_factory=SurvivalTaskConfig)


def register_finetune_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="finetune_age_schema", node=FinetuneAgeConfig)
    ConfigStore.instance().store(name="finetune_survival_schema", node=FinetuneSurvivalConfig)
