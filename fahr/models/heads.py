"""Task heads on the backbone's pre-logits features (B, D).

- :class:`AgeHead`: FaceAge in years. ``"regression"``: one linear output, trained with L1.
  ``"distribution"``: softmax over age bins, prediction = expectation over bin centres (label
  distribution learning, Gao et al., "Age Estimation Using Expectation of Label Distribution
  Learning", IJCAI 2018; the best family on Paplham & Franc's unified age benchmark, CVPR 2024).
- :class:`RiskHead`: a DeepSurv-style MLP giving a log-hazard (Katzman et al., BMC Med Res Methodol
  2018), optionally on features concatenated with clinical covariates (the "combined" model).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fahr.boundary import InputError


def _mlp(in_features: int, hidden: list[int], out_features: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class AgeHead(nn.Module):
    """Features (B, D) -> ``{"age": (B,) years, "logits": (B, K) or absent}``.

    Args:
        in_features: D, the backbone's ``num_features``.
        kind: ``"regression"`` or ``"distribution"``.
        min_age, max_age: the age range in years. Distribution bins are centred on
            ``min_age, min_age + bin_width, ..., max_age``; regression outputs are offset by
            ``(min_age + max_age) / 2`` so a zero-initialised head starts in the middle of the range.
        bin_width: years per bin (distribution).
        hidden: widths of hidden layers (empty: a linear head, as in MAE's fine-tuning).
        dropout: before each linear layer after the first.
    """

    def __init__(self, in_features: int, kind: str = "distribution", min_age: float = 0.0,
                 max_age: float = 100.0, bin_width: float = 1.0, hidden: list[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in ("regression", "distribution"):
            raise InputError(f"AgeHead kind must be 'regression' or 'distribution', got {kind!r}")
        if not max_age > min_age or bin_width <= 0:
            raise InputError(f"need min_age < max_age and bin_width > 0, got {min_age}, {max_age}, {bin_width}")
        self.kind = kind
        self.config = {"kind": kind, "min_age": float(min_age), "max_age": float(max_age),
                       "bin_width": float(bin_width), "hidden": list(hidden or []), "dropout": float(dropout)}
        centres = torch.arange(min_age, max_age + bin_width / 2, bin_width, dtype=torch.float32)
        self.register_buffer("centres", centres, persistent=False)
        out = len(centres) if kind == "distribution" else 1
        self.net = _mlp(in_features, list(hidden or []), out, dropout)
        self.offset = (min_age + max_age) / 2
        last = self.net[-1]
        nn.init.trunc_normal_(last.weight, std=2e-5)  # as MAE's fine-tuning head: start near-constant
        nn.init.zeros_(last.bias)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(features)
        if self.kind == "regression":
            return {"age": out.squeeze(-1) + self.offset}
        probs = out.float().softmax(dim=-1)
        return {"age": probs @ self.centres, "logits": out}


class RiskHead(nn.Module):
    """Features (B, D) [+ covariates (B, C)] -> ``{"risk": (B,)}``, a log-hazard (higher = worse).

    Args:
        in_features: D.
        num_covariates: C clinical covariates concatenated to the features (0: image only).
        hidden: MLP hidden widths (DeepSurv used one or two layers of tens to hundreds of units).
        dropout: after each hidden layer.
    """

    def __init__(self, in_features: int, num_covariates: int = 0, hidden: list[int] | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.num_covariates = num_covariates
        self.config = {"num_covariates": int(num_covariates), "hidden": list(hidden or []), "dropout": float(dropout)}
        self.net = _mlp(in_features + num_covariates, list(hidden or []), 1, dropout)

    def forward(self, features: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.num_covariates:
            if covariates is None or covariates.shape[-1] != self.num_covariates:
                got = None if covariates is None else tuple(covariates.shape)
                raise InputError(f"RiskHead expects {self.num_covariates} covariates per row, got {got}")
            features = torch.cat([features, covariates.to(features.dtype)], dim=-1)
        return {"risk": self.net(features).squeeze(-1)}


def build_head(name: str, in_features: int, config: dict[str, Any]) -> nn.Module:
    """Rebuild a head from its ``config`` (as stored in a model card)."""
    if name == "age":
        return AgeHead(in_features, **config)
    if name == "risk":
        return RiskHead(in_features, **config)
    raise InputError(f"unknown head {name!r} (known: age, risk)")
