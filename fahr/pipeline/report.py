"""`fahr report`: folders of results -> one self-contained HTML page (fahr.report)."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import fahr
from fahr.boundary import InputError, check_output_file, printable_path
from fahr.report.html import Section, page
from fahr.report.sections import collect
from fahr.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


def input_folders(value: Any) -> list[Path]:
    """``input`` as a list of folders: one path or a list of paths (empty is an error)."""
    if isinstance(value, (list, ListConfig)):
        folders = [str(v) for v in value]
    elif isinstance(value, str) and value.strip():
        folders = [value]
    else:
        folders = []
    if not folders or not all(f.strip() for f in folders):
        raise InputError("input is required: `fahr report RUN_DIR output=report.html`, or input=[DIR1,DIR2] "
                         "(run directories, exports, `fahr evaluate` outputs, analysis outputs)")
    return [Path(f) for f in folders]


def write_report(folders: list[Path], output: Path, title: str | None = None) -> dict[str, Any]:
    """Collect the sections of each folder and write the page atomically; returns ``{"output",
    "sections", "left_out"}`` (left-out files as ``folder/file -> reason``)."""
    sections: list[Section] = []
    left_out: dict[str, str] = {}
    for folder in folders:
        got = collect(folder)
        sections += got.sections
        left_out.update({f"{folder.name}/{name}": why for name, why in got.left_out.items()})
    if left_out:
        note = Section("Left out of this page")
        note.table(["file", "why"], [[k, v] for k, v in sorted(left_out.items())])
        sections.append(note)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_text(output, page(title or "fahr report", f"fahr {fahr.__version__}, written {when}", sections))
    log.info("fahr report: %d section(s), %d file(s) left out -> %s", len([s for s in sections if s]),
             len(left_out), printable_path(output))
    return {"output": str(output), "sections": len([s for s in sections if s]), "left_out": left_out}


def report(cfg: DictConfig) -> str:
    """Run ``fahr report``; returns the path written."""
    from fahr.config.report_schema import ReportConfig
    from fahr.config.schema import validate

    validate(cfg, ReportConfig)
    folders = input_folders(OmegaConf.to_container(cfg, resolve=True)["input"])
    output = check_output_file(cfg.output, "output", inputs=tuple(folders))
    if output.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"output={printable_path(output)}: give an .html file name")
    return write_report(folders, output, cfg.title)["output"]
