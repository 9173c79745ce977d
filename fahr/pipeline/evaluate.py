"""`fahr evaluate`: per-patient predictions + clinical columns -> Cox tables, KM figures, report.

Reads one CSV (one row per patient), checks it (``fahr.stats.validation``), drops rows with a missing
covariate or marker (complete-case; counted in the report), then writes to ``output/``:

    hazard_ratios.csv   marker HRs, unadjusted and adjusted for the covariates
    quartiles.csv       per marker quartile: n, events, range, adjusted HR vs Q1
    logrank.csv         multivariate log-rank test across the quartiles of each marker
    lrt.csv             likelihood-ratio tests for adding markers to the clinical model
    cindex.csv          Harrell's C-index (in-sample) of clinical and clinical+marker models
    model_terms.csv     every term of every model above (HR per 1 unit of its design column)
    far.csv             (FAR given) Cox of FAR per interval bin, adjusted
    km_<marker>.png     Kaplan-Meier curves by quartile, numbers at risk below
    report.md, summary.json

Nothing here logs or writes a patient identifier.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError
from fahr.config.evaluate_schema import EvaluateConfig
from fahr.config.schema import validate
from fahr.stats import clinical as cl
from fahr.stats.design import Coding, covariate_design, marker_scale
from fahr.stats.km import plot_km_by_group
from fahr.stats.report import markdown_table
from fahr.stats.validation import duplicate_patient_count, validate_survival_table
from fahr.utils.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger("fahr.evaluate")


# ---------------------------------------------------------------- input checks


def read_table(path: str) -> pd.DataFrame:
    """The input CSV; a clear error when it is missing or empty."""
    if not Path(path).is_file():
        raise InputError(f"input {path!r} is not a file: give input=PATH/TO/table.csv")
    df = pd.read_csv(path)
    if df.empty:
        raise InputError(f"input {path!r} has no rows")
    return df


def require_columns(df: pd.DataFrame, cfg: DictConfig) -> None:
    """Every column the config names (except absent markers) must exist in the table."""
    c = cfg.columns
    wanted = {"columns.time": c.time, "columns.event": c.event, "columns.patient": c.patient,
              "columns.photo_date": c.photo_date, "columns.event_date": c.event_date}
    wanted.update({f"covariates[{i}]": name for i, name in enumerate(cfg.covariates)})
    if cfg.far.column is not None:
        wanted.update({"far.column": cfg.far.column, "far.interval_bin": cfg.far.interval_bin})
    missing = [f"{key}={name!r}" for key, name in wanted.items() if name is not None and name not in df.columns]
    if missing:
        raise InputError(f"column(s) not in the input table: {', '.join(missing)}; table has {list(df.columns)}")
    stray = [name for name in cfg.categorical if name not in cfg.covariates]
    if stray:
        raise InputError(f"categorical {stray} must also be listed in covariates")


def check_one_row_per_patient(df: pd.DataFrame, patient: str | None) -> None:
    """Conflicting duplicates fail in validation; agreeing ones still bias the Cox model (counts only)."""
    if patient is None:
        return
    dup = duplicate_patient_count(df, patient)
    if dup:
        raise InputError(f"{dup} patient(s) have more than one row: give one row per patient "
                         "(e.g. the prediction from the first photo)")


def resolve_markers(df: pd.DataFrame, cfg: DictConfig) -> tuple[dict[str, Any], list[str]]:
    """Configured markers whose column is in the table, and the keys of those that are not."""
    present, skipped = {}, []
    for key, m in cfg.markers.items():
        if m.column not in df.columns:
            skipped.append(key)
            continue
        if not pd.api.types.is_numeric_dtype(df[m.column]):
            raise InputError(f"marker {key!r} (column {m.column!r}) is not numeric")
        if m.column in cfg.covariates:
            raise InputError(f"marker {key!r} (column {m.column!r}) is also a covariate")
        present[key] = m
    if not present:
        columns = [m.column for m in cfg.markers.values()]
        raise InputError(f"none of the marker columns {columns} is in the input table; "
                         "set markers.<name>.column to the prediction column(s)")
    return present, skipped


def check_analysable(data: pd.DataFrame, markers: list[cl.Marker], min_events: int) -> None:
    """Enough events for Cox models, and no constant marker."""
    events = int(data[cl.EVENT].sum())
    if events < min_events:
        raise InputError(f"only {events} event(s) in the {len(data)} analysed rows (after dropping incomplete rows); "
                         f"at least min_events={min_events} are needed")
    for m in markers:
        if data[m.term].nunique() < 2:
            raise InputError(f"marker {m.key!r} is constant in the analysed rows: nothing to estimate")


# ---------------------------------------------------------------- analysis frame


def build_frames(df: pd.DataFrame, cfg: DictConfig, marker_cfgs: dict[str, Any]):
    """(main frame, FAR frame or None, codings, dropped row count).

    The covariate coding is computed once, on the rows with every covariate present, so the main and
    FAR analyses share reference levels.
    """
    cov_rows = df[list(cfg.covariates)].notna().all(axis=1)
    design, codings = covariate_design(df.loc[cov_rows], list(cfg.covariates), list(cfg.categorical))
    clash = set(design.columns) & set(marker_cfgs)
    if clash:
        raise InputError(f"marker name(s) {sorted(clash)} clash with covariate terms; rename the markers")
    base = pd.DataFrame({cl.TIME: df.loc[cov_rows, cfg.columns.time].astype(float),
                         cl.EVENT: df.loc[cov_rows, cfg.columns.event].astype(int)}).join(design)
    markers = base.assign(**{key: df.loc[cov_rows, m.column].astype(float) for key, m in marker_cfgs.items()})
    main = markers.dropna(subset=list(marker_cfgs))
    far = None
    if cfg.far.column is not None:
        far = base.assign(far=df.loc[cov_rows, cfg.far.column], interval_bin=df.loc[cov_rows, cfg.far.interval_bin])
        far = far.dropna(subset=["far", "interval_bin"])
    return main, far, codings, int(len(df) - len(main))


def make_markers(data: pd.DataFrame, marker_cfgs: dict[str, Any]) -> list[cl.Marker]:
    """Marker descriptions with their reporting scale (units per step) measured on ``data``."""
    out = []
    for key, m in marker_cfgs.items():
        scale = marker_scale(data[key], m.per, m.standardize)
        out.append(cl.Marker(key, m.label or key, key, scale, per_text(m.per, m.unit, m.standardize)))
    return out


def per_text(per: float, unit: str, standardize: bool) -> str:
    """'per 10 years', 'per 1 SD'."""
    amount = f"{per:g}"
    return f"per {amount} SD" if standardize else f"per {amount} {unit}".rstrip()


def interval_bins(values: pd.Series, labels: list[str]) -> pd.Series:
    """Bin labels as given (text column), or numeric intervals in days -> the label 'lo-hi' they fall in
    (inclusive bounds; outside every bin -> NaN)."""
    if not pd.api.types.is_numeric_dtype(values):
        return values.astype(str)
    out = pd.Series(np.nan, index=values.index, dtype=object)
    for label in labels:
        lo, hi = (float(x) for x in label.split("-"))
        out[(values >= lo) & (values <= hi)] = label
    return out


# ---------------------------------------------------------------- outputs


def records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows for JSON: NaN/inf -> None."""
    def clean(v):
        if isinstance(v, (float, np.floating)):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, np.integer):
            return int(v)
        return v

    return [{k: clean(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))
    log.info("wrote %s", path)


HR_COLS = {"label": "marker", "per": "per", "model": "model", "hr": "HR", "ci": "95% CI", "p": "p"}


def render_report(s: dict[str, Any], tables: dict[str, pd.DataFrame]) -> str:
    """The Markdown report: cohort, coding, then one section per analysis."""
    cov = pd.DataFrame([{"covariate": c["column"], "kind": c["kind"], "reference": c["reference"] or "",
                         "terms": ", ".join(c["terms"])} for c in s["covariates"]])
    out = [
        "# fahr evaluate report\n",
        f"Input `{s['input_name']}`: {s['rows_read']} rows; analysed {s['n']} patients with {s['events']} events "
        f"({s['dropped_incomplete']} rows dropped for a missing covariate or marker). Follow-up in "
        f"{s['time_unit']}, median {s['median_followup']:g}.\n",
        "Cox proportional-hazards models (lifelines, Efron ties, Wald 95% CIs). Categorical covariates are "
        "dummy-coded against their most frequent level (the reference below).\n",
        "## Covariates\n", markdown_table(cov, {"covariate": "covariate", "kind": "kind", "reference": "reference",
                                                "terms": "terms"}) if len(cov) else "_none: clinical model = null model_\n",
        "## Markers\n",
        "\n".join(f"- {m['label']} (`{m['column']}`): HR {m['per']} (1 step = {m['scale']:.4g} column units)"
                  for m in s["markers"]) + "\n",
    ]
    if s["skipped_markers"]:
        out.append(f"Skipped (column not in the table): {', '.join(s['skipped_markers'])}.\n")
    out += ["## 1. Hazard ratios\n", markdown_table(tables["hazard_ratios"], HR_COLS)]
    out += ["## 2. Risk quartiles (Q1 = lowest; HR vs Q1 adjusted for the covariates)\n",
            markdown_table(tables["quartiles"], {"label": "marker", "quartile": "quartile", "n": "n", "events": "events",
                                                 "min": "min", "max": "max", "hr": "HR", "ci": "95% CI", "p": "p"}),
            "Log-rank test across quartiles (unadjusted):\n",
            markdown_table(tables["logrank"], {"label": "marker", "chi2": "chi2", "df": "df", "p": "p"})]
    out += [f"![Kaplan-Meier {m['label']}]({m['figure']})\n" for m in s["markers"]]
    out += ["## 3. Likelihood-ratio tests (added to the clinical model)\n",
            markdown_table(tables["lrt"], {"model": "model", "chi2": "chi2", "df": "df", "p": "p"}),
            "## 4. C-index (Harrell)\n",
            "In-sample: each model is fitted and scored on the same patients, so these are optimistic.\n",
            markdown_table(tables["cindex"], {"model": "model", "c_index": "C-index", "n": "n", "events": "events"})]
    if "far" in tables:
        out += ["## 5. Face Aging Rate by photo interval (adjusted for the covariates)\n",
                markdown_table(tables["far"], {"interval_bin": "interval (days)", "n": "n", "events": "events",
                                               "per": "per", "hr": "HR", "ci": "95% CI", "p": "p", "note": "note"})]
    out += ["## Appendix: all model terms (HR per 1 unit of the design column)\n",
            markdown_table(tables["model_terms"], {"model": "model", "term": "term", "hr": "HR", "ci": "95% CI", "p": "p"})]
    return "\n".join(out)


# ---------------------------------------------------------------- the command


def run_far(far: pd.DataFrame, cfg: DictConfig, clinical: list[str]) -> pd.DataFrame:
    """FAR rows -> per-bin adjusted HR table."""
    bins = interval_bins(far["interval_bin"], list(cfg.far.bins))
    marker = cl.Marker("far", "FAR", "far", 1.0, per_text(cfg.far.per, "", cfg.far.standardize))
    return cl.far_table(far.assign(far=far["far"].astype(float)), bins, marker, clinical, list(cfg.far.bins),
                        cfg.min_events, cfg.far.per, cfg.far.standardize)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every analysis of ``cfg`` and write the outputs; return the summary (also summary.json)."""
    validate(cfg, EvaluateConfig)
    out = Path(cfg.output)
    df = read_table(cfg.input)
    require_columns(df, cfg)
    c = cfg.columns
    validate_survival_table(df, c.time, c.event, c.patient, c.photo_date, c.event_date, name=Path(cfg.input).name)
    check_one_row_per_patient(df, c.patient)
    marker_cfgs, skipped = resolve_markers(df, cfg)
    data, far, codings, dropped = build_frames(df, cfg, marker_cfgs)
    markers = make_markers(data, marker_cfgs)
    check_analysable(data, markers, cfg.min_events)
    log.info("fahr evaluate: %d patients, %d events, %d rows dropped (incomplete), markers %s",
             len(data), int(data[cl.EVENT].sum()), dropped, [m.key for m in markers])

    clinical = [t for coding in codings for t in coding.terms]
    models = cl.CoxModels(data)
    tables = {"hazard_ratios": cl.marker_hazard_ratios(models, markers, clinical)}
    quartiles, logrank, figures = [], [], {}
    for m in markers:
        groups = cl.quartile_groups(data[m.term], m.key)
        quartiles.append(cl.quartile_table(models, m, groups, clinical))
        logrank.append({"marker": m.key, "label": m.label, **cl.logrank_by_group(data, groups)})
        figures[m.key] = f"km_{m.key}.png"
        plot_km_by_group(data[cl.TIME], data[cl.EVENT], groups.astype(str), cl.QUARTILES, out / figures[m.key],
                         f"{m.label}: Kaplan-Meier by quartile", c.time_unit)
        log.info("wrote %s", out / figures[m.key])
    tables["quartiles"] = pd.concat(quartiles, ignore_index=True)
    tables["logrank"] = pd.DataFrame(logrank)
    tables["lrt"] = cl.likelihood_ratio_table(models, markers, clinical)
    tables["cindex"] = cl.concordance_table(models, markers, clinical)
    named = {name: terms for name, (terms, _) in cl.nested_models(markers, clinical).items()}
    tables["model_terms"] = cl.model_terms(models, named, {m.term: m.label for m in markers})
    if far is not None:
        tables["far"] = run_far(far, cfg, clinical)

    for name, table in tables.items():
        write_csv(table, out / f"{name}.csv")
    summary = make_summary(cfg, df, data, dropped, codings, markers, marker_cfgs, skipped, figures, tables)
    atomic_write_text(out / "report.md", render_report(summary, tables))
    atomic_write_json(out / "summary.json", summary)
    log.info("fahr evaluate: report %s", out / "report.md")
    return summary


def make_summary(cfg, df, data, dropped, codings: list[Coding], markers, marker_cfgs, skipped, figures,
                 tables) -> dict[str, Any]:
    """Everything the report states, as JSON-ready values (no patient identifiers)."""
    return {
        "input_name": Path(cfg.input).name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "rows_read": int(len(df)),
        "n": int(len(data)),
        "events": int(data[cl.EVENT].sum()),
        "dropped_incomplete": dropped,
        "time_unit": cfg.columns.time_unit,
        "median_followup": float(data[cl.TIME].median()),
        "covariates": [vars(c) for c in codings],
        "markers": [{"key": m.key, "label": m.label, "column": marker_cfgs[m.key].column, "per": m.per_text,
                     "scale": m.scale, "figure": figures[m.key]} for m in markers],
        "skipped_markers": skipped,
        "c_index_in_sample": True,
        "tables": {name: records(t) for name, t in tables.items()},
    }
