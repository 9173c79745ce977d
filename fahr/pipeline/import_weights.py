"""`fahr import-weights`: an ``ImportWeightsConfig`` -> a backbone export (:mod:`fahr.models.import_weights`)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from fahr.boundary import check_output_dir
from fahr.config.import_schema import ImportWeightsConfig
from fahr.config.schema import validate

log = logging.getLogger(__name__)


def import_weights(cfg: DictConfig) -> Path:
    """Convert ``cfg.input`` into an export in ``cfg.output``; returns the export directory."""
    from fahr.models.import_weights import import_weights as convert

    validate(cfg, ImportWeightsConfig)
    out = check_output_dir(cfg.output, "output", inputs=(cfg.input,))
    convert(cfg.source, cfg.input, out, image_size=cfg.image_size, drop=list(cfg.drop), num_heads=cfg.num_heads,
            decoder_num_heads=cfg.decoder_num_heads, architecture=cfg.architecture,
            mean=None if cfg.mean is None else list(cfg.mean), std=None if cfg.std is None else list(cfg.std),
            license_name=cfg.license, log=log.info)
    return out
