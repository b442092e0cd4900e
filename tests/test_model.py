"""The model builder: stock model for cg, Gaunt backends slotted into mace's product blocks."""

import numpy as np
import pytest
import torch
from e3nn import o3
from mace.modules import ScaleShiftMACE, interaction_classes
from mace.modules import blocks as mace_blocks
from mace.modules.symmetric_contraction import SymmetricContraction
from mace.modules.wrapper_ops import CUET_AVAILABLE

from mace_grid.errors import ConfigError
from mace_grid.model import build_model, describe_products, product_backend

MODEL = {
    "r_max": 4.0,
    "num_bessel": 4,
    "num_polynomial_cutoff": 5,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "8x0e+8x1o",
    "MLP_irreps": "8x0e",
    "correlation": 2,
    "radial_MLP": [8, 8],
    "gate": "silu",
    "interaction": "RealAgnosticResidualInteractionBlock",
    "interaction_first": "RealAgnosticResidualInteractionBlock",
}
STATS = {
    "atomic_numbers": [1, 8],
    "atomic_energies": [-1.0, -2.0],
    "avg_num_neighbors": 3.0,
    "mean": 0.1,
    "std": 1.5,
}


def test_cg_is_the_stock_mace_model_bit_for_bit() -> None:
    torch.manual_seed(0)
    ours = build_model(MODEL, {"name": "cg", "options": {}}, STATS)
    torch.manual_seed(0)
    stock = ScaleShiftMACE(
        r_max=4.0,
        num_bessel=4,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=interaction_classes[MODEL["interaction"]],
        interaction_cls_first=interaction_classes[MODEL["interaction_first"]],
        num_interactions=2,
        num_elements=2,
        hidden_irreps=o3.Irreps("8x0e+8x1o"),
        MLP_irreps=o3.Irreps("8x0e"),
        atomic_energies=np.array([-1.0, -2.0]),
        avg_num_neighbors=3.0,
        atomic_numbers=[1, 8],
        correlation=2,
        gate=torch.nn.functional.silu,
        radial_MLP=[8, 8],
        atomic_inter_scale=1.5,
        atomic_inter_shift=0.1,
        use_reduced_cg=False,  # mace's original basis (its default is cuequivariance's)
    )
    assert ours.use_reduced_cg is False
    ours_state, stock_state = ours.state_dict(), stock.state_dict()
    assert ours_state.keys() == stock_state.keys()
    for key, value in stock_state.items():
        assert torch.equal(ours_state[key], value), key


@pytest.mark.parametrize("name", ["gaunt", "grid"])
def test_gaunt_backends_replace_every_product_contraction(name: str) -> None:
    stock = mace_blocks.SymmetricContractionWrapper
    net = build_model(MODEL, {"name": name, "options": {}}, STATS)
    assert mace_blocks.SymmetricContractionWrapper is stock  # the factory is restored
    assert not any(isinstance(m, SymmetricContraction) for m in net.modules())
    products = [m for m in net.modules() if isinstance(m, mace_blocks.EquivariantProductBasisBlock)]
    assert len(products) == 2
    assert all(p.symmetric_contractions.irreps_in.lmax == 2 for p in products)
    summary = describe_products(net, {"name": name, "options": {}}, MODEL["correlation"])
    assert summary.count(f"{name} (") == 2
    # L_in=2 -> 0e+1o and -> 0e at correlation 2: one weight per (nu, L), all independent, of
    # 2 + 5 and 1 + 3 equivariant maps (nu = 1 + 2, counted by hand from Sym^2(0e+1o+2e))
    assert "4 weights, 4 independent couplings of 7 equivariant maps" in summary
    assert "2 weights, 2 independent couplings of 4 equivariant maps" in summary


def test_cg_summary_counts_independent_couplings_not_u_columns() -> None:
    net = build_model(MODEL, {"name": "cg", "options": {}}, STATS)
    summary = describe_products(net, {"name": "cg", "options": {}}, MODEL["correlation"])
    assert "of 7 equivariant maps" in summary and "7 independent couplings" in summary


def test_grid_builds_beyond_what_mace_cg_can(tmp_path) -> None:
    """mace's U matrices stop at L_in=3 with correlation 3; the grid backend does not need them."""
    model = MODEL | {"max_ell": 4, "correlation": 3, "hidden_irreps": "4x0e+4x1o"}
    net = build_model(model, {"name": "grid", "options": {}}, STATS)
    assert [m.symmetric_contractions.irreps_in.lmax for m in net.products] == [4, 4]
    net = build_model(MODEL | {"correlation": 6}, {"name": "grid", "options": {}}, STATS)
    assert [m.symmetric_contractions.correlation for m in net.products] == [6, 6]


def test_factory_restored_when_the_build_fails() -> None:
    stock = mace_blocks.SymmetricContractionWrapper
    with pytest.raises(RuntimeError), product_backend({"name": "grid", "options": {}}):
        assert mace_blocks.SymmetricContractionWrapper is not stock
        raise RuntimeError("build failed")
    assert mace_blocks.SymmetricContractionWrapper is stock


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate": "relu"}, "model.gate"),
        ({"hidden_irreps": "8x0e+4x1o"}, "one multiplicity"),
        ({"correlation": 5}, r"model.correlation=5: tp=cg supports correlation 1\.\.4"),
        ({"layers": 3}, "unknown key"),
        ({"r_max": "five"}, "model.r_max"),
    ],
)
def test_invalid_model_config_names_the_fix(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(MODEL | change, {"name": "cg", "options": {}}, STATS)


@pytest.mark.parametrize(
    ("tp", "message"),
    [
        ({"name": "grid", "options": {}}, r"tp=grid supports correlation 1\.\.6"),
        ({"name": "gaunt", "options": {}}, r"tp=gaunt supports correlation 1\.\.6"),
    ],
)
def test_correlation_refusal_names_the_backends_own_limit(tp: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model(MODEL | {"correlation": 7}, tp, STATS)


def test_cg_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        build_model(MODEL, {"name": "cg", "options": {"reduce_cg": True}}, STATS)
    with pytest.raises(ConfigError, match="true or false"):
        build_model(MODEL, {"name": "cg", "options": {"reduced_cg": "yes"}}, STATS)


@pytest.mark.skipif(CUET_AVAILABLE, reason="cuequivariance is installed here")
def test_reduced_cg_without_cuequivariance_is_one_clear_refusal() -> None:
    with pytest.raises(ConfigError, match="needs cuequivariance") as err:
        build_model(MODEL, {"name": "cg", "options": {"reduced_cg": True}}, STATS)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not CUET_AVAILABLE, reason="needs cuequivariance")
def test_reduced_cg_selects_the_cuequivariance_basis() -> None:
    net = build_model(MODEL, {"name": "cg", "options": {"reduced_cg": True}}, STATS)
    assert net.use_reduced_cg is True


def test_pseudotensor_hidden_irreps_are_refused_by_gaunt_backends() -> None:
    with pytest.raises(ConfigError, match="cg"):
        build_model(MODEL | {"hidden_irreps": "8x0e+8x1e"}, {"name": "grid", "options": {}}, STATS)
