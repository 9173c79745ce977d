"""`fahr pretrain`: Hydra app over conf/pretrain.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.schema import register_schemas

register_schemas()


@hydra.main(config_path=config_dir(), config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.pretrain import pretrain

    run_command("pretrain", pretrain, cfg)
