"""The fused conv=fast kernel (`mace_grid.conv_kernel`), float64, both implementations (the C++
CPU kernel and the blocked PyTorch one): gradcheck and gradgradcheck of its autograd Function
(over several edge blocks), whole models against mace's own ``conv_tp`` (conv=e3nn) with both
interaction blocks at max_ell 1-3 and hidden L 0-2, and graphs with an isolated node, a single
edge and no edge."""

import itertools
import logging

import pytest
import torch
from _helpers import one_thread, require_cpp, threads_set  # noqa: F401
from mace.tools.scatter import scatter_sum
from mace.tools.torch_tools import default_dtype
from test_conv import (
    STATISTICS,
    energy_forces_and_second_derivatives,
    mace_conv_tp,
    molecule_batch,
    random_graph,
)
from torch.utils import cpp_extension

import mace_grid.conv
from mace_grid import conv_kernel
from mace_grid.conv import FastConvolution
from mace_grid.lit_module import backward_to_parameters
from mace_grid.model import build_model
from mace_grid.tp.work import count_work


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the calls of the fused kernel (so a test knows the eager path ran it)."""
    counted = []
    convolve = conv_kernel.convolve

    def counting(*args):
        counted.append(1)
        return convolve(*args)

    monkeypatch.setattr(mace_grid.conv, "convolve", counting)
    return counted


@pytest.fixture(params=["cpp", "pytorch"])
def kernel(request, monkeypatch) -> str:
    """Runs the test with the C++ kernel and with the PyTorch one (no compiler), and checks
    that the chosen one ran."""
    if request.param == "cpp":
        require_cpp(conv_kernel.native)
        function = conv_kernel._NativeConv
    else:
        monkeypatch.setattr(conv_kernel, "native", lambda: None)
        function = conv_kernel._Conv
    ran = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: ran.append(1) or apply(*args))
    yield request.param
    assert ran, f"the {request.param} kernel did not run"


def test_without_a_compiler_the_pytorch_kernel_runs(monkeypatch, caplog) -> None:
    """A failed build is one warning and ``native() is None`` (convolve then runs PyTorch ops)."""

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'mace_grid_conv'\n[1/2] c++: not found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    conv_kernel.native.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mace_grid.native"):
            assert conv_kernel.native() is None
        assert caplog.messages == [
            "conv=fast: the C++ CPU kernel could not be built (Error building extension "
            "'mace_grid_conv'); using PyTorch ops"
        ]
    finally:
        conv_kernel.native.cache_clear()


@pytest.mark.parametrize("bonded", [False, True])
@pytest.mark.parametrize(
    "kernel, small_blocks",
    [("cpp", False), ("pytorch", False), ("pytorch", True)],
    indirect=["kernel"],
)
def test_kernel_gradcheck_and_gradgradcheck(
    small_blocks: bool, kernel: str, bonded: bool, monkeypatch
) -> None:
    """First and second derivatives of the Function against finite differences, one block or
    blocks of 3 edges (edges unsorted, node 4 without incoming edges), each edge its own
    radial weights or edges sharing rows (``bond``: two bonds of two edges, two of one)."""
    if small_blocks:
        monkeypatch.setattr(conv_kernel, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(conv_kernel, "_MIN_BLOCK", 3)
    with default_dtype(torch.float64):
        fast = FastConvolution.like(mace_conv_tp("2x0e+2x1o", 1, channels=2))
    groups = conv_kernel.groups_of(fast.group_dims, fast.group_rows, fast.group_in)
    senders = torch.tensor([0, 4, 1, 2, 0, 3])
    receivers = torch.tensor([1, 0, 3, 1, 3, 1])
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    bond = torch.tensor([0, 1, 2, 0, 3, 1]) if bonded else None
    x = rand(5, fast.d_in, 2)
    a = rand(len(senders), fast.cg.shape[1])
    r = rand(4 if bonded else len(senders), fast.num_paths, 2)

    def conv(x, a, r):
        return conv_kernel.convolve(x, a, r, senders, receivers, fast.row_path, groups, bond)

    assert torch.autograd.gradcheck(conv, (x, a, r))
    assert torch.autograd.gradgradcheck(conv, (x, a, r))


def reference(tp):
    """mace's convolution: gather, e3nn's TensorProduct, scatter_sum."""

    def conv(x, y, w, edge_index):
        messages = tp(x[edge_index[0]], y, w)
        return scatter_sum(messages, edge_index[1], dim=0, dim_size=x.shape[0])

    return conv


def random_inputs(tp, n_nodes: int, n_edges: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Float64 node features, edge harmonics, radial weights and a probe of the messages."""
    shapes = [
        (n_nodes, tp.irreps_in1.dim),
        (n_edges, tp.irreps_in2.dim),
        (n_edges, tp.weight_numel),
        (n_nodes, tp.irreps_out.dim),
    ]
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def derivatives(conv, x, y, w, edge_index, probe) -> list[torch.Tensor]:
    """Messages, their gradients and the gradients of a function of those (zeros where the
    graph has no edge to depend on)."""
    inputs = [t.clone().requires_grad_(True) for t in (x, y, w)]
    out = conv(*inputs, edge_index)
    first = torch.autograd.grad((out * probe).sum(), inputs, create_graph=True)
    norm = sum(g.square().sum() for g in first)
    second = [None] * 3
    if norm.requires_grad:
        second = torch.autograd.grad(norm, inputs, allow_unused=True)
    return [
        out.detach(),
        *(g.detach() for g in first),
        *(torch.zeros_like(t) if g is None else g for g, t in zip(second, inputs, strict=True)),
    ]


GRAPHS = {
    "isolated node": torch.tensor([[0, 1, 2, 2, 3, 0], [1, 0, 1, 3, 2, 2]]),  # 4: no edge
    "single edge": torch.tensor([[2], [0]]),
    "no edge": torch.zeros(2, 0, dtype=torch.long),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_edge_cases_match_e3nn(graph: str, kernel: str, calls: list[int]) -> None:
    with default_dtype(torch.float64):
        tp = mace_conv_tp("2x0e+2x1o+2x2e", 2, channels=2)
        fast = FastConvolution.like(tp)
    edge_index = GRAPHS[graph]
    n_nodes, n_edges = 5, edge_index.shape[1]
    gen = torch.Generator().manual_seed(1)
    x, y, w, probe = random_inputs(tp, n_nodes, n_edges, gen)
    expected = derivatives(reference(tp), x, y, w, edge_index, probe)
    got = derivatives(fast, x, y, w, edge_index, probe)
    assert calls
    if n_edges:
        assert expected[0].abs().max() > 0.1
    for e, g in zip(expected, got, strict=True):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    if graph == "isolated node":
        assert got[0][4].abs().max() == 0 and got[1][4].abs().max() == 0


HIDDEN = ["2x0e", "2x0e+2x1o", "2x0e+2x1o+2x2e"]  # hidden L = 0, 1, 2
BLOCKS = ["RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock"]


def tiny_config(max_ell: int, hidden_l: int) -> dict:
    """Two interactions, both blocks: which comes first alternates with max_ell + hidden_l."""
    return dict(
        r_max=3.0,
        num_bessel=3,
        num_polynomial_cutoff=5,
        max_ell=max_ell,
        num_interactions=2,
        hidden_irreps=HIDDEN[hidden_l],
        MLP_irreps="2x0e",
        correlation=2,
        radial_MLP=[4],
        gate="silu",
        interaction=BLOCKS[(max_ell + hidden_l) % 2],
        interaction_first=BLOCKS[(max_ell + hidden_l + 1) % 2],
    )


@pytest.mark.parametrize("hidden_l", [0, 1, 2])
@pytest.mark.parametrize("max_ell", [1, 2, 3])
def test_models_match_mace_conv(max_ell: int, hidden_l: int, kernel: str, calls) -> None:
    """Energies, forces and the parameter gradients of a force loss (second derivatives) of a
    conv=fast model equal those of the same weights with mace's conv_tp (conv=e3nn). Every
    model has both blocks, one first (scalar inputs) and one second (hidden L inputs),
    alternating, so each block meets every max_ell and every hidden L."""
    config = tiny_config(max_ell, hidden_l)
    models = {}
    with default_dtype(torch.float64):
        for conv in ("e3nn", "fast"):
            torch.manual_seed(0)
            models[conv] = build_model(config, {"name": "cg"}, STATISTICS, {"name": conv})
        torch.manual_seed(1)
        for p in models["e3nn"].parameters():  # break mace's zero-initialised paths
            p.data.add_(0.1 * torch.randn_like(p))
        models["fast"].load_state_dict(models["e3nn"].state_dict())
    batch = molecule_batch()
    expected = energy_forces_and_second_derivatives(models["e3nn"], batch)
    assert not calls
    got = energy_forces_and_second_derivatives(models["fast"], batch)
    assert len(calls) == 2  # both interactions ran the kernel
    assert expected[1].abs().max() > 1e-3
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_backward_to_parameters_asks_the_kernel_for_less(kernel: str, monkeypatch) -> None:
    """Training's backward (`backward_to_parameters`) gives a plain ``loss.backward()``'s
    parameter gradients and leaves the positions alone, and the kernel's derivative passes
    skip what nobody reads: the force pass wants no d/dx of the first layer (the node
    embedding does not depend on the positions), the backward to the parameters no d/da (the
    edge harmonics depend on nothing else); a plain backward wants everything."""
    vjp = conv_kernel._NativeConvVJP if kernel == "cpp" else conv_kernel._ConvVJP
    wants = []
    apply = vjp.apply
    monkeypatch.setattr(vjp, "apply", lambda *args: wants.append(args[-1]) or apply(*args))
    with default_dtype(torch.float64):
        torch.manual_seed(0)
        model = build_model(tiny_config(2, 1), {"name": "cg"}, STATISTICS, {"name": "fast"})
    batch = molecule_batch()
    grads, positions = {}, {}
    for how in ("plain", "parameters"):
        model.zero_grad(set_to_none=True)
        data = dict(batch, positions=batch["positions"].clone().requires_grad_())
        wants.clear()
        out = model(data, training=True, compute_force=True)
        assert [want[0] for want in wants] == [True, False]  # second layer first
        loss = out["energy"].square().sum() + (out["forces"] - 1).square().sum()
        wants.clear()
        if how == "plain":
            loss.backward()
        else:
            backward_to_parameters(loss, model)
        assert len(wants) == 2 and all(want[1] == (how == "plain") for want in wants)
        grads[how] = [p.grad for p in model.parameters()]
        positions[how] = data["positions"].grad
    assert positions["plain"] is not None and positions["parameters"] is None
    for g, e in zip(grads["parameters"], grads["plain"], strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_random_graph_messages_match_e3nn_over_blocks(kernel: str, monkeypatch) -> None:
    """A random graph with repeated receivers and senders (sorted once per call); the PyTorch
    kernel in many blocks of 4 edges."""
    monkeypatch.setattr(conv_kernel, "_BLOCK_BYTES", 1)
    monkeypatch.setattr(conv_kernel, "_MIN_BLOCK", 4)
    with default_dtype(torch.float64):
        tp = mace_conv_tp("3x0e+3x1o+3x2e", 3, channels=3)
        fast = FastConvolution.like(tp)
    gen = torch.Generator().manual_seed(2)
    edge_index = random_graph(6, 23, gen)
    x, y, w, probe = random_inputs(tp, 6, 23, gen)
    expected = derivatives(reference(tp), x, y, w, edge_index, probe)
    got = derivatives(fast, x, y, w, edge_index, probe)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_fed_messages_come_in_the_given_rows_layout(kernel: str) -> None:
    """After ``feed(rows)`` the messages come as [nodes, rows, channels], row q being
    irreps_out's (irrep, m) row rows[q]: read back into e3nn's layout by plain indexing, they
    and their first and second derivatives are mace's; ``feed(None)`` restores e3nn's layout."""
    with default_dtype(torch.float64):
        tp = mace_conv_tp("3x0e+3x1o+3x2e", 3, channels=3)
        fast = FastConvolution.like(tp)
    gen = torch.Generator().manual_seed(4)
    rows = torch.randperm(fast.d_out, generator=gen).tolist()
    fast.feed(rows)
    n_nodes, channels = 6, 3
    # e3nn's column (irrep k, channel u, m) holds row (k, m), at place rows.index(first_k + m)
    columns, first = [], 0
    for _, ir in tp.irreps_out:
        columns += [
            rows.index(first + m) * channels + u for u in range(channels) for m in range(ir.dim)
        ]
        first += ir.dim
    columns = torch.tensor(columns)

    def fed(x, y, w, edge_index):
        out = fast(x, y, w, edge_index)
        assert out.shape == (n_nodes, fast.d_out, channels)
        return out.reshape(n_nodes, -1)[:, columns]

    edge_index = random_graph(n_nodes, 23, gen)
    x, y, w, probe = random_inputs(tp, n_nodes, 23, gen)
    expected = derivatives(reference(tp), x, y, w, edge_index, probe)
    for e, g in zip(expected, derivatives(fed, x, y, w, edge_index, probe), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    fast.feed(None)
    torch.testing.assert_close(fast(x, y, w, edge_index), expected[0], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="not a permutation"):
        fast.feed(rows[:-1] + rows[:1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_on_cuda_matches_cpu(calls) -> None:
    """The same Python kernel on CUDA (one block): messages, first and second derivatives."""
    with default_dtype(torch.float64):
        fast = FastConvolution.like(mace_conv_tp("3x0e+3x1o+3x2e", 3, channels=3))
    gen = torch.Generator().manual_seed(3)
    edge_index = random_graph(6, 23, gen)
    x, y, w, probe = random_inputs(fast, 6, 23, gen)
    expected = derivatives(fast, x, y, w, edge_index, probe)
    args = (t.cuda() for t in (x, y, w, edge_index, probe))
    got = derivatives(fast.to("cuda"), *args)
    assert len(calls) == 2
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g.cpu(), e, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_kernel_threads_match_e3nn(dtype: torch.dtype) -> None:
    """The C++ kernel's passes split the nodes across 3 threads (each node written by one), at
    a channel count with full vector blocks and a remainder (18: 2 x 8 doubles + 2, 16 floats
    + 2): messages and first and second derivatives equal mace's in float64 on 200 nodes and
    1500 edges (float32: to its rounding)."""
    require_cpp(conv_kernel.native)
    with default_dtype(torch.float64):
        tp = mace_conv_tp("18x0e+18x1o+18x2e", 3, channels=18)
    with default_dtype(dtype):
        fast = FastConvolution.like(tp)
    gen = torch.Generator().manual_seed(4)
    edge_index = random_graph(200, 1500, gen)
    x, y, w, probe = random_inputs(tp, 200, 1500, gen)
    expected = derivatives(reference(tp), x, y, w, edge_index, probe)
    with threads_set(3):
        args = (t.to(dtype) for t in (x, y, w))
        got = derivatives(fast, *args, edge_index, probe.to(dtype))
    for e, g in zip(expected, got, strict=True):
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
        else:
            torch.testing.assert_close(g.double(), e, rtol=0, atol=1e-5 * e.abs().max().item())


def test_cpp_kernel_reports_its_work() -> None:
    """The C++ ops are visible to `count_work`: the forward is one pass of per-edge matvecs
    (2 E C K flop, K the columns of the edge matrices) writing [n, rows, C]; a VJP of x, a and
    r three such passes writing the three gradients."""
    require_cpp(conv_kernel.native)
    with default_dtype(torch.float64):
        fast = FastConvolution.like(mace_conv_tp("3x0e+3x1o", 2, channels=3))
    groups = conv_kernel.groups_of(fast.group_dims, fast.group_rows, fast.group_in)
    gen = torch.Generator().manual_seed(5)
    senders, receivers = random_graph(4, 9, gen)
    x = torch.randn(4, fast.d_in, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(9, fast.cg.shape[1], dtype=torch.float64, requires_grad=True)
    r = torch.randn(9, fast.num_paths, 3, dtype=torch.float64, requires_grad=True)

    def conv():
        return conv_kernel.convolve(x, a, r, senders, receivers, fast.row_path, groups)

    matvecs = 2 * 9 * fast.cg.shape[1] * 3
    forward = count_work(conv)
    assert (forward.matmul_flop, forward.pointwise) == (matvecs, 4 * fast.d_out * 3)
    out = conv()
    vjp = count_work(lambda: torch.autograd.grad(out.sum(), (x, a, r), retain_graph=True))
    assert vjp.matmul_flop == 3 * matvecs
    assert vjp.pointwise >= x.numel() + a.numel() + r.numel()


def test_cpp_kernel_refuses_nodes_out_of_range() -> None:
    """An edge to or from a node that does not exist is an error, not a read out of bounds."""
    require_cpp(conv_kernel.native)
    with default_dtype(torch.float64):
        fast = FastConvolution.like(mace_conv_tp("2x0e+2x1o", 1, channels=2))
    x = torch.randn(3, fast.irreps_in1.dim, dtype=torch.float64)
    y = torch.randn(2, fast.irreps_in2.dim, dtype=torch.float64)
    w = torch.randn(2, fast.weight_numel, dtype=torch.float64)
    for edge_index in (torch.tensor([[0, 3], [1, 2]]), torch.tensor([[0, 1], [1, 5]])):
        with pytest.raises(ValueError, match="refers to node"):
            fast(x, y, w, edge_index)


def test_cpp_ops_refuse_inconsistent_tables() -> None:
    """The C++ ops check the shapes they index with (a rows table outside x or a, edge orders
    of another size) and raise instead of reading out of bounds."""
    require_cpp(conv_kernel.native)
    ops = conv_kernel.native()
    x, a, r = torch.randn(3, 4, 2), torch.randn(2, 4), torch.randn(2, 1, 2)
    senders, bond = torch.tensor([0, 1]), torch.tensor([0, 1])
    order, ptr = conv_kernel._csr(torch.tensor([1, 2]), 3)
    rows = torch.tensor([[0, 1, 0, 0, 1], [1, 3, 1, 0, 0]])  # columns 0 and 1..3 of x and a
    assert ops.forward(x, a, r, senders, order, ptr, rows, bond).shape == (3, 2, 2)
    with pytest.raises(RuntimeError, match="rows table outside"):
        ops.forward(x, a, r, senders, order, ptr, torch.tensor([[2, 3, 1, 0, 0]]), bond)
    with pytest.raises(RuntimeError, match="row path"):
        ops.forward(x, a, r, senders, order, ptr, torch.tensor([[0, 1, 0, 1, 0]]), bond)
    for places in ([1, 1], [0, 2]):  # two rows in one place, a place outside out
        with pytest.raises(RuntimeError, match="not a permutation"):
            bad = torch.cat([rows[:, :4], torch.tensor(places)[:, None]], 1)
            ops.forward(x, a, r, senders, order, ptr, bad, bond)
    with pytest.raises(RuntimeError, match="edge tensors disagree"):
        ops.forward(x, a, r, senders, order, ptr[:-1], rows, bond)
    with pytest.raises(RuntimeError, match="bond tensors disagree"):
        ops.forward(x, a, r, senders, order, ptr, rows, bond[:1])
    with pytest.raises(RuntimeError, match="bond tensors disagree"):  # more rows than edges
        ops.forward(x, a, torch.randn(3, 1, 2), senders, order, ptr, rows, bond)


def table_convolution(rows: torch.Tensor, senders, receivers, n_nodes: int):
    """The messages from the C++ ops' rows table (s, d, ac, k, q per output row o), by plain
    PyTorch (an independent reference): out[i, q] = sum over e = j -> i of
    r[e, k] * (a[e, ac : ac + d] @ x[j, s : s + d])."""

    def conv(x, a, r):
        out = {}
        for s, d, ac, k, q in rows.tolist():
            ax = torch.einsum("em,emc->ec", a[:, ac : ac + d], x[senders, s : s + d])
            out[q] = scatter_sum(r[:, k] * ax, receivers, dim=0, dim_size=n_nodes)
        return torch.stack([out[q] for q in range(len(out))], 1)

    return conv


@pytest.mark.parametrize(
    ("channels", "bonded", "threads", "placed"),
    [
        (8, False, 1, False),
        (11, False, 1, True),
        (8, True, 1, False),
        (11, True, 1, True),
        (11, True, 3, True),
    ],
)
def test_cpp_vjp_and_tangent_ops_match_autograd(
    channels: int, bonded: bool, threads: int, placed: bool
) -> None:
    """The C++ ``vjp`` for every subset of wanted gradients, and ``vjp_tangent`` for every
    subset of given tangents (v_x, v_a, v_r) and of needed outputs, equal torch.func's VJP and
    its forward-mode derivative of a plain-PyTorch convolution, in float64, at a channel count
    of whole vectors (8) and one with a remainder (11); with each edge its own radial weights,
    or rows shared by bonds of one to four edges (the reference gathers them); on one thread,
    and on three over a graph large enough to split (each thread's copy of d/dx, d/dr per edge
    then per bond); output rows in group order, or shuffled (``place``)."""
    require_cpp(conv_kernel.native)
    ops = conv_kernel.native()
    with default_dtype(torch.float64):
        fast = FastConvolution.like(mace_conv_tp("3x0e+3x1o+3x2e", 2, channels=channels))
    groups = conv_kernel.groups_of(fast.group_dims, fast.group_rows, fast.group_in)
    gen = torch.Generator().manual_seed(6)
    n_nodes, n_edges = (7, 30) if threads == 1 else (60, 240)
    senders, receivers = random_graph(n_nodes, n_edges, gen)
    n_bonds = n_edges * 17 // 30 if bonded else n_edges
    bond = torch.arange(n_edges) % n_bonds
    if bonded:
        bond[3], bond[29] = 5, 5  # bond 5: four edges; 3 and 12: one
        bond = bond[torch.randperm(n_edges, generator=gen)]
    place = torch.randperm(len(fast.row_path), generator=gen) if placed else None
    graph = conv_kernel._graph(
        senders, receivers, n_nodes, fast.row_path, groups, bond, n_bonds, place
    )
    edges = graph.senders, graph.receivers
    order = graph.recv_order, graph.recv_ptr
    bonds = graph.bond, graph.bond_order, graph.bond_ptr
    per_edge = table_convolution(graph.rows, senders, receivers, n_nodes)

    def reference(x, a, r):
        return per_edge(x, a, r[bond])

    shapes = [
        (n_nodes, fast.d_in, channels),
        (n_edges, fast.cg.shape[1]),
        (n_bonds, fast.num_paths, channels),
    ]
    x, a, r = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in shapes)
    grad = torch.randn(n_nodes, graph.rows.shape[0], channels, generator=gen, dtype=torch.float64)
    v = [torch.randn_like(t) for t in (x, a, r)]

    def vjp_and_out(x, a, r):
        out, pullback = torch.func.vjp(reference, x, a, r)
        return (*pullback(grad), out)

    expected_vjp = vjp_and_out(x, a, r)[:3]
    for want in itertools.product([False, True], repeat=3):
        with threads_set(threads):
            got = ops.vjp(x, a, r, grad, *edges, graph.rows, *want, *bonds)
        for w, g, e in zip(want, got, expected_vjp, strict=True):
            if w:
                torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    for given in itertools.product([False, True], repeat=3):
        if not any(given):
            continue
        tangents = [t if g else torch.zeros_like(t) for t, g in zip(v, given, strict=True)]
        _, expected = torch.func.jvp(vjp_and_out, (x, a, r), tuple(tangents))
        vs = [t if g else None for t, g in zip(v, given, strict=True)]
        for need in [(True,) * 4, *(tuple(k == q for k in range(4)) for q in range(4))]:
            with threads_set(threads):
                got = ops.vjp_tangent(
                    x, a, r, grad, *vs, graph.senders, *order, graph.rows, *need, *bonds
                )
            for n, g, e in zip(need, got, expected, strict=True):
                if n:
                    torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=f"{given} {need}")
