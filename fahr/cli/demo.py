"""`fahr demo`: Hydra app over conf/demo.yaml (the later steps compose their own configs)."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import config_dir, run_command
from fahr.config.evaluate_schema import register_evaluate_schema
from fahr.config.finetune_schema import register_finetune_schemas
from fahr.config.schema import register_schemas

register_schemas()
register_finetune_schemas()
register_evaluate_schema()


@hydra.main(config_path=config_dir(), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.demo import demo

    run_command("demo", demo, cfg)
