"""`fahr saliency`: a ``SaliencyConfig`` -> attribution maps of FaceAge and FaceSurvival, per facial region.

Output directory:

- ``regions.csv`` / ``regions.md``: per method and model, each region's importance (mean over photos
  of the region's mean |attribution| per pixel over the crop's, :func:`fahr.analysis.regions.region_importance`;
  1 = as important as the average pixel), its share of the six regions' total and its rank (1 = most important),
  and a row ``outside`` for the pixels in no region (hair, ears, background; no share or rank);
- ``overlap.csv`` / ``overlap.md``: per method, the Spearman rank correlation between the FaceAge and
  FaceSurvival region importances (of the mean importances, and the mean of the per-photo ones)
  and between their mean pixel maps;
- ``sanity.csv`` / ``sanity.md``: per method and model, the mean per-photo Spearman correlation of
  the pixel maps of the trained and the weight-randomised model (low = the maps explain the weights);
- ``decades.csv`` and ``saliency_decades.png`` where ages are known: region importances and mean
  maps per age decade; ``saliency_mean.png`` (mean face and mean maps), ``saliency_regions.png``,
  ``photo_NNN.png`` for the first ``photo_figures`` photos (numbered, never named);
- ``maps.npz``: every map (float32, (N, S, S)) and the ages; ``summary.json``.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fahr.boundary import InputError, check_output_dir
from fahr.config.analysis_schema import SaliencyConfig
from fahr.config.schema import validate

log = logging.getLogger("fahr.saliency")

#: the two models' names in the tables
FACEAGE, SURVIVAL = "faceage", "facesurvival"


def _load_models(cfg: DictConfig) -> tuple[dict[str, tuple[Any, str]], dict[str, Any]]:
    """name -> (FaceModel, head), and the FaceAge model's card."""
    from fahr.inference.predict import photo_outputs
    from fahr.pipeline.predict import load_model

    age_model, card = load_model(cfg.model)
    if "age" not in age_model.heads:
        raise InputError(f"model={cfg.model} has no FaceAge head (heads: {list(age_model.heads)}); give the FaceAge "
                         "export as model= and the FaceSurvival export as risk_model=")
    models = {FACEAGE: (age_model, "age")}
    if cfg.risk_model is not None:
        risk_model, risk_card = load_model(cfg.risk_model)
        if "risk" not in photo_outputs(risk_model):
            raise InputError(f"risk_model={cfg.risk_model} has no image-only risk head (a combined model needs "
                             "clinical covariates, which photos do not carry)")
        from fahr.inference.predict import resolve_preprocessing
        from fahr.pipeline.predict import preprocessing_overrides

        overrides = preprocessing_overrides(cfg)
        if resolve_preprocessing(risk_card, overrides) != resolve_preprocessing(card, overrides):
            raise InputError(f"model={cfg.model} and risk_model={cfg.risk_model} were trained on crops prepared "
                             "differently (their cards' preprocessing differ): one set of crops cannot serve both")
        models[SURVIVAL] = (risk_model, "risk")
    elif "risk" in photo_outputs(age_model):
        models[SURVIVAL] = (age_model, "risk")
    return models, card


def _check_methods(methods: list[str]) -> list[str]:
    from fahr.analysis.saliency import METHODS

    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(f"methods: unknown {unknown or 'empty list'}; choose from {list(METHODS)}")
    return methods


def _decade(age: float) -> str:
    return f"{int(age // 10) * 10}s"


def saliency(cfg: DictConfig) -> dict[str, Any]:
    """Run ``fahr saliency``; returns the summary written to ``summary.json``."""
    from fahr.analysis.photos import load_aligned
    from fahr.analysis.plots import decade_maps_png, region_bars_png, saliency_grid_png
    from fahr.analysis.regions import REGIONS, outside_importance, region_importance, region_labels
    from fahr.analysis.saliency import attribution_maps, normalised, randomized_copy, spearman
    from fahr.analysis.tables import write_tables
    from fahr.inference.predict import resolve_device
    from fahr.pipeline.predict import check_inference_options, model_files, preprocessing_overrides
    from fahr.utils.atomic import atomic_write, atomic_write_json

    validate(cfg, SaliencyConfig)
    methods = _check_methods(cfg.methods)
    check_inference_options(cfg)
    inputs = (cfg.input, cfg.model, *model_files(cfg.model))
    if cfg.risk_model is not None:
        inputs += (cfg.risk_model, *model_files(cfg.risk_model))
    out = check_output_dir(cfg.output, "output", inputs=inputs)
    models, card = _load_models(cfg)
    device = resolve_device(cfg.device)
    if device.type != "cpu":
        log.info("saliency runs on the CPU (device=%s ignored): maps are small and exact there", device)
    t0 = time.perf_counter()
    photos = load_aligned(cfg.input, card, preprocessing_overrides(cfg), cfg.max_photos)
    crops, ages = photos.crops, photos.ages
    size = crops.shape[1]
    labels = region_labels(size, float(photos.prep["margin"]))
    log.info("%d of %d photos aligned (%s); methods %s; models %s", len(crops), photos.considered,
             dict(photos.counts), methods, list(models))

    maps: dict[tuple[str, str], np.ndarray] = {}
    random_maps: dict[tuple[str, str], np.ndarray] = {}
    ig_error: dict[str, float] = {}
    for name, (model, head) in models.items():
        randomised = randomized_copy(model, cfg.sanity_seed)
        for method in methods:
            kw = dict(steps=cfg.ig_steps, baseline=cfg.baseline, batch_size=cfg.batch_size)
            maps[(method, name)], error = attribution_maps(model, crops, method, head, **kw)
            random_maps[(method, name)], _ = attribution_maps(randomised, crops, method, head, **kw)
            if error is not None:
                ig_error[name] = error
            log.info("%s maps of %s (trained and randomised): done after %.0f s", method, name, time.perf_counter() - t0)
            if not np.isfinite(maps[(method, name)]).all():
                raise InputError(f"the {name} model gave non-finite {method} maps: its weights are broken; re-export it")

    # region importance: per photo, each region's mean per-pixel share of the (normalised) map
    per_photo = {key: region_importance(m, labels) for key, m in maps.items()}
    region_rows, mean_importance = [], {}
    for (method, name), imp in per_photo.items():
        mean = imp.mean(axis=0)
        mean_importance[(method, name)] = mean
        ranks = (-mean).argsort().argsort() + 1
        for r, region in enumerate(REGIONS):
            region_rows.append({"method": method, "model": name, "region": region, "importance": float(mean[r]),
                                "share": float(mean[r] / mean.sum()) if mean.sum() > 0 else None,
                                "rank": int(ranks[r]), "photos": len(imp)})
        region_rows.append({"method": method, "model": name, "region": "outside", "photos": len(imp),
                            "importance": float(outside_importance(maps[(method, name)], labels).mean())})
    write_tables(region_rows, ["method", "model", "region", "importance", "share", "rank", "photos"],
                 out / "regions.csv", out / "regions.md",
                 title="Importance per facial region (mean |attribution| per pixel / the crop's mean; 1 = average pixel)")

    overlap_rows = []
    if SURVIVAL in models:
        for method in methods:
            a, b = per_photo[(method, FACEAGE)], per_photo[(method, SURVIVAL)]
            per = [spearman(x, y) for x, y in zip(a, b)]
            overlap_rows.append({
                "method": method, "regions_spearman": spearman(a.mean(0), b.mean(0)),
                "regions_spearman_per_photo_mean": float(np.nanmean(per)) if np.isfinite(per).any() else None,
                "pixels_spearman_mean_maps": spearman(normalised(maps[(method, FACEAGE)]).mean(0),
                                                      normalised(maps[(method, SURVIVAL)]).mean(0)),
                "same_backbone": models[FACEAGE][0] is models[SURVIVAL][0], "photos": len(a)})
        write_tables(overlap_rows, ["method", "regions_spearman", "regions_spearman_per_photo_mean",
                                    "pixels_spearman_mean_maps", "same_backbone", "photos"],
                     out / "overlap.csv", out / "overlap.md",
                     title="Overlap of FaceAge and FaceSurvival maps (Spearman rank correlation)")

    sanity_rows = []
    for (method, name), m in maps.items():
        rm = random_maps[(method, name)]
        per = [spearman(x, y) for x, y in zip(m, rm)]
        sanity_rows.append({"method": method, "model": name,
                            "pixels_spearman_trained_vs_random": float(np.nanmean(per)) if np.isfinite(per).any() else None,
                            "regions_spearman_trained_vs_random": spearman(
                                mean_importance[(method, name)],
                                region_importance(rm, labels).mean(0)),
                            "photos": len(m)})
    write_tables(sanity_rows, ["method", "model", "pixels_spearman_trained_vs_random",
                               "regions_spearman_trained_vs_random", "photos"], out / "sanity.csv", out / "sanity.md",
                 title="Weight-randomisation sanity check (Adebayo et al. 2018): low correlation = maps depend on weights")

    # figures
    mean_face = crops.mean(axis=0).round().astype(np.uint8)
    labels_of = {key: f"{key[1]} {key[0].replace('integrated_gradients', 'IG')}" for key in maps}
    saliency_grid_png(mean_face, {labels_of[k]: normalised(m).mean(0) for k, m in maps.items()},
                      out / "saliency_mean.png", title=f"mean over {len(crops)} photos")
    region_bars_png({labels_of[k]: v for k, v in mean_importance.items()}, REGIONS, out / "saliency_regions.png")
    for i in range(min(cfg.photo_figures, len(crops))):
        saliency_grid_png(crops[i], {labels_of[k]: m[i] for k, m in maps.items()}, out / f"photo_{i:03d}.png")

    decade_rows = []
    known = np.isfinite(ages)
    if known.any():
        decades = sorted({_decade(a) for a in ages[known]}, key=lambda d: int(d[:-1]))
        per_decade: dict[str, dict[str, tuple[np.ndarray, np.ndarray, int]]] = {labels_of[k]: {} for k in maps}
        for decade in decades:
            sel = np.array([bool(k) and _decade(a) == decade for a, k in zip(ages, known)])
            face = crops[sel].mean(axis=0).round().astype(np.uint8)
            for key, m in maps.items():
                per_decade[labels_of[key]][decade] = (face, normalised(m[sel]).mean(0), int(sel.sum()))
                imp = per_photo[key][sel].mean(0)
                decade_rows.append({"decade": decade, "method": key[0], "model": key[1], "photos": int(sel.sum()),
                                    **{region: float(v) for region, v in zip(REGIONS, imp)},
                                    "top_region": REGIONS[int(imp.argmax())]})
        write_tables(decade_rows, ["decade", "method", "model", "photos", *REGIONS, "top_region"], out / "decades.csv")
        decade_maps_png(per_decade, out / "saliency_decades.png")

    arrays = {f"{method}__{name}": m.astype(np.float32) for (method, name), m in maps.items()}
    arrays |= {f"random__{method}__{name}": m.astype(np.float32) for (method, name), m in random_maps.items()}

    def write_npz(f) -> None:
        buf = io.BytesIO()
        np.savez_compressed(buf, ages=ages, region_labels=labels, **arrays)
        f.write(buf.getvalue())

    atomic_write(out / "maps.npz", write_npz, mode="wb")
    seconds = time.perf_counter() - t0
    top = {f"{m} {n}": REGIONS[int(v.argmax())] for (m, n), v in mean_importance.items()}
    summary = {"model": str(cfg.model), "risk_model": cfg.risk_model, "photos": photos.considered,
               "aligned": len(crops), "counts": dict(photos.counts), "preprocessing": photos.prep,
               "methods": methods, "models": list(models), "ig_steps": cfg.ig_steps, "baseline": cfg.baseline,
               "ig_relative_completeness_error": ig_error, "top_region": top, "overlap": overlap_rows,
               "sanity": sanity_rows, "seconds": seconds}
    atomic_write_json(out / "summary.json", summary)
    log.info("fahr saliency: %d photos, top regions %s -> %s (%.1f s)", len(crops), top, out, seconds)
    return summary
