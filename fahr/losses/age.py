"""Age losses. Predictions and targets in years.

- :func:`l1_age_loss`: mean absolute error, optionally weighted per sample (age balancing by loss).
- :func:`label_distribution_loss`: DLDL (Gao et al., IJCAI 2018 / DLDL-v2, 2018): cross-entropy between
  the head's softmax over age bins and a Gaussian around the true age (sigma in years; sigma 0 puts all
  mass on the nearest bin), plus the L1 of the expectation, so the loss ranks and regresses at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)


def l1_age_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """pred, target: (B,) years; weight: (B,) or None. Returns the (weighted) mean |pred - target|."""
    return _weighted_mean((pred.float() - target.float()).abs(), weight)


def gaussian_label_distribution(target: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,) ages -> (B, K) distributions over bin ``centres`` (K,): Gaussian of ``sigma`` years,
    normalised over the bins; sigma 0 is one-hot at the nearest centre."""
    if sigma <= 0:
        nearest = (target.float()[:, None] - centres[None, :]).abs().argmin(dim=1)
        return F.one_hot(nearest, num_classes=centres.numel()).float()
    logits = -0.5 * ((centres[None, :] - target.float()[:, None]) / sigma) ** 2
    return logits.softmax(dim=1)


def label_distribution_loss(logits: torch.Tensor, centres: torch.Tensor, target: torch.Tensor,
                            sigma: float = 2.0, l1_weight: float = 1.0,
                            weight: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, K) over ``centres`` (K,) years, target (B,) years -> scalar loss.

    Cross-entropy to the label distribution (equal to KL up to a constant) + ``l1_weight`` x |E[age] - target|.
    """
    log_p = logits.float().log_softmax(dim=1)
    q = gaussian_label_distribution(target, centres, sigma)
    ce = -(q * log_p).sum(dim=1)
    expectation = log_p.exp() @ centres
    return _weighted_mean(ce + l1_weight * (expectation - target.float()).abs(), weight)
