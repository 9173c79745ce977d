"""The report's sections, read from what fahr's commands wrote: run directories, exports, ``fahr evaluate``
outputs and analysis folders (any folder of aggregate CSV tables and PNG figures).

Only aggregate results go in. A run directory's own CSV files (predictions, evaluation inputs) are
per-row files and never shown. Elsewhere a CSV is shown only when it reads as an aggregate table: no
identifier-like column (person, patient, photo, path, ...), no per-patient outcome column (time,
event, dates), at most :data:`MAX_TABLE_ROWS` rows, and at least one column of text labels naming what
each row is (a table of numbers only is taken for per-row data). Command lines and file paths (they
can name data) are left out too; every file left out is listed with the reason.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fahr.boundary import FileRefused, InputError, check_regular_file, printable_path, read_json_file, read_text_file
from fahr.report.html import Section

MAX_TABLE_ROWS = 300
MAX_FIGURE_BYTES = 20 * 1024**2
MAX_CSV_BYTES = 32 * 1024**2
#: column names that identify a person or a photo: such a table is never shown
IDENTIFIER_COLUMNS = re.compile(r"(?i)^(person|patient|subject|id|photo|image|path|file|filename|name|sha1|sha256|key|"
                                r"url|.*_id|.*_path|.*_file)$")
#: per-patient outcome columns: a table holding one is per-row data, whatever its other columns
OUTCOME_COLUMNS = re.compile(r"(?i)^(time|event|status|death|dead|followup|followup_days|days|duration|"
                             r".*_date|date|dob|birth.*)$")
#: packages whose versions the provenance shows
PACKAGES = ("fahr", "torch", "lightning", "timm", "webdataset", "hydra-core", "lifelines", "scikit-survival", "numpy")
#: config sections shown, as numbers, booleans and short strings without path separators
CONFIG_SECTIONS = ("experiment_name", "seed", "model", "data", "task", "trainer")


@dataclass
class Collected:
    """The sections of one input folder and the files left out of them (relative name -> reason)."""

    sections: list[Section] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)


def collect(folder: Path) -> Collected:
    """Sections for ``folder``: a run directory (``run.json``), an export (``model_card.json``), an evaluation
    (``summary.json`` + ``report.md``) or an analysis folder (CSV tables and PNG figures)."""
    if not folder.is_dir():
        raise InputError(f"input={printable_path(folder)}: not a directory (give a run, export, evaluate or "
                         "analysis output folder)")
    out = Collected()
    if (folder / "run.json").is_file():
        _run(folder, out)
    elif (folder / "model_card.json").is_file():
        _export(folder, f"Model card ({folder.name})", out)
    elif (folder / "summary.json").is_file() and (folder / "report.md").is_file():
        _evaluation(folder, folder, out, f"Clinical statistics ({folder.name})")
    else:
        _tables_and_figures(folder, folder, f"Results: {folder.name}", out)
    if not out.sections:
        raise InputError(f"input={printable_path(folder)}: no fahr results found (run.json, model_card.json, "
                         "summary.json + report.md, or CSV tables and PNG figures)")
    return out


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _run(run_dir: Path, out: Collected) -> None:
    info = read_json_file(run_dir / "run.json", "run file")
    if not isinstance(info, dict):
        raise InputError(f"{printable_path(run_dir / 'run.json')}: not a fahr run file (a JSON object)")
    facts = Section(f"Run {info.get('experiment_name', '?')} / {info.get('run_id', '?')}")
    facts.table(["fact", "value"], [[k, info[k]] for k in ("experiment_name", "run_id") if k in info])
    prov = run_dir / "provenance.json"
    if prov.is_file():
        p = read_json_file(prov, "provenance")
        p = p if isinstance(p, dict) else {}
        packages = p.get("packages") if isinstance(p.get("packages"), dict) else {}
        git = p.get("git")
        if isinstance(git, dict):
            git = f"{git.get('sha', '?')}{' (uncommitted changes)' if git.get('dirty') else ''}"
        rows = [["git", git], ["python", p.get("python")], ["platform", p.get("platform")]]
        rows += [[name, packages[name]] for name in PACKAGES if packages.get(name)]
        facts.heading("Provenance")
        facts.table(["what", "version"], [r for r in rows if r[1]])
        facts.text("The command line and file paths are left out: they can name data.", "note")
    config = run_dir / "config.yaml"
    if config.is_file():
        rows = _config_rows(read_text_file(config, "run config", 16 * 1024**2))
        if rows:
            facts.heading("Configuration (numbers, switches and names)")
            facts.table(["key", "value"], rows)
    out.sections.append(facts)
    label = str(info.get("experiment_name", run_dir.name))
    _curves(run_dir, out, label)
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        flat = _flatten(read_json_file(metrics, "metrics"))
        if flat:
            sec = Section(f"{label}: metrics (metrics.json)")
            sec.table(["metric", "value"], [[k, v] for k, v in flat])
            out.sections.append(sec)
    figures = run_dir / "figures"
    if figures.is_dir():
        _tables_and_figures(figures, run_dir, f"{label}: figures", out, tables=False)
    if (run_dir / "export" / "model_card.json").is_file():
        _export(run_dir / "export", f"{label}: model card", out)
    for sub in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name not in ("figures", "export")):
        if (sub / "summary.json").is_file() and (sub / "report.md").is_file():
            _evaluation(sub, run_dir, out, f"{label}: clinical statistics ({sub.name})")
    for csv in sorted(run_dir.glob("*.csv")):
        if csv.name != "metrics.csv":
            out.left_out[_rel(csv, run_dir)] = "a run's per-row file (predictions or evaluation input)"


def _config_rows(text: str) -> list[list[Any]]:
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    if not isinstance(cfg, dict):
        return []
    rows = []
    for key in CONFIG_SECTIONS:
        if key in cfg:
            rows += [[k, v] for k, v in _flatten({key: cfg[key]}, keep_text=True)
                     if not (isinstance(v, str) and ("/" in v or "\\" in v or len(v) > 80))]
    return rows


def _flatten(obj: Any, prefix: str = "", keep_text: bool = False, limit: int = 400) -> list[tuple[str, Any]]:
    """Leaves of nested dicts as (``a.b.c``, value): finite numbers, booleans (and short text when
    ``keep_text``); lists of numbers longer than 8 (a baseline hazard, a curve) are skipped."""
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), keep_text, limit - len(out))
            if len(out) >= limit:
                break
    elif isinstance(obj, list):
        if len(obj) <= 8 and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in obj):
            if keep_text or all(not isinstance(v, str) for v in obj):
                out.append((prefix, ", ".join(str(v) for v in obj)))
    elif isinstance(obj, bool) or (isinstance(obj, (int, float)) and math.isfinite(obj)):
        out.append((prefix, obj))
    elif keep_text and isinstance(obj, str):
        out.append((prefix, obj))
    return out[:limit]


def _curves(run_dir: Path, out: Collected, label: str) -> None:
    """Training curves from every Lightning ``metrics.csv`` of the run (stages included)."""
    import pandas as pd

    from fahr.utils.plots import training_curves_png

    sec = Section(f"{label}: training curves")
    for csv in sorted(run_dir.rglob("metrics.csv")):
        if "export" in csv.relative_to(run_dir).parts:
            continue
        try:
            check_regular_file(csv, MAX_CSV_BYTES)
            frame = pd.read_csv(csv)
        except (FileRefused, ValueError, OSError):
            out.left_out[_rel(csv, run_dir)] = "not a readable metrics table"
            continue
        if "step" not in frame.columns:
            continue
        curves = {}
        for col in frame.columns:
            if col in ("step", "epoch") or not pd.api.types.is_numeric_dtype(frame[col]):
                continue
            part = frame[["step", col]].dropna()
            if len(part) >= 2:
                curves[col] = (part["step"].to_numpy(float), part[col].to_numpy(float))
        if curves:
            sec.png(training_curves_png(curves), f"{_rel(csv, run_dir)}: by optimiser step")
    if sec:
        out.sections.append(sec)


def _export(export_dir: Path, title: str, out: Collected) -> None:
    from fahr.models.weights import read_any_card

    card = read_any_card(export_dir)
    sec = Section(title)
    skip = ("baseline_hazard", "metrics", "git", "created_utc")
    sec.table(["key", "value"], [[k, v] for k, v in _flatten({k: v for k, v in card.items() if k not in skip},
                                                                keep_text=True)
                                  if not (isinstance(v, str) and ("/" in v and k != "format"))])
    metrics = card.get("metrics")
    if isinstance(metrics, dict) and metrics:
        sec.heading("Metrics recorded in the card")
        sec.table(["metric", "value"], [[k, v] for k, v in _flatten(metrics)])
    out.sections.append(sec)


def _evaluation(folder: Path, root: Path, out: Collected, title: str) -> None:
    summary = read_json_file(folder / "summary.json", "evaluation summary")
    sec = Section(title)
    flags = summary.get("flags") if isinstance(summary, dict) else None
    if isinstance(flags, list) and flags:
        sec.heading("Flags")
        for flag in flags[:50]:
            sec.text(str(flag.get("message", flag)) if isinstance(flag, dict) else str(flag))
    out.sections.append(sec)
    _tables_and_figures(folder, root, "", out, into=sec)


def _tables_and_figures(folder: Path, root: Path, title: str, out: Collected, tables: bool = True,
                        into: Section | None = None, skip: tuple[str, ...] = ()) -> None:
    """The aggregate CSV tables and the PNG figures directly in ``folder``, into ``into`` or a new section."""
    sec = into if into is not None else Section(title)
    if tables:
        for csv in sorted(folder.glob("*.csv")):
            if csv.name not in skip:
                _table_file(csv, root, sec, out)
    for png in sorted(folder.glob("*.png")):
        try:
            check_regular_file(png, MAX_FIGURE_BYTES)
            sec.png(png.read_bytes(), _rel(png, root))
        except FileRefused as err:
            out.left_out[_rel(png, root)] = err.detail
    if into is None and sec:
        out.sections.append(sec)


def _table_file(csv: Path, root: Path, sec: Section, out: Collected) -> None:
    import pandas as pd

    name = _rel(csv, root)
    try:
        check_regular_file(csv, MAX_CSV_BYTES)
        frame = pd.read_csv(io.BytesIO(csv.read_bytes()), dtype=str, keep_default_na=False)
    except (FileRefused, ValueError, OSError):
        out.left_out[name] = "not a readable CSV table"
        return
    columns = [str(c).strip() for c in frame.columns]
    if any(IDENTIFIER_COLUMNS.match(c) for c in columns):
        out.left_out[name] = "per-person or per-photo table (identifier column)"
        return
    if any(OUTCOME_COLUMNS.match(c) for c in columns):
        out.left_out[name] = "per-patient table (outcome or date column)"
        return
    if len(frame) > MAX_TABLE_ROWS:
        out.left_out[name] = f"per-row table ({len(frame):,} rows > {MAX_TABLE_ROWS})"
        return
    if len(frame) and not any(isinstance(_cell(v), str) and v != "" for c in frame.columns for v in frame[c]):
        out.left_out[name] = "numbers only, no row labels (taken for per-row data)"
        return
    sec.heading(name)
    sec.table([str(c) for c in frame.columns], [[_cell(v) for v in row] for row in frame.itertuples(index=False)])


def _cell(text: str) -> Any:
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
