"""`fahr evaluate`: per-patient predictions + clinical columns -> Cox tables, KM figures, report.

Reads one CSV (one row per patient) through the input boundary, checks every option, the output
folder and the table (``fahr.stats.validation``), drops rows with a missing covariate or marker
(complete-case; counted in the report), then writes to ``output/``:

    hazard_ratios.csv   marker HRs, unadjusted and adjusted for the covariates
    quartiles.csv       per marker quartile: n, events, range, adjusted HR vs Q1
    logrank.csv         multivariate log-rank test across the quartiles of each marker
    lrt.csv             likelihood-ratio tests for adding markers to the clinical model
    cindex.csv          Harrell's C-index (in-sample) of clinical and clinical+marker models
    model_terms.csv     every term of every model above (HR per 1 unit of its design column)
    far.csv             (FAR given) Cox of FAR per interval bin, adjusted
    subgroups.csv       (subgroups.columns) per group: FaceAge MAE/mean signed error, each marker's
                        C-index and HR per SD, bootstrap 95% CIs; + subgroups.png (forest plot)
    incremental.csv     (incremental.horizon) AUC(t), NRI, IDI of adding each marker to the
                        clinical model, bootstrap 95% CIs; + incremental.png
    faceage_gap.csv     (gap.reference) age-adjusted FaceAge gap against healthy faces; + faceage_gap.png
    km_<marker>.png     Kaplan-Meier curves by quartile, numbers at risk below
    report.md, summary.json

Degenerate statistics are refused (an :class:`InputError`) when no honest report is possible, and
flagged (a ``note`` in the table row, ``flags`` in summary.json, a "Flags" section in report.md and
a warning in the log) when the rest of the report stands: see docs/evaluate.md.

Nothing here logs or writes a patient identifier, and no message quotes a cell of the table: they
name the file, the option key, the configured column and counts or file lines.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fahr.boundary import (
    MAX_CSV_BYTES,
    InputError,
    check_output_dir,
    printable_path,
    read_csv_lines,
    spreadsheet_safe,
)
from fahr.config.evaluate_schema import EvaluateConfig
from fahr.config.schema import validate
from fahr.stats import clinical as cl
from fahr.stats.figures import plot_gap, plot_incremental, plot_subgroups
from fahr.stats.gap import faceage_gap
from fahr.stats.incremental import incremental_table
from fahr.stats.subgroups import AGE_DECADE, SubgroupData, age_decades, level_labels, subgroup_table
from fahr.stats.design import (
    Coding,
    collinear_column,
    covariate_design,
    is_categorical,
    marker_scale,
)
from fahr.stats.km import plot_km_by_group
from fahr.stats.report import fmt_p, markdown_table, markdown_text
from fahr.stats.validation import (
    duplicate_patient_count,
    first_at,
    validate_survival_table,
)
from fahr.utils.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger("fahr.evaluate")

#: largest input table read (bytes)
MAX_INPUT_BYTES = MAX_CSV_BYTES
#: cells read as missing (as pandas does, plus "." from SAS/Stata exports); cells are trimmed first
NA_CODES = frozenset({"", "NA", "N/A", "n/a", "na", "NaN", "nan", "NAN", "null", "NULL", "Null", "None", "none",
                      "#N/A", "#NA", "#N/A N/A", "<NA>", ".", "-nan", "-NaN", "1.#IND", "1.#QNAN", "-1.#IND",
                      "-1.#QNAN"})
TRUE_CODES = frozenset({"true", "True", "TRUE"})
FALSE_CODES = frozenset({"false", "False", "FALSE"})
#: tables written as <name>.csv (far only with far.column)
TABLES = ("hazard_ratios", "quartiles", "logrank", "lrt", "cindex", "model_terms", "far", "subgroups",
          "incremental", "faceage_gap")
#: figures of the optional analyses (one per analysis; km_<marker>.png are per marker)
FIGURES = ("subgroups.png", "incremental.png", "faceage_gap.png")
#: the name in subgroups.columns of the age decade derived from columns.age
AGE_DECADE_KEY = "age_decade"
#: a marker or numeric covariate whose rank correlation with the follow-up time reaches this is the outcome
OUTCOME_RHO = 0.99
#: values farther than this many robust SDs (1.4826 MAD) from the median are flagged as outliers
OUTLIER_MADS = 10.0
#: dropping more than this fraction of rows as incomplete is flagged (complete-case bias)
DROPPED_FLAG = 0.2
#: FAR and its interval in the FAR analysis frame (names no covariate can take)
FAR, FAR_BIN = "__far__", "__interval_bin__"
_MARKER_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_BIN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*$")


# ---------------------------------------------------------------- options and paths


def check_options(cfg: DictConfig) -> None:
    """Every option, before any file is read: one-line errors naming the key.

    Raises:
        InputError: empty input/output, a bad number (``min_events``, ``max_levels``, a marker's or
            FAR's ``per``), a bad marker name, two markers on one column, duplicated or empty covariates,
            ``categorical`` not within ``covariates``, malformed or overlapping ``far.bins``, one column
            in two roles, or a covariate/marker/FAR column that is the outcome, a date or the patient id.
    """
    for key in ("input", "output"):
        if not str(cfg[key]).strip():
            raise InputError(f"{key} is empty: give {key}=PATH")
    if cfg.min_events < 1:
        raise InputError(f"min_events={cfg.min_events}: must be at least 1")
    if cfg.max_levels < 2:
        raise InputError(f"max_levels={cfg.max_levels}: must be at least 2")
    c = cfg.columns
    for key in ("time", "event"):
        if not str(c[key]).strip():
            raise InputError(f"columns.{key} is empty: give the name of the column")
    if (c.photo_date is None) != (c.event_date is None):
        raise InputError("columns.photo_date and columns.event_date go together (the check is a photo dated after "
                         "the event): set both, or neither")
    roles = {f"columns.{k}": c[k] for k in ("time", "event", "patient", "photo_date", "event_date") if c[k] is not None}
    if cfg.far.column is not None:
        roles.update({"far.column": cfg.far.column, "far.interval_bin": cfg.far.interval_bin})
    seen: dict[str, str] = {}
    for key, column in roles.items():
        if column in seen:
            raise InputError(f"{seen[column]} and {key} both name column {column!r}: each needs its own column")
        seen[column] = key
    outcome = {col: key for key, col in roles.items() if key.startswith("columns.")}
    why = {"columns.time": "the outcome", "columns.event": "the outcome", "columns.event_date": "the outcome",
           "columns.patient": "the patient id", "columns.photo_date": "a date"}
    covariates = list(cfg.covariates)
    for i, name in enumerate(covariates):
        if not str(name).strip():
            raise InputError(f"covariates[{i}] is empty: give a column name")
        if str(name).startswith("__") and str(name).endswith("__"):
            raise InputError(f"covariates[{i}]={name!r}: names like __x__ are reserved; rename the column")
        if name in outcome:
            raise InputError(f"covariates[{i}]={name!r} is {outcome[name]}, {why[outcome[name]]}: it cannot be a "
                             "covariate (a model adjusted for its own outcome is meaningless)")
        if cfg.far.column is not None and name in (cfg.far.column, cfg.far.interval_bin):
            raise InputError(f"covariates[{i}]={name!r} is also far.column/far.interval_bin")
    dup = sorted({n for n in covariates if covariates.count(n) > 1})
    if dup:
        raise InputError(f"covariates lists {dup} more than once: list each covariate once")
    categorical = list(cfg.categorical)
    dup = sorted({n for n in categorical if categorical.count(n) > 1})
    if dup:
        raise InputError(f"categorical lists {dup} more than once")
    stray = [name for name in categorical if name not in covariates]
    if stray:
        raise InputError(f"categorical {stray} must also be listed in covariates")
    if not cfg.markers:
        raise InputError("markers is empty: configure at least one marker (markers.<name>.column=COLUMN)")
    columns: dict[str, str] = {}
    for key, m in cfg.markers.items():
        if not _MARKER_KEY.match(str(key)):
            raise InputError(f"markers.{key}: a marker name must be 1-64 letters, digits, '_' or '-' (it names "
                             "the figure file km_<name>.png)")
        if m.column is None or not str(m.column).strip():
            raise InputError(f"markers.{key}.column is empty: give the prediction column")
        if not (math.isfinite(m.per) and m.per > 0):
            raise InputError(f"markers.{key}.per={m.per}: must be a positive number (the HR is reported per this step)")
        if m.column in outcome:
            raise InputError(f"markers.{key}.column={m.column!r} is {outcome[m.column]}, {why[outcome[m.column]]}: "
                             "it cannot be a marker")
        if cfg.far.column is not None and m.column in (cfg.far.column, cfg.far.interval_bin):
            raise InputError(f"markers.{key}.column={m.column!r} is also far.column/far.interval_bin")
        if m.column in columns:
            raise InputError(f"markers.{columns[m.column]} and markers.{key} both read column {m.column!r}: "
                             "remove one")
        columns[m.column] = key
    if cfg.far.column is not None:
        if not (math.isfinite(cfg.far.per) and cfg.far.per > 0):
            raise InputError(f"far.per={cfg.far.per}: must be a positive number")
        if cfg.far.column in covariates:
            raise InputError(f"far.column={cfg.far.column!r} is also a covariate")
        far_bins(list(cfg.far.bins))
    check_extra_options(cfg, outcome, why)


def check_extra_options(cfg: DictConfig, outcome: dict[str, str], why: dict[str, str]) -> None:
    """Options of the subgroup, incremental-value and FaceAge-gap analyses (one-line errors naming the key).

    Raises:
        InputError: ``columns.age`` or a subgroup column that is the outcome, a date or the patient id;
            an empty or repeated subgroup column; ``age_decade`` without ``columns.age``; cut-points not
            strictly increasing in (0, 1); the FaceAge accuracy or gap asked for without ``columns.age``
            or without ``faceage_marker`` among the markers.
    """
    age = cfg.columns.age
    if age is not None:
        if not str(age).strip():
            raise InputError("columns.age is empty: give the age column, or null")
        if age in outcome:
            raise InputError(f"columns.age={age!r} is {outcome[age]}, {why[outcome[age]]}: it cannot be the age")
    groups = list(cfg.subgroups.columns)
    for i, name in enumerate(groups):
        if not str(name).strip():
            raise InputError(f"subgroups.columns[{i}] is empty: give a column name")
        if name in outcome:
            raise InputError(f"subgroups.columns[{i}]={name!r} is {outcome[name]}, {why[outcome[name]]}: it cannot "
                             "define groups")
        if name == AGE_DECADE_KEY and age is None:
            raise InputError(f"subgroups.columns[{i}]={AGE_DECADE_KEY!r} is derived from columns.age: set "
                             "columns.age=COLUMN (age in years)")
    dup = sorted({n for n in groups if groups.count(n) > 1})
    if dup:
        raise InputError(f"subgroups.columns lists {dup} more than once")
    cuts = [float(c) for c in cfg.incremental.cutoffs]
    if cfg.incremental.horizon is not None:
        if not cuts:
            raise InputError("incremental.cutoffs is empty: give risk cut-points for the categorical NRI, e.g. "
                             "[0.06,0.2]")
        if any(not 0 < c < 1 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise InputError(f"incremental.cutoffs={cuts}: risks strictly between 0 and 1, in increasing order")
    if cfg.gap.reference is not None:
        if not str(cfg.gap.reference).strip():
            raise InputError("gap.reference is empty: give the CSV of healthy faces, or null")
        if age is None:
            raise InputError("gap.reference needs the cohort's age: set columns.age=COLUMN")
        if cfg.faceage_marker not in cfg.markers:
            raise InputError(f"gap.reference: faceage_marker={cfg.faceage_marker!r} is not one of the markers "
                             f"{list(cfg.markers)}")


def far_bins(labels: list[str]) -> list[tuple[float, float]]:
    """``far.bins`` as (lo, hi) day ranges: each ``"lo-hi"`` with 0 <= lo <= hi, labels distinct and
    ranges not overlapping (a row must fall in one bin at most).

    Raises:
        InputError: naming the offending ``far.bins[i]``.
    """
    if not labels:
        raise InputError("far.bins is empty: give interval bins such as ['10-365', '366-730']")
    ranges = []
    for i, label in enumerate(labels):
        match = _BIN.match(str(label))
        if not match:
            raise InputError(f"far.bins[{i}]={label!r}: expected 'lo-hi' in days, e.g. '10-365'")
        lo, hi = float(match.group(1)), float(match.group(2))
        if lo > hi:
            raise InputError(f"far.bins[{i}]={label!r}: lo is greater than hi")
        ranges.append((lo, hi))
    if len(set(labels)) != len(labels):
        raise InputError("far.bins lists a bin more than once")
    order = sorted(range(len(ranges)), key=lambda i: ranges[i])
    for a, b in zip(order, order[1:]):
        if ranges[b][0] <= ranges[a][1]:
            raise InputError(f"far.bins[{a}]={labels[a]!r} and far.bins[{b}]={labels[b]!r} overlap: "
                             "an interval must fall in one bin at most")
    return ranges


def output_names(cfg: DictConfig) -> list[str]:
    """Every file name ``fahr evaluate`` may write into ``output``."""
    return ([f"{t}.csv" for t in TABLES] + ["report.md", "summary.json"] + list(FIGURES)
            + [f"km_{key}.png" for key in cfg.markers])


def check_output(cfg: DictConfig) -> Path:
    """The output folder, checked (and created) before any work: not a file, not the input, writable,
    and writing into it must not replace the input (``input=report/cindex.csv output=report``).

    Raises:
        InputError: naming ``output=`` and, for a clash, the file that would be overwritten.
    """
    sources = {"input": cfg.input, "gap.reference": cfg.gap.reference}
    sources = {key: path for key, path in sources.items() if path is not None}
    out = check_output_dir(cfg.output, "output", inputs=tuple(sources.values()))
    for key, path in sources.items():
        source = Path(path)
        for name in output_names(cfg):
            target = out / name
            same = target.resolve() == source.resolve()
            if not same and target.exists() and source.exists():
                try:
                    same = os.path.samefile(target, source)
                except OSError:
                    same = False
            if same:
                raise InputError(f"output={printable_path(out)}: writing {name} there would overwrite {key}="
                                 f"{printable_path(path)}; choose another output directory")
    return out


# ---------------------------------------------------------------- reading the table


def read_table(path: str, what: str = "input") -> pd.DataFrame:
    """The input CSV through the boundary (:func:`fahr.boundary.read_csv_lines`), as a typed table
    indexed by file line (header = line 1).

    Cells are trimmed; :data:`NA_CODES` are missing; a column whose present cells are all numbers is
    numeric, all true/false boolean, otherwise text. Blank rows (every cell empty) are skipped.

    Raises:
        InputError: every refusal of ``read_csv_lines`` (file, header, cells, quoting), or no data
            rows. Never the file's content.
    """
    table = read_csv_lines(path, what, MAX_INPUT_BYTES)
    if not table.rows:
        raise InputError(f"{what} {printable_path(path)}: has a header but no data rows")
    raw = pd.DataFrame(table.rows, columns=table.columns, index=pd.Index(table.lines, name="line"), dtype=object)
    df = pd.DataFrame({name: _typed(raw[name]) for name in table.columns}, index=raw.index)
    df.attrs["hint"] = table.hint
    return df


def _typed(cells: pd.Series) -> pd.Series:
    """Trimmed text cells -> numbers, booleans or text (NaN for missing)."""
    values = cells.mask(cells.isin(NA_CODES))
    present = values.dropna()
    if present.empty:
        return pd.Series(np.nan, index=cells.index, dtype=float)
    numbers = _numbers(present)
    if numbers is not None:
        return numbers.reindex(values.index) if len(numbers) < len(values) else numbers
    if present.isin(TRUE_CODES | FALSE_CODES).all():
        flags = values.map(lambda v: v in TRUE_CODES if isinstance(v, str) else v)
        return flags.astype(bool) if flags.notna().all() else flags
    return values


_DECIMAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _numbers(present: pd.Series) -> pd.Series | None:
    """Present text cells as numbers (int64 when all are integers, else float64), or None when any is
    not a number. Integers beyond int64 and exponents beyond float become float (``inf`` for the
    latter, refused later as infinite)."""
    numbers = pd.to_numeric(present, errors="coerce")
    failed = numbers.isna()
    if failed.any():
        rest = present[failed]
        if not rest.map(lambda v: bool(_DECIMAL.match(v))).all():
            return None
        numbers = numbers.astype(float)
        numbers[failed] = rest.map(float)
    return numbers


def _lines(df: pd.DataFrame) -> np.ndarray:
    return df.index.to_numpy()


def require_columns(df: pd.DataFrame, cfg: DictConfig) -> None:
    """Every column the config names (except absent markers) must exist in the table.

    The message names the option keys and the configured column names, and counts the table's
    columns; it never lists the header (a header-less file has a patient's data there).
    """
    c = cfg.columns
    wanted = {"columns.time": c.time, "columns.event": c.event, "columns.patient": c.patient,
              "columns.photo_date": c.photo_date, "columns.event_date": c.event_date, "columns.age": c.age}
    wanted.update({f"covariates[{i}]": name for i, name in enumerate(cfg.covariates)})
    wanted.update({f"subgroups.columns[{i}]": name for i, name in enumerate(cfg.subgroups.columns)
                   if name != AGE_DECADE_KEY})
    if cfg.far.column is not None:
        wanted.update({"far.column": cfg.far.column, "far.interval_bin": cfg.far.interval_bin})
    missing = [f"{key}={name!r}" for key, name in wanted.items() if name is not None and name not in df.columns]
    if missing:
        raise InputError(f"input {printable_path(cfg.input)}: column(s) not in the table: {', '.join(missing)} "
                         f"(the table has {len(df.columns)} column(s)){df.attrs.get('hint', '')}")


def check_one_row_per_patient(df: pd.DataFrame, patient: str | None) -> None:
    """Conflicting duplicates fail in validation; agreeing ones still bias the Cox model (counts only)."""
    if patient is None:
        return
    dup = duplicate_patient_count(df, patient)
    if dup:
        raise InputError(f"{dup} patient(s) have more than one row: give one row per patient "
                         "(e.g. the prediction from the first photo)")


def check_numeric(df: pd.DataFrame, column: str, what: str) -> None:
    """A column used as a number: every present cell a finite number (counts and first line, no values).

    Raises:
        InputError: text cells, or infinite values.
    """
    values = df[column]
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        present = values.notna().to_numpy()
        bad = present & pd.to_numeric(values, errors="coerce").isna().to_numpy()
        if pd.api.types.is_bool_dtype(values) or not bad.any():
            raise InputError(f"{what} is not numeric (true/false cells): give numbers")
        raise InputError(f"{what} is not numeric: {int(bad.sum())} of {int(present.sum())} cell(s) are not numbers, "
                         f"{first_at(bad, _lines(df))}; leave a missing value empty (or NA)")
    inf = np.isinf(values.to_numpy(dtype=float))
    if inf.any():
        raise InputError(f"{what} has {int(inf.sum())} infinite value(s), {first_at(inf, _lines(df))}: give finite "
                         "numbers (leave a missing value empty)")


def resolve_markers(df: pd.DataFrame, cfg: DictConfig) -> tuple[dict[str, Any], list[str]]:
    """Configured markers whose column is in the table, and the keys of those that are not."""
    present, skipped = {}, []
    for key, m in cfg.markers.items():
        if m.column not in df.columns:
            skipped.append(key)
            continue
        if m.column in cfg.covariates:
            raise InputError(f"marker {key!r} (column {m.column!r}) is also a covariate")
        check_numeric(df, m.column, f"marker {key!r} (column {m.column!r})")
        present[key] = m
    if not present:
        columns = [m.column for m in cfg.markers.values()]
        raise InputError(f"none of the marker columns {columns} is in the input table; "
                         "set markers.<name>.column to the prediction column(s)")
    return present, skipped


def check_covariate_cells(df: pd.DataFrame, cfg: DictConfig) -> None:
    """Numeric covariates hold finite numbers; a text covariate that is mostly numbers has stray text
    cells (``unknown``, ``1,5``, ``#DIV/0!``) and would otherwise become one category per value."""
    for name in cfg.covariates:
        values = df[name]
        forced = name in cfg.categorical
        if not is_categorical(values, False):
            if not forced:
                check_numeric(df, name, f"covariate {name!r}")
            continue
        if pd.api.types.is_bool_dtype(values):
            continue
        text = values.dropna().astype(str)
        if text.str.casefold().nunique() < text.nunique():
            raise InputError(f"covariate {name!r}: {text.nunique()} levels, of which some differ only in letter case "
                             f"(e.g. 'm' and 'M'): spell each level one way, or they are analysed as different groups")
        if forced:
            continue
        present = values.notna().to_numpy()
        numbers = present & pd.to_numeric(values, errors="coerce").notna().to_numpy()
        if numbers.sum() * 2 >= present.sum():
            bad = present & ~numbers
            raise InputError(f"covariate {name!r}: {int(bad.sum())} cell(s) are not numbers ({first_at(bad, _lines(df))}) "
                             f"while {int(numbers.sum())} are: fix them, leave missing values empty (or NA), or list "
                             f"{name!r} in `categorical` if it is a category")


# ---------------------------------------------------------------- analysis frame


def build_frames(df: pd.DataFrame, cfg: DictConfig, marker_cfgs: dict[str, Any]):
    """(main frame, FAR frame or None, codings, dropped row count).

    The covariate coding is computed once, on the rows with every covariate present, so the main and
    FAR analyses share reference levels.
    """
    cov_rows = df[list(cfg.covariates)].notna().all(axis=1)
    if not cov_rows.any():
        raise InputError(f"no row has every covariate {list(cfg.covariates)} present: nothing to analyse")
    design, codings = covariate_design(df.loc[cov_rows], list(cfg.covariates), list(cfg.categorical), cfg.max_levels)
    clash = set(design.columns) & set(marker_cfgs)
    if clash:
        raise InputError(f"marker name(s) {sorted(clash)} clash with covariate names; rename the markers")
    base = pd.DataFrame({cl.TIME: df.loc[cov_rows, cfg.columns.time].astype(float),
                         cl.EVENT: df.loc[cov_rows, cfg.columns.event].astype(int)}).join(design)
    markers = base.assign(**{key: df.loc[cov_rows, m.column].astype(float) for key, m in marker_cfgs.items()})
    main = markers.dropna(subset=list(marker_cfgs))
    dropped = int(len(df) - len(main))
    if main.empty:
        raise InputError(f"no row has every covariate and marker present ({len(df)} rows read): nothing to analyse")
    for coding in codings:
        if any(main[t].nunique() < 2 for t in coding.terms):
            raise InputError(f"covariate {coding.column!r} has a level with no patients (or only one value left) once the "
                             f"{dropped} row(s) missing a covariate or marker are dropped: merge its levels or drop it")
    far = None
    if cfg.far.column is not None:
        far = base.assign(**{FAR: df.loc[cov_rows, cfg.far.column], FAR_BIN: df.loc[cov_rows, cfg.far.interval_bin]})
        far = far.dropna(subset=[FAR, FAR_BIN])
    return main, far, codings, dropped


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


def check_analysable(data: pd.DataFrame, markers: list[str], min_events: int) -> None:
    """Enough events for Cox models, and no constant marker (``markers``: their keys = frame columns)."""
    events = int(data[cl.EVENT].sum())
    if events < min_events:
        raise InputError(f"only {events} event(s) in the {len(data)} analysed rows (after dropping incomplete rows); "
                         f"at least min_events={min_events} are needed")
    for key in markers:
        if data[key].nunique() < 2:
            raise InputError(f"marker {key!r} is constant in the analysed rows: nothing to estimate")


def check_not_outcome(data: pd.DataFrame, owners: dict[str, str], terms: list[str]) -> None:
    """A marker or numeric covariate that *is* the outcome under another name (the event indicator, or
    the follow-up time up to a monotone transform) would give a perfect, meaningless model."""
    time_rank = data[cl.TIME].rank()
    for term in terms:
        values = data[term]
        if values.nunique() < 2:
            continue
        if values.nunique() == 2 and values.isin((0.0, 1.0)).all() and (values == data[cl.EVENT]).all():
            raise InputError(f"{owners[term]} equals the event indicator in every row: it is the outcome, not a "
                             "predictor")
        rho = float(np.corrcoef(values.rank(), time_rank)[0, 1]) if len(values) > 2 else 0.0
        if math.isfinite(rho) and abs(rho) >= OUTCOME_RHO:
            raise InputError(f"{owners[term]} is the follow-up time in other units (rank correlation {rho:+.3f} "
                             "with columns.time): it is the outcome, not a predictor")


def check_collinear(data: pd.DataFrame, owners: dict[str, str], terms: list[str]) -> None:
    """No design column may be an exact linear function of those before it (covariates, then markers)."""
    found = collinear_column(data, terms)
    if found is not None:
        term, used = found
        before = cl.describe_terms(used, owners) if used else "a constant"
        raise InputError(f"{owners[term]} is an exact linear function of {before}: the model cannot tell them apart; "
                         "drop one of them")


def interval_bins(values: pd.Series, labels: list[str]) -> pd.Series:
    """Bin labels as given (text column), or numeric intervals in days -> the label 'lo-hi' they fall in
    (inclusive bounds; outside every bin -> NaN)."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return values.astype(str)
    out = pd.Series(np.nan, index=values.index, dtype=object)
    for label, (lo, hi) in zip(labels, far_bins(labels)):
        out[(values >= lo) & (values <= hi)] = label
    return out


# ---------------------------------------------------------------- flags


def note_check(note: str) -> str:
    """A short id for the kind of a table note (what tests and scripts match on)."""
    for needle, check in (("group too small", "small_group"), ("excludes the overall", "subgroup_differs"),
                          ("resamples (the others", "bootstrap_failures"), ("not estimable:", "not_estimable"),
                          ("no events in", "no_events_in_group"), ("unbounded", "separation"),
                          ("did not converge", "not_converged"), ("beyond floating point", "hr_overflow"),
                          ("per term", "low_events_per_term"), ("fewer than", "few_events"),
                          ("constant in this bin", "constant_in_bin")):
        if needle in note:
            return check
    return "note"


ROW_KEYS = {"hazard_ratios": ("marker", "model"), "quartiles": ("marker", "quartile"), "lrt": ("model",),
            "cindex": ("model",), "model_terms": ("model", "term"), "far": ("interval_bin",),
            "subgroups": ("label", "statistic", "group", "level"), "incremental": ("label", "statistic")}


#: a (table, check) whose flag names a coarser row (one flag per small group, not one per statistic)
FLAG_ROW_KEYS = {("subgroups", "small_group"): ("group", "level")}


def table_flags(tables: dict[str, pd.DataFrame]) -> list[dict[str, str]]:
    """One flag per table row with a note (identical flags once)."""
    flags = []
    for name, table in tables.items():
        if "note" not in table:
            continue
        for _, row in table.iterrows():
            note = row["note"]
            if isinstance(note, str) and note:
                check = note_check(note)
                keys = FLAG_ROW_KEYS.get((name, check), ROW_KEYS.get(name, ()))
                flag = {"check": check, "table": name, "row": " ".join(str(row[k]) for k in keys), "message": note}
                if flag not in flags:
                    flags.append(flag)
    return flags


def outlier_flags(data: pd.DataFrame, owners: dict[str, str], terms: list[str]) -> list[dict[str, str]]:
    """Markers with values far from the rest (a unit or typing error, a failed prediction?). Model
    outputs are roughly symmetric, so this is not applied to covariates, whose long tails (counts,
    lab values) are real."""
    flags = []
    for term in terms:
        values = data[term].to_numpy(dtype=float)
        median = np.median(values)
        mad = 1.4826 * np.median(np.abs(values - median))
        if mad > 0:
            far = np.abs(values - median) > OUTLIER_MADS * mad
            if far.any():
                flags.append({"check": "outliers", "table": "", "row": "",
                              "message": f"{owners[term]}: {int(far.sum())} value(s) lie more than {OUTLIER_MADS:g} "
                                         "robust SDs from the median (a unit or typing error?); HRs per unit and "
                                         "per SD depend on them"})
    return flags


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


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Text cells neutralised for spreadsheets (``=1+1`` -> ``'=1+1``); numbers untouched."""
    out = df.copy()
    for column in out.columns:
        if out[column].dtype == object:
            out[column] = out[column].map(spreadsheet_safe)
    return out


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, csv_safe(df).to_csv(index=False))
    log.info("wrote %s", path)


HR_COLS = {"label": "marker", "per": "per", "model": "model", "hr": "HR", "ci": "95% CI", "p": "p", "note": "note"}


def render_report(s: dict[str, Any], tables: dict[str, pd.DataFrame]) -> str:
    """The Markdown report: cohort, flags, coding, then one section per analysis."""
    cov = pd.DataFrame([{"covariate": c["column"], "kind": c["kind"], "reference": c["reference"] or "",
                         "terms": ", ".join(c["terms"])} for c in s["covariates"]])
    flags = s["flags"]
    out = [
        "# fahr evaluate report\n",
        f"Input `{markdown_text(s['input_name'])}`: {s['rows_read']} rows; analysed {s['n']} patients with "
        f"{s['events']} events ({s['dropped_incomplete']} rows dropped for a missing covariate or marker). Follow-up in "
        f"{markdown_text(s['time_unit'])}, median {s['median_followup']:g}.\n",
        "Cox proportional-hazards models (lifelines, Efron ties, Wald 95% CIs). Categorical covariates are "
        "dummy-coded against their most frequent level (the reference below).\n",
        f"## Flags ({len(flags)})\n",
        ("Read these before using the numbers below; flagged rows have a note (and no HR when it is not "
         "estimable).\n\n" + "\n".join(f"- **{f['check']}**"
                                        + (f" ({f['table']}: {markdown_text(f['row'])})" if f["table"] else "")
                                        + f": {markdown_text(f['message'])}" for f in flags) + "\n")
        if flags else "None: no degenerate estimate, sparse data or outlier was detected.\n",
        "## Covariates\n", markdown_table(cov, {"covariate": "covariate", "kind": "kind", "reference": "reference",
                                                "terms": "terms"}) if len(cov) else "_none: clinical model = null model_\n",
        "## Markers\n",
        "\n".join(f"- {markdown_text(m['label'])} (`{markdown_text(m['column'])}`): HR {m['per']} "
                  f"(1 step = {m['scale']:.4g} column units)" for m in s["markers"]) + "\n",
    ]
    if s["skipped_markers"]:
        out.append(f"Skipped (column not in the table): {', '.join(s['skipped_markers'])}.\n")
    out += ["## 1. Hazard ratios\n", markdown_table(tables["hazard_ratios"], HR_COLS)]
    out += ["## 2. Risk quartiles (Q1 = lowest; HR vs Q1 adjusted for the covariates)\n",
            markdown_table(tables["quartiles"], {"label": "marker", "quartile": "quartile", "n": "n", "events": "events",
                                                 "min": "min", "max": "max", "hr": "HR", "ci": "95% CI", "p": "p",
                                                 "note": "note"}),
            "Log-rank test across quartiles (unadjusted):\n",
            markdown_table(tables["logrank"], {"label": "marker", "chi2": "chi2", "df": "df", "p": "p"})]
    out += [f"![Kaplan-Meier {markdown_text(m['label'])}]({m['figure']})\n" for m in s["markers"]]
    out += ["## 3. Likelihood-ratio tests (added to the clinical model)\n",
            markdown_table(tables["lrt"], {"model": "model", "chi2": "chi2", "df": "df", "p": "p", "note": "note"}),
            "## 4. C-index (Harrell)\n",
            "In-sample: each model is fitted and scored on the same patients, so these are optimistic.\n",
            markdown_table(tables["cindex"], {"model": "model", "c_index": "C-index", "n": "n", "events": "events",
                                              "note": "note"})]
    if "far" in tables:
        out += ["## 5. Face Aging Rate by photo interval (adjusted for the covariates)\n",
                markdown_table(tables["far"], {"interval_bin": "interval (days)", "n": "n", "events": "events",
                                               "per": "per", "hr": "HR", "ci": "95% CI", "p": "p", "note": "note"})]
    out += extra_sections(s, tables)
    out += ["## Appendix: all model terms (HR per 1 unit of the design column)\n",
            markdown_table(tables["model_terms"], {"model": "model", "term": "term", "hr": "HR", "ci": "95% CI", "p": "p",
                                                   "note": "note"})]
    return "\n".join(out)


def bracket_ci(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a ``ci95`` text column '[low, high]' (bounds may be negative: no leading '-')."""
    def text(row) -> str:
        lo, hi = row["ci_low"], row["ci_high"]
        return "" if pd.isna(lo) or pd.isna(hi) else f"[{lo:.3f}, {hi:.3f}]"
    return table.assign(ci95=table.apply(text, axis=1) if len(table) else [])


def extra_sections(s: dict[str, Any], tables: dict[str, pd.DataFrame]) -> list[str]:
    """Report sections of the subgroup, incremental-value and FaceAge-gap analyses that ran."""
    boot = s["config"]["bootstrap"]
    ci = f"percentile bootstrap 95% CI, {boot['n']} patient resamples, seed {boot['seed']}"
    out = []
    if "subgroups" in tables:
        table = bracket_ci(tables["subgroups"])
        table["differs"] = table["excludes_overall"].map({True: "yes", False: ""})
        out += ["## 6. Subgroups\n",
                f"Per group level ({ci}; each group resampled on its own). FaceAge error = FaceAge - age (years). "
                "C-index: Harrell's, of the marker alone. HR per SD: univariate Cox, per 1 SD of the marker in the "
                "whole cohort. *differs*: the group's CI excludes the overall value.\n",
                markdown_table(table, {"statistic": "statistic", "label": "marker", "group": "group", "level": "level",
                                       "n": "n", "events": "events", "estimate": "estimate", "ci95": "95% CI",
                                       "differs": "differs", "note": "note"}),
                f"![Subgroups]({s['figures']['subgroups']})\n"]
    if "incremental" in tables:
        horizon = tables["incremental"]["horizon"].iloc[0]
        out += [f"## 7. Incremental value at t = {horizon:g} {markdown_text(s['time_unit'])}\n",
                "Risk of the event by t from Cox models (clinical vs clinical + the marker), in-sample. AUC(t): "
                "cumulative/dynamic, IPCW (scikit-survival). NRI: Pencina 2011 with Kaplan-Meier event probabilities; "
                f"categorical cut-points {list(s['config']['incremental']['cutoffs'])}. IDI: IPCW means (Uno 2013). "
                f"CIs: {ci}, both models refitted on each.\n",
                markdown_table(bracket_ci(tables["incremental"]), {"label": "marker", "statistic": "statistic",
                                                                   "estimate": "estimate", "ci95": "95% CI",
                                                                   "resamples": "resamples", "note": "note"}),
                f"![Incremental value]({s['figures']['incremental']})\n"]
    if "faceage_gap" in tables:
        g = tables["faceage_gap"].iloc[0]
        out += ["## 8. FaceAge gap against healthy faces (adjusted for age)\n",
                f"Linear model faceage ~ age + cohort on {int(g['n_cohort'])} patients and {int(g['n_reference'])} "
                f"reference faces: age-adjusted FaceAge gap **{g['gap']:+.2f} years** (positive: the cohort looks older "
                f"than reference faces of the same age; 95% CI {g['ci_low']:.2f} to {g['ci_high']:.2f}, p {fmt_p(g['p'])}; t-interval). Raw mean "
                f"FaceAge - age: cohort {g['raw_gap_cohort']:.2f}, reference {g['raw_gap_reference']:.2f}. "
                f"{int(g['reference_rows_dropped'])} reference row(s) without age or FaceAge and "
                f"{int(g['cohort_rows_without_age'])} patient(s) without age left out.\n",
                f"![FaceAge gap]({s['figures']['faceage_gap']})\n"]
    return out


# ---------------------------------------------------------------- the command


def run_far(far: pd.DataFrame, cfg: DictConfig, clinical: list[str], owners: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """FAR rows -> (per-bin adjusted HR table, rows in no bin)."""
    bins = interval_bins(far[FAR_BIN], list(cfg.far.bins))
    outside = int(bins.isna().sum() + (~bins.isin(list(cfg.far.bins)) & bins.notna()).sum())
    marker = cl.Marker("far", "FAR", FAR, 1.0, per_text(cfg.far.per, "", cfg.far.standardize))
    table = cl.far_table(far.assign(**{FAR: far[FAR].astype(float)}), bins, marker, clinical, list(cfg.far.bins),
                         cfg.min_events, cfg.far.per, cfg.far.standardize, owners)
    return table, outside


def check_horizon(data: pd.DataFrame, cfg: DictConfig) -> None:
    """The horizon must have events before it and patients followed beyond it.

    Raises:
        InputError: naming ``incremental.horizon``, the longest follow-up and the counts.
    """
    horizon, unit = float(cfg.incremental.horizon), cfg.columns.time_unit
    time, event = data[cl.TIME].to_numpy(float), data[cl.EVENT].to_numpy(int)
    if not horizon < time.max():
        raise InputError(f"incremental.horizon={horizon:g} is not below the longest follow-up ({time.max():g} {unit}) "
                         "of the analysed rows: choose an earlier horizon")
    if int(((time <= horizon) & (event == 1)).sum()) == 0:
        raise InputError(f"incremental.horizon={horizon:g}: no event at or before it in the analysed rows: "
                         "choose a later horizon")


def subgroup_data(df: pd.DataFrame, data: pd.DataFrame, cfg: DictConfig, markers: list[cl.Marker]) -> SubgroupData:
    """The analysed patients as :class:`SubgroupData`: each marker, FaceAge and age (with ``columns.age``
    and the FaceAge marker present), and the group labels of ``subgroups.columns``.

    Raises:
        InputError: a group column with more than ``max_levels`` levels, or more than one level per
            two patients (an identifier or free text: its values would be written to every output).
    """
    rows = data.index
    age = df.loc[rows, cfg.columns.age].to_numpy(dtype=float) if cfg.columns.age is not None else None
    groups = {}
    for i, name in enumerate(cfg.subgroups.columns):
        if name == AGE_DECADE_KEY:
            groups[AGE_DECADE] = age_decades(age)
            continue
        labels = level_labels(df.loc[rows, name])
        levels = len({v for v in labels if v is not None})
        if levels > cfg.max_levels or (levels > 2 and levels * 2 > len(labels)):
            raise InputError(f"subgroups.columns[{i}]={name!r} has {levels} levels in {len(labels)} analysed rows "
                             f"(at most max_levels={cfg.max_levels}, and one per two patients): an identifier or free "
                             "text? Group a coarser column")
        groups[name] = labels
    keys = {m.key for m in markers}
    faceage = (data[cfg.faceage_marker].to_numpy(dtype=float)
               if age is not None and cfg.faceage_marker in keys else None)
    return SubgroupData(data[cl.TIME].to_numpy(float), data[cl.EVENT].to_numpy(int),
                        {m.key: data[m.term].to_numpy(float) for m in markers}, {m.key: m.label for m in markers},
                        faceage, age if faceage is not None else None, groups)


def run_gap(cfg: DictConfig, df: pd.DataFrame, data: pd.DataFrame,
            marker_cfgs: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The FaceAge gap of the analysed patients against ``gap.reference``: (one-row table, arrays for
    the figure). Reference rows missing the age or FaceAge are dropped and counted.

    Raises:
        InputError: the FaceAge marker absent from the input; the reference unreadable, without the
            columns, with text or infinite cells, or with fewer than 2 complete rows; ages that do not vary.
    """
    key = cfg.faceage_marker
    if key not in marker_cfgs:
        raise InputError(f"gap.reference: the FaceAge marker {key!r} (column {cfg.markers[key].column!r}) is not in "
                         f"input {printable_path(cfg.input)}")
    path = cfg.gap.reference
    ref = read_table(path, "gap.reference")
    columns = {"gap.age": cfg.gap.age or cfg.columns.age, "gap.faceage": cfg.gap.faceage or marker_cfgs[key].column}
    missing = [f"{k}={v!r}" for k, v in columns.items() if v not in ref.columns]
    if missing:
        raise InputError(f"gap.reference {printable_path(path)}: column(s) not in the table: {', '.join(missing)} "
                         f"(the table has {len(ref.columns)} column(s)){ref.attrs.get('hint', '')}")
    for k, v in columns.items():
        check_numeric(ref, v, f"gap.reference column {v!r} ({k})")
    ref_age, ref_fa = ref[columns["gap.age"]].to_numpy(float), ref[columns["gap.faceage"]].to_numpy(float)
    keep = np.isfinite(ref_age) & np.isfinite(ref_fa)
    age = df.loc[data.index, cfg.columns.age].to_numpy(float)
    faceage = data[key].to_numpy(float)
    has_age = np.isfinite(age)
    try:
        fit = faceage_gap(age[has_age], faceage[has_age], ref_age[keep], ref_fa[keep])
    except ValueError as err:
        raise InputError(f"gap.reference {printable_path(path)}: {err}") from None
    fit.update(reference_rows_dropped=int((~keep).sum()), cohort_rows_without_age=int((~has_age).sum()))
    arrays = {"cohort_age": age[has_age], "cohort_faceage": faceage[has_age], "reference_age": ref_age[keep],
              "reference_faceage": ref_fa[keep]}
    return pd.DataFrame([fit]), arrays


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every analysis of ``cfg`` and write the outputs; return the summary (also summary.json).

    Order: options, output folder, input file, table checks, then the statistics; nothing is written
    to ``output`` until every analysis has succeeded. Library warnings (lifelines, pandas, numpy) are
    kept off the terminal: their text may quote a term or a level; the log names their kind only.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return _evaluate(cfg)
        finally:
            kinds = sorted({w.category.__name__ for w in caught})
            if kinds:
                log.debug("library warnings suppressed: %s", ", ".join(kinds))


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg, EvaluateConfig)
    check_options(cfg)
    out = check_output(cfg)
    df = read_table(cfg.input)
    require_columns(df, cfg)
    c = cfg.columns
    validate_survival_table(df, c.time, c.event, c.patient, c.photo_date, c.event_date,
                            name=f"input {printable_path(cfg.input)}", lines=_lines(df))
    check_one_row_per_patient(df, c.patient)
    marker_cfgs, skipped = resolve_markers(df, cfg)
    check_covariate_cells(df, cfg)
    if cfg.far.column is not None:
        check_numeric(df, cfg.far.column, f"far.column={cfg.far.column!r}")
    if cfg.columns.age is not None:
        check_numeric(df, cfg.columns.age, f"columns.age={cfg.columns.age!r}")
    data, far, codings, dropped = build_frames(df, cfg, marker_cfgs)
    check_analysable(data, list(marker_cfgs), cfg.min_events)
    markers = make_markers(data, marker_cfgs)

    clinical = [t for coding in codings for t in coding.terms]
    owners = {t: f"covariate {coding.column!r}" for coding in codings for t in coding.terms}
    owners.update({m.term: f"marker {m.key!r} (column {marker_cfgs[m.key].column!r})" for m in markers})
    numeric = [t for coding in codings if coding.kind == "numeric" for t in coding.terms]
    check_not_outcome(data, owners, [*numeric, *(m.term for m in markers)])
    check_collinear(data, owners, [*clinical, *(m.term for m in markers)])
    log.info("fahr evaluate: %d patients, %d events, %d rows dropped (incomplete), markers %s",
             len(data), int(data[cl.EVENT].sum()), dropped, [m.key for m in markers])

    models = cl.CoxModels(data, owners)
    cl.check_clinical_model(models, clinical)
    tables = {"hazard_ratios": cl.marker_hazard_ratios(models, markers, clinical)}
    quartiles, logrank, groups = [], [], {}
    for m in markers:
        groups[m.key] = cl.quartile_groups(data[m.term], m.key)
        quartiles.append(cl.quartile_table(models, m, groups[m.key], clinical))
        logrank.append({"marker": m.key, "label": m.label, **cl.logrank_by_group(data, groups[m.key])})
    tables["quartiles"] = pd.concat(quartiles, ignore_index=True)
    tables["logrank"] = pd.DataFrame(logrank)
    tables["lrt"] = cl.likelihood_ratio_table(models, markers, clinical)
    tables["cindex"] = cl.concordance_table(models, markers, clinical)
    named = {name: terms for name, (terms, _) in cl.nested_models(markers, clinical).items()}
    tables["model_terms"] = cl.model_terms(models, named, {m.term: m.label for m in markers})
    far_outside = 0
    if far is not None:
        tables["far"], far_outside = run_far(far, cfg, clinical, owners)
    figures_extra: dict[str, Any] = {}
    boot = cfg.bootstrap
    if cfg.subgroups.columns:
        tables["subgroups"] = subgroup_table(subgroup_data(df, data, cfg, markers), boot.n, boot.seed,
                                             cfg.subgroups.min_n, cfg.subgroups.min_events)
        figures_extra["subgroups"] = tables["subgroups"]
    if cfg.incremental.horizon is not None:
        check_horizon(data, cfg)
        tables["incremental"], _ = incremental_table(data, clinical, markers, float(cfg.incremental.horizon),
                                                     list(cfg.incremental.cutoffs), boot.n, boot.seed)
        figures_extra["incremental"] = tables["incremental"]
    if cfg.gap.reference is not None:
        tables["faceage_gap"], figures_extra["faceage_gap"] = run_gap(cfg, df, data, marker_cfgs)
        figures_extra["faceage_gap_fit"] = tables["faceage_gap"].iloc[0].to_dict()

    flags = cohort_flags(data, markers, clinical, owners, dropped, len(df), far_outside)
    flags += table_flags(tables)
    for flag in flags:
        log.warning("flag %s%s: %s", flag["check"], f" ({flag['table']}: {flag['row']})" if flag["table"] else "",
                    flag["message"])

    figures = {m.key: f"km_{m.key}.png" for m in markers}
    for m in markers:
        plot_km_by_group(data[cl.TIME], data[cl.EVENT], groups[m.key].astype(str), cl.QUARTILES, out / figures[m.key],
                         f"{m.label}: Kaplan-Meier by quartile", c.time_unit)
        log.info("wrote %s", out / figures[m.key])
    extra_figures = write_extra_figures(out, figures_extra)
    for name, table in tables.items():
        write_csv(table, out / f"{name}.csv")
    summary = make_summary(cfg, df, data, dropped, codings, markers, marker_cfgs, skipped, figures, tables, flags)
    summary["figures"] = extra_figures
    atomic_write_text(out / "report.md", render_report(summary, tables))
    atomic_write_json(out / "summary.json", summary)
    remove_stale_outputs(out, {f"{name}.csv" for name in tables} | set(figures.values()) | set(extra_figures.values()))
    log.info("fahr evaluate: report %s (%d flag(s))", out / "report.md", len(flags))
    return summary


def write_extra_figures(out: Path, extra: dict[str, Any]) -> dict[str, str]:
    """The figure of each optional analysis that ran: analysis name -> file name."""
    written = {}
    if "subgroups" in extra:
        plot_subgroups(extra["subgroups"], out / "subgroups.png")
        written["subgroups"] = "subgroups.png"
    if "incremental" in extra:
        plot_incremental(extra["incremental"], out / "incremental.png")
        written["incremental"] = "incremental.png"
    if "faceage_gap" in extra:
        a = extra["faceage_gap"]
        plot_gap(a["cohort_age"], a["cohort_faceage"], a["reference_age"], a["reference_faceage"], extra["faceage_gap_fit"],
                 out / "faceage_gap.png")
        written["faceage_gap"] = "faceage_gap.png"
    for name in written.values():
        log.info("wrote %s", out / name)
    return written


def remove_stale_outputs(out: Path, written: set[str]) -> None:
    """Delete what an earlier ``fahr evaluate`` left in ``out`` and this run did not write again (a
    ``far.csv`` or ``km_<marker>.png`` of an analysis no longer asked for), so every result in the
    folder belongs to this report. Only fahr's own file names are touched."""
    ours = {f"{t}.csv" for t in TABLES} | set(FIGURES)
    for path in out.iterdir():
        stale = (path.name in ours or (path.name.startswith("km_") and path.suffix == ".png")) and path.name not in written
        if stale and path.is_file():
            path.unlink()
            log.info("removed %s (from an earlier run; not part of this report)", path)


def cohort_flags(data: pd.DataFrame, markers: list[cl.Marker], clinical: list[str], owners: dict[str, str],
                 dropped: int, rows: int, far_outside: int) -> list[dict[str, str]]:
    """Flags about the cohort as a whole: events per model term, outliers, dropped rows, FAR bins."""
    flags = []
    events = int(data[cl.EVENT].sum())
    largest = len(clinical) + max(len(markers), 3)  # clinical + all markers, or + 3 quartile indicators
    note = cl.events_per_term_note(events, largest)
    if note:
        flags.append({"check": "low_events_per_term", "table": "", "row": "",
                      "message": f"{note} (the largest model here: {len(clinical)} covariate term(s) plus "
                                 f"{max(len(markers), 3)} marker/quartile term(s))"})
    flags += outlier_flags(data, owners, [m.term for m in markers])
    if rows and dropped / rows > DROPPED_FLAG:
        flags.append({"check": "many_rows_dropped", "table": "", "row": "",
                      "message": f"{dropped} of {rows} rows ({100 * dropped / rows:.0f}%) were dropped for a missing "
                                 "covariate or marker: a complete-case analysis may be biased"})
    if far_outside:
        flags.append({"check": "far_outside_bins", "table": "far", "row": "",
                      "message": f"{far_outside} row(s) with FAR fall in none of far.bins and are not analysed"})
    return flags


def make_summary(cfg, df, data, dropped, codings: list[Coding], markers, marker_cfgs, skipped, figures,
                 tables, flags) -> dict[str, Any]:
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
        "flags": flags,
        "tables": {name: records(t) for name, t in tables.items()},
    }
