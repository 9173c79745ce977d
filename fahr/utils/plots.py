"""Matplotlib figures of results (not of faces), written atomically as PNG (Agg backend, no display)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fahr.utils.atomic import atomic_write


def _png_bytes(fig, dpi: int = 100) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _save(fig, path: str | Path) -> Path:
    data = _png_bytes(fig, dpi=120)
    return atomic_write(Path(path), lambda f: f.write(data), mode="wb")


def training_curves_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], max_panels: int = 12) -> bytes:
    """PNG bytes: one small panel per metric (``name -> (steps, values)``), at most ``max_panels``."""
    names = list(curves)[:max_panels]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, _ = _figure(4.0 * cols, 2.6 * rows)
    fig.clf()
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        steps, values = curves[name]
        ax.plot(steps, values, lw=1.2, marker="." if len(steps) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png_bytes(fig)


def _figure(width: float = 5.0, height: float = 5.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def age_scatter_png(pred: np.ndarray, true: np.ndarray, path: str | Path, corrected: np.ndarray | None = None) -> Path:
    """Predicted vs true age (years), with the identity line; corrected predictions overlaid if given."""
    fig, ax = _figure()
    ax.scatter(true, pred, s=6, alpha=0.5, label=f"FaceAge (MAE {np.mean(np.abs(pred - true)):.2f})")
    if corrected is not None:
        ax.scatter(true, corrected, s=6, alpha=0.4, label=f"bias-corrected (MAE {np.mean(np.abs(corrected - true)):.2f})")
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="true age (years)", ylabel="predicted age (years)", title="FaceAge vs age")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def age_error_by_decade_png(pred: np.ndarray, true: np.ndarray, path: str | Path) -> Path:
    """MAE and mean signed error per decade of true age (years)."""
    decades = np.floor(true / 10).astype(int)
    ds = np.unique(decades)
    mae = [np.mean(np.abs(pred - true)[decades == d]) for d in ds]
    bias = [np.mean((pred - true)[decades == d]) for d in ds]
    fig, ax = _figure(6, 4)
    x = np.arange(len(ds))
    ax.bar(x - 0.2, mae, 0.4, label="MAE")
    ax.bar(x + 0.2, bias, 0.4, label="mean signed error")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, [f"{d * 10}s" for d in ds])
    ax.set(xlabel="true age", ylabel="years", title="FaceAge error by decade")
    ax.legend(fontsize=8)
    return _save(fig, path)
