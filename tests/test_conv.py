"""conv=fast against mace's own convolution (e3nn's TensorProduct + gather + scatter_sum), float64:
messages, first and second derivatives, whole models of every interaction class conv=fast
serves, checkpoints, TorchScript, training."""

import copy

import numpy as np
import pytest
import torch
from _helpers import best_checkpoint, one_thread, shared_root, trained_runs  # noqa: F401
from e3nn import nn, o3
from e3nn.util import jit
from mace.data import AtomicData, config_from_atoms
from mace.modules.irreps_tools import tp_out_irreps_with_instructions
from mace.tools import AtomicNumberTable
from mace.tools.scatter import scatter_sum
from mace.tools.torch_geometric.dataloader import DataLoader
from mace.tools.torch_tools import default_dtype

from mace_grid.calculator import MaceGridCalculator, read_checkpoint, trained_conv
from mace_grid.conv import FastConvolution, set_conv, validate_conv
from mace_grid.data.io import read_atoms
from mace_grid.errors import ConfigError
from mace_grid.linear import StackedLinear
from mace_grid.model import build_model
from mace_grid.radial import RadialMLP

STATISTICS = dict(
    atomic_numbers=[1, 8],
    atomic_energies=[-1.0, -2.0],
    avg_num_neighbors=4.0,
    mean=0.1,
    std=0.7,
)


def mace_conv_tp(node_irreps: str, max_ell: int, channels: int) -> o3.TensorProduct:
    """The conv_tp mace's interaction blocks build for these irreps (see mace's blocks.py)."""
    sh = o3.Irreps.spherical_harmonics(max_ell)
    target = (sh * channels).sort()[0].simplify()
    mid, instructions = tp_out_irreps_with_instructions(o3.Irreps(node_irreps), sh, target)
    return o3.TensorProduct(
        node_irreps, sh, mid, instructions, shared_weights=False, internal_weights=False
    )


def random_graph(n_nodes: int, n_edges: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n_nodes, (2, n_edges), generator=gen)


@pytest.mark.parametrize("max_ell", [1, 2, 3])
@pytest.mark.parametrize("node_irreps", ["3x0e", "3x0e+3x1o", "3x0e+3x1o+3x2e"])
def test_messages_and_derivatives_match_e3nn(max_ell: int, node_irreps: str) -> None:
    """Summed messages, their gradients w.r.t. features, edge harmonics and radial weights, and
    the gradients of a function of those gradients (what force training differentiates)."""
    with default_dtype(torch.float64):
        tp = mace_conv_tp(node_irreps, max_ell, channels=3)
        fast = FastConvolution.like(tp)
    gen = torch.Generator().manual_seed(max_ell)
    n_nodes, n_edges = 5, 17
    edge_index = random_graph(n_nodes, n_edges, gen)
    x = torch.randn(n_nodes, tp.irreps_in1.dim, generator=gen, dtype=torch.float64)
    y = torch.randn(n_edges, tp.irreps_in2.dim, generator=gen, dtype=torch.float64)
    w = torch.randn(n_edges, tp.weight_numel, generator=gen, dtype=torch.float64)
    probe = torch.randn(n_nodes, tp.irreps_out.dim, generator=gen, dtype=torch.float64)

    def derivatives(conv) -> list[torch.Tensor]:
        inputs = [t.clone().requires_grad_(True) for t in (x, y, w)]
        out = conv(*inputs)
        first = torch.autograd.grad((out * probe).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), inputs)
        return [out, *first, *second]

    def reference(x, y, w):
        return scatter_sum(tp(x[edge_index[0]], y, w), edge_index[1], dim=0, dim_size=n_nodes)

    expected = derivatives(reference)
    got = derivatives(lambda x, y, w: fast(x, y, w, edge_index))
    assert expected[0].abs().max() > 0.1
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def molecule_batch(n_molecules: int = 2) -> dict[str, torch.Tensor]:
    """Random H/O clusters (6 atoms, within the cutoff of each other), float64."""
    from ase import Atoms

    rng = np.random.default_rng(0)
    graphs = []
    for _ in range(n_molecules):
        atoms = Atoms("H4O2", positions=rng.uniform(0, 2.5, size=(6, 3)))
        graphs.append(
            AtomicData.from_config(config_from_atoms(atoms), AtomicNumberTable([1, 8]), 3.0)
        )
    batch = next(iter(DataLoader(graphs, batch_size=n_molecules))).to_dict()
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def tiny_config(max_ell: int, interaction: str, first: str) -> dict:
    return dict(
        r_max=3.0,
        num_bessel=4,
        num_polynomial_cutoff=5,
        max_ell=max_ell,
        num_interactions=2,
        hidden_irreps="4x0e+4x1o",
        MLP_irreps="4x0e",
        correlation=2,
        radial_MLP=[8],
        gate="silu",
        interaction=interaction,
        interaction_first=first,
    )


def tiny_model(max_ell: int, interaction: str, first: str, conv: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        tiny_config(max_ell, interaction, first), {"name": "cg"}, STATISTICS, {"name": conv}
    )


def energy_forces_and_second_derivatives(model, batch) -> list[torch.Tensor]:
    """Energy, forces, d|F|^2/dpositions and d|F|^2/dparameters (a force-training gradient)."""
    data = dict(batch, positions=batch["positions"].clone())
    out = model(data, training=True, compute_force=True)
    force_norm = out["forces"].square().sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(force_norm, [data["positions"], *params], allow_unused=True)
    return [out["energy"], out["forces"], *(g for g in grads if g is not None)]


INTERACTIONS = [
    ("RealAgnosticResidualInteractionBlock", "RealAgnosticResidualInteractionBlock"),
    ("RealAgnosticInteractionBlock", "RealAgnosticInteractionBlock"),
    ("RealAgnosticResidualInteractionBlock", "RealAgnosticInteractionBlock"),
]


@pytest.mark.parametrize("max_ell", [1, 3])
@pytest.mark.parametrize(("interaction", "first"), INTERACTIONS)
def test_model_with_fast_conv_loads_e3nn_weights_and_matches(
    max_ell: int, interaction: str, first: str
) -> None:
    """A conv=fast model takes a conv=e3nn model's state_dict (same keys) and gives the same
    energies, forces and second derivatives; set_conv(..., "e3nn") gives mace's module back."""
    with default_dtype(torch.float64):
        stock = tiny_model(max_ell, interaction, first, "e3nn")
        fast = tiny_model(max_ell, interaction, first, "fast")
        torch.manual_seed(1)
        for p in stock.parameters():  # break mace's zero-initialised paths
            p.data.add_(0.1 * torch.randn_like(p))
        fast.load_state_dict(stock.state_dict())
    assert all(type(b.conv_tp) is FastConvolution for b in fast.interactions)
    assert all(type(b.linear) is StackedLinear for b in fast.interactions)
    assert all(b.linear_up.rows_out for b in fast.interactions)  # a StackedLinear, in rows
    assert all(b.conv_tp.reads_rows for b in fast.interactions)  # and the conv reads them so
    assert all(b.conv_tp.place is not None for b in fast.interactions)
    assert all(type(b.conv_tp_weights) is RadialMLP for b in fast.interactions)
    assert fast.state_dict().keys() == stock.state_dict().keys()
    batch = molecule_batch()
    expected = energy_forces_and_second_derivatives(stock, batch)
    got = energy_forces_and_second_derivatives(fast, batch)
    assert expected[1].abs().max() > 1e-3
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)

    back = copy.deepcopy(fast)
    weights = [(b.linear.weight, b.linear_up.weight) for b in back.interactions]
    back = set_conv(back, "e3nn")  # in place, on the same Parameters (an optimiser keeps them)
    for b, (w, w_up) in zip(back.interactions, weights, strict=True):
        assert b.linear.weight is w and b.linear_up.weight is w_up
    assert all(type(b.conv_tp) is o3.TensorProduct for b in back.interactions)
    assert all(not hasattr(b, "conv_fusion") for b in back.interactions)
    assert all(type(b.linear) is o3.Linear for b in back.interactions)
    assert all(type(b.linear_up) is o3.Linear for b in back.interactions)
    assert all(type(b.conv_tp_weights) is nn.FullyConnectedNet for b in back.interactions)
    torch.testing.assert_close(
        energy_forces_and_second_derivatives(back, batch)[1], expected[1], rtol=0, atol=1e-10
    )


def test_periodic_model_evaluates_the_radial_network_once_per_bond(monkeypatch) -> None:
    """In a small periodic H/O cell (every atom its own neighbour's image, several images per
    pair), conv=fast runs the radial network on one edge of each bond (half the edges) and
    gives mace's energies, forces and second derivatives."""
    from ase import Atoms

    import mace_grid.radial

    atoms = Atoms("HO", positions=[[0.1, 0, 0.05], [1.0, 1.2, 1.1]], cell=2.2 * np.eye(3))
    atoms.pbc = True
    graph = AtomicData.from_config(config_from_atoms(atoms), AtomicNumberTable([1, 8]), 3.0)
    batch = next(iter(DataLoader([graph], batch_size=1))).to_dict()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    with default_dtype(torch.float64):
        stock = tiny_model(3, *INTERACTIONS[0], "e3nn")
        fast = tiny_model(3, *INTERACTIONS[0], "fast")
        torch.manual_seed(1)
        for p in stock.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
        fast.load_state_dict(stock.state_dict())
    found = []
    bonds = mace_grid.radial.bonds
    monkeypatch.setattr(
        mace_grid.radial, "bonds", lambda *args: found.append(bonds(*args)) or found[-1]
    )
    expected = energy_forces_and_second_derivatives(stock, batch)
    got = energy_forces_and_second_derivatives(fast, batch)
    n_edges = batch["edge_index"].shape[1]
    assert len(found) == 2 and all(2 * len(first) == n_edges for first, _ in found)
    assert expected[1].abs().max() > 1e-3
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_checkpoint_evaluates_with_either_conv(tmp_path_factory) -> None:
    """The shared tiny run trained with the default conv=fast; MaceGridCalculator(conv="e3nn")
    (mace's own module on the same weights) gives the same energies and forces."""
    ckpt = best_checkpoint(trained_runs(tmp_path_factory)["grid"])
    assert trained_conv(read_checkpoint(ckpt)) == "fast"
    atoms = read_atoms(str(shared_root(tmp_path_factory) / "demo" / "test.db"), "test")[0]
    results = []
    for conv in ("e3nn", None):
        atoms.calc = MaceGridCalculator(ckpt, dtype="float64", conv=conv)
        results.append((atoms.get_potential_energy(), atoms.get_forces(apply_constraint=False)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-10)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-10)
    assert np.abs(results[0][1]).max() > 1e-3


def test_fast_conv_model_compiles_to_torchscript() -> None:
    with default_dtype(torch.float64):
        model = tiny_model(2, *INTERACTIONS[0], "fast")
    batch = molecule_batch()
    scripted = jit.compile(copy.deepcopy(model))
    ref = model(dict(batch), compute_force=True)
    out = scripted(dict(batch), compute_force=True)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], ref["forces"], rtol=0, atol=1e-10)


def test_training_with_fast_conv_lowers_the_loss() -> None:
    with default_dtype(torch.float64):
        model = tiny_model(2, *INTERACTIONS[0], "fast")
    batch = molecule_batch(3)
    target = torch.randn_like(batch["positions"], generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        out = model(dict(batch), training=True, compute_force=True)
        loss = (out["forces"] - target).square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_unsupported_interaction_and_unknown_conv_are_config_errors() -> None:
    model_cfg = {"interaction": "RealAgnosticDensityInteractionBlock"}
    model_cfg["interaction_first"] = model_cfg["interaction"]
    with pytest.raises(ConfigError, match="conv=fast does not support"):
        validate_conv("fast", model_cfg)
    validate_conv("e3nn", model_cfg)
    with pytest.raises(ConfigError, match="choose one of e3nn, fast"):
        validate_conv("cuda", model_cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_conv_on_cuda_matches_cpu() -> None:
    with default_dtype(torch.float64):
        tp = mace_conv_tp("3x0e+3x1o", 3, channels=3)
        fast = FastConvolution.like(tp)
    gen = torch.Generator().manual_seed(0)
    edge_index = random_graph(5, 17, gen)
    args = (
        torch.randn(5, tp.irreps_in1.dim, generator=gen, dtype=torch.float64),
        torch.randn(17, tp.irreps_in2.dim, generator=gen, dtype=torch.float64),
        torch.randn(17, tp.weight_numel, generator=gen, dtype=torch.float64),
        edge_index,
    )
    expected = fast(*args)
    got = fast.to("cuda")(*(a.cuda() for a in args))
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.interaction=RealAgnosticDensityInteractionBlock"], "conv=fast does not support"),
        (["conv.name=cuda"], "choose one of e3nn, fast"),
        (["compile=maybe"], "compile='maybe' must be true or false"),
    ],
)
def test_train_config_validation(overrides: list[str], message: str, tmp_path) -> None:
    from mace_grid.config import compose_config
    from mace_grid.train import validate_config

    cfg = compose_config("train", overrides, output_dir=str(tmp_path))
    assert cfg.conv.name == ("cuda" if "conv.name=cuda" in overrides else "fast")
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_compile_preparation_keeps_the_eager_state_dict() -> None:
    """compile=true with tp=cg: mace's fx simplification of its contraction drops the
    contraction's ``weights_*_zeroed`` flags unless kept; checkpoints load both ways."""
    from mace_grid.model import build_compiled_model

    eager = tiny_model(2, *INTERACTIONS[0], "fast")
    compiled = build_compiled_model(
        tiny_config(2, *INTERACTIONS[0]), {"name": "cg"}, STATISTICS, {"name": "fast"}
    )
    flags = [k for k in eager.state_dict() if k.endswith("_zeroed")]
    assert flags and set(compiled.state_dict()) == set(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    eager.load_state_dict(compiled.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["e3nn", "fast"])
def test_compiled_model_matches_eager_training_step(conv: str) -> None:
    """compile=true: mace's compile preparation + torch.compile, forces and parameter gradients
    of a force loss as in eager mode (compiling takes minutes on a CPU)."""
    from mace_grid.model import build_compiled_model

    with default_dtype(torch.float64):
        eager = tiny_model(2, *INTERACTIONS[0], conv)
        compiled = build_compiled_model(
            tiny_config(2, *INTERACTIONS[0]), {"name": "cg"}, STATISTICS, {"name": conv}
        )
    assert set(compiled.state_dict()) == set(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    batch = molecule_batch()
    results = []
    for model in (eager, compiled):
        data = dict(batch, positions=batch["positions"].clone().requires_grad_(True))
        out = model(data, training=True, compute_force=True)
        loss = out["forces"].square().sum() + out["energy"].square().sum()
        params = [p for p in model.parameters() if p.requires_grad]
        results.append([out["forces"], *torch.autograd.grad(loss, params, allow_unused=True)])
    for e, g in zip(*results, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


class GhostExchange:
    """What LAMMPS's ML-IAP data object does for mace's ``LAMMPS_MP``: each ghost atom takes its
    owner's features (forward) and gives its gradient back to the owner (reverse), on per-atom
    vectors of ``vec_len`` numbers."""

    def __init__(self, owner: torch.Tensor) -> None:
        self.owner = owner

    def _atoms(self, t: torch.Tensor, vec_len: int) -> torch.Tensor:
        assert t.numel() == len(self.owner) * vec_len, "features are not one vector per atom"
        return t.view(len(self.owner), vec_len)

    def forward_exchange(self, feats, out, vec_len: int) -> None:
        self._atoms(out, vec_len).copy_(self._atoms(feats, vec_len)[self.owner])

    def reverse_exchange(self, grad, gout, vec_len: int) -> None:
        gout.zero_()
        self._atoms(gout, vec_len).index_add_(0, self.owner, self._atoms(grad, vec_len))


def mliap_batch(atoms, z_table: list[int], r_max: float) -> dict:
    """mace's ML-IAP input for periodic ``atoms`` (as ``LAMMPS_MLIAP_MACE._prepare_batch``
    builds it): local atoms, then one ghost per periodic image within r_max of them; pairs
    (sender j, local receiver i) with their vectors."""
    from ase.neighborlist import neighbor_list

    i, j, shifts = neighbor_list("ijS", atoms, r_max)
    n = len(atoms)
    images = {}
    senders = []
    for jj, s in zip(j, map(tuple, shifts), strict=True):
        if any(s):
            images.setdefault((jj, s), n + len(images))
        senders.append(images[jj, s] if any(s) else jj)
    owner = torch.tensor(list(range(n)) + [jj for jj, _ in images])
    vectors = atoms.positions[j] + shifts @ atoms.cell.array - atoms.positions[i]
    species = torch.tensor([z_table.index(z) for z in atoms.numbers])[owner]
    return {
        "vectors": torch.tensor(vectors),
        "node_attrs": torch.nn.functional.one_hot(species, len(z_table)).double(),
        "edge_index": torch.tensor(np.stack([senders, i])),
        "batch": torch.zeros(n, dtype=torch.long),
        "lammps_class": GhostExchange(owner),
        "natoms": (n, len(images)),
    }


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_lammps_mliap_wrapper_with_fast_conv_matches_mace(interaction) -> None:
    """LAMMPS's ML-IAP interface runs the Python model (eager) on local and ghost atoms,
    exchanging ghost features between layers, and takes per-pair f_ij = dE/dr_ij (r_ij = x_j -
    x_i), which it adds to atom i's force and subtracts from j's, ghosts' to their owners, and
    tallies as the virial sum r_ij f_ij. conv=fast gives mace's own conv's energies, atom
    forces and virial, and they are the calculator's (forces from positions) for the periodic
    structure. Its pair forces differ: the radial network runs once per bond, so the length's
    derivative lands on one of the bond's two pairs (the same force on each atom, the same
    virial)."""
    from ase import Atoms
    from mace.calculators.lammps_mliap_mace import MACEEdgeForcesWrapper

    rng = np.random.default_rng(3)
    atoms = Atoms("H4O2", positions=rng.uniform(0, 3.2, (6, 3)), cell=[3.2] * 3, pbc=True)
    with default_dtype(torch.float64):
        fast = tiny_model(2, *interaction, "fast")
        stock = set_conv(copy.deepcopy(fast), "e3nn")
    results = []
    for model in (fast, stock):
        batch = mliap_batch(atoms, [1, 8], 3.0)
        energy, node_energy, pair_forces = MACEEdgeForcesWrapper(model)(batch)
        senders, receivers = batch["edge_index"]
        forces = torch.zeros(len(batch["lammps_class"].owner), 3, dtype=torch.float64)
        forces.index_add_(0, receivers, pair_forces).index_add_(0, senders, -pair_forces)
        local = torch.zeros(len(atoms), 3, dtype=torch.float64)
        local.index_add_(0, batch["lammps_class"].owner, forces)
        virial = batch["vectors"].detach().T @ pair_forces
        results.append((energy, node_energy, local, virial))
    assert results[0][2].abs().max() > 1e-2
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    with default_dtype(torch.float64):
        data = AtomicData.from_config(config_from_atoms(atoms), AtomicNumberTable([1, 8]), 3.0)
    reference = stock(next(iter(DataLoader([data], batch_size=1))).to_dict(), compute_force=True)
    torch.testing.assert_close(results[0][0], reference["energy"][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(results[0][2], reference["forces"], rtol=0, atol=1e-10)
