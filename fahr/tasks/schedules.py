"""Learning-rate schedules as pure functions of the global step (resume needs only the step)."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule used by MAE: ``base_lr * effective_batch / 256``."""
    return base_lr * effective_batch / 256.0


def warmup_cosine(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak_lr`` over ``warmup_steps``, then half-cosine to ``min_lr`` at
    ``total_steps`` (held there afterwards). ``step`` counts optimiser steps from 0."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
