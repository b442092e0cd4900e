"""LightningModule: energy-per-atom + forces loss, Adam + ReduceLROnPlateau, error metrics.

EMA of the weights is the ``ParameterEMA`` callback (Lightning's ``WeightAveraging``,
``conf/callbacks``): it swaps the averaged weights in for validation and stores them as the
checkpoint's ``state_dict``.
"""

import random
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.loggers import WandbLogger

from mace_grid.errors import DivergedError
from mace_grid.model import build_compiled_model, build_model

METRIC_NAMES = ("e_mae", "e_rmse", "f_mae", "f_rmse")
#: training steps between finiteness checks (each one host sync and, under DDP, one all-reduce);
#: the last step of every epoch is checked too, so no checkpoint holds a diverged state
FINITE_CHECK_STEPS = 50


def backward_to_parameters(loss: torch.Tensor, module: torch.nn.Module, *args, **kwargs) -> None:
    """``loss.backward()`` into the trainable parameters of ``module`` only, with the same
    gradients. The positions require grad for the forces, so a plain backward also carries
    the loss back to them (through the harmonics, the edge lengths and every derivative taken
    with respect to them): work whose result nobody reads. Naming the parameters lets autograd
    skip those nodes, and the fused convolution those outputs (`mace_grid.conv_kernel`)."""
    params = [p for p in module.parameters() if p.requires_grad]
    loss.backward(*args, inputs=params, **kwargs)


class MaskedError(torchmetrics.Metric):
    """Mean absolute (or root mean square) error over the entries where ``mask`` is 1.

    Masked sums, not boolean indexing: indexing by a mask asks the device how many entries it
    holds (a host sync every step). Synced in DDP; NaN when no entry was seen (an energy-only
    test set's forces).
    """

    full_state_update = False

    def __init__(self, squared: bool = False) -> None:
        super().__init__()
        self.squared = squared
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        diff = (pred - ref).double()
        error = diff.square() if self.squared else diff.abs()
        mask = mask.double().expand_as(error)
        self.total += (error * mask).sum()
        self.count += mask.sum()

    def compute(self) -> torch.Tensor:
        mean = self.total / self.count
        return mean.sqrt() if self.squared else mean


class ErrorMetrics(torch.nn.Module):
    """Energy-per-atom (meV/atom) and force-component (meV/Å) MAE/RMSE, free atoms only.

    torchmetrics does the accumulation, so the numbers are exact over an epoch and synced in DDP.
    """

    def __init__(self) -> None:
        super().__init__()
        self.e_mae = MaskedError()
        self.e_rmse = MaskedError(squared=True)
        self.f_mae = MaskedError()
        self.f_rmse = MaskedError(squared=True)

    def update(self, pred: Mapping[str, torch.Tensor], batch: Any) -> None:
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(pred["energy"].dtype)
        e_pred = pred["energy"].detach() / n_atoms * 1000.0
        e_ref = batch.energy / n_atoms * 1000.0
        # Free atoms of frames with reference forces (not those of an energy-only test set).
        free = (batch.free_mask * (batch.forces_weight[batch.batch] > 0)).unsqueeze(-1)
        f_pred, f_ref = pred["forces"].detach() * 1000.0, batch.forces * 1000.0
        for metric in (self.e_mae, self.e_rmse):
            metric.update(e_pred, e_ref, torch.ones_like(e_ref))
        for metric in (self.f_mae, self.f_rmse):
            metric.update(f_pred, f_ref, free)

    def metrics(self) -> dict[str, torchmetrics.Metric]:
        return {name: getattr(self, name) for name in METRIC_NAMES}


class MaceLitModule(L.LightningModule):
    """Trains a mace-torch model built by :func:`mace_grid.model.build_model`.

    The constructor arguments (model/tp config, data statistics, optimisation settings) are saved
    as hyperparameters, so ``MaceLitModule.load_from_checkpoint(path)`` rebuilds the model from the
    checkpoint alone.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        tp: Mapping[str, Any],
        statistics: Mapping[str, Any],
        conv: Mapping[str, Any] | None = None,
        compile: bool = False,
        lr: float = 0.01,
        weight_decay: float = 5e-7,
        amsgrad: bool = True,
        lr_factor: float = 0.8,
        scheduler_patience: int = 5,
        energy_weight: float = 1.0,
        forces_weight: float = 100.0,
        test_names: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = (build_compiled_model if compile else build_model)(model, tp, statistics, conv)
        self.train_metrics = ErrorMetrics()
        self.val_metrics = ErrorMetrics()
        self.test_metrics = torch.nn.ModuleList(ErrorMetrics() for _ in test_names)
        self.initial_val: dict[str, float] | None = None
        self.run_dir: str | None = None
        self.run_config: dict[str, Any] | None = None
        # The same config with its interpolations (data root, run dir): what a resume restores.
        self.run_config_unresolved: dict[str, Any] | None = None
        # Wall-clock seconds of fit() before this process (a resumed run continues the count).
        self.fit_time_offset = 0.0
        self._fit_start = 0.0
        # per stage: non-finite losses since the last check, on the device (no per-step sync)
        self._non_finite: dict[str, torch.Tensor] = {}

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        data = batch.to_dict()
        data["positions"].requires_grad_(True)  # here, not in the model: torch.compile needs it
        return self.model(data, training=self.training, compute_force=True)

    def loss(self, pred: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """Weighted MSE of energy per atom and of the forces on free atoms."""
        n_atoms = (batch.ptr[1:] - batch.ptr[:-1]).to(pred["energy"].dtype)
        e_loss = torch.mean(((pred["energy"] - batch.energy) / n_atoms) ** 2)
        mask = batch.free_mask.to(pred["forces"].dtype).unsqueeze(-1)
        f_sq = (mask * (pred["forces"] - batch.forces) ** 2).sum()
        f_loss = f_sq / (3.0 * mask.sum()).clamp(min=1.0)
        return self.hparams.energy_weight * e_loss + self.hparams.forces_weight * f_loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's hook: the loss to the parameters only (`backward_to_parameters`)."""
        backward_to_parameters(loss, self, *args, **kwargs)

    def _log_metrics(self, prefix: str, metrics: ErrorMetrics, batch_size: int) -> None:
        for name, metric in metrics.metrics().items():
            self.log(
                f"{prefix}/{name}",
                metric,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                add_dataloader_idx=False,
            )

    def _flag_non_finite(self, loss: torch.Tensor, stage: str) -> None:
        """Count a non-finite loss on the device (no host sync); `_raise_if_diverged` reads it."""
        bad = (~torch.isfinite(loss.detach())).to(torch.int64)
        previous = self._non_finite.get(stage)
        self._non_finite[stage] = bad if previous is None else previous + bad

    def _raise_if_diverged(self, stage: str) -> None:
        """Stop the run if any rank saw a non-finite ``stage`` loss since the last check, before
        a checkpoint of this state is written. Every rank takes the same decision (all-reduced),
        so under DDP all of them raise together instead of the others waiting in a collective."""
        count = self._non_finite.pop(stage, None)
        local = count is not None and bool(count)  # the one host sync of a check
        if self.trainer.strategy.reduce_boolean_decision(local, all=False):
            raise DivergedError(
                f"non-finite {stage} loss at epoch {self.current_epoch} (by step "
                f"{self.global_step}): training diverged (try a lower optim.lr or "
                "trainer.gradient_clip_val); no checkpoint of this state was saved"
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        pred = self(batch)
        loss = self.loss(pred, batch)
        self._flag_non_finite(loss, "training")
        # The running loss in the progress bar only (loggers get the epoch mean below).
        self.log("loss", loss.detach(), on_step=True, prog_bar=True, logger=False)
        self.train_metrics.update(pred, batch)
        self.log(
            "train/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=batch.num_graphs,
            sync_dist=True,
        )
        self._log_metrics("train", self.train_metrics, batch.num_graphs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Finiteness check every `FINITE_CHECK_STEPS` steps and at the epoch's last step (the
        last batch, or a budget stop): the same steps on every rank."""
        step, trainer = batch_idx + 1, self.trainer
        if (
            step % FINITE_CHECK_STEPS == 0
            or step == trainer.num_training_batches
            or trainer.should_stop
        ):
            self._raise_if_diverged("training")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.enable_grad():
            pred = self(batch)
        self.val_metrics.update(pred, batch)
        loss = self.loss(pred, batch).detach()
        self._flag_non_finite(loss, "validation")
        # sync_dist: under DDP every rank's LR scheduler, checkpoint and early stopping must see
        # the same val/loss (the mean over ranks), or their learning rates drift apart.
        self.log("val/loss", loss, batch_size=batch.num_graphs, sync_dist=True)
        self._log_metrics("val", self.val_metrics, batch.num_graphs)

    def on_validation_epoch_end(self) -> None:
        # before ModelCheckpoint and EarlyStopping read val/loss (their on_validation_end)
        self._raise_if_diverged("validation")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.enable_grad():
            pred = self(batch)
        metrics = self.test_metrics[dataloader_idx]
        metrics.update(pred, batch)
        name = self.hparams.test_names[dataloader_idx]
        self._log_metrics(f"test/{name}", metrics, batch.num_graphs)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(
            self.model.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            amsgrad=self.hparams.amsgrad,
        )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=self.hparams.lr_factor, patience=self.hparams.scheduler_patience
        )
        # Stepped on the epochs that validate (val/loss exists only there).
        every = getattr(self._trainer, "check_val_every_n_epoch", None) or 1
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "monitor": "val/loss",
                "interval": "epoch",
                "frequency": every,
            },
        }

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()

    def fit_time_s(self) -> float:
        """Wall-clock seconds of fit() so far, over every process of a resumed run."""
        return self.fit_time_offset + time.perf_counter() - self._fit_start

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["initial_val"] = self.initial_val
        checkpoint["run_dir"] = self.run_dir
        checkpoint["run_config"] = self.run_config
        checkpoint["run_config_unresolved"] = self.run_config_unresolved
        checkpoint["fit_time_s"] = self.fit_time_s()
        # train.py resumes this W&B run (logger id) when the run is resumed from this checkpoint.
        checkpoint["wandb_run_id"] = next(
            (lg.version for lg in self.loggers if isinstance(lg, WandbLogger)), None
        )
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),  # noqa: NPY002 (the global state seed_everything sets)
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.initial_val = checkpoint.get("initial_val")
        # A resume sets these before fit (its overrides on top): they outlive the checkpoint's.
        if self.run_config is None:
            self.run_dir = checkpoint.get("run_dir")
            self.run_config = checkpoint.get("run_config")
            self.run_config_unresolved = checkpoint.get("run_config_unresolved")
        self.fit_time_offset = checkpoint.get("fit_time_s", 0.0)
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            np.random.set_state(states["numpy"])  # noqa: NPY002
            random.setstate(states["python"])
