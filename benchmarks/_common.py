"""Shared benchmark helpers: result tables and JSON output."""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def print_table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"

    text = "\n".join([f"### {title}", "", line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, rows)])
    print(text, flush=True)
    return text


def write_result(name: str, payload: dict[str, Any]) -> Path:
    from fahr.utils.atomic import atomic_write_json

    payload = {"benchmark": name, "when_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()}, **payload}
    return atomic_write_json(RESULTS / f"{name}.json", payload)


def baseline_tree(commit: str, into: Path) -> Path:
    """The project at ``commit`` (``git archive``), to run with this venv (its ``fahr`` package first on
    the path, as ``python -m`` puts the working folder first)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(RESULTS.parents[1]), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def median_rate(stamps: list[float], warmup: int) -> float:
    """Steps/s from step-end timestamps: 1 / median step duration after ``warmup`` steps (a median,
    so one scheduler hiccup on a shared 2-core machine does not decide a ratio)."""
    return 1.0 / statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))


def step_clock() -> Any:
    """A Lightning callback recording ``time.perf_counter()`` at every training batch end (``.stamps``)."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            self.stamps.append(time.perf_counter())

    return StepClock()


def child_peak_rss_mb(code: str) -> float:
    """Run ``code`` in a fresh interpreter; its peak RSS in MB: the process plus its largest child
    (``resource.getrusage``: ru_maxrss of RUSAGE_SELF + RUSAGE_CHILDREN)."""
    code += ("\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
             " + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the RSS run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return int(out.stdout.split()[-1]) / 1024


def step_benchmark_parser(description: str, samples_help: str) -> argparse.ArgumentParser:
    """The arguments shared by the step-rate benchmarks (pretrain, finetune)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers in the step test (0: loading in-process, no core contention)")
    parser.add_argument("--samples", type=int, default=2048, help=samples_help)
    parser.add_argument("--repeats", type=int, default=3)
    return parser
