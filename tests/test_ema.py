"""`ParameterEMA`: the same average as Lightning's EMAWeightAveraging, over parameters only."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from mace_grid.callbacks import ParameterEMA
from mace_grid.errors import ConfigError


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(5, 3)
        self.scale = torch.nn.Parameter(torch.ones(7))
        self.register_buffer("index", torch.arange(4))  # a constant, as MACE's


def averaged(callback) -> list[torch.Tensor]:
    return [p.detach().clone() for p in callback._average_model.module.parameters()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_average_as_lightnings_ema(dtype) -> None:
    torch.manual_seed(0)
    module = Tiny().to(dtype)
    ours, lightnings = ParameterEMA(decay=0.9), EMAWeightAveraging(decay=0.9)
    trainer = SimpleNamespace(global_step=0)
    for callback in (ours, lightnings):
        callback.setup(trainer, module, "fit")
    for step in range(1, 8):
        with torch.no_grad():  # an optimiser step
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        trainer.global_step = step
        for callback in (ours, lightnings):
            callback.on_train_batch_end(trainer, module, None, None, step - 1)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for a, b in zip(averaged(ours), averaged(lightnings), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert int(ours._average_model.n_averaged) == int(lightnings._average_model.n_averaged) == 7
    # not a copy of the current weights: the average lags behind
    average_scale = dict(ours._average_model.module.named_parameters())["scale"]
    assert not torch.allclose(average_scale, module.scale)


def test_step_without_an_optimiser_step_does_not_update() -> None:
    """Gradient accumulation: no optimiser step, no update (as Lightning's)."""
    module = Tiny()
    ema = ParameterEMA(decay=0.5)
    trainer = SimpleNamespace(global_step=1)
    ema.setup(trainer, module, "fit")
    ema.on_train_batch_end(trainer, module, None, None, 0)
    before = averaged(ema)
    with torch.no_grad():
        module.scale.add_(1.0)
    ema.on_train_batch_end(trainer, module, None, None, 1)  # global_step still 1
    for a, b in zip(averaged(ema), before, strict=True):
        assert torch.equal(a, b)


def test_decay_outside_zero_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="decay=1.5"):
        ParameterEMA(decay=1.5)
