"""Compose ``conf/`` outside ``@hydra.main`` (scripts, tests), as the entry points see it."""

from collections.abc import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mace_grid import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"


def compose_config(
    name: str = "train", overrides: Sequence[str] = (), output_dir: str | None = None
) -> DictConfig:
    """``conf/<name>.yaml`` with ``overrides``. With ``output_dir`` the Hydra runtime is set up
    (so ``${hydra:runtime.output_dir}`` resolves to it) and the ``hydra`` node is dropped, as
    ``@hydra.main`` does before calling the task."""
    extra = [] if output_dir is None else [f"hydra.runtime.output_dir={output_dir}"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(name, overrides=[*overrides, *extra], return_hydra_config=bool(extra))
    if extra:
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg
