"""Train a MACE potential: ``python train.py [data=…] [tp=cg|gaunt|grid] [key=value …]``."""

import hydra
from omegaconf import DictConfig

from mace_grid.cli import exit_on_user_error
from mace_grid.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    summary = run(cfg)
    # Returned for sweepers (hparams_search): the best validation force MAE.
    return summary["val"]["f_mae"]


if __name__ == "__main__":
    main()
