"""Callbacks of our own; everything else in ``conf/callbacks`` is Lightning's."""

import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from tqdm import tqdm

from mace_grid.errors import ConfigError
from mace_grid.tp.work import synchronize
from mace_grid.utils import atomic_path, atomic_write_text

log = logging.getLogger("mace_grid.train")


class ParameterEMA(WeightAveraging):
    """Exponential moving average of the parameters after every optimiser step, used for
    validation and test and saved as the checkpoint's ``state_dict`` (Lightning's
    `WeightAveraging` does the swapping and the checkpoint layout).

    The same average as Lightning's ``EMAWeightAveraging(decay)`` (``ema = decay ema + (1 -
    decay) p``; the first step copies), but over the parameters only, not the buffers (MACE has
    no running statistics: its buffers are constants, int64 index tensors among them), and as
    two multi-tensor operations per step (``torch._foreach_*``) instead of one small update per
    tensor; the update count stays on the host, so a step does not wait for the device.
    """

    def __init__(self, decay: float = 0.99) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"callbacks.ema.decay={decay} must be in [0, 1]")
        super().__init__(use_buffers=False)
        self.decay = decay
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._updates: int | None = None  # host copy of the AveragedModel's n_averaged

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None  # after every optimiser step, not at epoch ends

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._latest_update_step:
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def _update(self, pl_module: L.LightningModule) -> None:
        average = self._average_model
        if self._pairs is None:
            averaged = [p.detach() for p in average.module.parameters()]
            current = [p.detach() for p in pl_module.parameters()]
            self._pairs = averaged, current
            self._updates = int(average.n_averaged)  # restored by a resume; read once
        averaged, current = self._pairs
        if self._updates == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_mul_(averaged, self.decay)
            torch._foreach_add_(averaged, current, alpha=1.0 - self.decay)
        self._updates += 1
        average.n_averaged += 1

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._pairs = self._updates = None  # re-read n_averaged from the restored state


class EpochTrainTimer(L.Callback):
    """Wall-clock time of the training steps of each epoch (data loading and validation excluded).

    Recorded before validation runs (where checkpoints are written) and stored in them, so a
    resumed run keeps exactly one entry per completed epoch.

    ``budget_s``: stop training once the training steps of the whole run (resumes included) have
    used that many seconds; the epoch in progress ends there, is validated and checkpointed
    (Lightning's ``trainer.should_stop``, so after ``trainer.min_epochs`` at the earliest).
    Unlike ``trainer.max_time`` it ignores data loading, validation and start-up, so runs of
    different speed get the same optimisation time. On a GPU it synchronises the device at the
    start and end of every step (`synchronize`: two waits per step, the cost of timing steps).
    """

    def __init__(self, budget_s: float | None = None) -> None:
        self.budget_s = budget_s
        self.epoch_times: dict[int, float] = {}
        self._epoch = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        synchronize(pl_module.device)  # work queued before the step (EMA, validation) is not its
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(pl_module.device)  # the step's kernels have run, not only been launched
        self._epoch += time.perf_counter() - self._start
        if self.budget_s is not None:
            spent = self._epoch + sum(
                t for epoch, t in self.epoch_times.items() if epoch != trainer.current_epoch
            )
            # Every DDP rank must stop at the same step: stop when any rank is out of time.
            if trainer.strategy.reduce_boolean_decision(spent >= self.budget_s, all=False):
                trainer.should_stop = True

    def _record(self, trainer: L.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.epoch_times[trainer.current_epoch] = self._epoch

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer)

    @property
    def per_epoch(self) -> list[float]:
        return [self.epoch_times[k] for k in sorted(self.epoch_times)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_times": dict(self.epoch_times)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_times = {int(k): float(v) for k, v in state_dict["epoch_times"].items()}


class SyncCounter(L.Callback):
    """Host-device synchronisations per training step on CUDA, counted by
    ``torch.cuda.set_sync_debug_mode`` (one warning per synchronising call) between the step's
    first and last callback hook; written to ``<run dir>/sync_counts.json`` when training ends
    (``scripts/gpu_check.py`` adds it; ``per_step_median`` is null on the CPU: nothing to count).
    Add it last (``+callbacks.sync_counter._target_=mace_grid.callbacks.SyncCounter``) so that
    the other callbacks' step hooks are counted."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._warn_always = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type != "cuda":
            return
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._warn_always = torch.is_warn_always_enabled()
        torch.set_warn_always(True)  # every synchronising call, not the first of each kind
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._catcher is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        torch.set_warn_always(self._warn_always)
        self._catcher.__exit__(None, None, None)
        self._catcher = None
        self.counts.append(sum("synchroniz" in str(w.message) for w in self._caught))

    def on_train_end(self, trainer, pl_module) -> None:
        run_dir = getattr(pl_module, "run_dir", None)
        if not trainer.is_global_zero or not run_dir:
            return
        steady = self.counts[2:] or self.counts  # the first steps warm up (allocations, caches)
        result = {
            "steps": len(self.counts),
            "per_step_median": statistics.median(steady) if steady else None,
            "per_step_max": max(steady) if steady else None,
            "counts": self.counts,
        }
        atomic_write_text(Path(run_dir) / "sync_counts.json", json.dumps(result, indent=1) + "\n")


class EpochSummary(L.Callback):
    """Visible progress: after every training epoch one log line (console and ``train.log``) with
    epoch, train loss, validation E/F MAE and RMSE, learning rate and seconds, and
    ``<run dir>/<filename>``: validation E and F MAE vs epoch and vs training time.

    The validation history is recorded before checkpoints are written and stored in them, so a
    resumed run continues the curve.
    """

    def __init__(self, filename: str | None = "learning_curve.png") -> None:
        self.filename = filename
        self.history: list[dict[str, float]] = []
        self._epoch_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "time_s": pl_module.fit_time_s()}
        row.update({k: float(m[f"val/{k}"]) for k in ("e_mae", "e_rmse", "f_mae", "f_rmse")})
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch  # 0-based, as in checkpoint names, metrics.csv, resumes
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"epoch {epoch}{_progress(trainer, epoch)}"]
        parts.append(f"train loss {float(loss):.4g}" if loss is not None else "train loss -")
        row = self.history[-1] if self.history and self.history[-1]["epoch"] == epoch else None
        if row is not None:
            parts.append(f"val E MAE {row['e_mae']:.3g} RMSE {row['e_rmse']:.3g} meV/atom")
            parts.append(f"F MAE {row['f_mae']:.3g} RMSE {row['f_rmse']:.3g} meV/Å")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        parts.append(f"{time.perf_counter() - self._epoch_start:.1f} s")
        with tqdm.external_write_mode(file=sys.stdout):  # not glued to the progress bar
            log.info(" | ".join(parts))
        if self.filename and self.history and getattr(pl_module, "run_dir", None):
            plot_learning_curve(self.history, Path(pl_module.run_dir) / self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


def _progress(trainer: L.Trainer, epoch: int) -> str:
    """`` (k/n done)`` epochs, or the budget's seconds used, for the per-epoch line."""
    timer = next((c for c in trainer.callbacks if isinstance(c, EpochTrainTimer)), None)
    if timer is not None and timer.budget_s is not None:
        return f" ({sum(timer.epoch_times.values()):.0f}/{timer.budget_s:g} s of budget)"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f" ({epoch + 1}/{trainer.max_epochs} done)"
    return ""


def plot_learning_curve(history: list[dict[str, float]], path: Path) -> None:
    """Validation energy and force MAE vs epoch (top) and vs training time (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), constrained_layout=True)
    epochs = [r["epoch"] for r in history]
    minutes = [r["time_s"] / 60.0 for r in history]
    for col, (key, label) in enumerate(
        (("e_mae", "val energy MAE (meV/atom)"), ("f_mae", "val force MAE (meV/Å)"))
    ):
        values = [r[key] for r in history]
        for row, (x, xlabel) in enumerate(((epochs, "epoch"), (minutes, "training time (min)"))):
            ax = axes[row][col]
            ax.plot(x, values, "o-", ms=3)
            ax.set(xlabel=xlabel, ylabel=label)
            if min(values) > 0 and max(values) > 5 * min(values):
                ax.set_yscale("log")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


class OptunaPruning(L.Callback):
    """Report ``monitor`` after every validation epoch to this job's Optuna trial and stop the
    run when the study's pruner gives up on it, by raising ``optuna.TrialPruned`` (recorded by
    the sweeper as PRUNED, not failed). Does nothing outside a trial of ``hparams_search=optuna``
    (:func:`mace_grid.sweeper.current_trial`)."""

    def __init__(self, monitor: str = "val/f_mae") -> None:
        self.monitor = monitor
        self._trial = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from mace_grid.sweeper import current_trial

        self._trial = current_trial()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._trial is None or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking:
            return
        import optuna

        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigError(
                f"callbacks.optuna_pruning.monitor={self.monitor} is not logged; one of "
                f"{sorted(k for k in trainer.callback_metrics if k.startswith('val/'))}"
            )
        epoch = trainer.current_epoch
        prune = False
        if trainer.is_global_zero:
            self._trial.report(float(value), epoch)
            prune = self._trial.should_prune()
        # Every DDP rank stops at the same epoch.
        if trainer.strategy.reduce_boolean_decision(prune, all=False):
            raise optuna.TrialPruned(f"after epoch {epoch + 1}, {self.monitor} {float(value):.4g}")
