"""The stock Clebsch-Gordan backend: mace-torch's own ``SymmetricContraction``, unchanged."""

from e3nn import o3
from mace.modules.symmetric_contraction import SymmetricContraction


def build_cg(
    irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
) -> SymmetricContraction:
    """mace's contraction as ``EquivariantProductBasisBlock`` builds it without cuEquivariance."""
    return SymmetricContraction(
        irreps_in=irreps_in,
        irreps_out=irreps_out,
        correlation=correlation,
        num_elements=num_elements,
    )
