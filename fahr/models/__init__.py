"""Models: the ViT backbone factory, the MAE wrapper and weight I/O (no trainer dependencies)."""

from fahr.models.backbone import VIT_SIZES, backbone_config, create_backbone
from fahr.models.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from fahr.models.weights import load_backbone, read_card, save_backbone, strip_prefix

__all__ = [
    "VIT_SIZES", "MaskedAutoencoder", "backbone_config", "create_backbone", "load_backbone",
    "patchify", "random_masking", "read_card", "save_backbone", "strip_prefix", "unpatchify",
]
