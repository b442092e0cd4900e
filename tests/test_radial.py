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
from mace_grid.radial import Deferred, RadialMLP, _SiLU, _SiLUGrad, bonds, restore


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


def periodic_edges(positions, cell, r_max: float):
    """(edge_index, unit_shifts, directions, features) of mace's neighbour list of an H/O cell
    (float64): directions the l = 1 harmonics, features mace's radial embedding."""
    from ase import Atoms
    from e3nn import o3
    from mace.data import AtomicData, config_from_atoms
    from mace.modules.blocks import RadialEmbeddingBlock
    from mace.modules.utils import get_edge_vectors_and_lengths
    from mace.tools import AtomicNumberTable

    atoms = Atoms("HO", positions=positions, cell=cell, pbc=True)
    data = AtomicData.from_config(config_from_atoms(atoms), AtomicNumberTable([1, 8]), r_max)
    vectors, lengths = get_edge_vectors_and_lengths(
        data.positions.double(), data.edge_index, data.shifts.double()
    )
    directions = o3.spherical_harmonics(1, vectors, normalize=True, normalization="component")
    with default_dtype(torch.float64):
        embedding = RadialEmbeddingBlock(r_max, 8, 5)
    features, _ = embedding(lengths, None, data.edge_index, None)
    return data.edge_index, data.unit_shifts, directions, features


def test_bonds_pair_each_edge_with_its_reverse_among_equal_images() -> None:
    """In a cubic cell with O at the body centre every H-O image lies at one distance: each
    edge pairs with its reverse (receiver and sender swapped, the opposite periodic shift) and
    with no other image; with one edge left out, its reverse is a bond of its own."""
    edge_index, shifts, directions, features = periodic_edges(
        [[0, 0, 0], [1.1, 1.1, 1.1]], 2.2 * torch.eye(3).numpy(), 3.0
    )
    n_edges = edge_index.shape[1]
    assert n_edges == 28  # 8 H-O images each way at 1.91 A, 6 self-images per atom at 2.2 A
    first, bond = bonds(edge_index, directions, features, 2)
    assert len(first) * 2 == n_edges
    assert torch.equal(bond[first], torch.arange(len(first)))
    assert torch.equal(torch.bincount(bond), torch.full((len(first),), 2))
    for b in range(len(first)):
        e, p = (bond == b).nonzero().flatten().tolist()
        assert torch.equal(edge_index[:, p], edge_index[:, e].flip(0))
        assert torch.equal(shifts[p], -shifts[e])

    keep = torch.arange(n_edges) != 5
    first, bond = bonds(edge_index[:, keep], directions[keep], features[keep], 2)
    assert len(first) == n_edges // 2
    assert torch.bincount(bond).tolist().count(1) == 1


def test_bonds_of_a_molecule_pair_every_edge_with_its_reverse() -> None:
    """Without periodic images each atom pair has at most two edges, which the atom pair alone
    orders: in a shuffled molecular graph every edge pairs with its reverse, and an edge whose
    pair holds it twice in one direction (a half list) stays a bond of its own."""
    gen = torch.Generator().manual_seed(3)
    positions = 3 * torch.rand(12, 3, generator=gen, dtype=torch.float64)
    i, j = torch.triu_indices(12, 12, 1)
    near = (positions[i] - positions[j]).norm(dim=1) < 2.5
    i, j = i[near], j[near]
    edge_index = torch.cat([torch.stack([i, j]), torch.stack([j, i])], 1)
    edge_index = edge_index[:, torch.randperm(edge_index.shape[1], generator=gen)]
    vectors = positions[edge_index[1]] - positions[edge_index[0]]
    lengths = vectors.norm(dim=1)
    directions = vectors / lengths[:, None]
    features = torch.stack([lengths, lengths.square()], 1)
    first, bond = bonds(edge_index, directions, features, 12)
    assert 2 * len(first) == edge_index.shape[1] > 20
    for b in range(len(first)):
        e, p = (bond == b).nonzero().flatten().tolist()
        assert torch.equal(edge_index[:, p], edge_index[:, e].flip(0))
    half = edge_index[0] < edge_index[1]  # each pair's edge in one direction, twice
    doubled = torch.cat([edge_index[:, half]] * 2, 1)
    first, bond = bonds(
        doubled, torch.cat([directions[half]] * 2), torch.cat([features[half]] * 2), 12
    )
    assert len(first) == doubled.shape[1]


def test_deferred_weights_are_the_networks_per_edge() -> None:
    """With ``per_bond`` set an eager call defers; ``per_bond`` gives the network's rows for one
    edge of each bond, and those, read through ``bond``, equal the network on every edge."""
    edge_index, _, directions, features = periodic_edges(
        [[0.1, 0, 0], [1.1, 1.2, 0.9]], 2.2 * torch.eye(3).numpy(), 3.0
    )
    net = RadialMLP.like(mace_radial([16], 12))
    expected = net(features)
    net.per_bond = True
    deferred = net(features)
    assert isinstance(deferred, Deferred)
    weights, bond = deferred.per_bond(edge_index, directions, 2)
    assert 2 * weights.shape[0] == edge_index.shape[1]
    torch.testing.assert_close(weights[bond], expected, rtol=0, atol=1e-14)
    per_edge, none = deferred.per_bond(edge_index, None, 2)  # no directions: per edge
    assert none is None
    torch.testing.assert_close(per_edge, expected, rtol=0, atol=0)
    assert torch.equal(net(features, now=True), expected)
