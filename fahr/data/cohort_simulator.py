"""Semi-synthetic clinical cohort: simulated survival attached to face photos, with the true HRs beside it.

Faces are either SYNTHETIC (:mod:`fahr.data.synthetic`, which carry a hidden health factor in [0, 1])
or real UTKFace photos (age only). Survival follows a Cox model with a Weibull baseline::

    log-hazard  eta = beta_age * (age_years - 60) / 10 + beta_health * health      (health term optional)
    hazard      h(t | x) = (k / lam) (t / lam)^(k - 1) exp(eta)                    t in days
    survival    S(t | x) = exp(-(t / lam)^k exp(eta))

with shape ``k`` and scale ``lam`` (days). Event times are drawn by inverse-transform sampling
(Bender, Augustin & Blettner 2005, Stat. Med. 24:1713): ``T = lam * (-log U / exp(eta))^(1 / k)``,
``U ~ Uniform(0, 1)``. Censoring is independent: administrative, ``C ~ Uniform(min, max)`` days of
follow-up (staggered entry), or exponential drop-out with mean ``censoring_mean_days``. The observed
time is ``min(T, C)`` and ``event = 1{T <= C}``. So ``exp(beta_age)`` is the hazard ratio per 10
years of age and ``exp(beta_health)`` the ratio between health 1 and health 0.

:func:`write_cohort` writes, atomically::

    output_dir/
        cohort.csv      # the ``cohort`` source format (data_pipelines/sources/cohort.py): patient_id,
                        # photo_path, photo_date, age_at_photo, sex[, race], followup_days, event
        photos/...      # synthetic faces (PNG/JPEG), or UTKFace photos when copied
        utkface -> ...  # symlink to the UTKFace folder when photos are referenced, not copied
        truth.csv       # hidden per-photo truth: health, log_hazard, latent event / censoring times
        true_hr.json    # betas, HRs, Weibull and censoring parameters, seed, expected event rate

Each patient's survival starts at the index photo (the latest); with ``photos_per_patient > 1``
earlier photos precede it by 1-5 years (as in longitudinal FaceAge studies), and their
``followup_days`` count from their own date. The hidden ``health`` is kept out of ``cohort.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from collections.abc import Collection
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from fahr.utils.atomic import atomic_write, atomic_write_json, atomic_write_text

DAYS_PER_YEAR = 365.25
AGE_CENTRE_YEARS = 60.0
AGE_SCALE_YEARS = 10.0
BETA_AGE = math.log(2.0)  # HR 2 per 10 years of age
BETA_HEALTH = -2.0  # HR 0.135 for health 1 vs 0 (about 0.7 per SD of health)
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_DAYS = 8.0 * DAYS_PER_YEAR
FOLLOWUP_DAYS = (1.0 * DAYS_PER_YEAR, 10.0 * DAYS_PER_YEAR)
CENSORINGS = ("uniform", "exponential")
GENERATOR_VERSION = "1"


def log_hazard(age_years: Any, health: Any = None, beta_age: float = BETA_AGE,
               beta_health: float = BETA_HEALTH) -> np.ndarray:
    """(N,) ``beta_age * (age - 60) / 10 [+ beta_health * health]``; age in years, health in [0, 1]."""
    age = np.asarray(age_years, dtype=np.float64)
    eta = beta_age * (age - AGE_CENTRE_YEARS) / AGE_SCALE_YEARS
    if health is not None:
        eta = eta + beta_health * np.asarray(health, dtype=np.float64)
    return eta


def _censoring_quantiles(u: np.ndarray, censoring: str, followup_days: tuple[float, float],
                         censoring_mean_days: float) -> np.ndarray:
    """Censoring times (days) at uniform quantiles ``u``."""
    if censoring == "uniform":
        lo, hi = followup_days
        return lo + (hi - lo) * u
    return -censoring_mean_days * np.log1p(-u)


def _check_params(age: np.ndarray, health: np.ndarray | None, weibull_shape: float, weibull_scale_days: float,
                  censoring: str, followup_days: tuple[float, float], censoring_mean_days: float) -> None:
    if age.ndim != 1 or not np.isfinite(age).all():
        raise ValueError(f"age_years must be a 1-D array of finite years, got shape {age.shape}")
    if health is not None:
        if health.shape != age.shape:
            raise ValueError(f"health has shape {health.shape}, age_years {age.shape}")
        if not np.isfinite(health).all():
            raise ValueError("health contains NaN or inf")
    if not (weibull_shape > 0 and weibull_scale_days > 0):
        raise ValueError(f"Weibull shape and scale must be > 0, got {weibull_shape}, {weibull_scale_days}")
    if censoring not in CENSORINGS:
        raise ValueError(f"censoring must be one of {CENSORINGS}, got {censoring!r}")
    if censoring == "uniform" and not (0 <= followup_days[0] <= followup_days[1] and followup_days[1] > 0):
        raise ValueError(f"followup_days must be (min, max) with 0 <= min <= max, max > 0; got {followup_days}")
    if censoring == "exponential" and not censoring_mean_days > 0:
        raise ValueError(f"censoring_mean_days must be > 0, got {censoring_mean_days}")


def simulate_survival(age_years: Any, health: Any = None, *, beta_age: float = BETA_AGE,
                      beta_health: float = BETA_HEALTH, weibull_shape: float = WEIBULL_SHAPE,
                      weibull_scale_days: float = WEIBULL_SCALE_DAYS, censoring: str = "uniform",
                      followup_days: tuple[float, float] = FOLLOWUP_DAYS,
                      censoring_mean_days: float = 5.0 * DAYS_PER_YEAR, seed: int = 0,
                      return_latent: bool = False) -> tuple[np.ndarray, ...]:
    """Draw Weibull-Cox survival (see the module docstring) for N subjects.

    Args:
        age_years: (N,) age at the time origin, years.
        health: optional (N,) hidden health factor in [0, 1] (1 = healthy); ``None`` drops the term.
        beta_age: log-HR per 10 years of age; beta_health: log-HR of health 1 vs 0.
        weibull_shape, weibull_scale_days: baseline ``H0(t) = (t / scale)^shape``, t in days.
        censoring: ``"uniform"`` (administrative, ``Uniform(*followup_days)`` days) or
            ``"exponential"`` (mean ``censoring_mean_days``).
        seed: the draws depend only on the seed and N.
        return_latent: also return the latent event and censoring times.

    Returns:
        ``time_days`` (N,) float64 = min(T, C) and ``event`` (N,) int64 = 1{T <= C};
        with ``return_latent``, also ``event_time_days`` (N,) and ``censor_time_days`` (N,).
    """
    age = np.asarray(age_years, dtype=np.float64)
    h = None if health is None else np.asarray(health, dtype=np.float64)
    _check_params(age, h, weibull_shape, weibull_scale_days, censoring, followup_days, censoring_mean_days)
    eta = log_hazard(age, h, beta_age, beta_health)
    rng = np.random.default_rng(seed)
    u_event = rng.random(age.size)
    u_censor = rng.random(age.size)
    # -log U ~ Exp(1) is the cumulative hazard at T; 1 - random() avoids log(0)
    t_event = weibull_scale_days * (-np.log1p(-u_event) * np.exp(-eta)) ** (1.0 / weibull_shape)
    t_censor = _censoring_quantiles(u_censor, censoring, followup_days, censoring_mean_days)
    event = (t_event <= t_censor).astype(np.int64)
    time = np.minimum(t_event, t_censor)
    return (time, event, t_event, t_censor) if return_latent else (time, event)


def expected_event_rate(age_years: Any, health: Any = None, *, beta_age: float = BETA_AGE,
                        beta_health: float = BETA_HEALTH, weibull_shape: float = WEIBULL_SHAPE,
                        weibull_scale_days: float = WEIBULL_SCALE_DAYS, censoring: str = "uniform",
                        followup_days: tuple[float, float] = FOLLOWUP_DAYS,
                        censoring_mean_days: float = 5.0 * DAYS_PER_YEAR, grid: int = 512) -> float:
    """Expected fraction of events given the covariates: mean_i P(T_i <= C) = 1 - mean_i E_C[S_i(C)].

    ``E_C`` by the midpoint rule over ``grid`` quantiles of the censoring distribution.
    """
    age = np.asarray(age_years, dtype=np.float64)
    h = None if health is None else np.asarray(health, dtype=np.float64)
    _check_params(age, h, weibull_shape, weibull_scale_days, censoring, followup_days, censoring_mean_days)
    hazard_ratio = np.exp(log_hazard(age, h, beta_age, beta_health))
    c = _censoring_quantiles((np.arange(grid) + 0.5) / grid, censoring, followup_days, censoring_mean_days)
    h0 = (c / weibull_scale_days) ** weibull_shape  # (G,)
    chunks = np.array_split(hazard_ratio, max(1, age.size // 4096))  # bounded (chunk, G) memory
    survival = sum(np.exp(-np.outer(chunk, h0)).sum() for chunk in chunks)
    return float(1.0 - survival / (age.size * grid))


def sample_synthetic_covariates(n: int, seed: int) -> dict[str, np.ndarray]:
    """Age (years), sex (0/1) and hidden health of synthetic faces ``0..n-1`` of dataset ``seed``.

    Exactly the faces :func:`fahr.data.synthetic.synthetic_face` renders for ``(index, seed)``.
    """
    from fahr.data.synthetic import sample_spec

    specs = [sample_spec(i, seed) for i in range(n)]
    return {"age": np.array([s.age for s in specs]), "sex": np.array([s.sex for s in specs]),
            "health": np.array([s.health for s in specs])}


# --------------------------------------------------------------------------- writing a cohort

def write_cohort(output_dir: str | Path, source: str = "synthetic", n_patients: int | None = 200, *,
                 seed: int = 0, photos_per_patient: int = 1, utkface_dir: str | Path | None = None,
                 copy_photos: bool = False, age_range: tuple[float, float] = (18.0, 100.0),
                 only_sha1: Collection[str] | None = None,
                 image_size: int = 112, image_format: str = "png", start_date: str = "2005-01-01",
                 accrual_days: int = 3652, beta_age: float = BETA_AGE, beta_health: float = BETA_HEALTH,
                 weibull_shape: float = WEIBULL_SHAPE, weibull_scale_days: float = WEIBULL_SCALE_DAYS,
                 censoring: str = "uniform", followup_days: tuple[float, float] = FOLLOWUP_DAYS,
                 censoring_mean_days: float = 5.0 * DAYS_PER_YEAR) -> dict[str, Any]:
    """Write a semi-synthetic cohort to ``output_dir`` (layout in the module docstring); returns true_hr.json.

    Args:
        source: ``"synthetic"`` (faces ``0..n-1`` of synthetic dataset ``seed``, rendered at
            ``image_size`` pixels as PNG or JPEG; health enters the hazard) or ``"utkface"``
            (``n_patients`` photos drawn without replacement from ``utkface_dir/manifest.csv`` with age
            in ``age_range``, one per patient, ``None`` = all; age only).
        photos_per_patient: synthetic only: 1 index photo plus up to ``photos_per_patient - 1``
            earlier photos of the same face, 1-5 years younger (skipped below 18 years).
        copy_photos: UTKFace only: copy the photos into ``photos/`` instead of linking the folder.
        only_sha1: UTKFace only: draw only photos whose manifest ``sha1`` is in this set, e.g. the
            val/test split of a FaceAge model, so that the model never trained on the cohort's faces.
        start_date, accrual_days: index photos are dated uniformly over the accrual period.
        The remaining arguments are those of :func:`simulate_survival` (times in days).
    """
    if source not in ("synthetic", "utkface"):
        raise ValueError(f"source must be 'synthetic' or 'utkface', got {source!r}")
    if photos_per_patient < 1 or (source == "utkface" and photos_per_patient != 1):
        raise ValueError("photos_per_patient must be >= 1 (and 1 for UTKFace: one photo per person)")
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])  # dates and photo gaps; survival has its own stream

    if source == "synthetic":
        if n_patients is None or n_patients < 1:
            raise ValueError("n_patients must be >= 1 for synthetic faces")
        cov = sample_synthetic_covariates(n_patients, seed)
        age, sex, health, race = cov["age"], cov["sex"], cov["health"], None
    else:
        files, age, sex, race = _pick_utkface(utkface_dir, n_patients, age_range, rng, only_sha1)
        health = None
    n = age.size
    params = dict(beta_age=beta_age, beta_health=beta_health, weibull_shape=weibull_shape,
                  weibull_scale_days=weibull_scale_days, censoring=censoring, followup_days=tuple(followup_days),
                  censoring_mean_days=censoring_mean_days)
    time, event, t_event, t_censor = simulate_survival(age, health, seed=seed, return_latent=True, **params)
    eta = log_hazard(age, health, beta_age, beta_health)
    index_date = [date.fromisoformat(start_date) + timedelta(days=int(d)) for d in rng.integers(0, accrual_days + 1, n)]

    if source == "utkface" and not copy_photos:
        link = out / "utkface"
        if not link.exists():
            tmp = out / f".utkface.{os.getpid()}.tmp"
            os.symlink(Path(utkface_dir).resolve(), tmp, target_is_directory=True)
            os.replace(tmp, link)

    rows, truth = [], []
    for i in range(n):
        pid = f"P{i:06d}"
        gaps = [0.0] + sorted(rng.uniform(1.0, 5.0, photos_per_patient - 1).tolist(), reverse=False)
        for k, gap_years in enumerate(gaps):
            gap_days = int(round(gap_years * DAYS_PER_YEAR))
            age_at = float(age[i]) - gap_days / DAYS_PER_YEAR
            if k > 0 and age_at < 18.0:
                continue
            if source == "synthetic":
                photo = f"photos/{pid}_{k}.{'png' if image_format == 'png' else 'jpg'}"
                _write_synthetic_photo(out / photo, i, seed, age_at, image_size, image_format)
            elif copy_photos:
                photo = f"photos/{pid}{Path(files[i]).suffix.lower()}"
                atomic_write(out / photo, lambda f, src=Path(utkface_dir) / files[i]: f.write(src.read_bytes()), "wb")
            else:
                photo = f"utkface/{files[i]}"
            row = {"patient_id": pid, "photo_path": photo,
                   "photo_date": (index_date[i] - timedelta(days=gap_days)).isoformat(),
                   "age_at_photo": f"{age_at:.4f}", "sex": int(sex[i]),
                   "followup_days": f"{time[i] + gap_days:.3f}", "event": int(event[i])}
            if race is not None:
                row["race"] = race[i]
            rows.append(row)
            truth.append({"patient_id": pid, "photo_path": photo, "index_photo": int(k == 0),
                          "health": "" if health is None else f"{health[i]:.6f}", "log_hazard": f"{eta[i]:.6f}",
                          "event_time_days": f"{t_event[i]:.3f}", "censor_time_days": f"{t_censor[i]:.3f}"})

    info = {
        "synthetic_survival": True, "generator_version": GENERATOR_VERSION, "source": source, "seed": seed,
        "time_unit": "days",
        "log_hazard": "beta_age * (age_years - 60) / 10" + (" + beta_health * health" if health is not None else ""),
        "beta_age": beta_age, "hr_age_per_10_years": math.exp(beta_age),
        "beta_health": beta_health if health is not None else None,
        "hr_health": math.exp(beta_health) if health is not None else None,
        "health": (None if health is None
                   else "hidden factor in [0, 1], 1 = healthy (HR compares health 1 with 0); in truth.csv"),
        "baseline": {"distribution": "weibull", "shape": weibull_shape, "scale_days": weibull_scale_days,
                     "cumulative_hazard": "(t_days / scale_days) ** shape"},
        "censoring": ({"kind": "uniform", "followup_days": list(followup_days)} if censoring == "uniform"
                      else {"kind": "exponential", "mean_days": censoring_mean_days}),
        "n_patients": n, "n_photos": len(rows),
        "expected_event_rate": expected_event_rate(age, health, **params),
        "observed_event_rate": float(event.mean()),
    }
    _write_csv(out / "truth.csv", truth)
    _write_csv(out / "cohort.csv", rows)
    atomic_write_json(out / "true_hr.json", info)
    return info


def _pick_utkface(utkface_dir: str | Path | None, n: int | None, age_range: tuple[float, float],
                  rng: np.random.Generator, only_sha1: Collection[str] | None = None,
                  ) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    if utkface_dir is None:
        raise ValueError("source='utkface' needs utkface_dir (a folder with manifest.csv and the images)")
    root = Path(utkface_dir)
    with open(root / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle)
                if r["age"] and age_range[0] <= float(r["age"]) <= age_range[1] and r["gender"] in ("0", "1")
                and (only_sha1 is None or r["sha1"] in only_sha1)]
    rows.sort(key=lambda r: r["sha1"] or r["file"])  # order-independent selection
    if not rows:
        raise ValueError(f"no UTKFace photo with age in {age_range}{' and a listed sha1' if only_sha1 is not None else ''} "
                         f"in {root / 'manifest.csv'}")
    if n is not None:
        if n > len(rows):
            raise ValueError(f"asked for {n} patients, only {len(rows)} UTKFace photos have age in {age_range}")
        rows = [rows[i] for i in np.sort(rng.choice(len(rows), size=n, replace=False))]
    # UTKFace ages are integers: spread them over the year so ages at the photo are not all whole
    age = np.array([float(r["age"]) for r in rows]) + rng.random(len(rows))
    return ([r["file"] for r in rows], np.minimum(age, age_range[1]), np.array([int(r["gender"]) for r in rows]),
            [r.get("race", "") for r in rows])


def _write_synthetic_photo(path: Path, index: int, seed: int, age: float, size: int, image_format: str) -> None:
    from PIL import Image

    from fahr.data.synthetic import AGE_MAX, render_face, sample_spec

    spec = dataclasses.replace(sample_spec(index, seed), age=min(max(age, 18.0), AGE_MAX))
    image = Image.fromarray(render_face(spec, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image_format == "png" else "JPEG", quality=95)
    atomic_write(path, lambda f: f.write(buffer.getvalue()), "wb")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        raise ValueError(f"nothing to write to {path}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


__all__ = ["BETA_AGE", "BETA_HEALTH", "WEIBULL_SHAPE", "WEIBULL_SCALE_DAYS", "FOLLOWUP_DAYS", "log_hazard",
           "simulate_survival", "expected_event_rate", "sample_synthetic_covariates", "write_cohort"]
