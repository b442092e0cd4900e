"""Evaluate a checkpoint: ``python scripts/evaluate.py ckpt_path=… [file=… | data=…]``."""

import hydra
from omegaconf import DictConfig

from mace_grid.cli import exit_on_user_error
from mace_grid.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
