"""Hydra sweeps of train.py: one job per backend (-m tp=…), and a 2-trial Optuna search."""

import json
import sys
from pathlib import Path

import yaml
from _helpers import run, shared_root, tiny_args, trained_runs

from mace_grid import PROJECT_ROOT
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


def test_optuna_two_trials(tmp_path_factory, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    run(
        [
            sys.executable,
            str(PROJECT_ROOT / "train.py"),
            "-m",
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "tp=grid",
            *tiny_args(shared_root(tmp_path_factory)),
            "trainer.max_epochs=1",
            f"hydra.sweep.dir={sweep}",
        ]
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    values = [json.loads((job / "summary.json").read_text())["val"]["f_mae"] for job in jobs]
    lrs = [
        next(
            o
            for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            if o.startswith("optim.lr=")
        )
        for job in jobs
    ]
    assert lrs[0] != lrs[1], "trials sample different learning rates"
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(values)
    assert set(result["best_params"]) == {
        "optim.lr",
        "loss.forces_weight",
        "callbacks.ema.decay",
        "optim.lr_factor",
    }
