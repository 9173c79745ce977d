"""CSV and Markdown tables of the analysis commands (written atomically)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from fahr.boundary import spreadsheet_safe
from fahr.utils.atomic import atomic_write, atomic_write_text


def _cell(value: Any, digits: int) -> Any:
    """None / non-finite -> empty, floats to ``digits`` decimals, text neutralised for spreadsheets."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return spreadsheet_safe(value)


def write_tables(rows: list[dict[str, Any]], columns: list[str], csv_path: str | Path, md_path: str | Path | None = None,
                 title: str = "") -> None:
    """``rows`` as a CSV (floats to 4 decimals, empty cells for missing values) and, with ``md_path``,
    as a Markdown pipe table (3 decimals) under an optional ``# title``. The cells are names from
    fahr's own tables and numbers, never photo paths."""

    def write(f) -> None:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow([_cell(row.get(c), 4) for c in columns])

    atomic_write(csv_path, write, mode="w")
    if md_path is None:
        return
    lines = [f"# {title}\n"] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(_cell(row.get(c), 3)) for c in columns) + " |" for row in rows]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
