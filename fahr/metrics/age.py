"""Age-estimation metrics (years), computed from all predictions of a split at once.

MAE overall / per decade / per group, CS@5 (share within 5 years), Pearson r, and the mean signed
error per decade, which shows regression to the mean (young over-, old under-estimated). The linear
bias correction of brain-age work (Smith et al., NeuroImage 2019) fits ``pred = a + b * true`` on
validation data and maps ``pred -> (pred - a) / b``; metrics are reported before and after.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# torchmetrics is imported where the metrics are computed, not here: `fahr predict` needs only the
# calibration arithmetic below, and torchmetrics (with torchvision) is ~2 s of its start-up


def decade_label(age: float) -> str:
    lo = int(age // 10) * 10
    return f"{lo}-{lo + 9}"


def _mae(pred: np.ndarray, true: np.ndarray) -> float:
    from torchmetrics.functional import mean_absolute_error

    return float(mean_absolute_error(torch.from_numpy(pred), torch.from_numpy(true)))


def age_metrics(pred: np.ndarray, true: np.ndarray, groups: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Flat metric dict from predictions and true ages (float (N,), years).

    Keys: ``mae``, ``cs5``, ``pearson_r``, ``mean_error`` (pred - true), ``n``, ``mae/decade/<lo-hi>``,
    ``mean_error/decade/<lo-hi>``, ``n/decade/<lo-hi>``, and ``mae/<group>/<value>``,
    ``mean_error/<group>/<value>``, ``n/<group>/<value>`` for each group array (e.g. sex, race; NaN
    entries are left out of that group's breakdown).
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 1 or len(pred) == 0:
        raise ValueError(f"pred and true must be equal-length 1-D arrays, got {pred.shape} and {true.shape}")
    from torchmetrics.functional import pearson_corrcoef

    err = pred - true
    out: dict[str, float] = {
        "n": float(len(pred)),
        "mae": _mae(pred, true),
        "cs5": float(np.mean(np.abs(err) <= 5.0)),
        "mean_error": float(err.mean()),
        "pearson_r": float(pearson_corrcoef(torch.from_numpy(pred), torch.from_numpy(true)))
        if len(pred) > 1 and pred.std() > 0 and true.std() > 0 else math.nan,
    }
    decades = np.floor(true / 10).astype(int)
    for d in np.unique(decades):
        m = decades == d
        label = f"{d * 10}-{d * 10 + 9}"
        out[f"mae/decade/{label}"] = _mae(pred[m], true[m])
        out[f"mean_error/decade/{label}"] = float(err[m].mean())
        out[f"n/decade/{label}"] = float(m.sum())
    for name, values in (groups or {}).items():
        values = np.asarray(values, dtype=np.float64)
        for v in np.unique(values[np.isfinite(values)]):
            m = values == v
            out[f"mae/{name}/{v:g}"] = _mae(pred[m], true[m])
            out[f"mean_error/{name}/{v:g}"] = float(err[m].mean())
            out[f"n/{name}/{v:g}"] = float(m.sum())
    return out


def fit_bias_correction(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Least-squares ``pred = intercept + slope * true`` (years) on validation predictions."""
    slope, intercept = np.polyfit(np.asarray(true, np.float64), np.asarray(pred, np.float64), 1)
    # Dividing by a small slope amplifies noise: below 0.1 the model has not learnt age yet.
    if slope < 0.1:
        raise ValueError(f"bias correction is ill-posed: predictions barely follow age (slope {slope:.2g} < 0.1)")
    return {"slope": float(slope), "intercept": float(intercept)}


def apply_bias_correction(pred: np.ndarray, correction: dict[str, float]) -> np.ndarray:
    """max(0, (pred - intercept) / slope), years: an age is never below 0 (dividing by a slope < 1
    stretches an infant's small FaceAge below zero otherwise)."""
    return np.maximum((np.asarray(pred, np.float64) - correction["intercept"]) / correction["slope"], 0.0)


def decide_bias_correction(pred: np.ndarray, true: np.ndarray, seed: int = 0) -> tuple[dict[str, float] | None, dict]:
    """The bias correction fitted on all validation predictions, kept only if it lowers held-out error.

    Held out = 2-fold cross-fitting on the validation set: photos are split in two halves (a fixed
    permutation from ``seed``), the correction is fitted on each half and applied to the other, and the
    MAE of those out-of-fold corrected ages is compared with the MAE as predicted. The test set is
    never looked at. Returns ``(correction or None, decision)``; ``decision`` holds ``kept``,
    ``val_mae``, ``val_mae_corrected_heldout``, the full-val ``slope``/``intercept`` (or ``reason``).
    """
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    decision: dict = {"kept": False, "method": "2-fold cross-fitting on val", "val_mae": _mae(pred, true)}
    if len(pred) < 10 or np.ptp(true) == 0:
        return None, {**decision, "reason": "fewer than 10 validation photos, or all of one age"}
    try:
        correction = fit_bias_correction(pred, true)
        order = np.random.default_rng(seed).permutation(len(pred))
        halves = (order[: len(pred) // 2], order[len(pred) // 2:])
        corrected = np.empty_like(pred)
        for fit_on, apply_to in (halves, halves[::-1]):
            corrected[apply_to] = apply_bias_correction(pred[apply_to], fit_bias_correction(pred[fit_on], true[fit_on]))
    except (ValueError, np.linalg.LinAlgError, TypeError) as err:
        return None, {**decision, "reason": str(err).splitlines()[0] if str(err) else type(err).__name__}
    decision.update(correction, val_mae_corrected_heldout=_mae(corrected, true))
    decision["kept"] = decision["val_mae_corrected_heldout"] < decision["val_mae"]
    return (correction if decision["kept"] else None), decision
