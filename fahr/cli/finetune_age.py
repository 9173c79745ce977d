"""`fahr finetune-age`: Hydra app over conf/finetune_age.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.finetune_schema import register_finetune_schemas
from fahr.config.schema import register_schemas

register_schemas()
register_finetune_schemas()


@hydra.main(config_path=config_dir(), config_name="finetune_age", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.finetune_age import finetune_age

    run_command("finetune-age", finetune_age, cfg)
