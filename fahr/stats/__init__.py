"""Clinical statistics for `fahr evaluate`: adjusted Cox models, risk quartiles, Kaplan-Meier, C-index."""
