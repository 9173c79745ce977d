"""`fahr import-weights`: Hydra app over conf/import_weights.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import run_command
from fahr.config.import_schema import register_import_weights

register_import_weights()  # conf/import_weights.yaml, composed from the ConfigStore


@hydra.main(config_path=None, config_name="import_weights", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.import_weights import import_weights

    print(run_command("import-weights", import_weights, cfg))
