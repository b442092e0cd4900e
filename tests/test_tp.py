"""Product-basis backends: equivariance, agreement, references, derivatives, init, TorchScript."""

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import contextlib
import functools
import io
import math

import numpy as np
import pytest
import torch
from e3nn import o3
from e3nn.util.jit import compile as jit_compile
from mace.modules.blocks import EquivariantProductBasisBlock

from mace_grid.errors import ConfigError
from mace_grid.tp import BACKENDS, build, expressivity
from mace_grid.tp.engine import DEVICE_BLOCK_BYTES, PointSet, block_size
from mace_grid.tp.expressivity import equivariant_maps, rank, weight_jacobian
from mace_grid.tp.gaunt import INIT_MOMENT_LINEAR, INIT_MOMENT_POWER, METHODS
from mace_grid.tp.grid import gauss_legendre_points
from mace_grid.tp.step_size import adam_step_change

F64 = torch.float64
GAUNT_VARIANTS = [*(("gaunt", {"method": m}) for m in METHODS), ("grid", {})]
FUSED = [("gaunt", {}), ("grid", {})]  # the backends on the point-set engine (default method)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def natural(mul: int, ls) -> o3.Irreps:
    return o3.Irreps("+".join(f"{mul}x{l}{'e' if l % 2 == 0 else 'o'}" for l in ls))


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make(name, irreps_in, irreps_out, correlation, num_elements, seed=0, **options):
    """A float64 module (built in float64, so mace's U matrices are float64 too)."""
    torch.manual_seed(seed)
    with default_dtype(F64):
        return build(name, irreps_in, irreps_out, correlation, num_elements, **options).double()


@functools.cache
def cached_cg(irreps_in: str, irreps_out: str, correlation: int, num_elements: int):
    """mace's U matrices take seconds at L_in=3, correlation 3: build each cg module once."""
    return make("cg", irreps_in, irreps_out, correlation, num_elements)


def inputs(n, channels, l_in, num_elements, seed=1, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, (l_in + 1) ** 2, generator=gen, dtype=dtype)
    species = torch.arange(n) % num_elements
    return x, torch.nn.functional.one_hot(species, num_elements).to(dtype)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- equivariance -------------------------------------------------------------------------


@pytest.mark.parametrize("l_in", [1, 2, 3, 4])
@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("name", BACKENDS)
def test_equivariant_under_rotations_and_inversion(name, correlation, l_in):
    channels, num_elements = 3, 2
    irreps_in, irreps_out = natural(channels, range(l_in + 1)), natural(channels, range(3))
    if name == "cg":
        if l_in == 4 and correlation == 3:
            pytest.skip("e3nn's wigner_3j stops at l=11: mace cannot build U here")
        module = cached_cg(str(irreps_in), str(irreps_out), correlation, num_elements)
    else:
        module = make(name, irreps_in, irreps_out, correlation, num_elements)
    x, attrs = inputs(7, channels, l_in, num_elements)
    y = module(x, attrs)
    torch.manual_seed(l_in * 10 + correlation)
    rotation = o3.rand_matrix(dtype=F64)
    for matrix in (rotation, -rotation):  # -R: rotation times inversion
        d_in = natural(1, range(l_in + 1)).D_from_matrix(matrix)
        d_out = irreps_out.D_from_matrix(matrix)
        assert relative_error(module(x @ d_in.T, attrs), y @ d_out.T) < 1e-10


def test_a_sized_down_grid_breaks_equivariance():
    """The equivariance test can fail: a grid sized from the output degree aliases the powers."""
    module = make("grid", natural(2, range(4)), natural(2, range(3)), 3, 1)
    points = gauss_legendre_points(module.l_in, 1, module.l_out)  # as if correlation were 1
    module.points = PointSet(module.l_in, 3, *points)
    x, attrs = inputs(5, 2, 3, 1)
    rotation = o3.rand_matrix(dtype=F64)
    rotated = module(x @ natural(1, range(4)).D_from_matrix(rotation).T, attrs)
    assert (
        relative_error(rotated, module(x, attrs) @ module.irreps_out.D_from_matrix(rotation).T)
        > 1e-3
    )


@CUDA
@pytest.mark.parametrize("name,options", GAUNT_VARIANTS)
def test_equivariant_and_gaunt_equals_grid_on_cuda(name, options):
    irreps_in, irreps_out = natural(4, range(4)), natural(4, [0, 1, 2])
    grid = make("grid", irreps_in, irreps_out, 3, 2)
    module = make(name, irreps_in, irreps_out, 3, 2, **options)
    module.load_state_dict(grid.state_dict())
    x, attrs = inputs(7, 4, 3, 2)
    expected = grid(x, attrs)
    module, x, attrs = module.cuda(), x.cuda(), attrs.cuda()
    y = module(x, attrs)
    assert y.is_cuda and relative_error(y.cpu(), expected) < 1e-10
    matrix = -o3.rand_matrix(dtype=F64)
    d_in = natural(1, range(4)).D_from_matrix(matrix).cuda()
    d_out = irreps_out.D_from_matrix(matrix).cuda()
    assert relative_error(module(x @ d_in.T, attrs), y @ d_out.T) < 1e-10
    y2, forces, x_grad, _ = training_step(module, x, attrs)
    y3, forces3, x_grad3, _ = training_step(grid, x.cpu(), attrs.cpu())
    assert relative_error(forces.cpu(), forces3) < 1e-10
    assert relative_error(x_grad.cpu(), x_grad3) < 1e-10


# --- the two Gaunt algorithms agree, and agree with independent references --------------


@pytest.mark.parametrize("l_in", [1, 2, 3, 4])
@pytest.mark.parametrize("correlation", [1, 2, 3, 4])
def test_gaunt_and_grid_agree_on_the_same_state_dict(correlation, l_in):
    irreps_in, irreps_out = natural(4, range(l_in + 1)), natural(4, [2, 0, 1])
    grid = make("grid", irreps_in, irreps_out, correlation, 3, seed=1)
    state = grid.state_dict()
    assert set(state) == {"weight", "_extra_state"}
    x, attrs = inputs(6, 4, l_in, 3)
    expected = grid(x, attrs)
    for method in METHODS:
        gaunt = make("gaunt", irreps_in, irreps_out, correlation, 3, seed=2, method=method)
        gaunt.load_state_dict(state)
        assert relative_error(gaunt(x, attrs), expected) < 1e-10, method


def test_unknown_gaunt_method_is_refused():
    with pytest.raises(ConfigError, match="tp.options.method must be one of fused, fft, direct"):
        build("gaunt", natural(2, range(2)), natural(2, [0]), 2, 1, method="conv")


def z_axis_reference(module, x, attrs):
    """The product basis by brute force: a dense Gauss-Legendre(z) x 64-point phi quadrature
    around the z axis (not the y axis the backends use) with e3nn's spherical_harmonics."""
    cos_t, w_t = np.polynomial.legendre.leggauss(32)
    phi = torch.arange(64, dtype=F64) * 2 * math.pi / 64
    cos_t, w_t = torch.from_numpy(cos_t)[:, None], torch.from_numpy(w_t)[:, None]
    sin_t = (1 - cos_t**2).sqrt()
    xyz = torch.stack(
        [
            (sin_t * phi.cos()).flatten(),
            (sin_t * phi.sin()).flatten(),
            cos_t.expand(-1, 64).flatten(),
        ],
        dim=-1,
    )
    weight = (w_t / 2 / 64).expand(-1, 64).flatten()
    l_max = max(module.l_in, module.l_out_max)
    sh = o3.spherical_harmonics(list(range(l_max + 1)), xyz, True, normalization="component")
    f = x @ sh[:, : x.shape[-1]].T  # [n, C, points]
    scale = module.basis_scale / module.init_weight_std
    w = module.weight.detach() * scale[:, None, :, None]  # [nu, E, irrep, C]
    w = torch.einsum("ne,veic->nvic", attrs, w)
    out = []
    for i, (_, ir) in enumerate(module.irreps_out):
        y = sh[:, ir.l**2 : (ir.l + 1) ** 2]
        proj = torch.stack(
            [(f**nu * weight) @ y for nu in range(1, module.correlation + 1)], dim=1
        )  # [n, nu, C, 2l+1]
        out.append((w[:, :, i, :, None] * proj).sum(1).reshape(x.shape[0], -1))
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("name,options", GAUNT_VARIANTS)
@pytest.mark.parametrize(
    "l_in,correlation,irreps_out",
    [(1, 4, [2, 0, 1]), (2, 3, [0, 2]), (3, 3, [1, 0, 3]), (4, 2, [2])],
)
def test_product_block_matches_brute_force_quadrature(name, options, l_in, correlation, irreps_out):
    """Every backend's output by value against an independent dense quadrature."""
    irreps_in = natural(3, range(l_in + 1))
    module = make(name, irreps_in, natural(3, irreps_out), correlation, 2, **options)
    x, attrs = inputs(5, 3, l_in, 2)
    assert relative_error(module(x, attrs), z_axis_reference(module, x, attrs)) < 1e-10


def three_j_000(l1, l2, l3):
    """Wigner 3j symbol (l1 l2 l3; 0 0 0) by Racah's closed form."""
    j = l1 + l2 + l3
    if j % 2 or l3 < abs(l1 - l2) or l3 > l1 + l2:
        return 0.0
    g = j // 2
    f = math.factorial
    return (
        (-1) ** g
        * math.sqrt(f(j - 2 * l1) * f(j - 2 * l2) * f(j - 2 * l3) / f(j + 1))
        * (f(g) / (f(g - l1) * f(g - l2) * f(g - l3)))
    )


@pytest.mark.parametrize("name,options", GAUNT_VARIANTS)
def test_quadratic_term_is_the_gaunt_tensor_of_wigner_3j(name, options):
    """P_LM(Y_i Y_j) = +-sqrt((2l1+1)(2l2+1)(2L+1)) (l1 l2 L; 0 0 0) wigner_3j(l1, l2, L)."""
    l_in = 2
    irreps_in, irreps_out = natural(1, range(l_in + 1)), natural(1, range(2 * l_in + 1))
    module = make(name, irreps_in, irreps_out, 2, 1, **options)
    dim = (l_in + 1) ** 2
    eye = torch.eye(dim, dtype=F64)
    pairs = (eye[:, None, :] + eye[None, :, :]).reshape(-1, dim)
    proj = lambda a: module.project_powers(a.T.contiguous())[0].T  # noqa: E731  [rows, LM]
    single = proj(eye)
    gaunt = ((proj(pairs).reshape(dim, dim, -1) - single[:, None] - single[None, :]) / 2).clone()
    gaunt[range(dim), range(dim)] = single
    for l1 in range(l_in + 1):
        for l2 in range(l_in + 1):
            for l3 in range(2 * l_in + 1):
                block = gaunt[l1**2 : (l1 + 1) ** 2, l2**2 : (l2 + 1) ** 2, l3**2 : (l3 + 1) ** 2]
                norm = math.sqrt((2 * l1 + 1) * (2 * l2 + 1) * (2 * l3 + 1)) * abs(
                    three_j_000(l1, l2, l3)
                )
                w3j = o3.wigner_3j(l1, l2, l3, dtype=F64) if norm else torch.zeros_like(block)
                sign = 1.0 if (block * w3j).sum() >= 0 else -1.0
                assert (block - sign * norm * w3j).abs().max() < 1e-12, (l1, l2, l3)


# --- cg is the stock mace contraction -----------------------------------------------------


def test_cg_is_the_contraction_mace_builds():
    irreps_in, irreps_out = natural(8, range(3)), natural(8, range(2))
    block = EquivariantProductBasisBlock(irreps_in, irreps_out, 3, num_elements=3)
    stock = block.symmetric_contractions
    ours = build("cg", irreps_in, irreps_out, 3, 3)
    assert type(ours) is type(stock)
    ours.load_state_dict(stock.state_dict())
    x, attrs = inputs(9, 8, 2, 3, dtype=torch.float32)
    assert torch.equal(ours(x, attrs), stock(x, attrs))


def test_grid_runs_inside_the_mace_product_block():
    irreps_in, irreps_out = natural(8, range(3)), natural(8, range(2))
    block = EquivariantProductBasisBlock(irreps_in, irreps_out, 2, num_elements=3)
    block.symmetric_contractions = build("grid", irreps_in, irreps_out, 2, 3)
    x, attrs = inputs(9, 8, 2, 3, dtype=torch.float32)
    assert block(x, None, attrs).shape == (9, irreps_out.dim)


@pytest.mark.parametrize("name", ["gaunt", "grid"])
def test_whole_mace_model_with_the_backend_scripts_for_export(name):
    """mace's deployment path (MACECalculator, LAMMPS) runs the TorchScript-compiled model."""
    from mace.modules import RealAgnosticResidualInteractionBlock, ScaleShiftMACE

    torch.manual_seed(0)
    with default_dtype(F64):
        model = ScaleShiftMACE(
            r_max=4.0, num_bessel=4, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=RealAgnosticResidualInteractionBlock,
            interaction_cls_first=RealAgnosticResidualInteractionBlock,
            num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("4x0e+4x1o"),
            MLP_irreps=o3.Irreps("4x0e"), atomic_energies=np.array([-1.0, -2.0]),
            avg_num_neighbors=4.0, atomic_numbers=[1, 6], correlation=2, gate=torch.tanh,
            atomic_inter_scale=1.0, atomic_inter_shift=0.0,
        )  # fmt: skip
        for block in model.products:
            old = block.symmetric_contractions
            block.symmetric_contractions = build(name, old.irreps_in, old.irreps_out, 2, 2)
    assert_scripted_model_matches(model)


def assert_scripted_model_matches(model: torch.nn.Module) -> None:
    """The TorchScript-compiled H/C model gives the eager energy and forces of CH4 (float64)."""
    from ase.build import molecule
    from mace.data import AtomicData, config_from_atoms
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric.dataloader import DataLoader

    with default_dtype(F64):
        graph = AtomicData.from_config(
            config_from_atoms(molecule("CH4")), AtomicNumberTable([1, 6]), cutoff=4.0
        )
    batch = next(iter(DataLoader([graph], batch_size=1))).to_dict()
    scripted = jit_compile(model)
    expected = model(batch, compute_force=True)
    got = scripted(batch, compute_force=True)
    assert expected["forces"].abs().max() > 1e-6
    for key in ("energy", "forces"):
        assert relative_error(got[key], expected[key]) < 1e-12


# --- derivatives ---------------------------------------------------------------------------


def training_step(module, x, attrs):
    """What training differentiates: energy, forces by create_graph, then backward."""
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x, attrs)
    energy = (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)).sum()
    (forces,) = torch.autograd.grad(energy, x, create_graph=True)
    (energy + forces.square().sum()).backward()
    return y, forces, x.grad, [p.grad.clone() for p in module.parameters() if p.grad is not None]


@pytest.mark.parametrize("correlation", [2, 3, 4])
@pytest.mark.parametrize("name", ["grid", "gaunt"])
def test_fused_derivatives_match_plain_autograd(name, correlation):
    """The hand-written first and second derivatives of the fused kernel, by value, against
    plain autograd through the same maps and through the literal FFT route (gaunt, fft)."""
    irreps_in, irreps_out = natural(5, range(4)), natural(5, [0, 2, 1])
    fused = make(name, irreps_in, irreps_out, correlation, 3)
    fused.points.block = 8  # several blocks, the last one partial
    plain = make(name, irreps_in, irreps_out, correlation, 3)
    plain.load_state_dict(fused.state_dict())
    plain.points.forward = plain.points.project_autograd
    fft = make("gaunt", irreps_in, irreps_out, correlation, 3, method="fft")
    fft.load_state_dict(fused.state_dict())
    x, attrs = inputs(7, 5, 3, 3)
    got = training_step(fused, x, attrs)
    for other in (plain, fft):
        expected = training_step(other, x, attrs)
        assert len(got[3]) == len(expected[3]) == 1  # the weights' gradient
        for a, b in zip([*got[:3], *got[3]], [*expected[:3], *expected[3]], strict=True):
            assert relative_error(a, b) < 1e-10


@pytest.mark.parametrize("name,options", [("cg", {}), ("gaunt", {"method": "direct"})])
def test_second_derivatives_of_the_plain_autograd_backends(name, options):
    """cg and direct convolution run plain autograd: cg's second derivatives against finite
    differences, direct convolution's training-step derivatives against grid's by value."""
    irreps_in, irreps_out = natural(3, range(3)), natural(3, range(3))
    x, attrs = inputs(4, 3, 2, 2)
    if name == "cg":  # the equivariance test's module, built once
        module = cached_cg(str(irreps_in), str(irreps_out), 3, 2)
        x = x.clone().requires_grad_(True)
        func = lambda x: module(x, attrs)  # noqa: E731
        assert torch.autograd.gradgradcheck(func, (x,), fast_mode=True)
        return
    module = make(name, irreps_in, irreps_out, 3, 2, **options)
    grid = make("grid", irreps_in, irreps_out, 3, 2)
    module.load_state_dict(grid.state_dict())
    got, expected = training_step(module, x, attrs), training_step(grid, x, attrs)
    for a, b in zip([*got[:3], *got[3]], [*expected[:3], *expected[3]], strict=True):
        assert relative_error(a, b) < 1e-10


@pytest.mark.parametrize("name", ["grid", "gaunt"])
@pytest.mark.parametrize("l_in", [1, 3, 6])
def test_separable_and_dense_evaluation_agree(name, l_in):
    irreps_in, irreps_out = natural(2, range(l_in + 1)), natural(2, [0, 2, 1])
    separable = make(name, irreps_in, irreps_out, 3, 2)
    dense = make(name, irreps_in, irreps_out, 3, 2)
    dense.load_state_dict(separable.state_dict())
    separable.points.separable, dense.points.separable = True, False
    separable.points.block = 3
    x, attrs = inputs(5, 2, l_in, 2)
    for a, b in zip(
        training_step(separable, x, attrs)[:3], training_step(dense, x, attrs)[:3], strict=True
    ):
        assert relative_error(a, b) < 1e-12


@pytest.mark.parametrize("name", ["grid", "gaunt"])
def test_fused_gradgradcheck(name):
    module = make(name, natural(1, range(3)), natural(1, [0, 1]), 3, 2)
    module.points.block = 2
    x, attrs = inputs(3, 1, 2, 2)
    x.requires_grad_(True)
    func = lambda x, w: torch.func.functional_call(module, {"weight": w}, (x, attrs))  # noqa: E731
    weight = module.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(func, (x, weight), fast_mode=True)
    assert torch.autograd.gradgradcheck(func, (x, weight), fast_mode=True)


# --- init, dtype, TorchScript, validation ---------------------------------------------------


def second_moments(module, x, attrs):
    """Mean square output per output irrep, and over all outputs."""
    y = module(x, attrs)
    out, start = [], 0
    for mul, ir in module.irreps_out:
        out.append(y[:, start : start + mul * ir.dim].square().mean().item())
        start += mul * ir.dim
    return out, y.square().mean().item()


@pytest.mark.parametrize("l_in,correlation", [(1, 3), (2, 3), (3, 2)])
def test_output_second_moment_at_init_is_close_to_cg(l_in, correlation):
    """Overall within a factor 2 of cg's; per irrep within 4 (cg's scalars get many more paths
    at high correlation, e.g. 5 vs 2.6 for 0e vs 1o at L_in=1, correlation 3)."""
    irreps_in, irreps_out = natural(64, range(l_in + 1)), natural(64, range(min(l_in, 2) + 1))
    x, attrs = inputs(300, 64, l_in, 2)
    with torch.no_grad():
        cg, cg_all = second_moments(
            cached_cg(str(irreps_in), str(irreps_out), correlation, 2), x, attrs
        )
        for name, options in FUSED:
            module = make(name, irreps_in, irreps_out, correlation, 2, **options)
            ours, ours_all = second_moments(module, x, attrs)
            assert 1 / 2 < ours_all / cg_all < 2, (name, ours_all, cg_all)
            for a, b in zip(ours, cg, strict=True):
                assert 1 / 4 < a / b < 4, (name, ours, cg)
            expected = INIT_MOMENT_LINEAR + (correlation - 1) * INIT_MOMENT_POWER
            assert np.allclose(ours, expected, rtol=0.3), (name, ours, expected)


@pytest.mark.parametrize("l_in", [2, 3])
@pytest.mark.parametrize("l_out", [[0, 1], [0]])
def test_one_adam_step_moves_the_output_about_as_far_as_cg(l_in, l_out):
    """Equal learning speed: with N(0, 1) weights times a fixed scale it was 7-20x less."""
    irreps_in, irreps_out = natural(32, range(l_in + 1)), natural(32, l_out)
    x, attrs = inputs(128, 32, l_in, 4)
    cg = adam_step_change(cached_cg(str(irreps_in), str(irreps_out), 3, 4), x, attrs)
    for name, options in FUSED:
        module = make(name, irreps_in, irreps_out, 3, 4, **options)
        assert 1 / 3 < adam_step_change(module, x, attrs) / cg < 3, name


def test_dtype_follows_the_input():
    module = build("grid", natural(4, range(3)), natural(4, range(2)), 3, 2)  # float32 weights
    x, attrs = inputs(5, 4, 2, 2)
    assert module(x.float(), attrs.float()).dtype == torch.float32
    assert module(x, attrs).dtype == F64
    exact = module.double()(x, attrs)
    assert relative_error(module.float()(x.float(), attrs.float()).double(), exact) < 1e-5


@pytest.mark.parametrize("name,options", [("cg", {}), *GAUNT_VARIANTS])
def test_torchscript(name, options):
    irreps_in, irreps_out = natural(3, range(3)), natural(3, [0, 1])
    if name == "cg":
        module = cached_cg(str(irreps_in), str(irreps_out), 3, 2)
    else:
        module = make(name, irreps_in, irreps_out, 3, 2, **options)
    assert_script_round_trip(module)


def assert_script_round_trip(module: torch.nn.Module) -> None:
    """The TorchScript-compiled module, and the same saved and reloaded, give the eager module's
    output, forces and input gradient of a training step."""
    scripted = jit_compile(module)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x, attrs = inputs(4, 3, 2, 2)
    expected = training_step(module, x, attrs)
    for other in (scripted, loaded):
        y, forces, x_grad, _ = training_step(other, x, attrs)
        assert relative_error(y, expected[0]) < 1e-12
        assert relative_error(forces, expected[1]) < 1e-10
        assert relative_error(x_grad, expected[2]) < 1e-10


@pytest.mark.parametrize("name", ["gaunt", "grid"])
@pytest.mark.parametrize(
    "irreps_in,irreps_out",
    [("4x0e+4x1e", "4x0e"), ("4x0e+4x1o", "4x0o"), ("4x0o+4x1e+4x2o", "4x0o+4x1e")],
)
def test_pseudo_tensors_are_refused_with_one_clear_message(name, irreps_in, irreps_out):
    with pytest.raises(ConfigError) as err:
        build(name, irreps_in, irreps_out, 2, 1)
    message = str(err.value)
    assert "tp=cg" in message and "natural-parity" in message and "\n" not in message


@pytest.mark.parametrize(
    "irreps_in,irreps_out,correlation,needle",
    [
        ("4x0e+2x1o", "4x0e", 2, "common multiplicity"),
        ("4x0e+4x2e", "4x0e", 2, "every degree 0..L_in"),
        ("4x1o+4x0e", "4x0e", 2, "every degree 0..L_in"),
        ("4x0e+4x1o", "2x0e", 2, "multiplicity 4"),
        ("4x0e+4x1o", "4x0e", 7, "correlation 1..6"),
        ("4x0e+4x1o", "4x0e", 0, "correlation"),
    ],
)
def test_unsupported_irreps_are_refused(irreps_in, irreps_out, correlation, needle):
    with pytest.raises(ConfigError, match=needle):
        build("grid", irreps_in, irreps_out, correlation, 1)


# --- the constants that define a backend's function travel with its weights ---------------


@pytest.mark.parametrize("name", ["gaunt", "grid"])
def test_saved_state_round_trips_and_tampered_constants_are_refused(name, tmp_path):
    module = make(name, natural(2, range(3)), natural(2, [0, 1]), 3, 2)
    torch.save(module.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    other = make(name, natural(2, range(3)), natural(2, [0, 1]), 3, 2, seed=5)
    other.load_state_dict(state)
    x, attrs = inputs(4, 2, 2, 2)
    assert torch.equal(other(x, attrs), module(x, attrs))
    size = "n_beta" if name == "grid" else "n_theta"
    for key, value in (("basis_scale", [[2.0, 1.0]] * 3), (size, 99)):
        tampered = {k: v for k, v in state.items()}
        tampered["_extra_state"] = state["_extra_state"] | {
            "constants": state["_extra_state"]["constants"] | {key: value}
        }
        with pytest.raises(ConfigError, match=f"saved state's {key}=.* this code's {key}=") as err:
            other.load_state_dict(tampered)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="format 0, this code reads format"):
        other.load_state_dict(state | {"_extra_state": state["_extra_state"] | {"format": 0}})
    with pytest.raises(ConfigError, match="no function constants"):  # written before they were
        other.load_state_dict({"weight": state["weight"]})


def test_another_backend_of_the_same_basis_loads_but_another_basis_does_not():
    """grid's state loads into gaunt (same basis, other points), whatever its grid sizes, and
    in whatever dtype it was saved; a state with other basis scales does not."""
    grid = make("grid", natural(2, range(3)), natural(2, [0, 1]), 3, 2)
    gaunt = make("gaunt", natural(2, range(3)), natural(2, [0, 1]), 3, 2)
    state = grid.float().state_dict()
    constants = state["_extra_state"]["constants"]
    gaunt.load_state_dict(state | {"_extra_state": state["_extra_state"] | {
        "constants": constants | {"n_beta": 99}}})  # fmt: skip
    scaled = [[2 * v for v in row] for row in constants["basis_scale"]]
    with pytest.raises(ConfigError, match="basis_scale"):
        gaunt.load_state_dict(state | {"_extra_state": state["_extra_state"] | {
            "constants": constants | {"basis_scale": scaled}}})  # fmt: skip


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", ["gaunt", "grid"])
def test_autocast_is_refused_in_one_line(name, device):
    module = build(name, natural(2, range(3)), natural(2, [0, 1]), 3, 2).to(device)
    x, attrs = (t.to(device) for t in inputs(4, 2, 2, 2, dtype=torch.float32))
    low = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=low), pytest.raises(ConfigError, match="autocast") as err:
        module(x, attrs)
    assert "\n" not in str(err.value)
    assert module(x, attrs).dtype == torch.float32  # outside autocast it runs


# --- high correlation (the Gaunt backends' cheap body order) -------------------------------


@pytest.mark.parametrize("correlation", [4, 5, 6])
@pytest.mark.parametrize("l_in", [1, 2])
def test_high_correlation_is_equivariant_and_gaunt_equals_grid(correlation, l_in):
    irreps_in, irreps_out = natural(2, range(l_in + 1)), natural(2, [0, 1, 2])
    grid = make("grid", irreps_in, irreps_out, correlation, 2)
    gaunt = make("gaunt", irreps_in, irreps_out, correlation, 2)
    gaunt.load_state_dict(grid.state_dict())
    x, attrs = inputs(5, 2, l_in, 2)
    y = grid(x, attrs)
    assert relative_error(gaunt(x, attrs), y) < 1e-10
    torch.manual_seed(correlation)
    rotation = o3.rand_matrix(dtype=F64)
    for matrix in (rotation, -rotation):
        x_rot = x @ natural(1, range(l_in + 1)).D_from_matrix(matrix).T
        y_rot = y @ irreps_out.D_from_matrix(matrix).T
        for module in (grid, gaunt):
            assert relative_error(module(x_rot, attrs), y_rot) < 1e-10


def test_correlation_limit_is_named_per_backend():
    with pytest.raises(ConfigError, match=r"tp=cg supports correlation 1\.\.4"):
        build("cg", "2x0e+2x1o", "2x0e", 5, 1)
    with pytest.raises(ConfigError, match=r"tp=grid supports correlation 1\.\.6"):
        build("grid", "2x0e+2x1o", "2x0e", 7, 1)


# --- expressivity --------------------------------------------------------------------------

# (L_in, irreps_out): (cg U columns, cg independent, grid weights = independent), correlation 3
# (/work/shared/notes/backends-next.md, measured independently of this code)
EXPECTED_COUNTS = {
    (1, "0e+1o"): (16, 9, 6),
    (2, "0e+1o"): (41, 17, 6),
    (2, "0e"): (15, 9, 3),
    (3, "0e+1o"): (86, 29, 6),
    (3, "0e"): (28, 13, 3),
}


@pytest.mark.parametrize("l_in,irreps_out", list(EXPECTED_COUNTS))
def test_expressivity_counts(l_in, irreps_out):
    columns, cg_rank, grid_rank = EXPECTED_COUNTS[l_in, irreps_out]
    irreps_in = natural(8, range(l_in + 1))  # the channel count does not matter
    assert expressivity("cg", irreps_in, irreps_out, 3) == (columns, cg_rank, cg_rank)
    for name in ("gaunt", "grid"):
        assert expressivity(name, irreps_in, irreps_out, 3) == (grid_rank, grid_rank, cg_rank)


def test_complete_count_by_hand():
    """Sym^nu(0e+1o), nu = 1..3, holds 0e 1, 2, 2 times and 1o 1, 1, 2 times; 2e once at
    nu = 2 (Sym^2 1o = 0e + 2e) and once at nu = 3 (0e x Sym^2 1o; Sym^3 1o = 1o + 3o)."""
    assert equivariant_maps("0e+1o", "0e+1o", 3) == 9
    assert equivariant_maps("0e+1o", "2e", 3) == 2
    assert equivariant_maps("0e+1o", "1e+0o", 3) == 0  # no pseudo-tensor from natural inputs
    assert equivariant_maps("0e+1e", "0o", 3) == 0
    assert equivariant_maps("0o", "0e+0o", 3) == 3  # into 0e: x^2; into 0o: x, x^3


@pytest.mark.parametrize("l_in", [1, 2, 3])
def test_complete_equals_the_measured_rank_of_cg(l_in):
    """cg (mace's symmetric basis) reaches every equivariant map into 0e and 1o, counted
    without it. (Not always into 2e: at L_in = 1, correlation 3 mace's U matrices reach 1 of
    the 2 maps, while grid reaches both.)"""
    for irreps_out in ("0e+1o", "0e"):
        irreps_in = natural(1, range(l_in + 1))
        jacobian = weight_jacobian("cg", irreps_in, irreps_out, 3)
        assert rank(jacobian) == equivariant_maps(irreps_in, irreps_out, 3)


@pytest.mark.parametrize("l_in", [1, 2, 3])
@pytest.mark.parametrize("name", ["gaunt", "grid"])
def test_every_gaunt_basis_map_lies_in_the_span_of_cg(name, l_in):
    irreps_in, irreps_out = natural(1, range(l_in + 1)), "0e+1o"
    cg = weight_jacobian("cg", irreps_in, irreps_out, 3, samples=24)
    ours = weight_jacobian(name, irreps_in, irreps_out, 3, samples=24)
    assert rank(torch.cat([cg, ours], dim=1)) == rank(cg)
    # and the test can fail: a map that is not a polynomial of degree <= 3 leaves the span
    higher = weight_jacobian(name, irreps_in, irreps_out, 4, samples=24)
    assert rank(torch.cat([cg, higher], dim=1)) > rank(cg)


def test_independent_is_the_local_rank_for_a_block_non_linear_in_its_weights(monkeypatch):
    """A toy block gain * (grid block): two weights, but scaling the grid weight up and the gain
    down leaves the output unchanged, so the rank is 1."""
    from mace_grid import tp

    class Product(torch.nn.Module):
        def __init__(self, *args):
            super().__init__()
            self.inner = build("grid", *args)
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, attrs):
            return self.gain * self.inner(x, attrs)

    monkeypatch.setitem(tp._BUILDERS, "toy", Product)
    jacobian = weight_jacobian("toy", natural(1, range(2)), "0e", 1)
    assert jacobian.shape[1] == 2 and rank(jacobian) == 1
    assert rank(weight_jacobian("grid", natural(1, range(2)), "0e", 1)) == 1


def run_expressivity_script(monkeypatch, capsys, *argv: str) -> list[str]:
    """Lines ``scripts/expressivity.py argv`` prints (it sets 1 thread: restored after)."""
    import runpy
    import sys

    from mace_grid import PROJECT_ROOT

    monkeypatch.setattr(sys, "argv", ["expressivity.py", *argv])
    num_threads = torch.get_num_threads()
    try:
        runpy.run_path(str(PROJECT_ROOT / "scripts" / "expressivity.py"), run_name="__main__")
    finally:
        torch.set_num_threads(num_threads)
    return capsys.readouterr().out.splitlines()


def test_expressivity_script_prints_the_readme_table(monkeypatch, capsys):
    argv = ["--max-l", "1", "--correlation", "5", "--backends", "cg", "gaunt", "grid"]
    lines = run_expressivity_script(monkeypatch, capsys, *argv)
    assert lines[0].startswith("correlation 5")
    # cg stops at correlation 4. Sym^nu(0e+1o) holds 0e nu // 2 + 1 times and 1o (nu + 1) // 2
    # times: 11 + 9 maps for nu = 1..5; gaunt/grid have 5 + 5 weights, all independent
    assert lines[2].split() == ["1", "0e+1o", "-", *["10", "/", "10", "/", "20"] * 2]
    assert lines[3].split() == ["1", "0e", "-", *["5", "/", "5", "/", "11"] * 2]


# --- what a GPU or DDP run needs ------------------------------------------------------------

ALL_VARIANTS = [
    *GAUNT_VARIANTS,
    *(
        (name, {"factors": f})
        for name in ("grid_rank", "grid_chain")
        for f in ("channel", "element")
    ),
]


@pytest.mark.parametrize("name,options", ALL_VARIANTS)
def test_no_nodes_gives_empty_outputs(name, options):
    """An empty batch runs (a GPU block of 0 columns or an empty per-element split crashed)."""
    module = make(name, natural(3, range(3)), natural(3, [0, 1]), 3, 2, **options)
    x, attrs = inputs(4, 3, 2, 2)
    y, forces, x_grad, _ = training_step(module, x[:0], attrs[:0])
    assert y.shape == (0, module.irreps_out.dim)
    assert forces.shape == x_grad.shape == (0, 3, 9)


def test_device_block_is_capped_by_memory_and_never_empty():
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert block_size(0, cuda, 128, 1000) == 1
    assert block_size(5000, cuda, 128, 1000) == 5000  # small batch: one block
    assert block_size(10**7, cuda, 128, 1 << 20) == DEVICE_BLOCK_BYTES >> 20
    assert block_size(10**7, torch.device("cpu"), 128, 1 << 20) == 128


@pytest.mark.parametrize("correlation", [1, 2, 3])
@pytest.mark.parametrize("name", BACKENDS)
def test_every_parameter_gets_a_gradient(name, correlation):
    """DDP (find_unused_parameters=False) fails on a parameter no forward uses."""
    if name == "cg":
        module = cached_cg(str(natural(2, range(3))), str(natural(2, [0, 1])), correlation, 2)
    else:
        module = make(name, natural(2, range(3)), natural(2, [0, 1]), correlation, 2)
    x, attrs = inputs(4, 2, 2, 2)
    training_step(module, x, attrs)
    unused = [n for n, p in module.named_parameters() if p.grad is None]
    assert not unused, unused
