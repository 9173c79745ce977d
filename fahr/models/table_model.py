"""A survival model on a feature table (DeepSurv mode) and its pickle-free export.

An export of ``fahr finetune-survival data=table`` holds ``model.safetensors`` (keys ``heads.risk.*``)
and ``model_card.json`` with ``format: "fahr-table-model/1"``:

- ``heads.risk``: the risk head's constructor config (hidden widths, dropout);
- ``num_features``: F, the number of feature columns;
- ``covariates``: ``features`` (the F column names, in order), ``mean`` and ``std`` (F numbers each,
  from the training rows): a row is standardised as ``(x - mean) / std`` before the head sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fahr.boundary import InputError, printable_path
from fahr.models.heads import RiskHead
from fahr.models.weights import TABLE_FORMAT, WEIGHTS_FILE, write_export


class TableRiskModel(nn.Module):
    """Standardised features (B, F) -> ``{"risk": (B,)}``, a log-hazard (a DeepSurv MLP)."""

    def __init__(self, num_features: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({"risk": RiskHead(num_features, 0, hidden, dropout)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads["risk"](x)


def save_table_model(export_dir: str | Path, model: TableRiskModel, card: dict[str, Any]) -> Path:
    """safetensors + card (format ``fahr-table-model/1``): the head and, in ``card["covariates"]``, the
    feature scaler (``features``, ``mean``, ``std``)."""
    head = model.heads["risk"]
    return write_export(export_dir, model.state_dict(),
                        {"heads": {"risk": head.config}, "num_features": len(card["covariates"]["features"]), **card},
                        TABLE_FORMAT)


def load_table_model(export_dir: str | Path) -> tuple[TableRiskModel, dict[str, Any]]:
    """Rebuild a :class:`TableRiskModel` from its export (safetensors: no pickle). Returns (model in
    eval mode, card); :class:`InputError` for another kind of export or a card or weights file that
    fails the checks of :func:`fahr.models.weights.check_card` / ``load_weights``."""
    from fahr.models.weights import load_state_dict_checked, load_weights, read_any_card

    card = read_any_card(export_dir)
    if card["format"] != TABLE_FORMAT:
        raise InputError(f"{printable_path(Path(export_dir))} holds {card['format']}, not a table model "
                         f"({TABLE_FORMAT}): load it with fahr.models.load_export")
    risk = card["heads"]["risk"]
    model = TableRiskModel(card["num_features"], risk.get("hidden", []), risk.get("dropout", 0.0))
    load_state_dict_checked(model, load_weights(export_dir), Path(export_dir) / WEIGHTS_FILE)
    return model.eval(), card


def table_log_hazard(model: TableRiskModel, card: dict[str, Any], features: np.ndarray) -> np.ndarray:
    """Log-hazards (N,) of raw feature rows (N, F), columns in the order of ``card["covariates"]["features"]``,
    standardised with the card's training mean and SD first (float64 arithmetic, then float32 as in training)."""
    features = np.asarray(features, dtype=np.float64)
    names = card["covariates"]["features"]
    if features.ndim != 2 or features.shape[1] != len(names):
        raise InputError(f"the table model takes rows of {len(names)} features ({', '.join(names[:5])}"
                         f"{', ...' if len(names) > 5 else ''}), got an array of shape {features.shape}")
    if not np.isfinite(features).all():
        row = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
        raise InputError(f"feature row {row}: missing or infinite values (the table model needs every feature)")
    z = (features - np.asarray(card["covariates"]["mean"])) / np.asarray(card["covariates"]["std"])
    with torch.no_grad():
        return model.eval()(torch.tensor(z, dtype=torch.float32))["risk"].double().numpy()
