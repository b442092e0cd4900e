"""StackedLinear against e3nn's own o3.Linear (an independent implementation), float64: values,
first and second derivatives, the state_dict, TorchScript and errors."""

import pytest
import torch
from e3nn import o3
from e3nn.util import jit
from mace.tools.torch_tools import default_dtype

from mace_grid.errors import ConfigError
from mace_grid.linear import StackedLinear, restore

# mace's linear after the convolution at max_ell 3, L = 1 (several paths per output, each input
# read once), an output no input reaches, multiplicities that differ per irrep, and an input
# read by two outputs
CASES = [
    ("3x0e+3x0e+3x1o+3x1o+3x1o+3x2e+3x2e+3x3o", "3x0e+3x1o+3x2e+3x3o"),
    ("2x0e+3x1o", "4x0e+2x1o+2x2e"),
    ("2x0e+3x1o", "2x0e+1x0e+2x1o"),
]


@pytest.mark.parametrize("irreps_in, irreps_out", CASES)
def test_matches_e3nn_linear_with_derivatives(irreps_in: str, irreps_out: str) -> None:
    with default_dtype(torch.float64):
        e3nn_linear = o3.Linear(irreps_in, irreps_out)
        stacked = StackedLinear.like(e3nn_linear)
    stacked.load_state_dict(e3nn_linear.state_dict())
    assert stacked.state_dict().keys() == e3nn_linear.state_dict().keys()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        e3nn_linear.weight.normal_(generator=gen)
        stacked.weight.copy_(e3nn_linear.weight)
    x = torch.randn(2, 5, e3nn_linear.irreps_in.dim, dtype=torch.float64, generator=gen)
    probe = torch.randn(2, 5, e3nn_linear.irreps_out.dim, dtype=torch.float64, generator=gen)

    def derivatives(linear):
        xi = x.clone().requires_grad_()
        y = linear(xi)
        (dx,) = torch.autograd.grad((y * probe).sum(), xi, create_graph=True)
        second = torch.autograd.grad((dx**2).sum(), [xi, linear.weight], allow_unused=True)
        return [y, dx, *second]

    for got, expected in zip(derivatives(stacked), derivatives(e3nn_linear), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert derivatives(e3nn_linear)[-1].abs().max() > 1e-3  # the weights' gradient is not zero


def linear_derivatives(linear, x, probe, before=lambda t: t, after=lambda y: y) -> list:
    """after(linear(before(x))), its gradient along ``probe`` w.r.t. x, and the gradient of
    that gradient's square w.r.t. the weights (w.r.t. x it is None: a linear map's gradient does
    not depend on x)."""
    xi = x.clone().requires_grad_()
    y = after(linear(before(xi)))
    (dx,) = torch.autograd.grad((y * probe).sum(), xi, create_graph=True)
    (dw,) = torch.autograd.grad((dx**2).sum(), [linear.weight])
    return [y, dx, dw]


def test_reads_its_rows_layout() -> None:
    """Given [nodes, rows, channels] with row q holding the input's (irrep, m) row rows_in[q]
    (built here by plain indexing of e3nn's layout), the output and its first and second
    derivatives are e3nn's; linears with no such layout (an input read twice, multiplicities
    that differ) have none, and a wrong shape is refused."""
    irreps_in, irreps_out = CASES[0]
    with default_dtype(torch.float64):
        e3nn_linear = o3.Linear(irreps_in, irreps_out)
        stacked = StackedLinear.like(e3nn_linear)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        e3nn_linear.weight.normal_(generator=gen)
        stacked.weight.copy_(e3nn_linear.weight)
    channels, n = 3, 4
    # e3nn's column (irrep k, channel u, m) -> flat row (k, m), channel u
    flat, first, offset = {}, 0, 0
    for _, ir in e3nn_linear.irreps_in:
        for u in range(channels):
            for m in range(ir.dim):
                flat[(first + m, u)] = offset + u * ir.dim + m
        first, offset = first + ir.dim, offset + channels * ir.dim
    assert sorted(stacked.rows_in) == list(range(first))
    gather = torch.tensor([[flat[(q, u)] for u in range(channels)] for q in stacked.rows_in])
    x = torch.randn(n, e3nn_linear.irreps_in.dim, dtype=torch.float64, generator=gen)
    probe = torch.randn(n, e3nn_linear.irreps_out.dim, dtype=torch.float64, generator=gen)

    expected = linear_derivatives(e3nn_linear, x, probe)
    got = linear_derivatives(stacked, x, probe, before=lambda t: t[:, gather])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
    for irreps in CASES[1:]:
        with default_dtype(torch.float64):
            assert StackedLinear.like(o3.Linear(*irreps)).rows_in is None
    with pytest.raises(ValueError, match="rows layout"):
        stacked(x[:, gather][:, 1:])


def test_writes_rows_when_asked() -> None:
    """With ``rows_out`` the output is [nodes, rows * channels], row (irrep k, m) holding e3nn's
    columns (k, u, m) for the channels u (read back here by plain indexing): values and first and
    second derivatives are e3nn's."""
    irreps_in, irreps_out = CASES[0]
    with default_dtype(torch.float64):
        e3nn_linear = o3.Linear(irreps_in, irreps_out)
        stacked = StackedLinear.like(e3nn_linear)
    stacked.rows_out = True
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        e3nn_linear.weight.normal_(generator=gen)
        stacked.weight.copy_(e3nn_linear.weight)
    channels, n = 3, 4
    columns, offset = [], 0
    for _, ir in e3nn_linear.irreps_out:
        columns += [[offset + u * ir.dim + m for u in range(channels)] for m in range(ir.dim)]
        offset += channels * ir.dim
    columns = torch.tensor(columns)  # [rows, channels]
    x = torch.randn(n, e3nn_linear.irreps_in.dim, dtype=torch.float64, generator=gen)
    probe = torch.randn(n, *columns.shape, dtype=torch.float64, generator=gen)

    assert stacked(x).shape == (n, columns.numel())  # one vector per node
    got = linear_derivatives(stacked, x, probe, after=lambda y: y.view(n, *columns.shape))
    expected = linear_derivatives(e3nn_linear, x, probe, after=lambda y: y[:, columns])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_torchscript_and_restore_give_the_same_function() -> None:
    with default_dtype(torch.float64):
        stacked = StackedLinear.like(o3.Linear(*CASES[0]))
        with torch.no_grad():
            stacked.weight.normal_()
        x = torch.randn(4, stacked.irreps_in.dim)
        back = restore(stacked)
    back.load_state_dict(stacked.state_dict())
    assert type(back) is o3.Linear
    torch.testing.assert_close(back(x), stacked(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(jit.compile(stacked)(x), stacked(x), rtol=0, atol=1e-12)


def test_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(ConfigError, match="biases"):
        StackedLinear.like(o3.Linear("2x0e", "2x0e", biases=True))
    with pytest.raises(ConfigError, match="normalises"):
        StackedLinear.like(o3.Linear("1x0e+3x0e", "2x0e", path_normalization="path"))


def test_compiled_runs_e3nns_layout() -> None:
    """Under torch.compile (mace's preparation: e3nn's code generation off) it runs e3nn's code
    in e3nn's layout, rows_out or not, as the compiled convolution reads and writes it."""
    from mace.tools.compile import disable_e3nn_codegen

    irreps = "3x0e+3x1o+3x2e"
    with default_dtype(torch.float64), disable_e3nn_codegen():
        e3nn_linear = o3.Linear(irreps, irreps)
        stacked = StackedLinear.like(e3nn_linear)
    stacked.weight = e3nn_linear.weight
    stacked.rows_out = True
    x = torch.randn(4, e3nn_linear.irreps_in.dim, dtype=torch.float64)
    assert not torch.allclose(stacked(x), e3nn_linear(x))  # eager: the rows layout
    compiled = torch.compile(stacked, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), e3nn_linear(x), rtol=0, atol=1e-12)
