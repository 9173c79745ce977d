"""Evaluation metrics (age: MAE, CS@5, ...; survival: C-index, time-dependent AUC, Brier)."""
