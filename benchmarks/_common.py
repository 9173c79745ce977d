"""Shared benchmark helpers: result tables and JSON output."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    text = "\n".join([f"### {title}", "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])
    print(text, flush=True)
    return text


def write_result(name: str, payload: dict[str, Any]) -> Path:
    from fahr.utils.atomic import atomic_write_json

    payload = {"benchmark": name, "when_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()}, **payload}
    return atomic_write_json(RESULTS / f"{name}.json", payload)
