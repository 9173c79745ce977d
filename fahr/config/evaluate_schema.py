"""Structured schema for ``conf/evaluate.yaml`` (``fahr evaluate``).

Kept apart from ``fahr.config.schema`` so the statistics command owns its config; the CLI module
registers it with Hydra's ConfigStore as ``evaluate_schema``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fahr.config.schema import bounded


@dataclass
class EvaluateColumnsConfig:
    """Names of the outcome columns in the input table."""

    time: str = "time"  # follow-up from photo to event or last contact, in `time_unit`
    event: str = "event"  # 1 = event (death), 0 = censored
    time_unit: str = "days"  # only used for axis labels and the report
    patient: Optional[str] = None  # pseudonymous id: checks one row per patient; never printed
    photo_date: Optional[str] = None  # with event_date: a photo after the event is an error
    event_date: Optional[str] = None  # date of the event or of last contact
    age: Optional[str] = None  # chronological age at the photo, years: FaceAge accuracy, age_decade, the gap


@dataclass
class MarkerConfig:
    """A prediction column to study. The hazard ratio is reported per `per` units (or SDs)."""

    column: str = MISSING
    label: str = ""  # name in the report; defaults to the marker's key
    per: float = bounded(1.0, above=0)  # HR per this many units of the column (or SDs when standardize)
    unit: str = ""  # e.g. "years"; "SD" is implied by standardize
    standardize: bool = False  # true: per `per` standard deviations (sample SD of the analysed rows)


@dataclass
class FarConfig:
    """Face Aging Rate analysis: one Cox model per interval bin, adjusted for the covariates."""

    column: Optional[str] = None  # FAR column; null = no FAR analysis
    interval_bin: str = "interval_bin"  # bin label ("10-365"), or the interval in days (binned here)
    bins: list[str] = field(default_factory=lambda: ["10-365", "366-730", "731-1460"])  # days, inclusive
    per: float = bounded(1.0, above=0)
    standardize: bool = True  # HR per 1 SD of FAR within the bin


@dataclass
class SubgroupsConfig:
    """Per-group statistics with bootstrap CIs (docs/evaluate.md, "Subgroups")."""

    columns: list[str] = field(default_factory=list)  # e.g. [sex, race, age_decade, site]; [] = no analysis
    min_n: int = bounded(20, lo=2)  # a smaller group is listed without estimates
    min_events: int = bounded(5, lo=1)  # ... and, for C-index and HR, one with fewer events


@dataclass
class IncrementalConfig:
    """NRI, IDI and time-dependent AUC of adding each marker to the clinical model at a horizon."""

    horizon: Optional[float] = bounded(None, above=0)  # in columns.time_unit (182 days ~ 6 months); null = off
    cutoffs: list[float] = bounded(lo=0, hi=1, factory=lambda: [0.06, 0.2])  # risk categories (categorical NRI)


@dataclass
class GapConfig:
    """FaceAge gap of the cohort against a reference CSV of healthy faces, adjusted for age."""

    reference: Optional[str] = None  # CSV with an age and a FaceAge column per healthy face; null = off
    age: Optional[str] = None  # its age column (null: the name of columns.age)
    faceage: Optional[str] = None  # its FaceAge column (null: the column of the FaceAge marker)


@dataclass
class BootstrapConfig:
    n: int = bounded(200, lo=10, hi=100_000)  # resamples of the patients per CI
    seed: int = 0


@dataclass
class EvaluateConfig:
    input: str = MISSING  # CSV, one row per patient
    output: str = MISSING  # directory for the tables, figures, report.md and summary.json
    columns: EvaluateColumnsConfig = field(default_factory=EvaluateColumnsConfig)
    markers: dict[str, MarkerConfig] = field(default_factory=dict)
    covariates: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)  # numeric covariates to dummy-code anyway
    far: FarConfig = field(default_factory=FarConfig)
    min_events: int = bounded(10, lo=1)  # fewer events (after dropping incomplete rows) is an error
    max_levels: int = bounded(20, lo=2)  # a categorical covariate with more levels (or > 1 per 2 rows) is an error
    faceage_marker: str = "faceage"  # the marker holding FaceAge in years (accuracy, the gap)
    subgroups: SubgroupsConfig = field(default_factory=SubgroupsConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)
    gap: GapConfig = field(default_factory=GapConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)


def register_evaluate_schema() -> None:
    """Register ``EvaluateConfig`` with Hydra's ConfigStore as ``evaluate_schema`` (idempotent)."""
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
