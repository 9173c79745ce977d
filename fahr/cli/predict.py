"""`fahr predict`: Hydra app over conf/predict.yaml."""

import hydra
from omegaconf import DictConfig

from fahr.cli._hydra import run_command
from fahr.config.inference_schema import register_predict

register_predict()  # conf/predict.yaml, composed from the ConfigStore (see fahr.config.inference_schema)


@hydra.main(config_path=None, config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.predict import predict

    run_command("predict", predict, cfg)
