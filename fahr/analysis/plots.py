"""Figures of the analysis commands (matplotlib, house style of :mod:`fahr.utils.plots`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fahr.utils.plots import _figure, _save


def robustness_family_png(rows: list[dict[str, Any]], family: str, threshold: float, path: str | Path) -> Path:
    """One family's perturbations: mean (+- SD) change in FaceAge per severity level (left; risk
    change when the model has no age head) and the share of photos moved by more than ``threshold``
    years (right)."""
    rows = [r for r in rows if r["family"] == family]
    age = any("faceage_change_mean" in r for r in rows)
    prefix, unit = ("faceage", "years") if age else ("risk", "log-hazard")
    fig, axes = _figure(10 if age else 5, 4)
    fig.clf()
    ax = fig.add_subplot(1, 2 if age else 1, 1)
    share_ax = fig.add_subplot(1, 2, 2) if age else None
    share_col = f"share_moved_gt_{threshold:g}y"
    for name in dict.fromkeys(r["perturbation"] for r in rows):
        mine = [r for r in rows if r["perturbation"] == name]
        levels = [0] + [r["level"] for r in mine]
        mean = np.array([0.0] + [r[f"{prefix}_change_mean"] for r in mine])
        sd = np.array([0.0] + [r[f"{prefix}_change_sd"] or 0.0 for r in mine])
        line = ax.plot(levels, mean, marker="o", label=name)[0]
        ax.fill_between(levels, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
        if share_ax is not None:
            share_ax.plot(levels, [0.0] + [r[share_col] for r in mine], marker="o", label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="severity level (0 = unperturbed)", ylabel=f"change in {'FaceAge' if age else 'risk'} ({unit})",
           title=f"{family}: mean change +- SD")
    ax.set_xticks(range(4))
    ax.legend(fontsize=8)
    if share_ax is not None:
        share_ax.set(xlabel="severity level (0 = unperturbed)", ylabel=f"share of photos moved > {threshold:g} years",
                     ylim=(-0.02, 1.02), title=f"{family}: photos moved > {threshold:g} years")
        share_ax.set_xticks(range(4))
    return _save(fig, path)


def saliency_grid_png(background: np.ndarray, maps: dict[str, np.ndarray], path: str | Path,
                      title: str = "") -> Path:
    """One row: the (S, S, 3) uint8 background face, then each named (S, S) map overlaid on it
    (each map scaled to its own maximum)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(2.4 * (len(maps) + 1), 2.8))
    axes[0].imshow(background)
    axes[0].set_title("face", fontsize=8)
    for ax, (name, m) in zip(axes[1:], maps.items()):
        ax.imshow(background)
        peak = float(np.max(np.abs(m))) or 1.0
        ax.imshow(np.abs(m) / peak, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def decade_maps_png(rows: dict[str, dict[str, tuple[np.ndarray, np.ndarray, int]]], path: str | Path) -> Path:
    """Mean maps per age decade: ``rows`` map name -> decade label -> (mean face, mean map, photos)."""
    import matplotlib.pyplot as plt

    decades = sorted({d for per in rows.values() for d in per})
    fig, axes = plt.subplots(len(rows), len(decades), figsize=(2.0 * len(decades), 2.2 * len(rows)), squeeze=False)
    for i, (name, per) in enumerate(rows.items()):
        for j, decade in enumerate(decades):
            ax = axes[i][j]
            ax.axis("off")
            if decade not in per:
                continue
            face, m, n = per[decade]
            ax.imshow(face)
            ax.imshow(m / (float(m.max()) or 1.0), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f"{name}\n{decade} (n={n})", fontsize=7)
    return _save(fig, path)


def region_bars_png(importance: dict[str, np.ndarray], regions: tuple[str, ...], path: str | Path) -> Path:
    """Importance per region (:func:`fahr.analysis.regions.region_importance`: 1 = the average
    pixel's), one bar group per map name."""
    fig, ax = _figure(7, 4)
    width = 0.8 / max(1, len(importance))
    x = np.arange(len(regions))
    for k, (name, values) in enumerate(importance.items()):
        ax.bar(x + (k - (len(importance) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, regions)
    ax.axhline(1, color="k", lw=0.8)
    ax.set(ylabel="mean |attribution| per pixel / crop mean", title="importance per facial region")
    ax.legend(fontsize=7)
    return _save(fig, path)
