"""Every option of every config group composes, resolves and names importable targets."""

from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from mace_grid.config import CONF_DIR, compose_config
from mace_grid.errors import ConfigError
from mace_grid.model import validate_model_config
from mace_grid.train import validate_config

GROUPS = ("data", "model", "tp", "trainer", "callbacks", "logger", "experiment", "hparams_search")


def compose_train(overrides: list[str], tmp_path: Path):
    """The config ``train.py`` would run with."""
    return compose_config("train", overrides, output_dir=str(tmp_path))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def targets(node) -> list[str]:
    """All ``_target_`` values in a config subtree."""
    if OmegaConf.is_dict(node):
        found = [node["_target_"]] if "_target_" in node else []
        for key in node:
            found += targets(node[key])
        return found
    if OmegaConf.is_list(node):
        return [t for item in node for t in targets(item)]
    return []


# Options with mandatory values (``???``) get one here.
REQUIRED = {
    ("data", "xyz"): ["data.train_file=train.xyz"],
    ("data", "oc20_lmdb"): ["data.train_file=train.aselmdb"],
}
CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_train([f"{group}={option}", *REQUIRED.get((group, option), [])], tmp_path)
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    for target in targets(cfg.get(group)) + targets(cfg.trainer) + targets(cfg.data):
        assert hydra.utils.get_object(target) is not None, target


def test_default_config_is_the_embedded_demo_on_cg(tmp_path: Path) -> None:
    cfg = compose_train([], tmp_path)
    assert cfg.data.name == "demo"
    assert cfg.tp.name == "cg"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.trainer.inference_mode is False
    validate_model_config(OmegaConf.to_container(cfg.model, resolve=True))


def test_callbacks_and_loggers_instantiate(tmp_path: Path) -> None:
    cfg = compose_train(["logger=csv"], tmp_path)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.callbacks.values()]
    names = {type(c).__name__ for c in callbacks}
    assert {"ModelCheckpoint", "EarlyStopping", "ParameterEMA"} <= names
    (logger,) = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert Path(logger.save_dir) == tmp_path


def test_test_files_can_be_given_on_the_command_line(tmp_path: Path) -> None:
    """The README's `'data.test_files={hot: hot.xyz}'` replaces the (null) default."""
    for data in ("xyz", "oc20"):
        cfg = compose_train(
            [f"data={data}", "data.train_file=a.xyz", "data.test_files={hot: hot.xyz}"], tmp_path
        )
        assert dict(cfg.data.test_files) == {"hot": "hot.xyz"}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["tp=grid", "trainer.precision=bf16-mixed"], "do not support autocast"),
        (["tp=gaunt", "trainer.precision=16-mixed"], "do not support autocast"),
        (["tp=cg", "model.correlation=5"], "tp=cg supports correlation 1..4"),
        (["tp=grid", "model.correlation=7"], "tp=grid supports correlation 1..6"),
    ],
)
def test_backend_limits_are_checked_up_front(overrides, needle, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate_config(compose_train(overrides, tmp_path))
    validate_config(compose_train(["tp=grid", "model.correlation=6"], tmp_path))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["budget_s=0"], "budget_s=0"),
        (["budget_s=60", "callbacks.epoch_timer=null"], "needs callbacks.epoch_timer"),
        (["trainer.max_epochs=-1"], "or -1 with a budget_s"),
        (["trainer.max_epochs=0", "budget_s=60"], "trainer.max_epochs=0"),
    ],
)
def test_bad_training_budget_is_refused(overrides: list[str], message: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_train(overrides, tmp_path))


def test_budget_reaches_the_epoch_timer(tmp_path: Path) -> None:
    cfg = compose_train(["budget_s=60", "trainer.max_epochs=-1"], tmp_path)
    validate_config(cfg)
    assert hydra.utils.instantiate(cfg.callbacks.epoch_timer).budget_s == 60
