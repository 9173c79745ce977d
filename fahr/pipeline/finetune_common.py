"""What both fine-tunes (``fahr finetune-age``, ``fahr finetune-survival``) do before any work."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fahr.boundary import InputError, check_output_dir
from fahr.config.schema import validate
from fahr.utils.run import run_dir_for


def check_finetune(cfg: DictConfig, schema: type, command: str, steps: str) -> tuple[Path, Path]:
    """Check a fine-tune's config before any run directory exists; returns (run dir, export dir).

    Args:
        schema: the command's config schema (unknown keys, wrong types, out-of-range values fail).
        command: ``finetune-age`` / ``finetune-survival`` (for messages).
        steps: the keys that set the training length, for the message when ``trainer.max_steps`` is
            given (it does not apply to the fine-tunes).

    Raises:
        InputError: naming the key.
    """
    from fahr.data.augment import augment_settings

    validate(cfg, schema)
    if cfg.trainer.max_steps is not None:
        raise InputError(f"trainer.max_steps does not apply to {command}: its training length is {steps}")
    augment_settings(OmegaConf.to_container(cfg.task.augment))  # the rules a schema cannot say
    run_dir = run_dir_for(cfg)
    if cfg.export_dir:
        check_output_dir(cfg.export_dir, "export_dir")
    return run_dir, Path(cfg.export_dir) if cfg.export_dir else run_dir / "export"
