"""Callbacks that tests add to a train.py run (``+callbacks.<name>._target_=_callbacks.<class>``,
with ``tests/`` on PYTHONPATH, so that DDP ranks relaunched by Lightning import them too)."""

import lightning as L


class NonFiniteLossOnRank(L.Callback):
    """Make one rank's training loss NaN at one step (its batch energies), as a rank that alone
    meets a bad batch would."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch.energy.fill_(float("nan"))
