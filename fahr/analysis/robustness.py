"""How much graded perturbations of aligned crops move a model's FaceAge (and risk).

:func:`perturbation_predictions` runs the model on every crop under every level of every
perturbation (:data:`fahr.analysis.perturbations.PERTURBATIONS`); :func:`robustness_table` turns
those predictions into one row per (perturbation, level): the mean and SD of the change in FaceAge
(years) and risk (log-hazard) against the unperturbed crop, the share of photos whose FaceAge moves
by more than ``threshold`` years and, where true ages are known, the MAE and its change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fahr.analysis.perturbations import PERTURBATIONS, perturb


def predict_crops(model, crops: np.ndarray, batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """(N, S, S, 3) uint8 crops -> ``{"age": (N,) years clipped at 0, "risk": (N,)}`` as
    ``fahr predict`` computes them (:func:`fahr.inference.predict.run_model`)."""
    from fahr.inference.predict import run_model

    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous()
    out = run_model(model, x, batch_size, device)
    if "age" in out:
        out["age"] = np.maximum(out["age"], 0.0)
    return out


def perturbation_predictions(model, crops: np.ndarray, points: np.ndarray, names: list[str], *, seed: int = 0,
                             batch_size: int = 32, device: torch.device | str = "cpu",
                             progress: Callable[[int], None] | None = None) -> dict[tuple[str, int], dict[str, np.ndarray]]:
    """(perturbation, level index) -> the model's outputs on the perturbed crops (:func:`predict_crops`).

    Level index 0 (the identity) is computed once, under the key ``("none", 0)``. Photo ``i`` is
    perturbed with seed ``seed + i``, so its result does not depend on the batch or the other photos.
    """
    device = torch.device(device)
    model = model.to(device).eval()
    results = {("none", 0): predict_crops(model, crops, batch_size, device)}
    for name in names:
        for index, level in enumerate(PERTURBATIONS[name].levels[1:], start=1):
            perturbed = np.stack([perturb(c, name, level, seed + i, points) for i, c in enumerate(crops)])
            results[(name, index)] = predict_crops(model, perturbed, batch_size, device)
            if progress is not None:
                progress(1)
    return results


def _finite_check(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        from fahr.boundary import InputError

        raise InputError(f"the model gave a non-finite {what}: its weights or normalisation are broken; re-export it")


def robustness_table(results: dict[tuple[str, int], dict[str, np.ndarray]], ages: np.ndarray | None = None,
                     threshold: float = 5.0) -> list[dict[str, Any]]:
    """One row per (perturbation, level >= 1), in table order.

    Columns: ``perturbation``, ``family``, ``level`` (index, 1 = mildest), ``value`` (in ``unit``),
    ``unit``, ``n``; with an age head ``faceage_change_mean`` / ``faceage_change_sd`` (perturbed minus
    original, years; SD with ddof 1, empty for one photo), ``faceage_abs_change_mean``,
    ``share_moved_gt_<threshold>y`` (fraction of photos with |change| > threshold); with ``ages``
    ((N,) years, NaN where unknown) ``mae`` and ``mae_change`` (perturbed MAE minus original MAE, over
    photos with a known age); with a risk head ``risk_change_mean`` / ``risk_change_sd`` (log-hazard).
    """
    base = results[("none", 0)]
    for key, value in base.items():
        _finite_check(value, key)
    known = None if ages is None else np.isfinite(ages)
    if known is not None and not known.any():
        known = None
    share_col = f"share_moved_gt_{threshold:g}y"
    rows = []
    for (name, index), out in results.items():
        if name == "none":
            continue
        p = PERTURBATIONS[name]
        row: dict[str, Any] = {"perturbation": name, "family": p.family, "level": index, "value": float(p.levels[index]),
                               "unit": p.unit}
        for head, prefix in (("age", "faceage"), ("risk", "risk")):
            if head not in out:
                continue
            _finite_check(out[head], f"{head} under {name}")
            change = out[head] - base[head]
            row["n"] = len(change)
            row[f"{prefix}_change_mean"] = float(change.mean())
            row[f"{prefix}_change_sd"] = float(change.std(ddof=1)) if len(change) > 1 else None
            if head == "age":
                row["faceage_abs_change_mean"] = float(np.abs(change).mean())
                row[share_col] = float((np.abs(change) > threshold).mean())
                if known is not None:
                    before = float(np.abs(base["age"][known] - ages[known]).mean())
                    after = float(np.abs(out["age"][known] - ages[known]).mean())
                    row["mae"] = after
                    row["mae_change"] = after - before
        rows.append(row)
    return rows


def ranking(rows: list[dict[str, Any]], key: str = "faceage_abs_change_mean") -> list[dict[str, Any]]:
    """Perturbations ordered by ``key`` at their strongest level (largest first): the finding."""
    strongest = {}
    for row in rows:
        if row.get(key) is not None and row["level"] >= strongest.get(row["perturbation"], {}).get("level", 0):
            strongest[row["perturbation"]] = row
    return sorted(strongest.values(), key=lambda r: -r[key])


def baseline_summary(results: dict[tuple[str, int], dict[str, np.ndarray]], ages: np.ndarray | None) -> dict[str, Any]:
    """Unperturbed FaceAge mean and, with ages, the MAE over photos with a known age."""
    base = results[("none", 0)]
    out: dict[str, Any] = {"photos": int(len(next(iter(base.values()))))}
    if "age" in base:
        out["faceage_mean"] = float(base["age"].mean())
        if ages is not None and np.isfinite(ages).any():
            known = np.isfinite(ages)
            out["photos_with_age"] = int(known.sum())
            out["mae"] = float(np.abs(base["age"][known] - ages[known]).mean())
    return out
