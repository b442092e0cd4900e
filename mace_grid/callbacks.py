"""Callbacks of our own; everything else in ``conf/callbacks`` is Lightning's."""

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from mace_grid.utils import atomic_path

log = logging.getLogger("mace_grid.train")


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run the work queued on it: CUDA kernels run asynchronously, so
    a host clock alone would time their launch. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        epoch = trainer.current_epoch
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"epoch {epoch + 1}/{trainer.max_epochs}"]
        parts.append(f"train loss {float(loss):.4g}" if loss is not None else "train loss -")
        row = self.history[-1] if self.history and self.history[-1]["epoch"] == epoch else None
        if row is not None:
            parts.append(f"val E MAE {row['e_mae']:.3g} RMSE {row['e_rmse']:.3g} meV/atom")
            parts.append(f"F MAE {row['f_mae']:.3g} RMSE {row['f_rmse']:.3g} meV/Å")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        parts.append(f"{time.perf_counter() - self._epoch_start:.1f} s")
        log.info(" | ".join(parts))
        if self.filename and self.history and getattr(pl_module, "run_dir", None):
            plot_learning_curve(self.history, Path(pl_module.run_dir) / self.filename)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])


def plot_learning_curve(history: list[dict[str, float]], path: Path) -> None:
    """Validation energy and force MAE vs epoch (top) and vs training time (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), constrained_layout=True)
    epochs = [r["epoch"] + 1 for r in history]
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
