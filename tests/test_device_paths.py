"""What a GPU run does differently, checked on the CPU: loaders chosen per trainer, batches
copied without blocking, metrics without per-step host syncs (masked sums)."""

from types import SimpleNamespace

import pytest
import torch
import torchmetrics

from mace_grid.data.datamodule import GPU_WORKERS, SplitLoaders
from mace_grid.lit_module import MaskedError


class Loaders(SplitLoaders):
    def __init__(self, num_workers, device: str | None) -> None:
        self.statistics = {}
        self._train, self._valid, self._tests = [1, 2, 3], [4], [[5], [6]]
        self.batch_size = self.valid_batch_size = 2
        self.num_workers = num_workers
        if device is not None:
            self.trainer = SimpleNamespace(
                strategy=SimpleNamespace(root_device=torch.device(device))
            )


@pytest.mark.parametrize(
    "num_workers,device,workers,pinned",
    [
        (None, "cpu", 0, False),  # CPU runs as before
        (None, None, 0, False),  # no trainer (scripts)
        (None, "cuda", "auto", True),
        (1, "cuda", 1, True),  # an explicit data.num_workers wins
        (2, "cpu", 2, False),
    ],
)
def test_loaders_are_chosen_per_trainer(num_workers, device, workers, pinned) -> None:
    data = Loaders(num_workers, device)
    if workers == "auto":
        workers = min(GPU_WORKERS, __import__("os").cpu_count() or 1)
    loaders = [data.train_dataloader(), data.val_dataloader(), *data.test_dataloader()]
    for loader in loaders:
        assert loader.num_workers == workers and loader.pin_memory == pinned
        assert loader.persistent_workers == (workers > 0)


def test_gpu_batches_are_copied_without_blocking() -> None:
    calls = []
    batch = SimpleNamespace(apply=None, to=lambda device, **kw: calls.append((device, kw)) or "b")
    gpu = torch.device("cuda", 0)
    assert SplitLoaders.transfer_batch_to_device(None, batch, gpu, 0) == "b"
    assert calls == [(gpu, {"non_blocking": True})]


@pytest.mark.parametrize("squared", [False, True])
def test_masked_error_equals_the_error_of_the_selected_entries(squared) -> None:
    gen = torch.Generator().manual_seed(0)
    metric = MaskedError(squared=squared)
    reference = torchmetrics.MeanSquaredError(squared=False) if squared else None
    reference = reference or torchmetrics.MeanAbsoluteError()
    for _ in range(3):
        pred, ref = torch.randn(10, 3, generator=gen), torch.randn(10, 3, generator=gen)
        mask = (torch.rand(10, generator=gen) > 0.4).float().unsqueeze(-1)
        metric.update(pred, ref, mask)
        keep = mask[:, 0].bool()
        reference.update(pred[keep].double(), ref[keep].double())
    # torchmetrics accumulates in float32, MaskedError in float64
    assert metric.compute().item() == pytest.approx(reference.compute().item(), rel=1e-6)
    empty = MaskedError(squared=squared)
    empty.update(torch.ones(4, 3), torch.zeros(4, 3), torch.zeros(4, 1))
    assert torch.isnan(empty.compute())  # no labelled entries: NaN, reported as None


def test_sync_counter_counts_sync_warnings_per_step(monkeypatch, tmp_path) -> None:
    """On CUDA, torch.cuda.set_sync_debug_mode("warn") warns once per synchronising call; the
    counter records them per step (faked here: the mode switch is a no-op, the step warns)."""
    import json
    import warnings

    from mace_grid.callbacks import SyncCounter

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = SyncCounter()
    module = SimpleNamespace(device=torch.device("cuda"), run_dir=str(tmp_path))
    for syncs in (3, 0, 2, 2):
        counter.on_train_batch_start(None, module, None, 0)
        for _ in range(syncs):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        counter.on_train_batch_end(None, module, None, None, 0)
    assert counter.counts == [3, 0, 2, 2] and modes == ["warn", "default"] * 4
    counter.on_train_end(SimpleNamespace(is_global_zero=True), module)
    result = json.loads((tmp_path / "sync_counts.json").read_text())
    assert result["per_step_median"] == 2 and result["steps"] == 4  # first 2 steps: warm-up
    cpu = SyncCounter()
    cpu.on_train_batch_start(None, SimpleNamespace(device=torch.device("cpu")), None, 0)
    assert cpu._catcher is None  # nothing to count on the CPU
