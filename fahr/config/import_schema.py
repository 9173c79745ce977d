"""Structured schema for ``conf/import_weights.yaml`` (``fahr import-weights``).

Registered with Hydra's ConfigStore as ``import_weights_schema``; the YAML file is composed from the
ConfigStore too (as ``fahr predict`` does, see :mod:`fahr.config.inference_schema`), so a misspelt key
(``imagesize=112``) fails at start-up naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fahr.config.inference_schema import register_yaml_config
from fahr.config.schema import bounded


@dataclass
class ImportWeightsConfig:
    source: str = bounded(MISSING, choices=("hf", "mae", "timm"))
    input: str = MISSING  # hf: model directory; mae: the .pth; timm: folder (config.json + model.safetensors) or file
    output: str = MISSING  # export directory to write (model.safetensors + model_card.json)
    image_size: Optional[int] = bounded(None, lo=16, hi=1024)  # resample position embeddings; null: the source's
    drop: list[str] = field(default_factory=list)  # source tensor prefixes to leave out, e.g. [pooler] or [head]
    num_heads: Optional[int] = bounded(None, lo=1, hi=128)  # mae: heads, when not one of MAE's published sizes
    decoder_num_heads: Optional[int] = bounded(None, lo=1, hi=128)  # mae: decoder heads, likewise
    architecture: Optional[str] = None  # timm: model name when input is a file without config.json
    mean: Optional[list[float]] = None  # normalisation of [0, 1] RGB when the source states none (or to override)
    std: Optional[list[float]] = None
    license: Optional[str] = None  # recorded in the card when the source states none


def register_import_weights() -> None:
    """Schema + ``conf/import_weights.yaml``, for ``@hydra.main(config_path=None, config_name="import_weights")``."""
    ConfigStore.instance().store(name="import_weights_schema", node=ImportWeightsConfig)
    register_yaml_config("import_weights")
