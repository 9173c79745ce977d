"""CSV and Markdown tables of the analysis commands (written atomically)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fahr.utils.atomic import atomic_write_text


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], columns: list[str], csv_path: str | Path, md_path: str | Path | None = None,
                 title: str = "") -> None:
    """``rows`` as a CSV (:func:`fahr.pipeline.predict.write_csv`: floats to 4 decimals, empty cells
    for missing values) and, with
    ``md_path``, as a Markdown pipe table (3 decimals) under an optional ``# title``. The cells are
    names from fahr's own tables and numbers, never photo paths."""
    from fahr.pipeline.predict import write_csv

    write_csv(str(csv_path), columns, rows)
    if md_path is None:
        return
    lines = [f"# {title}\n"] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c), 3) for c in columns) + " |" for row in rows]
    atomic_write_text(md_path, "\n".join(lines) + "\n")

