"""The stock Clebsch-Gordan backend: mace-torch's own ``SymmetricContraction``, unchanged."""

from e3nn import o3
from mace.modules.symmetric_contraction import SymmetricContraction
from mace.modules.wrapper_ops import CUET_AVAILABLE

from mace_grid.errors import ConfigError

#: mace-torch builds its U matrices without cuequivariance up to correlation 4 (its wigner
#: coupling code special-cases 4 to stay below e3nn's l = 11 limit)
MAX_CORRELATION = 4


def use_reduced_cg(reduced_cg: bool) -> bool:
    """mace's ``use_reduced_cg`` for ``tp.options.reduced_cg``: False is mace's original
    (unreduced) U-matrix basis; True is cuequivariance's reduced basis, refused where
    cuequivariance is not importable (mace would silently fall back to the unreduced one)."""
    if not isinstance(reduced_cg, bool):
        raise ConfigError(f"tp.options.reduced_cg={reduced_cg!r} must be true or false")
    if reduced_cg and not CUET_AVAILABLE:
        raise ConfigError(
            "tp.options.reduced_cg=true needs cuequivariance and cuequivariance_torch, which "
            "are not importable here (pip install cuequivariance-torch); use reduced_cg=false"
        )
    return reduced_cg


def build_cg(
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int,
    reduced_cg: bool = False,
) -> SymmetricContraction:
    """mace's contraction as ``EquivariantProductBasisBlock`` builds it without cuEquivariance's
    kernels, with the U-matrix basis chosen explicitly (`use_reduced_cg`)."""
    return SymmetricContraction(
        irreps_in=irreps_in,
        irreps_out=irreps_out,
        correlation=correlation,
        num_elements=num_elements,
        use_reduced_cg=use_reduced_cg(reduced_cg),
    )
