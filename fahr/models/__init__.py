"""Models: the ViT backbone factory, the MAE wrapper and weight I/O (no trainer dependencies)."""

from fahr.models.backbone import VIT_SIZES, backbone_config, create_backbone
from fahr.models.face_model import FaceModel, load_export, load_face_model, save_face_model
from fahr.models.heads import AgeHead, RiskHead
from fahr.models.mae import MaskedAutoencoder, patchify, random_masking, unpatchify
from fahr.models.table_model import TableRiskModel, load_table_model, save_table_model, table_log_hazard
from fahr.models.weights import load_backbone, read_card, save_backbone, strip_prefix

__all__ = [
    "AgeHead", "FaceModel", "RiskHead", "TableRiskModel", "load_export", "load_face_model", "load_table_model",
    "save_face_model", "save_table_model", "table_log_hazard", "VIT_SIZES", "MaskedAutoencoder", "backbone_config",
    "create_backbone", "load_backbone", "patchify", "random_masking", "read_card", "save_backbone", "strip_prefix", "unpatchify",
]
