"""`fahr predict`: Hydra app over conf/predict.yaml."""

import sys

import hydra
from omegaconf import DictConfig

from fahr.config.inference_schema import register_predict

register_predict()  # conf/predict.yaml, composed from the ConfigStore (see fahr.config.inference_schema)


@hydra.main(config_path=None, config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fahr.pipeline.predict import predict

    try:
        predict(cfg)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message is the whole story
        print(f"fahr predict: error: {err}", file=sys.stderr)
        sys.exit(1)
