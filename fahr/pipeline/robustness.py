"""`fahr robustness`: a ``RobustnessConfig`` -> tables and figures of how perturbations move FaceAge.

Output directory: ``robustness.csv`` / ``robustness.md`` (one row per perturbation and severity,
:func:`fahr.analysis.robustness.robustness_table`), ``ranking.md`` (perturbations by mean |change|
at their strongest level), ``robustness_<family>.png`` per family and ``summary.json``. Photos are
counted by status; no path or image leaves the run except the aggregated numbers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig

from fahr.boundary import InputError, check_output_dir, printable_path
from fahr.config.analysis_schema import RobustnessConfig
from fahr.config.schema import validate

log = logging.getLogger("fahr.robustness")

TABLE_COLUMNS = ["perturbation", "family", "level", "value", "unit", "n", "faceage_change_mean", "faceage_change_sd",
                 "faceage_abs_change_mean", "{share}", "mae", "mae_change", "risk_change_mean", "risk_change_sd"]


def check_perturbation_names(names: list[str] | None) -> list[str]:
    """The requested perturbation names (all when None), each checked against the table."""
    from fahr.analysis.perturbations import PERTURBATIONS

    if names is None:
        return list(PERTURBATIONS)
    names = list(names)
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown or not names:
        raise InputError(f"perturbations: unknown {unknown or 'empty list'}; choose from {list(PERTURBATIONS)} "
                         "(or null for all)")
    return list(dict.fromkeys(names))


def robustness(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fahr robustness``; returns the summary written to ``summary.json``."""
    from tqdm import tqdm

    from fahr.analysis.perturbations import FAMILIES
    from fahr.analysis.photos import load_aligned
    from fahr.analysis.plots import robustness_family_png
    from fahr.analysis.robustness import baseline_summary, perturbation_predictions, ranking, robustness_table
    from fahr.analysis.tables import write_tables
    from fahr.inference.predict import photo_outputs, resolve_device
    from fahr.pipeline.predict import check_inference_options, load_model, model_files, preprocessing_overrides
    from fahr.utils.atomic import atomic_write_json

    validate(cfg, RobustnessConfig)
    names = check_perturbation_names(cfg.perturbations)
    check_inference_options(cfg)
    out = check_output_dir(cfg.output, "output", inputs=(cfg.input, cfg.model, *model_files(cfg.model)))
    model, card = load_model(cfg.model)
    if not photo_outputs(model):
        raise InputError(f"model {cfg.model}: no FaceAge head and no image-only risk head, nothing to perturb")
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    photos = load_aligned(cfg.input, card, preprocessing_overrides(cfg), cfg.max_photos)
    log.info("%d of %d photos aligned (%s); %d perturbations x 3 levels", len(photos.crops), photos.considered,
             dict(photos.counts), len(names))
    with tqdm(total=3 * len(names), desc="robustness", unit="level", disable=None) as bar:
        results = perturbation_predictions(model, photos.crops, photos.points, names, seed=cfg.seed,
                                           batch_size=cfg.batch_size, device=device, progress=bar.update)
    ages = photos.ages if (photos.ages == photos.ages).any() else None
    rows = robustness_table(results, ages, threshold=cfg.threshold_years)
    share = f"share_moved_gt_{cfg.threshold_years:g}y"
    columns = [c.format(share=share) for c in TABLE_COLUMNS]
    columns = [c for c in columns if any(c in r for r in rows) or c in ("perturbation", "family", "level", "value",
                                                                          "unit", "n")]
    title = f"Robustness of {printable_path(cfg.model)}: change under perturbation (perturbed - original)"
    write_tables(rows, columns, out / "robustness.csv", out / "robustness.md", title=title)
    key = "faceage_abs_change_mean" if "age" in model.heads else "risk_change_mean"
    order = ranking(rows, key) if key == "faceage_abs_change_mean" else sorted(
        [r for r in rows if r["level"] == 3], key=lambda r: -abs(r[key]))
    write_tables(order, columns, out / "ranking.csv", out / "ranking.md",
                 title="Perturbations at their strongest level, most disruptive first")
    figures = [str(robustness_family_png(rows, family, cfg.threshold_years, out / f"robustness_{family}.png"))
               for family in FAMILIES if any(r["family"] == family for r in rows)]
    seconds = time.perf_counter() - t0
    summary = {
        "model": str(cfg.model), "photos": photos.considered, "aligned": len(photos.crops),
        "counts": dict(photos.counts), "preprocessing": photos.prep, "perturbations": names,
        "threshold_years": cfg.threshold_years, "seed": cfg.seed, "baseline": baseline_summary(results, ages),
        "most_disruptive": [r["perturbation"] for r in order[:5]], "figures": figures, "seconds": seconds,
    }
    atomic_write_json(out / "summary.json", summary)
    log.info("fahr robustness: %d photos, most disruptive %s -> %s (%.1f s)", len(photos.crops),
             summary["most_disruptive"][:3], out, seconds)
    return summary
