"""Evaluation metrics (age: MAE, CS@5, ...; survival: C-index, time-dependent AUC, Brier)."""

from fahr.metrics.survival import (
    BreslowBaseline, ConcordanceIndex, check_survival_arrays, harrell_c, integrated_brier, time_dependent_auc,
    uno_c,
)

__all__ = ["BreslowBaseline", "ConcordanceIndex", "check_survival_arrays", "harrell_c", "integrated_brier",
           "time_dependent_auc", "uno_c"]
