"""The FaceAge gap of a cohort against a reference set of healthy faces, adjusted for age.

One linear model on the reference and cohort faces together (analysis of covariance, common slope)::

    faceage = a + b * age + gap * cohort + error      (cohort = 1 for a patient, 0 for a reference face)

``gap`` is how much older (years) the cohort looks than healthy people of the same age; its 95% CI
and p-value are the ordinary least-squares t-interval and t-test (homoscedastic errors, df = N - 3).
Also reported: the raw mean FaceAge - age of each set (not adjusted). The FaceAge paper (Bontempi
et al., Lancet Digit Health 2025) reports this gap as about 4.8 years for cancer patients.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def faceage_gap(cohort_age: np.ndarray, cohort_faceage: np.ndarray, reference_age: np.ndarray,
                reference_faceage: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Age-adjusted FaceAge gap (years) of the cohort over the reference; all inputs (N,) years.

    Returns gap, se, ci_low, ci_high, p, slope and intercept (the common line), n_cohort,
    n_reference, residual_sd, and the raw mean gaps ``raw_gap_cohort``/``raw_gap_reference``
    (mean FaceAge - age).

    Raises:
        ValueError: fewer than 2 faces in a set, or the ages do not vary (the slope is not identifiable).
    """
    ca, cf, ra, rf = (np.asarray(a, dtype=float).reshape(-1) for a in
                      (cohort_age, cohort_faceage, reference_age, reference_faceage))
    if len(ca) < 2 or len(ra) < 2:
        raise ValueError(f"the FaceAge gap needs at least 2 faces in each set (cohort {len(ca)}, reference {len(ra)})")
    age = np.concatenate([ca, ra])
    y = np.concatenate([cf, rf])
    cohort = np.concatenate([np.ones(len(ca)), np.zeros(len(ra))])
    x = np.column_stack([np.ones(len(age)), age, cohort])
    if np.linalg.matrix_rank(x) < 3:
        raise ValueError("the ages do not vary: the FaceAge-age slope (and so the gap) cannot be estimated")
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    df = len(y) - 3
    sigma2 = float(residual @ residual) / df if df > 0 else math.nan
    cov = sigma2 * np.linalg.inv(x.T @ x)
    se = math.sqrt(max(float(cov[2, 2]), 0.0))
    q = float(stats.t.ppf(0.5 + level / 2, df)) if df > 0 else math.nan
    gap = float(coef[2])
    if se > 0:
        p = float(2 * stats.t.sf(abs(gap / se), df))
    else:
        p = 0.0 if gap != 0 else 1.0
    return {"gap": gap, "se": se, "ci_low": gap - q * se, "ci_high": gap + q * se, "p": p,
            "intercept": float(coef[0]), "slope": float(coef[1]), "n_cohort": int(len(ca)),
            "n_reference": int(len(ra)), "residual_sd": math.sqrt(sigma2) if sigma2 == sigma2 else math.nan,
            "raw_gap_cohort": float(np.mean(cf - ca)), "raw_gap_reference": float(np.mean(rf - ra))}
