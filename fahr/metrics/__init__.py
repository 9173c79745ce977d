"""Evaluation metrics (age: MAE, CS@5, ...; survival: C-index, time-dependent AUC, Brier)."""

from fahr.metrics.age import age_metrics, apply_bias_correction, decide_bias_correction, fit_bias_correction
from fahr.metrics.survival import (
    BreslowBaseline, ConcordanceIndex, check_survival_arrays, harrell_c, integrated_brier, time_dependent_auc,
    uno_c,
)

__all__ = ["age_metrics", "apply_bias_correction", "decide_bias_correction", "fit_bias_correction", "BreslowBaseline", "ConcordanceIndex", "check_survival_arrays", "harrell_c", "integrated_brier",
           "time_dependent_auc", "uno_c"]
