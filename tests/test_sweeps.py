"""Hydra sweeps of train.py: one job per backend (-m tp=…), and Optuna searches
(hparams_search=optuna): a study continued from its storage, pruned and failed trials, refused
sweeper configs, parallel trial processes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from _helpers import run, shared_root, tiny_args, trained_runs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mace_grid import PROJECT_ROOT
from mace_grid.errors import ConfigError
from mace_grid.sweeper import build_pruner, open_storage
from mace_grid.tp import BACKENDS


def test_multirun_one_job_per_backend(tmp_path_factory) -> None:
    """`python train.py -m tp=<every backend>` (the shared session runs): numbered job dirs, each
    with its own summary, checkpoints and overrides."""
    runs = trained_runs(tmp_path_factory)
    assert list(runs) == list(BACKENDS)
    assert [p.name for p in runs.values()] == [str(i) for i in range(len(BACKENDS))]
    for tp, job in runs.items():
        summary = json.loads((job / "summary.json").read_text())
        assert summary["epochs"] == 4 and Path(summary["best_checkpoint"]).parent.parent == job
        assert f"tp={tp}" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())


def optuna_sweep(tmp_path_factory, sweep: Path, *overrides: str, check: bool = True):
    """`python train.py -m hparams_search=optuna …` on the tiny demo, 1 epoch per trial."""
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "-m",
        "hparams_search=optuna",
        *tiny_args(shared_root(tmp_path_factory)),
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]
    if check:
        return run(cmd)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)


def load_study(storage: str, name: str = "mace-grid-demo-grid") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(storage))


@pytest.mark.slow
def test_optuna_study_in_sqlite_continues(tmp_path_factory, tmp_path: Path) -> None:
    """The same command twice adds to one study in the storage file (2 + 2 trials here, 4 + 4 in
    the README's check): trials numbered on, new
    parameters (the seeded sampler does not repeat itself), job dir = trial number; results,
    trials.csv and both plots cover the whole study."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    first, second = tmp_path / "first", tmp_path / "second"
    for sweep in (first, second):  # the same command twice
        optuna_sweep(
            tmp_path_factory,
            sweep,
            "tp=grid",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.n_trials=2",
        )
    study = load_study(storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert len({t.params["optim.lr"] for t in study.trials}) == 4
    assert set(study.trials[0].params) == {
        "optim.lr",
        "loss.forces_weight",
        "callbacks.ema.decay",
        "optim.lr_factor",
    }
    assert sorted(p.name for p in first.iterdir() if p.is_dir()) == ["0", "1"]
    assert sorted(p.name for p in second.iterdir() if p.is_dir()) == ["2", "3"]
    for trial in study.trials:
        job = Path(trial.user_attrs["job_dir"])
        summary = json.loads((job / "summary.json").read_text())
        assert summary["val"]["f_mae"] == pytest.approx(trial.value)
        assert list(trial.intermediate_values) == [0]  # reported by the pruning callback
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"optim.lr={trial.params['optim.lr']}" in overrides
    result = yaml.safe_load((second / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(t.value for t in study.trials)
    assert result["best_params"] == study.best_params
    assert result["trials"] == {"COMPLETE": 4}
    with open(second / "trials.csv") as f:
        assert [row["state"] for row in csv.DictReader(f)] == ["COMPLETE"] * 4
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (second / plot).read_bytes().startswith(b"\x89PNG")


def test_optuna_records_pruned_and_failed_trials(tmp_path_factory, tmp_path: Path) -> None:
    """Brute force over max_epochs 0, 1, 3 with a pruner that stops any trial after its second
    epoch: 0 is refused by train.py (FAIL, with its error), 3 is pruned after epoch 2 (PRUNED,
    no summary), 1 completes and is the best; the sweep goes on through all three."""
    sweep = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna_sweep(
        tmp_path_factory,
        sweep,
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.params=null",
        "trainer.max_epochs=choice(0,1,3)",
        "hydra.sweeper.n_trials=5",  # the sampler stops after its 3 points
        "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
        "~hydra.sweeper.sampler.n_startup_trials",
        "~hydra/sweeper/pruner",
        "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,upper:0,n_warmup_steps:1}",
    )
    with open(sweep / "trials.csv") as f:
        rows = {int(r["params_trainer.max_epochs"]): r for r in csv.DictReader(f)}
    assert {k: r["state"] for k, r in rows.items()} == {0: "FAIL", 1: "COMPLETE", 3: "PRUNED"}
    assert "trainer.max_epochs=0 must be >= 1" in rows[0]["user_attrs_error"]
    pruned = Path(rows[3]["user_attrs_job_dir"])
    assert not (pruned / "summary.json").exists()
    assert {"best-epoch000.ckpt", "best-epoch001.ckpt"} & {
        p.name for p in (pruned / "checkpoints").iterdir()
    }
    assert not (pruned / "checkpoints" / "best-epoch002.ckpt").exists()
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_params"] == {"trainer.max_epochs": 1}
    assert result["trials"] == {"COMPLETE": 1, "FAIL": 1, "PRUNED": 1}
    study = load_study(storage, "mace-grid-demo-cg")  # the file holds the same three trials
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "FAIL", "PRUNED"]
    assert all(len(t.intermediate_values) == 2 for t in study.trials if t.state.name == "PRUNED")


def test_optuna_refuses_an_in_memory_study_for_other_processes(
    tmp_path_factory, tmp_path: Path
) -> None:
    proc = optuna_sweep(
        tmp_path_factory, tmp_path / "sweep", "hydra/launcher=submitit_local", check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: LocalLauncher runs trials in other processes, which cannot reach an in-memory "
        "study: set hydra.sweeper.storage=<journal file or sqlite:///file.db>"
    ], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("overrides", "pruner"),
    [
        ([], optuna.pruners.MedianPruner),
        (["hydra/sweeper/pruner=hyperband"], optuna.pruners.HyperbandPruner),
        (["hydra.sweeper.pruner=null"], optuna.pruners.NopPruner),
    ],
    ids=["median", "hyperband", "none"],
)
def test_pruner_options(overrides: list[str], pruner: type) -> None:
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train", overrides=["hparams_search=optuna", *overrides], return_hydra_config=True
        )
    assert cfg.hydra.sweeper._target_.endswith("mace_grid_optuna.optuna_sweeper.OptunaSweeper")
    assert type(build_pruner(cfg.hydra.sweeper.pruner)) is pruner


def test_bad_pruner_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hydra.sweeper.pruner: .*NoSuchPruner"):
        build_pruner(OmegaConf.create({"_target_": "optuna.pruners.NoSuchPruner"}))
    with pytest.raises(ConfigError, match="is not an Optuna BasePruner"):
        build_pruner(OmegaConf.create({"_target_": "optuna.samplers.RandomSampler"}))
    assert isinstance(build_pruner(None), optuna.pruners.NopPruner)


@pytest.mark.slow
def test_optuna_parallel_trials_in_local_processes(tmp_path_factory, tmp_path: Path) -> None:
    """n_jobs=2 with the submitit local launcher: two trial processes at once, reporting to a
    journal file (what SLURM jobs do with hydra/launcher=slurm)."""
    journal = tmp_path / "study.journal"
    sweep = tmp_path / "sweep"
    optuna_sweep(
        tmp_path_factory,
        sweep,
        "tp=grid",
        "hydra/launcher=submitit_local",
        f"hydra.sweeper.storage={journal}",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
    )
    study = load_study(str(journal))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(list(t.intermediate_values) == [0] for t in study.trials)
    starts = sorted(t.datetime_start for t in study.trials)
    ends = sorted(t.datetime_complete for t in study.trials)
    assert starts[1] < ends[0], "the two trials ran at the same time"
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"]
