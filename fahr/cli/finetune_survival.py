"""`fahr finetune-survival`: Hydra app over conf/finetune_survival.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.finetune_schema import register_finetune_schemas
from fahr.config.schema import register_schemas

register_schemas()
register_finetune_schemas()


@hydra.main(config_path=config_dir(), config_name="finetune_survival", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.finetune_survival import finetune_survival

    run_command("finetune-survival", finetune_survival, cfg)
