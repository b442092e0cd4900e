"""Callbacks of our own; everything else in ``conf/callbacks`` is Lightning's."""

import time
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


class EpochTrainTimer(L.Callback):
    """Wall-clock time of the training steps of each epoch (data loading and validation excluded).

    Recorded before validation runs (where checkpoints are written) and stored in them, so a
    resumed run keeps exactly one entry per completed epoch.
    """

    def __init__(self) -> None:
        self.epoch_times: dict[int, float] = {}
        self._epoch = 0.0
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._epoch += time.perf_counter() - self._start

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
