"""RadialMLP against e3nn's own FullyConnectedNet (an independent implementation), float64:
values, first and second derivatives with respect to the edge lengths and the weights, the
state_dict, TorchScript, the restore and errors; its SiLU derivatives against finite
differences."""

import copy

import pytest
import torch
from e3nn import nn
from e3nn.util import jit
from mace.tools.torch_tools import default_dtype

from mace_grid.errors import ConfigError
from mace_grid.radial import RadialMLP, _SiLU, _SiLUGrad, restore


def mace_radial(hidden: list[int], n_out: int) -> nn.FullyConnectedNet:
    """mace's ``conv_tp_weights`` (8 Bessel features in), with random weights."""
    with default_dtype(torch.float64):
        net = nn.FullyConnectedNet([8, *hidden, n_out], torch.nn.functional.silu)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(generator=gen)
    return net


def features(r: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.sin(k * r) / r for k in range(1, 9)], -1)


def derivatives(net, r: torch.Tensor, probe: torch.Tensor) -> list[torch.Tensor]:
    """Outputs, d<probe, out>/dr (a force) and the gradient of a force loss with respect to r
    and every weight (the double backward of training)."""
    r = r.clone().requires_grad_()
    out = net(features(r))
    (dr,) = torch.autograd.grad((out * probe).sum(), r, create_graph=True)
    loss = (dr**2).sum() + out.square().sum()
    return [out, dr, *torch.autograd.grad(loss, [r, *net.parameters()])]


@pytest.mark.parametrize("hidden", [[64, 64, 64], [8]])
def test_matches_e3nn_network_with_derivatives(hidden: list[int]) -> None:
    net = mace_radial(hidden, 12)
    fast = RadialMLP.like(net)
    assert fast.state_dict().keys() == net.state_dict().keys()
    assert all(
        mine is theirs for mine, theirs in zip(fast.parameters(), net.parameters(), strict=True)
    )
    gen = torch.Generator().manual_seed(1)
    r = 0.5 + 4 * torch.rand(40, dtype=torch.float64, generator=gen)
    probe = torch.randn(40, 12, dtype=torch.float64, generator=gen)
    expected = derivatives(net, r, probe)
    assert all(d.abs().max() > 1e-3 for d in expected)
    for got, want in zip(derivatives(fast, r, probe), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_silu_derivatives_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(30, dtype=torch.float64, generator=gen)).requires_grad_()
    g = torch.randn(30, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: _SiLU.apply(z, 1.7), (z,))
    assert torch.autograd.gradgradcheck(lambda z: _SiLU.apply(z, 1.7), (z,))
    assert torch.autograd.gradcheck(lambda z, g: _SiLUGrad.apply(z, g, 1.7), (z, g))


def test_torchscript_and_restore_give_the_same_function() -> None:
    fast = RadialMLP.like(mace_radial([16, 16], 5))
    x = features(1 + torch.rand(7, dtype=torch.float64))
    back = restore(fast)
    assert type(back) is nn.FullyConnectedNet
    assert all(
        mine is theirs for mine, theirs in zip(back.parameters(), fast.parameters(), strict=True)
    )
    torch.testing.assert_close(back(x), fast(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(jit.compile(copy.deepcopy(fast))(x), fast(x), rtol=0, atol=1e-12)


def test_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(ConfigError, match="SiLU radial network"):
        RadialMLP.like(nn.FullyConnectedNet([4, 8, 3], torch.tanh))
    with pytest.raises(ConfigError, match="SiLU radial network"):
        RadialMLP.like(nn.FullyConnectedNet([4, 8, 3], torch.nn.functional.silu, out_act=True))
