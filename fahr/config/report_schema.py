"""Schema of `fahr report` (conf/report.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ReportConfig:
    # a folder or a list of folders, in order: run directories, exports, `fahr evaluate` outputs, analysis outputs
    input: Any = field(default_factory=list)
    output: str = MISSING  # the .html file written
    title: Optional[str] = None  # default: "fahr report"


def register_report_schema() -> None:
    """Register ``ReportConfig`` as ``report_schema`` (idempotent)."""
    ConfigStore.instance().store(name="report_schema", node=ReportConfig)
