"""The SLURM launcher config (hydra-submitit-launcher) composes and maps the trainer's resources;
no SLURM here, so nothing is submitted."""

from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from mace_grid import PROJECT_ROOT


@pytest.fixture(autouse=True)
def _reset_hydra_config():
    """launcher_for sets Hydra's global config as a launch would; later tests must not see it."""
    yield
    HydraConfig.instance().cfg = None


def launcher_for(overrides: list[str], tmp_path: Path):
    """The plugin's SlurmLauncher as `-m hydra/launcher=slurm …` would build it."""
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    return hydra.utils.instantiate(cfg.hydra.launcher)


@pytest.mark.parametrize(
    ("overrides", "nodes", "tasks", "gpus"),
    [
        (["trainer=gpu"], 1, 1, 1),
        (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], 2, 4, 4),
    ],
)
def test_slurm_launcher_takes_resources_from_the_trainer(
    overrides: list[str], nodes: int, tasks: int, gpus: int, tmp_path: Path
) -> None:
    launcher = launcher_for([*overrides, "hydra.launcher.partition=gpu"], tmp_path)
    assert type(launcher).__name__ == "SlurmLauncher"  # hydra's plugin loader owns the class
    params = launcher.params
    assert (params["nodes"], params["tasks_per_node"], params["gpus_per_node"]) == (
        nodes,
        tasks,
        gpus,
    )
    assert params["partition"] == "gpu"
    assert params["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    assert params["max_num_timeout"] == 0


def test_slurm_launcher_cpu_partition(tmp_path: Path) -> None:
    launcher = launcher_for(["trainer=ddp", "hydra.launcher.gpus_per_node=null"], tmp_path)
    assert launcher.params["gpus_per_node"] is None
    assert launcher.params["tasks_per_node"] == 2
