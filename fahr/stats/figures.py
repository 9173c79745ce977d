"""Figures of the subgroup, incremental-value and FaceAge-gap analyses (matplotlib Agg, PNG).

Each figure shows the same numbers as its table: estimates with their 95% CI as error bars.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fahr.utils.atomic import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=110, metadata={"Software": None}),
                        mode="wb")


def _forest(ax, labels: list[str], est: np.ndarray, low: np.ndarray, high: np.ndarray, ref: float | None,
            highlight: np.ndarray | None = None) -> None:
    y = np.arange(len(labels))[::-1]
    colors = np.where(highlight, "tab:red", "tab:blue") if highlight is not None else "tab:blue"
    err = np.vstack([est - low, high - est])
    err = np.where(np.isfinite(err), np.maximum(err, 0), 0)
    ax.errorbar(est, y, xerr=err, fmt="none", ecolor="0.4", capsize=2)
    ax.scatter(est, y, c=colors, zorder=3, s=18)
    if ref is not None and np.isfinite(ref):
        ax.axvline(ref, color="0.5", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)


def plot_subgroups(table: pd.DataFrame, path: str | Path) -> Path:
    """One forest panel per statistic and marker: each group level's estimate and 95% CI, the
    cohort's value dashed; levels whose CI excludes it in red."""
    plt = _pyplot()
    panels = list(dict.fromkeys(zip(table["statistic"], table["label"])))
    rows = max(int(((table["statistic"] == s) & (table["label"] == m)).sum()) for s, m in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 1.2 + 0.32 * rows), squeeze=False)
    try:
        for ax, (stat, label) in zip(axes[0], panels):
            part = table[(table["statistic"] == stat) & (table["label"] == label)]
            names = [("all" if g == "all" else f"{g}: {lv}") + f" (n={n})"
                     for g, lv, n in zip(part["group"], part["level"], part["n"])]
            overall = part.loc[part["group"] == "all", "estimate"]
            _forest(ax, names, part["estimate"].to_numpy(float), part["ci_low"].to_numpy(float),
                    part["ci_high"].to_numpy(float), float(overall.iloc[0]) if len(overall) else None,
                    part["excludes_overall"].to_numpy(bool))
            ax.set_title(stat if stat.startswith("FaceAge") else f"{label}: {stat}", fontsize=9)
            if stat.startswith("HR"):
                ax.set_xscale("log")
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_incremental(table: pd.DataFrame, path: str | Path) -> Path:
    """Left: AUC(t) of the clinical model and clinical + each marker; right: the changes (AUC, NRI,
    IDI) with 95% CIs against 0."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 1.6 + 0.45 * len(table["marker"].unique()) * 4))
    try:
        aucs = table[table["key"].isin(["auc_clinical", "auc_marker"])]
        aucs = aucs.drop_duplicates(subset=["key"] if aucs["marker"].nunique() == 1 else None)
        clinical = aucs[aucs["key"] == "auc_clinical"].head(1)
        shown = pd.concat([clinical, aucs[aucs["key"] == "auc_marker"]])
        labels = ["clinical" if k == "auc_clinical" else f"clinical + {lab}" for k, lab in
                  zip(shown["key"], shown["label"])]
        _forest(left, labels, shown["estimate"].to_numpy(float), shown["ci_low"].to_numpy(float),
                shown["ci_high"].to_numpy(float), None)
        left.set_title(f"time-dependent AUC at t = {table['horizon'].iloc[0]:g}", fontsize=9)
        gains = table[table["key"].isin(["delta_auc", "nri", "nri_cat", "idi"])]
        labels = [f"{lab}: {stat}" for lab, stat in zip(gains["label"], gains["statistic"])]
        _forest(right, labels, gains["estimate"].to_numpy(float), gains["ci_low"].to_numpy(float),
                gains["ci_high"].to_numpy(float), 0.0)
        right.set_title("added to the clinical model (95% CI)", fontsize=9)
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_gap(cohort_age: np.ndarray, cohort_faceage: np.ndarray, reference_age: np.ndarray,
             reference_faceage: np.ndarray, fit: dict[str, float], path: str | Path) -> Path:
    """FaceAge against age for the reference and the cohort, with the two parallel fitted lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    try:
        ax.scatter(reference_age, reference_faceage, s=8, alpha=0.5, label=f"reference (n={len(reference_age)})")
        ax.scatter(cohort_age, cohort_faceage, s=8, alpha=0.5, label=f"cohort (n={len(cohort_age)})")
        grid = np.linspace(min(np.min(reference_age), np.min(cohort_age)),
                           max(np.max(reference_age), np.max(cohort_age)), 50)
        line = fit["intercept"] + fit["slope"] * grid
        ax.plot(grid, line, color="tab:blue")
        ax.plot(grid, line + fit["gap"], color="tab:orange",
                label=f"gap {fit['gap']:.2f} y (95% CI {fit['ci_low']:.2f} to {fit['ci_high']:.2f})")
        ax.plot(grid, grid, color="0.6", linestyle=":", linewidth=1, label="FaceAge = age")
        ax.set_xlabel("age (years)")
        ax.set_ylabel("FaceAge (years)")
        ax.set_title("FaceAge gap against healthy faces, adjusted for age", fontsize=10)
        ax.legend(fontsize=8)
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
