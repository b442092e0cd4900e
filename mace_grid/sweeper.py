"""Optuna (>= 4) hyperparameter search behind ``python train.py -m hparams_search=optuna``.

Hydra's sweeper interface (registered as ``hydra/sweeper=mace_grid_optuna`` by
``hydra_plugins/mace_grid_optuna``) around Optuna's ask-and-tell: each batch of ``n_jobs``
trials is asked from the study, run by the configured Hydra launcher (in this process, or as
``submitit_local`` / SLURM jobs) and told back as COMPLETE, PRUNED (the trial raised
``optuna.TrialPruned``: :class:`mace_grid.callbacks.OptunaPruning`) or FAIL with its error as
the user attribute ``error``. The study lives in ``storage`` (in memory, an Optuna storage URL or
a journal file), so running the same command again, or on another worker, adds to it. At the end
the sweep directory gets ``optimization_results.yaml`` (best parameters and value),
``trials.csv`` and Optuna's history and parameter-importance plots.
"""

import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import optuna
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from mace_grid.cli import exit_with_error
from mace_grid.errors import ConfigError, MaceGridError
from mace_grid.utils import atomic_path, atomic_write_text

log = logging.getLogger("mace_grid.sweeper")

# Set in each trial's job (hydra.job.env_set) to its Optuna trial number; see current_trial().
TRIAL_ENV = "MACE_GRID_OPTUNA_TRIAL"
# In-memory studies of this process by name: trials run here (Hydra's basic launcher) find them.
_IN_MEMORY: dict[str, optuna.storages.BaseStorage] = {}


class TrialFailed(Exception):
    """A trial's job exited with an error (``error: …`` and exit 2 in train.py)."""


def open_storage(spec: str | None, study_name: str | None = None) -> optuna.storages.BaseStorage:
    """The Optuna storage ``hydra.sweeper.storage`` names: None, in memory (this process's
    ``study_name`` study if there is one); ``<scheme>://…``, an RDB URL; else a journal file
    (Optuna's ``JournalFileBackend``: append-only with file locks, safe on shared filesystems)."""
    if spec is None:
        return _IN_MEMORY.get(study_name) or optuna.storages.InMemoryStorage()
    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(spec).expanduser())))


def current_trial() -> optuna.Trial | None:
    """This job's Optuna trial when it runs inside a ``mace_grid_optuna`` sweep, else None."""
    number = os.environ.get(TRIAL_ENV)
    if number is None or not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    storage = open_storage(sweeper.storage, sweeper.study_name)
    study = optuna.load_study(
        study_name=sweeper.study_name, storage=storage, pruner=build_pruner(sweeper.pruner)
    )
    study_id = storage.get_study_id_from_name(sweeper.study_name)
    return optuna.Trial(
        study, storage.get_trial_id_from_study_id_trial_number(study_id, int(number))
    )


def build_pruner(cfg: DictConfig | None) -> optuna.pruners.BasePruner:
    """``hydra.sweeper.pruner`` (``hydra/sweeper/pruner=median|hyperband|none``)."""
    if cfg is None:
        return optuna.pruners.NopPruner()
    return _instantiate(cfg, "hydra.sweeper.pruner", optuna.pruners.BasePruner)


def _instantiate(cfg: DictConfig, key: str, kind: type, **kwargs: Any) -> Any:
    try:
        obj = hydra.utils.instantiate(cfg, **kwargs)
    except (HydraException, TypeError, ValueError) as err:
        cause = err.__cause__ or err
        raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from None
    if not isinstance(obj, kind):
        raise ConfigError(f"{key}._target_={cfg.get('_target_')} is not an Optuna {kind.__name__}")
    return obj


class _RecordExit:
    """The task function as the launcher runs it: an exit (train.py's ``error: …``, exit 2)
    becomes a :class:`TrialFailed` carrying the message, so the sweeper records it and goes on
    instead of the whole sweep exiting. A class, so that submitit can pickle it."""

    def __init__(self, task_function: Callable[[DictConfig], Any]) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            return self.task_function(cfg)
        except SystemExit as err:
            cause = err.__cause__ or err.__context__
            raise TrialFailed(str(cause) if cause else f"exit code {err.code}") from None


def search_space(arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Hydra sweep overrides → Optuna distributions; other overrides are passed to every trial.
    ``choice(a, b)`` / ``a,b`` and ``range(…)``: categorical; ``interval(lo, hi)``: uniform,
    ``tag(log, interval(lo, hi))``: log-uniform (int bounds: integers)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except HydraException as err:
        raise ConfigError(f"hydra.sweeper.params: {str(err).splitlines()[0]}") from None
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parsed:  # a later override of a key replaces an earlier one
        name = override.get_key_element()
        space.pop(name, None)
        fixed.pop(name, None)
        if not override.is_sweep_override():
            fixed[name] = f"{name}={override.get_value_element_as_str()}"
        elif override.is_interval_sweep():
            value = override.value()
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[name] = IntDistribution(value.start, value.end, log=log_scale)
            else:
                space[name] = FloatDistribution(value.start, value.end, log=log_scale)
        else:  # choice or range: the listed values
            space[name] = CategoricalDistribution(_choices(override))
    return space, list(fixed.values())


def _choices(override: Override) -> list[Any]:
    return list(override.sweep_iterator(transformer=Transformer.encode))


class OptunaSweep:
    """The sweep itself; see the module docstring. Arguments: ``hydra.sweeper``'s options."""

    def __init__(
        self,
        direction: str,
        study_name: str | None,
        storage: str | None,
        n_trials: int,
        n_jobs: int,
        sampler: DictConfig,
        pruner: DictConfig | None,
        params: DictConfig | None,
    ) -> None:
        self.direction = direction
        self.study_name = study_name
        self.storage = storage
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.params = params

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=_RecordExit(task_function)
        )

    def sweep(self, arguments: list[str]) -> None:
        """Refuse a bad sweeper config with one ``error:`` line (exit 2) before any trial."""
        try:
            self._sweep(arguments)
        except MaceGridError as err:
            exit_with_error(err)

    def _validate(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ConfigError(f"hydra.sweeper.direction={self.direction}; minimize or maximize")
        if not self.study_name:
            raise ConfigError("hydra.sweeper.study_name is empty; name the study")
        for key in ("n_trials", "n_jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"hydra.sweeper.{key}={getattr(self, key)} must be >= 1")
        in_process = isinstance(self.launcher, BasicLauncher)
        launcher = self.config.hydra.launcher._target_.rsplit(".", 1)[-1]
        if not in_process and self.storage is None:
            raise ConfigError(
                f"{launcher} runs trials in other processes, which cannot reach an in-memory "
                "study: set hydra.sweeper.storage=<journal file or sqlite:///file.db>"
            )
        if in_process and self.n_jobs > 1:
            raise ConfigError(
                f"hydra.sweeper.n_jobs={self.n_jobs}: the basic launcher runs one trial at a "
                "time; run them in parallel with hydra/launcher=submitit_local (or slurm) and "
                "hydra.sweeper.storage=<journal file>"
            )
        if self.storage is not None and "://" not in self.storage:
            parent = Path(self.storage).expanduser().parent
            if not parent.is_dir():
                raise ConfigError(f"hydra.sweeper.storage={self.storage}: no directory {parent}")

    def _sweep(self, arguments: list[str]) -> None:
        self._validate()
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        space, fixed = search_space(params + list(arguments))
        if not space:
            raise ConfigError("nothing to search: give hydra.sweeper.params or sweep overrides")
        pruner = build_pruner(self.pruner_cfg)
        sampler = self._sampler(0)  # validated before the storage is created
        try:
            storage = open_storage(self.storage, self.study_name)
            study = optuna.create_study(
                study_name=self.study_name,
                storage=storage,
                sampler=sampler,
                pruner=pruner,
                direction=self.direction,
                load_if_exists=True,
            )
        except (ValueError, ImportError, OSError, optuna.exceptions.OptunaError) as err:
            raise ConfigError(
                f"hydra.sweeper.storage={self.storage}: {str(err).splitlines()[0]}"
            ) from None
        if self.storage is None:
            _IN_MEMORY[self.study_name] = storage
        done = len(study.trials)
        # Continuing a study: a seeded sampler starts from another seed, not the first
        # invocation's (which would propose the same parameters again).
        study.sampler = self._sampler(done)
        log.info(
            "Study %s in %s: %d trials so far, %d to add, %d at a time; sampler %s, pruner %s",
            self.study_name,
            self.storage or "memory",
            done,
            self.n_trials,
            self.n_jobs,
            type(study.sampler).__name__,
            type(pruner).__name__,
        )
        sweep_dir = Path(self.config.hydra.sweep.dir)
        left = self.n_trials
        self.exhausted = False
        while left > 0 and not self.exhausted:
            trials = [study.ask(fixed_distributions=space) for _ in range(min(self.n_jobs, left))]
            overrides = [
                (
                    *(f"{k}={v}" for k, v in t.params.items()),
                    *fixed,
                    f"hydra.sweep.subdir={t.number}",  # job dir = trial number, unique per study
                    f"++hydra.job.env_set.{TRIAL_ENV}={t.number}",
                )
                for t in trials
            ]
            returns = self.launcher.launch(overrides, initial_job_idx=trials[0].number)
            for trial, ret in zip(trials, returns, strict=True):
                job_dir = sweep_dir / str(trial.number)
                if job_dir.is_dir():  # a failed start leaves none
                    trial.set_user_attr("job_dir", str(job_dir))
                self._tell(study, trial, ret)
            left -= len(trials)
        if self.exhausted:
            log.info("The sampler has tried its whole search space; %d trials not run", left)
        write_results(study, sweep_dir)

    def _sampler(self, offset: int) -> optuna.samplers.BaseSampler:
        cfg = OmegaConf.to_container(self.sampler_cfg, resolve=True)
        if cfg.get("seed") is not None:
            cfg["seed"] = int(cfg["seed"]) + offset
        return _instantiate(
            OmegaConf.create(cfg), "hydra.sweeper.sampler", optuna.samplers.BaseSampler
        )

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret) -> None:
        """Record one job's outcome: its value, pruned, or failed with the error."""
        outcome = ret._return_value  # the value, or the exception the job raised
        if isinstance(outcome, optuna.TrialPruned):
            log.info("Trial %d pruned: %s", trial.number, outcome)
            self._record(study, trial, state=optuna.trial.TrialState.PRUNED)
            return
        if isinstance(outcome, BaseException):
            plain = isinstance(outcome, (TrialFailed, MaceGridError))  # messages for the user
            error = str(outcome) if plain else repr(outcome)
        else:
            try:
                value = float(outcome)
            except (TypeError, ValueError):
                value = math.nan
            if math.isfinite(value):
                log.info("Trial %d: %.6g %s", trial.number, value, trial.params)
                self._record(study, trial, values=value)
                return
            error = f"returned {outcome!r}, not a finite number"
        log.warning("Trial %d failed: %s", trial.number, error)
        trial.set_user_attr("error", error)
        self._record(study, trial, state=optuna.trial.TrialState.FAIL)

    def _record(self, study: optuna.Study, trial: optuna.Trial, **outcome: Any) -> None:
        """``study.tell``; a sampler that has tried its whole space (grid, brute force) asks
        the study to stop, which ends this sweep after the batch (the trial is recorded)."""
        try:
            study.tell(trial, **outcome)
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise
            self.exhausted = True


def write_results(study: optuna.Study, sweep_dir: Path) -> None:
    """``optimization_results.yaml``, ``trials.csv``, ``optimization_history.png`` and
    ``param_importances.png`` (the importances need two finished trials) over every trial of the
    study, in ``sweep_dir``; refuses (exit 2) when no trial has finished."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    sweep_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(sweep_dir / "trials.csv") as tmp:
        study.trials_dataframe().to_csv(tmp, index=False)
    states = [t.state.name for t in study.trials]
    counts = {s: states.count(s) for s in sorted(set(states))}
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        raise MaceGridError(
            f"no trial of study {study.study_name} finished ({counts}); "
            f"the errors are in {sweep_dir / 'trials.csv'}"
        )
    best = study.best_trial
    result = {
        "name": "optuna",
        "study_name": study.study_name,
        "best_trial": best.number,
        "best_params": best.params,
        "best_value": best.value,
        "trials": counts,
    }
    atomic_write_text(sweep_dir / "optimization_results.yaml", OmegaConf.to_yaml(result))
    log.info("Best trial %d: value %.6g, params %s", best.number, best.value, best.params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        figures = {"optimization_history.png": plots.plot_optimization_history}
        if len(completed) >= 2:
            figures["param_importances.png"] = plots.plot_param_importances
        else:
            log.info("param_importances.png needs two finished trials; skipped")
        for name, plot in figures.items():
            try:
                figure = plot(study).figure
            except (ValueError, RuntimeError) as err:  # e.g. no parameter varied
                log.warning("%s not written: %s", name, err)
                continue
            figure.tight_layout()
            with atomic_path(sweep_dir / name) as tmp:
                figure.savefig(tmp, format="png", dpi=120)
            plt.close(figure)
    print(f"best value {best.value:.6g} (trial {best.number}): {best.params}")
    print(f"sweep results: {sweep_dir}")
