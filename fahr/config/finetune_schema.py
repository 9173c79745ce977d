"""Schemas of the fine-tuning commands (``fahr finetune-age``), strict like fahr.config.schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from fahr.config.schema import (
    IMAGENET_MEAN, IMAGENET_STD, LoggerConfig, ModelConfig, PathsConfig, TrainerConfig,
)


@dataclass
class SyntheticSplitsConfig:
    """Synthetic labelled faces, one generator seed per split (so no face is in two splits)."""
    out_dir: str = MISSING
    train: int = 2048
    val: int = 256
    test: int = 256
    samples_per_shard: int = 256
    seed: int = 1


@dataclass
class LabelledDataConfig:
    """Labelled shards: each of train/val/test is an ``index.json#<split>`` of ``fahr shards``, an
    ``index.json``, a brace pattern or a list of URLs."""
    name: str = MISSING
    root: Optional[str] = None  # e.g. a `fahr shards` output dir that train/val/test interpolate
    train: Any = MISSING
    val: Any = MISSING
    test: Any = None
    image_size: int = 112
    batch_size: int = 64  # per device
    eval_batch_size: int = 128
    num_workers: int = 2
    clinical: bool = False
    synthetic: bool = False
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    generate: Optional[SyntheticSplitsConfig] = None


@dataclass
class BalanceConfig:
    mode: str = "sampler"  # "sampler" (weighted sampling), "loss" (per-sample loss weights) or "none"
    bin_width: float = 10.0  # years
    max_weight: float = 10.0  # cap, relative to the most frequent bin's weight


@dataclass
class AgeHeadConfig:
    min_age: float = 0.0
    max_age: float = 100.0
    bin_width: float = 1.0  # years per bin of the distribution head
    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0


@dataclass
class StageConfig:
    max_steps: int = MISSING  # 0 skips the stage
    base_lr: float = 1e-3  # LR = base_lr * effective_batch / 256
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # stage 2: LR of block i scaled by layer_decay ** (depth + 1 - i)
    drop_path_rate: float = 0.0
    val_every_n_steps: int = 100


@dataclass
class AgeTaskConfig:
    loss: str = "distribution"  # "distribution" (softmax over bins, expectation) or "l1"
    label_sigma: float = 2.0  # years: Gaussian label distribution around the true age (0 = one-hot)
    head: AgeHeadConfig = field(default_factory=AgeHeadConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(max_steps=200, base_lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(
        max_steps=1000, base_lr=5e-4, warmup_steps=50, layer_decay=0.75, drop_path_rate=0.1))
    hflip: bool = True
    bias_correction: bool = True  # also report metrics after a linear correction fitted on val


@dataclass
class FinetuneAgeConfig:
    experiment_name: str = "faceage"
    run_id: Optional[str] = None
    seed: int = 0
    resume: bool = True
    backbone: Optional[str] = None  # a `fahr export` directory; None trains from scratch
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: LabelledDataConfig = field(default_factory=LabelledDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture when training from scratch
    task: AgeTaskConfig = field(default_factory=AgeTaskConfig)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=-1))  # steps: task.stageN
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    export_dir: Optional[str] = None  # default: <run_dir>/export


def register_finetune_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="finetune_age_schema", node=FinetuneAgeConfig)
