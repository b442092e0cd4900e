"""Registers ``hydra/sweeper=mace_grid_optuna``. Kept light: Hydra imports every plugin module at
start-up, so Optuna and mace_grid are imported only when a sweep is set up."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper


@dataclass
class OptunaSweeperConf:
    """Options of ``hydra.sweeper`` (see ``conf/hparams_search/optuna.yaml``)."""

    _target_: str = "hydra_plugins.mace_grid_optuna.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # sampler and pruner are built by the sweep (seeded, validated)
    direction: str = "minimize"
    study_name: str | None = None
    # None: in memory (this process only). A URL (sqlite:///x.db, postgresql://…) or a journal
    # file path: several workers share the study and the same command continues it.
    storage: str | None = None
    n_trials: int = 20
    n_jobs: int = 1
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler"})
    pruner: Any = None
    params: dict[str, str] | None = None  # null: only the sweep overrides of the command line


ConfigStore.instance().store(
    group="hydra/sweeper", name="mace_grid_optuna", node=OptunaSweeperConf, provider="mace_grid"
)


class OptunaSweeper(Sweeper):
    """Hydra's Sweeper interface; :class:`mace_grid.sweeper.OptunaSweep` does the work."""

    def __init__(self, **options: Any) -> None:
        from mace_grid.sweeper import OptunaSweep

        self.sweep_impl = OptunaSweep(**options)

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.sweep_impl.setup(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        self.sweep_impl.sweep(arguments)
