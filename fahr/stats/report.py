"""Markdown rendering of the `fahr evaluate` tables (plain pipe tables, no dependency)."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import pandas as pd

from fahr.boundary import spreadsheet_safe

_HTML_START = re.compile(r"<(?=[A-Za-z/!?])")


def markdown_text(text: Any) -> str:
    """Text from the data or the config made inert in Markdown: one line, no table break (``|``), no
    HTML tag, no link or image (``](``, ``][``), and no spreadsheet formula at its start (a report is
    often pasted into a spreadsheet). Numbers such as ``-3.5`` are unchanged."""
    text = str(spreadsheet_safe(" ".join(str(text).split())))
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("](", "]\\(").replace("][", "]\\[")
    return _HTML_START.sub("&lt;", text)


def fmt_p(p: Any) -> str:
    """p-value: three significant digits, '<0.001' below that, blank when undefined."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def fmt_num(x: Any, digits: int = 3) -> str:
    """Number with ``digits`` decimals; blank when undefined; other values as text."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(row: pd.Series) -> str:
    """'[low, high]' of a row with ci_low/ci_high; blank for a reference row. Brackets, not 'low-high':
    a negative bound would read as a range dash (and a leading '-' as a spreadsheet formula)."""
    if pd.isna(row.get("ci_low")) or pd.isna(row.get("ci_high")):
        return ""
    return f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def markdown_table(df: pd.DataFrame, columns: dict[str, str], formats: dict[str, Callable[[Any], str]] | None = None) -> str:
    """Rows of ``df`` as a pipe table; ``columns`` maps a source column (or 'ci' for the CI) to its header."""
    formats = {"p": fmt_p, **(formats or {})}
    if df.empty:
        return "_(no rows)_\n"
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for _, row in df.iterrows():
        cells = [fmt_ci(row) if col == "ci" else formats.get(col, fmt_num)(row.get(col)) for col in columns]
        lines.append("| " + " | ".join(markdown_text(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
