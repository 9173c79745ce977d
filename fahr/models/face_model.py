"""A fine-tuned face model (backbone + task heads) and its pickle-free export.

An export directory of a fine-tuned model holds ``model.safetensors`` (keys ``backbone.*``,
``heads.age.*``, ``heads.risk.*``) and ``model_card.json`` with ``format: "fahr-model/1"``:

- ``backbone``: architecture facts (arch, img_size, patch_size, global_pool, ...; see
  :func:`fahr.models.backbone.backbone_args`) and how timm rebuilds the backbone
  (``timm_architecture``, ``timm_kwargs``; ``timm_note`` says what timm needs besides);
- ``heads``: head name -> constructor config (see :mod:`fahr.models.heads`);
- ``normalization``: ``mean`` / ``std`` of [0, 1] RGB;
- ``preprocessing``: how training photos were prepared (detection, alignment template, image size,
  margin, multi-face policy, minimum confidence); ``fahr predict`` applies exactly this by default;
- optional extras written by the task: ``age_calibration`` (a linear bias correction),
  ``baseline_hazard`` (Breslow, for survival curves), training data and metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fahr.boundary import InputError
from fahr.models.backbone import backbone_args, backbone_config, create_backbone
from fahr.models.heads import build_head
from fahr.models.weights import CARD_FILE, MODEL_FORMAT, TABLE_FORMAT, WEIGHTS_FILE, write_export


def normalize_uint8(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float (B, 3, H, W): (x / 255 - mean) / std, per channel
    (``mean`` and ``std``: 3 values, any shape that holds them)."""
    return (images.float().div_(255.0) - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)


# What `fahr shards` does by default (data_pipelines.build.AlignOptions): recorded when a model is
# trained on shards whose index.json says nothing else.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "detect": True, "detector": "mtcnn (facenet-pytorch)", "template": "fahr 5-point, 112x112",
    "image_size": 112, "margin": 0.0, "multi_face": "reject", "min_confidence": 0.95,
}


class FaceModel(nn.Module):
    """Backbone + named heads. ``forward(images)`` takes uint8 RGB (B, 3, S, S) as the shards hold
    them and normalises with the stored mean/std, so callers never re-implement preprocessing.

    Returns a dict: ``"features"`` (B, D) plus every head's outputs (``"age"`` (B,) years,
    ``"risk"`` (B,) log-hazard, ``"logits"`` when the age head has bins).

    ``flip_average``: in eval mode, features are the mean over the photo and its mirror image
    (test-time augmentation for models trained with random flips; twice the backbone cost). Stored
    in the model card, so every consumer of an export predicts the same way.
    """

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], mean: list[float], std: list[float],
                 flip_average: bool = False) -> None:
        super().__init__()
        self.flip_average = bool(flip_average)
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) in [0, 255] -> float (B, 3, S, S), (x / 255 - mean) / std."""
        if images.dtype != torch.uint8:
            raise TypeError(f"FaceModel takes uint8 images (B, 3, S, S), got {images.dtype}")
        return normalize_uint8(images, self.mean, self.std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> pre-logits features (B, D); mirror-averaged in eval mode if ``flip_average``."""
        x = self.normalize(images)
        embed = lambda v: self.backbone.forward_head(self.backbone.forward_features(v), pre_logits=True)  # noqa: E731
        if self.flip_average and not self.training:
            return (embed(x) + embed(x.flip(-1))) / 2
        return embed(x)

    def forward(self, images: torch.Tensor, covariates: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        out: dict[str, torch.Tensor] = {"features": feats}
        for name, head in self.heads.items():
            out.update(head(feats, covariates) if name == "risk" else head(feats))
        return out


def save_face_model(export_dir: str | Path, model: FaceModel, card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``model_card.json`` (format ``fahr-model/1``) atomically.

    ``card`` holds the task facts (preprocessing, calibration, data, metrics); the architecture,
    head configs and normalisation are filled in from ``model``.
    """
    backbone = backbone_config(model.backbone)
    prefixed = ("model.safetensors holds this backbone under the prefix 'backbone.' next to the task heads: "
                "give timm a file of the backbone.* tensors with the prefix removed (what fahr.models.load_backbone "
                "loads), e.g. safetensors.torch.save_file(fahr.models.load_backbone(EXPORT)[0].state_dict(), FILE)")
    backbone["timm_note"] = f"{backbone['timm_note']}; {prefixed}" if "timm_note" in backbone else prefixed
    full = {
        "backbone": backbone,
        "heads": {name: head.config for name, head in model.heads.items()},
        "normalization": {"input": "RGB uint8 / 255, then (x - mean) / std per channel",
                          "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
        "preprocessing": dict(DEFAULT_PREPROCESSING),
        **card,
        "flip_average": model.flip_average,
    }
    return write_export(export_dir, model.state_dict(), full, MODEL_FORMAT)


def load_face_model(export_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[FaceModel, dict[str, Any]]:
    """Rebuild a :class:`FaceModel` from an export directory (safetensors: no pickle). Returns (model in
    eval mode, card).

    Raises:
        InputError: not an export directory, a backbone without heads, or a card or weights file that
            fails the checks of :func:`fahr.models.weights.check_card` / :func:`~fahr.models.weights.load_weights`
            (naming the key or tensor).
    """
    from fahr.models.weights import load_state_dict_checked, load_weights, read_any_card

    card = read_any_card(export_dir)
    if card["format"] == TABLE_FORMAT:
        raise InputError(f"{export_dir} holds a survival model on a feature table ({TABLE_FORMAT}): it scores "
                         "table rows, not photos (fahr.models.load_table_model)")
    if card["format"] != MODEL_FORMAT:
        raise InputError(
            f"{export_dir} holds a backbone ({card['format']}) without task heads: fine-tune it first "
            "(`fahr finetune-age` / `fahr finetune-survival`), or load it with fahr.models.load_backbone"
        )
    backbone = create_backbone(**backbone_args(card["backbone"]), init_weights=False)  # all loaded below
    heads = {}
    for name, cfg in card["heads"].items():
        try:
            heads[name] = build_head(name, backbone.num_features, cfg)
        except (TypeError, ValueError) as err:
            raise InputError(f"{Path(export_dir) / CARD_FILE}: heads.{name} is not a valid head config "
                             f"({str(err).splitlines()[0][:120]})") from None
    model = FaceModel(backbone, heads, card["normalization"]["mean"], card["normalization"]["std"],
                      flip_average=card.get("flip_average", False))  # cards before 2026-11-30: none
    state = load_weights(export_dir, device=str(map_location))
    load_state_dict_checked(model, state, Path(export_dir) / WEIGHTS_FILE)
    return model.eval(), card


def load_export(export_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Any export fahr writes, as its card says: (model in eval mode, card).

    ``fahr-backbone/1``: the timm ``VisionTransformer`` (:func:`fahr.models.weights.load_backbone`);
    ``fahr-model/1``: a :class:`FaceModel`; ``fahr-table-model/1``: a
    :class:`fahr.models.table_model.TableRiskModel`. Safetensors only: nothing is unpickled."""
    from fahr.models.table_model import load_table_model
    from fahr.models.weights import CARD_FORMAT, load_backbone, read_any_card

    kind = read_any_card(export_dir)["format"]
    if kind == CARD_FORMAT:
        backbone, card = load_backbone(export_dir)
        return backbone.eval(), card
    if kind == TABLE_FORMAT:
        return load_table_model(export_dir)
    return load_face_model(export_dir)
