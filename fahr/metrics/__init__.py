"""Evaluation metrics (age: MAE, CS@5, ...; survival: C-index, time-dependent AUC, Brier)."""

from fahr.metrics.age import age_metrics, apply_bias_correction, decide_bias_correction, fit_bias_correction

_SURVIVAL = ("BreslowBaseline", "ConcordanceIndex", "check_survival_arrays", "harrell_c", "integrated_brier",
             "time_dependent_auc", "uno_c")


def __getattr__(name: str):
    # the survival metrics (torchmetrics, lifelines) load on first use, so `fahr.metrics.age` alone
    # (what `fahr predict` needs) does not pay for them
    if name in _SURVIVAL:
        from fahr.metrics import survival

        return getattr(survival, name)
    raise AttributeError(f"module 'fahr.metrics' has no attribute {name!r}")


__all__ = ["age_metrics", "apply_bias_correction", "decide_bias_correction", "fit_bias_correction", "BreslowBaseline", "ConcordanceIndex", "check_survival_arrays", "harrell_c", "integrated_brier",
           "time_dependent_auc", "uno_c"]
