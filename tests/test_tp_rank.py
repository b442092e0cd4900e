"""tp=grid_rank and tp=grid_chain: equivariance, reach (Jacobian rank) against cg, the grid
function at init, both fused kernels' derivatives (the C++ CPU kernel and the blocked PyTorch
one) against plain autograd, TorchScript, training, refusals."""

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import csv
import json
import logging

import pytest
import torch
from _helpers import require_cpp, threads_set, trained_runs
from e3nn import o3
from test_tp import (
    assert_script_round_trip,
    assert_scripted_model_matches,
    default_dtype,
    inputs,
    make,
    natural,
    relative_error,
    run_expressivity_script,
    training_step,
)

from mace_grid.errors import ConfigError
from mace_grid.tp import build, expressivity, grid_rank, rank_kernel, sphere
from mace_grid.tp.engine import PointSet
from mace_grid.tp.grid import gauss_legendre_points
from mace_grid.tp.grid_chain import chain_degree
from mace_grid.tp.work import count_work

F64 = torch.float64
NEW = ["grid_rank", "grid_chain"]


def plain_ops(module):
    """Run ``module`` through its plain-ops TorchScript path in eager mode (the reference)."""
    module.project_powers = lambda features, node_attrs=None: module._project_autograd(
        features, module.node_species(node_attrs)
    )
    return module


@pytest.fixture(params=["cpp", "pytorch"])
def kernel(request, monkeypatch) -> str:
    """Runs the test with the C++ kernel and with the PyTorch one (as without a compiler), and
    checks that the chosen one ran."""
    if request.param == "cpp":
        require_cpp(rank_kernel.native)
        function = rank_kernel._Rank
    else:
        monkeypatch.setattr(rank_kernel, "native", lambda: None)
        function = grid_rank._RankProduct
    ran = []
    apply = function.apply
    monkeypatch.setattr(function, "apply", lambda *args: ran.append(1) or apply(*args))
    yield request.param
    assert ran, f"the {request.param} kernel did not run"


def randomise(module, seed=3):
    """Generic weights: every rank's output, factor and round-trip weights nonzero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize(
    "correlation,l_in", [(c, l) for c in (1, 2, 3, 4) for l in (1, 2, 3, 4)] + [(5, 2), (6, 1)]
)
@pytest.mark.parametrize("name", NEW)
def test_equivariant_under_rotations_and_inversion(name, correlation, l_in):
    irreps_in, irreps_out = natural(2, range(l_in + 1)), natural(2, [0, 1, 2])
    module = randomise(make(name, irreps_in, irreps_out, correlation, 2, rank=2))
    x, attrs = inputs(3, 2, l_in, 2)
    y = module(x, attrs)
    assert y.abs().max() > 1e-3
    torch.manual_seed(l_in * 10 + correlation)
    rotation = o3.rand_matrix(dtype=F64)
    for matrix in (rotation, -rotation):  # -R: rotation times inversion
        d_in = natural(1, range(l_in + 1)).D_from_matrix(matrix)
        rotated = module(x @ d_in.T, attrs)
        assert relative_error(rotated, y @ irreps_out.D_from_matrix(matrix).T) < 1e-10


def test_a_grid_one_degree_short_breaks_equivariance():
    """The sizing is tested, not assumed: the chain's grid integrates exactly the degree it
    needs (corr L_in + L_out, which covers 2 L_in + K and K + L_in + L_out), and no less works."""
    l_in, l_out = 3, 2
    k = chain_degree(l_in, 3, l_out)
    module = randomise(make("grid_chain", natural(1, range(4)), natural(1, [0, 2]), 3, 1))
    assert k == l_in + l_out and module.trip_degree == k
    assert module.degree == 3 * l_in + l_out >= max(2 * l_in + k, k + l_in + l_out)
    x, attrs = inputs(4, 1, l_in, 1)
    rotation = o3.rand_matrix(dtype=F64)
    d_in = natural(1, range(4)).D_from_matrix(rotation)
    d_out = module.irreps_out.D_from_matrix(rotation)

    def error():
        return relative_error(module(x @ d_in.T, attrs), module(x, attrs) @ d_out.T)

    assert error() < 1e-10
    n_beta, n_alpha = module.n_beta, module.degree  # exact to degree - 1 in alpha
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sphere, "grid_resolution", lambda *_: (n_beta, n_alpha))
        module.points = PointSet(l_in, 3, *gauss_legendre_points(l_in, 3, [0, 2]))
    module.n_alpha = n_alpha
    module.build_maps(n_beta, n_alpha)  # the round trip's maps on the same short grid
    assert module.points.n_points == n_beta * n_alpha
    assert error() > 1e-6


def test_round_trip_keeps_every_degree_that_couples_and_only_those():
    """With d = 1 the chain is grid_rank (what K cuts off cannot reach L_out), and the weight of
    the top degree K changes the output (K is not too small)."""
    irreps_in, irreps_out = natural(2, range(3)), natural(2, [0, 1])
    chain = randomise(make("grid_chain", irreps_in, irreps_out, 3, 2))
    rank = make("grid_rank", irreps_in, irreps_out, 3, 2)
    rank.load_state_dict({k: v for k, v in chain.state_dict().items() if k != "trip"})
    x, attrs = inputs(5, 2, 2, 2)
    with torch.no_grad():
        chain.trip.fill_(1.0)
        assert relative_error(chain(x, attrs), rank(x, attrs)) < 1e-12
        chain.trip[:, -1] = 0.5
        assert relative_error(chain(x, attrs), rank(x, attrs)) > 1e-3


# --- reach: the rank of d(output)/d(weights) over many inputs, at a generic weight point ----


def jacobian_rank(name, l_in, l_out, correlation, **options) -> int:
    """Independent couplings per (element, channel), measured here independently of
    `expressivity`: rank of the weight Jacobian of a 1-channel, 1-element block at other random
    weights, stacked over other random inputs."""
    irreps_in, irreps_out = natural(1, range(l_in + 1)), natural(1, l_out)
    module = make(name, irreps_in, irreps_out, correlation, 1, **options)
    params = dict(randomise(module).named_parameters())
    count = sum(p.numel() for p in params.values())
    samples = 2 * count // irreps_out.dim + 4
    x, attrs = inputs(samples, 1, l_in, 1, seed=5)
    rows = []
    for i in range(samples * irreps_out.dim):
        y = module(x, attrs).reshape(-1)[i]
        grads = torch.autograd.grad(y, list(params.values()), allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads if g is not None]))
    s = torch.linalg.svdvals(torch.stack(rows))
    return int((s > 1e-9 * s[0]).sum())


def reach(name, l_in, l_out, **options):
    return expressivity(name, natural(1, range(l_in + 1)), natural(1, l_out), 3, **options)


@pytest.mark.parametrize("l_in", [1, 2, 3])
@pytest.mark.parametrize("l_out", [[0], [0, 1]])
def test_grid_chain_reaches_the_complete_space(l_in, l_out):
    expr = reach("grid_chain", l_in, l_out)  # complete: counted by characters, not by a backend
    assert expr.independent == expr.complete


def test_grid_rank_reach_at_l_in_3():
    """Rank 2: all 13 couplings of a scalar block, 26 of 29 for 0e+1o (the three nu = 3 -> 1o
    maps it misses need the chain's intermediate weights); rank 1 already reaches 12 and 15."""
    assert reach("grid_rank", 3, [0], rank=2)[1:] == (13, 13)
    assert reach("grid_rank", 3, [0, 1], rank=2).complete == 29
    assert reach("grid_rank", 3, [0, 1], rank=2).independent >= 26
    assert reach("grid_rank", 3, [0, 1], rank=1).independent == 15
    assert reach("grid", 3, [0, 1]).independent == 6


@pytest.mark.parametrize(
    "name,l_in,l_out,rank", [("grid_rank", 3, [0, 1], 2), ("grid_chain", 2, [0, 1], 2)]
)
def test_expressivity_is_the_measured_jacobian_rank(name, l_in, l_out, rank):
    expected = jacobian_rank(name, l_in, l_out, 3, rank=rank)
    assert reach(name, l_in, l_out, rank=rank).independent == expected


def over_elements(name, elements):
    return expressivity(name, natural(1, range(3)), natural(1, [0, 1]), 3, elements)


@pytest.mark.parametrize("name", ["cg", "grid"])
def test_elements_that_share_no_weights_add_up(name):
    assert over_elements(name, 3) == tuple(3 * n for n in over_elements(name, 1))


@pytest.mark.parametrize("name", NEW)
def test_factor_weights_shared_by_the_elements_count_once(name):
    """Four elements share a channel's factor weights: its total reach stays within its
    weights (the study reported 4 x the per-element count before) and below cg's."""
    one, four = over_elements(name, 1), over_elements(name, 4)
    assert one.independent >= one.complete - 1  # each element alone: (almost) everything
    assert four.weights < 4 * one.weights
    assert four.independent <= four.weights
    assert four.independent < four.complete == over_elements("cg", 4).independent


# --- init: exactly the grid function ----------------------------------------------------------


def extra_rows(module) -> torch.Tensor:
    """Output-weight rows of ranks >= 1 (row 0 is nu = 1, rows 1 + (nu - 2) R + r the rest)."""
    rows = torch.ones(module.weight.shape[0], dtype=torch.bool)
    rows[0] = rows[1 :: module.rank] = False
    return rows


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("rank", [1, 2])
def test_init_is_the_grid_function_on_the_same_weights(name, rank):
    irreps_in, irreps_out = natural(3, range(3)), natural(3, [0, 1, 2])
    grid = make("grid", irreps_in, irreps_out, 3, 2, seed=4)
    ours = make(name, irreps_in, irreps_out, 3, 2, seed=5, rank=rank)
    assert torch.all(ours.weight[extra_rows(ours)] == 0)
    with torch.no_grad():
        ours.weight[0] = grid.weight[0]
        ours.weight[1::rank] = grid.weight[1:]
    x, attrs = inputs(5, 3, 2, 2)
    assert relative_error(ours(x, attrs), grid(x, attrs)) < 1e-13


def test_init_factor_weights_are_order_one_and_the_output_weights_carry_the_scale():
    module = make("grid_chain", natural(64, range(3)), natural(64, [0, 1]), 3, 2, rank=3)
    assert torch.equal(module.factor[0], torch.ones_like(module.factor[0]))
    assert torch.equal(module.trip[0], torch.ones_like(module.trip[0]))
    assert 0.7 < module.factor[1:].std().item() < 1.3 and 0.7 < module.trip[1:].std() < 1.3
    grid = make("grid", natural(64, range(3)), natural(64, [0, 1]), 3, 2)
    for nu in range(3):  # rank 0: grid's initial weights and multipliers
        row = 0 if nu == 0 else 1 + (nu - 1) * module.rank
        assert module.weight[row].std().item() == pytest.approx(grid.weight[nu].std().item(), 0.3)
        multiplier = grid.basis_scale[nu] / grid.init_weight_std
        assert torch.equal(module.term_scale[row], multiplier)


# --- fused derivatives, blocks, dtype, TorchScript -------------------------------------------


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize(
    "kernel,correlation,block",
    [("pytorch", 2, 16), ("pytorch", 3, 3), ("pytorch", 3, 16), ("pytorch", 3, None)]
    + [("pytorch", 4, 3), ("cpp", 2, None), ("cpp", 3, None), ("cpp", 4, None)],
    indirect=["kernel"],
)
def test_fused_derivatives_match_plain_autograd(name, kernel, correlation, block):
    """The fused kernels' forward, forces and second derivatives (into inputs and every weight)
    against autograd through the plain-ops TorchScript path (dense evaluation and round trip),
    on 7 nodes x 5 channels (35 columns: the C++ kernel's vectors of 16 floats or 8 doubles and
    a remainder). The PyTorch kernel in blocks: 3 splits each channel's nodes 3 + 3 + 1 (weight
    gradients summed over node blocks), 16 takes 2 channels at a time (the last alone), None
    all in one (as on a GPU)."""
    irreps_in, irreps_out = natural(5, range(4)), natural(5, [0, 2, 1])
    fused = randomise(make(name, irreps_in, irreps_out, correlation, 3, rank=2))
    fused.block = block
    plain = make(name, irreps_in, irreps_out, correlation, 3, rank=2)
    plain.load_state_dict(fused.state_dict())
    plain_ops(plain)
    x, attrs = inputs(7, 5, 3, 3)
    ours, theirs = training_step(fused, x, attrs)[:3], training_step(plain, x, attrs)[:3]
    for a, b in zip(ours, theirs, strict=True):
        assert relative_error(a, b) < 1e-10
    params = [
        (p, q) for p, q in zip(fused.parameters(), plain.parameters(), strict=True) if p.numel()
    ]
    assert len(params) == (3 if name == "grid_chain" and correlation >= 3 else 2)
    for p, q in params:
        assert relative_error(p.grad, q.grad) < 1e-10


@pytest.mark.parametrize("name", NEW)
def test_fused_kernel_at_high_l_in(name, kernel):
    """L_in = 5 (a larger grid, K = 7 for the chain): the fused training step against plain
    autograd."""
    irreps_in, irreps_out = natural(2, range(6)), natural(2, [0, 2, 1])
    fused = randomise(make(name, irreps_in, irreps_out, 3, 2))
    plain = make(name, irreps_in, irreps_out, 3, 2)
    plain.load_state_dict(fused.state_dict())
    plain_ops(plain)
    fused.block = 5
    x, attrs = inputs(3, 2, 5, 2)
    got, expected = training_step(fused, x, attrs), training_step(plain, x, attrs)
    for a, b in zip([*got[:3], *got[3]], [*expected[:3], *expected[3]], strict=True):
        assert relative_error(a, b) < 1e-12


def test_fused_gradgradcheck(kernel):
    module = randomise(make("grid_chain", natural(1, range(3)), natural(1, [0, 1]), 3, 2))
    module.block = 2
    x, attrs = inputs(3, 1, 2, 2)
    x.requires_grad_(True)
    names = [k for k, p in module.named_parameters() if p.numel()]

    def func(x, *weights):
        return torch.func.functional_call(
            module, dict(zip(names, weights, strict=True)), (x, attrs)
        )

    weights = [module.get_parameter(k).detach().clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradgradcheck(func, (x, *weights), fast_mode=True)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cpp_kernel_threads_match_plain_autograd(dtype):
    """The C++ kernel splits its column vectors across 3 threads: grid_chain with per-element
    weights (each column its own) on 50 nodes x 6 channels (300 columns: full vectors and a
    remainder), forward, forces and second derivatives equal plain autograd in float64
    (float32: to its rounding)."""
    require_cpp(rank_kernel.native)
    irreps_in, irreps_out = natural(6, range(4)), natural(6, [0, 2, 1])
    fused = randomise(make("grid_chain", irreps_in, irreps_out, 3, 3, factors="element"))
    plain = plain_ops(make("grid_chain", irreps_in, irreps_out, 3, 3, factors="element"))
    plain.load_state_dict(fused.state_dict())
    x, attrs = inputs(50, 6, 3, 3)
    expected = training_step(plain, x, attrs)
    with threads_set(3):
        got = training_step(fused.to(dtype), x.to(dtype), attrs.to(dtype))
    tolerance = 1e-10 if dtype == F64 else 1e-4
    for a, b in zip([*got[:3], *got[3]], [*expected[:3], *expected[3]], strict=True):
        assert relative_error(a.double(), b) < tolerance


def test_without_a_compiler_the_pytorch_kernel_runs(monkeypatch, caplog):
    """A failed build is one warning and ``native() is None``; the product then runs the
    PyTorch kernel."""
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension 'mace_grid_rank'\n[1/2] c++: not found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    rank_kernel.native.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mace_grid.native"):
            assert rank_kernel.native() is None
        assert caplog.messages == [
            "tp=grid_rank/grid_chain: the C++ CPU kernel could not be built (Error building "
            "extension 'mace_grid_rank'); using PyTorch ops"
        ]
        calls, apply = [], grid_rank._RankProduct.apply
        function = grid_rank._RankProduct
        monkeypatch.setattr(function, "apply", lambda *a: calls.append(a) or apply(*a))
        make("grid_rank", natural(2, range(3)), natural(2, [0, 1]), 3, 2)(*inputs(3, 2, 2, 2))
        assert len(calls) == 1
    finally:
        rank_kernel.native.cache_clear()


def kernel_inputs(channels: int = 2, nodes: int = 4):
    """A grid_rank module (L_in = 2, outputs 0e + 1o, correlation 3, rank 2) and its kernel's
    inputs: features a [9, N], per-column weights w [6, 3, N], d [2, 0, N], the maps."""
    module = make("grid_rank", natural(channels, range(3)), natural(channels, [0, 1]), 3, 2)
    columns = channels * nodes
    gen = torch.Generator().manual_seed(8)
    a, w = (torch.randn(*shape, columns, generator=gen, dtype=F64) for shape in ((9,), (6, 3)))
    d = torch.zeros(2, 0, columns, dtype=F64)
    return module, a, w, d, rank_kernel.constant_maps(module, F64)


def test_cpp_kernel_reports_its_work():
    """The C++ ops are visible to `count_work`: the forward costs per column, at each of the G
    points, 2 (D_in + J (L_in+1) + rows D_out) flop (evaluation, factor mixing, projections)
    and writes its [rows, D_out, N] output; the VJP twice those flop."""
    require_cpp(rank_kernel.native)
    module, a, w, d, maps = kernel_inputs()
    points, columns = module.points.n_points, a.shape[1]
    linear_maps = 2 * columns * points * (9 + 6 * 3 + 4 * 4)
    forward = count_work(lambda: rank_kernel.products(a, w, d, maps, 3))
    assert (forward.matmul_flop, forward.pointwise, forward.ops) == (linear_maps, 16 * columns, 1)
    grad = torch.ones(4, 4, columns, dtype=F64)
    vjp = count_work(lambda: rank_kernel.native().vjp(a, w, d, grad, maps, 3))
    assert vjp.matmul_flop == 2 * linear_maps


def test_cpp_ops_refuse_inconsistent_shapes():
    """The C++ ops check the shapes they index with and raise instead of reading out of
    bounds: columns of w, the factor count for the correlation, the maps, grad's shape."""
    require_cpp(rank_kernel.native)
    ops = rank_kernel.native()
    _, a, w, d, maps = kernel_inputs()
    assert ops.forward(a, w, d, maps, 3).shape == (4, 4, 8)
    with pytest.raises(RuntimeError, match="inconsistent shapes"):
        ops.forward(a, w[..., :7].contiguous(), d, maps, 3)
    with pytest.raises(RuntimeError, match="inconsistent shapes"):
        ops.forward(a, w, d, maps, 4)
    with pytest.raises(RuntimeError, match="do not match"):
        ops.forward(a, w, d, [maps[2], maps[3], maps[0], maps[1], *maps[4:]], 3)
    with pytest.raises(RuntimeError, match="grad must be"):
        ops.vjp(a, w, d, torch.zeros(4, 4, 7, dtype=F64), maps, 3)


@pytest.mark.parametrize("name", NEW)
def test_dtype_follows_the_input(name):
    module = build(name, natural(4, range(3)), natural(4, range(2)), 3, 2)  # float32 weights
    randomise(module)
    x, attrs = inputs(5, 4, 2, 2)
    assert module(x.float(), attrs.float()).dtype == torch.float32
    exact = module.double()(x, attrs)
    assert exact.dtype == F64
    assert relative_error(module.float()(x.float(), attrs.float()).double(), exact) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NEW)
def test_cuda_matches_cpu_and_is_equivariant(name):
    module = randomise(make(name, natural(3, range(4)), natural(3, [0, 1, 2]), 3, 2))
    x, attrs = inputs(6, 3, 3, 2)
    expected = training_step(module, x, attrs)
    gpu = module.cuda()
    got = training_step(gpu, x.cuda(), attrs.cuda())
    for a, b in zip(got[:3], expected[:3], strict=True):
        assert relative_error(a.cpu(), b) < 1e-10
    rotation = o3.rand_matrix(dtype=F64)
    d_in = natural(1, range(4)).D_from_matrix(rotation).cuda()
    d_out = gpu.irreps_out.D_from_matrix(rotation).cuda()
    y = gpu(x.cuda(), attrs.cuda())
    assert relative_error(gpu(x.cuda() @ d_in.T, attrs.cuda()), y @ d_out.T) < 1e-10


@pytest.mark.parametrize("name", NEW)
def test_torchscript_round_trip(name):
    assert_script_round_trip(randomise(make(name, natural(3, range(3)), natural(3, [0, 1]), 3, 2)))


@pytest.mark.parametrize("name", NEW)
def test_torch_compile_traces_the_plain_ops(name):
    """Under torch.compile the product runs its plain ops (the compiled kernel's ops have no
    fake-tensor implementation to trace): one graph (fullgraph), the eager values and input
    gradient."""
    module = randomise(make(name, natural(3, range(3)), natural(3, [0, 1]), 3, 2))
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x, attrs = inputs(5, 3, 2, 2)
    results = []
    for f in (module, compiled):
        x_ = x.clone().requires_grad_(True)
        y = f(x_, attrs)
        results.append((y, *torch.autograd.grad(y.square().sum(), x_)))
    for e, g in zip(*results, strict=True):
        assert relative_error(g, e) < 1e-12


@pytest.mark.parametrize("factors", ["channel", "element"])
def test_whole_mace_model_scripts(factors):
    """A correlation-3 ScaleShiftMACE with the chain (grid_rank's code path plus the round
    trip) compiles, and the compiled model agrees with the eager one."""
    name = "grid_chain"

    from mace_grid.model import build_model

    model_cfg = dict(
        r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=2, num_interactions=2,
        hidden_irreps="4x0e+4x1o+4x2e", MLP_irreps="4x0e", correlation=3, radial_MLP=[8],
        gate="silu", interaction="RealAgnosticResidualInteractionBlock",
        interaction_first="RealAgnosticResidualInteractionBlock",
    )  # fmt: skip
    statistics = dict(
        atomic_numbers=[1, 6], atomic_energies=[-1.0, -2.0], avg_num_neighbors=4.0, mean=0.0,
        std=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    with default_dtype(F64):
        tp = {"name": name, "options": {"rank": 2, "factors": factors}}
        model = build_model(model_cfg, tp, statistics)
        for block in model.products:
            randomise(block.symmetric_contractions)
    assert_scripted_model_matches(model)


# --- factor weights per (element, channel) ------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_per_element_factors_with_equal_sets_are_the_shared_function(name):
    """factors=element with every element's set equal to the shared set computes the same
    function; changing one element's set changes only that element's nodes."""
    irreps_in, irreps_out = natural(3, range(3)), natural(3, [0, 1])
    shared = randomise(make(name, irreps_in, irreps_out, 3, 3))
    ours = make(name, irreps_in, irreps_out, 3, 3, factors="element")
    state = shared.state_dict()
    for key in ("factor", "trip"):
        if key in state:  # insert the element axis before the channel axis
            state[key] = state[key].unsqueeze(-2).expand(*ours.state_dict()[key].shape).clone()
    ours.load_state_dict(state)
    x, attrs = inputs(7, 3, 2, 3)  # elements 0, 1, 2, 0, 1, 2, 0: interleaved
    expected = shared(x, attrs)
    assert relative_error(ours(x, attrs), expected) < 1e-12
    with torch.no_grad():
        ours.factor[1:, :, :, 1] += 0.5
    y = ours(x, attrs)
    moved = (y - expected).abs().amax(1) > 1e-6
    assert moved.tolist() == [n % 3 == 1 for n in range(7)]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize(
    "kernel,block,per_node",
    [("pytorch", b, p) for p in (False, True) for b in (3, 16, None)] + [("cpp", None, False)],
    indirect=["kernel"],
)
def test_per_element_fused_derivatives_match_plain_autograd(
    name, kernel, block, per_node, monkeypatch
):
    """Per-element weights: gathered per column (the C++ kernel), or for the PyTorch kernel one
    call per element on its nodes (the CPU's way) or gathered per node into one call (other
    devices'): forward, forces and second derivatives into inputs and every weight against
    plain autograd, with an element absent from the batch."""
    monkeypatch.setattr(grid_rank, "_gathers_per_node", lambda device: per_node)
    irreps_in, irreps_out = natural(5, range(4)), natural(5, [0, 2, 1])
    fused = randomise(make(name, irreps_in, irreps_out, 3, 4, rank=2, factors="element"))
    fused.block = block
    plain = plain_ops(make(name, irreps_in, irreps_out, 3, 4, rank=2, factors="element"))
    plain.load_state_dict(fused.state_dict())
    x, attrs = inputs(9, 5, 3, 3)  # elements 0..2 of 4
    attrs = torch.cat([attrs, torch.zeros(9, 1, dtype=F64)], dim=1)
    ours, theirs = training_step(fused, x, attrs)[:3], training_step(plain, x, attrs)[:3]
    for a, b in zip(ours, theirs, strict=True):
        assert relative_error(a, b) < 1e-10
    for p, q in zip(fused.parameters(), plain.parameters(), strict=True):
        assert relative_error(p.grad, q.grad) < 1e-10
    assert torch.all(fused.factor.grad[..., 3, :] == 0)  # the absent element learns nothing


@pytest.mark.parametrize("name", NEW)
def test_per_element_factors_run_one_kernel_call_off_the_cpu(name, monkeypatch):
    """Off the CPU per-element factor weights are gathered per node: one call of the PyTorch
    kernel for a batch of three elements (no per-element split, which needs the counts on the
    host)."""
    monkeypatch.setattr(rank_kernel, "native", lambda: None)
    monkeypatch.setattr(grid_rank, "_gathers_per_node", lambda device: True)
    calls = []
    apply = grid_rank._RankProduct.apply
    monkeypatch.setattr(grid_rank._RankProduct, "apply", lambda *a: calls.append(1) or apply(*a))
    module = randomise(
        make(name, natural(2, range(3)), natural(2, [0, 1]), 3, 3, factors="element")
    )
    module(*inputs(6, 2, 2, 3))
    assert len(calls) == 1


@pytest.mark.parametrize("name", NEW)
def test_per_element_factors_are_equivariant_and_script(name):
    irreps_in, irreps_out = natural(2, range(3)), natural(2, [0, 1, 2])
    module = randomise(make(name, irreps_in, irreps_out, 3, 2, factors="element"))
    x, attrs = inputs(4, 2, 2, 2)
    y = module(x, attrs)
    rotation = o3.rand_matrix(dtype=F64)
    for matrix in (rotation, -rotation):
        d_in = natural(1, range(3)).D_from_matrix(matrix)
        rotated = module(x @ d_in.T, attrs)
        assert relative_error(rotated, y @ irreps_out.D_from_matrix(matrix).T) < 1e-10
    assert_script_round_trip(
        randomise(make(name, natural(3, range(3)), natural(3, [0, 1]), 3, 2, factors="element"))
    )


@pytest.mark.parametrize("name", NEW)
def test_per_element_factors_reach_every_map_of_every_element(name):
    """Over 4 elements, per channel: 4 x one element's reach, more than shared factors reach,
    and for the chain all of cg's (at L_in 2)."""
    irreps_in = natural(1, range(3))
    for l_out in ([0, 1], [0]):
        irreps_out = natural(1, l_out)
        one = expressivity(name, irreps_in, irreps_out, 3, 1, factors="element")
        four = expressivity(name, irreps_in, irreps_out, 3, 4, factors="element")
        assert four == tuple(4 * n for n in one)
        assert four.independent > expressivity(name, irreps_in, irreps_out, 3, 4).independent
        if name == "grid_chain":
            cg = expressivity("cg", irreps_in, irreps_out, 3, 4)
            assert four.independent == four.complete == cg.independent


def test_bad_factors_option_is_refused():
    with pytest.raises(ConfigError, match=r"tp.options.factors must be one of .*'elements'"):
        build("grid_rank", "4x0e+4x1o", "4x0e", 3, 2, factors="elements")


def test_factors_option_reaches_the_backend_from_the_config():
    from mace_grid.config import compose_config

    cfg = compose_config("train", ["tp=grid_chain", "tp.options.factors=element"])
    module = build(cfg.tp.name, "4x0e+4x1o", "4x0e+4x1o", 3, 5, **cfg.tp.options)
    assert module.factor.shape == (2, 3, 2, 5, 4)
    assert module.trip.shape == (2, chain_degree(1, 3, 1) + 1, 5, 4)


# --- training, refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW)
def test_training_on_demo_data_lowers_the_loss(name, tmp_path_factory):
    """The shared tiny multirun over every backend (tests/_helpers.py) trains this one too."""
    run = trained_runs(tmp_path_factory)[name]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["f_mae"] < summary["initial_val"]["f_mae"]
    with open(run / "csv" / "metrics.csv") as handle:
        losses = [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("irreps_in,irreps_out", [("4x0e+4x1e", "4x0e"), ("4x0e+4x1o", "4x0o")])
def test_pseudo_tensors_are_refused(name, irreps_in, irreps_out):
    with pytest.raises(ConfigError, match="tp=cg") as err:
        build(name, irreps_in, irreps_out, 2, 1)
    assert "natural-parity" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", NEW)
def test_saved_state_round_trips_and_other_constants_are_refused(name):
    module = randomise(make(name, natural(2, range(3)), natural(2, [0, 1]), 3, 2))
    state = module.state_dict()
    constants = state["_extra_state"]["constants"]
    assert constants["rank"] == 2 and constants["n_beta"] == module.n_beta
    other = make(name, natural(2, range(3)), natural(2, [0, 1]), 3, 2, seed=7)
    other.load_state_dict(state)
    x, attrs = inputs(4, 2, 2, 2)
    assert torch.equal(other(x, attrs), module(x, attrs))
    key = "round_trip_degree" if name == "grid_chain" else "n_alpha"
    tampered = state | {"_extra_state": state["_extra_state"] | {"constants": constants | {key: 1}}}
    with pytest.raises(ConfigError, match=f"saved state's {key}=1 differs"):
        other.load_state_dict(tampered)


@pytest.mark.parametrize("name", NEW)
def test_model_builds_with_the_backend_and_its_summary_counts_reach(name):
    from test_model import MODEL, STATS

    from mace_grid.model import build_model, describe_products

    tp = {"name": name, "options": {"rank": 2}}
    net = build_model(MODEL, tp, STATS)
    blocks = [b.symmetric_contractions for b in net.products]
    assert [type(b).__name__ for b in blocks] == [
        type(build(name, "1x0e", "1x0e", 2, 1)).__name__
    ] * 2
    # correlation 2, L_in = 2: every equivariant map into 0e+1o (7) and into 0e (4) is reached
    summary = describe_products(net, tp, MODEL["correlation"])
    assert "7 independent couplings of 7" in summary and "4 independent couplings of 4" in summary


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank_is_refused(rank):
    with pytest.raises(ConfigError, match="rank"):
        build("grid_rank", "4x0e+4x1o", "4x0e", 2, 1, rank=rank)


def test_rank_option_reaches_the_backend_from_the_config():
    from mace_grid.config import compose_config

    cfg = compose_config("train", ["tp=grid_chain", "tp.options.rank=3"])
    module = build(cfg.tp.name, "4x0e+4x1o", "4x0e+4x1o", 3, 2, **cfg.tp.options)
    assert module.rank == 3 and module.factor.shape == (3, 3, 2, 4)
    assert module.trip.shape == (3, chain_degree(1, 3, 1) + 1, 4)


def test_expressivity_script_counts_a_channel_over_its_elements(monkeypatch, capsys):
    argv = ["--max-l", "1", "--elements", "3"]
    lines = run_expressivity_script(monkeypatch, capsys, *argv, "--backends", "grid", *NEW)
    assert lines[0] == (
        "correlation 3; per channel, 3 elements: weights / independent couplings / complete"
    )
    for line, irreps_out in zip(lines[2:4], ("0e+1o", "0e"), strict=True):
        cells = line.split()
        assert cells[:2] == ["1", irreps_out]
        grid = expressivity("grid", "0e+1o", irreps_out, 3)
        assert cells[2:7] == " / ".join(str(3 * n) for n in grid).split()
        for start in (7, 12):  # grid_rank, grid_chain: no more than their weights
            weights, _, independent, _, complete = cells[start : start + 5]
            assert int(independent) <= min(int(weights), int(complete))
    argv += ["--factors", "element", "--backends", "cg", "grid_chain"]
    lines = run_expressivity_script(monkeypatch, capsys, *argv)
    assert lines[0].startswith("correlation 3; per channel, 3 elements, factors=element: ")
    for line in lines[2:4]:  # the chain per element reaches all of cg's maps
        cg, chain = line.split()[2:7], line.split()[7:12]
        assert chain[2] == chain[4] == cg[2] == cg[4]
    with pytest.raises(SystemExit) as exit_info:
        run_expressivity_script(monkeypatch, capsys, "--elements", "0")
    assert exit_info.value.code == 2
    assert "--elements must be >= 1, got 0" in capsys.readouterr().err
