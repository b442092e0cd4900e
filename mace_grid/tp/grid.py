"""Gaunt product on a Gauss-Legendre sphere grid (Xie et al., ICML 2025): the ``grid`` backend.

Evaluate each channel's spherical function on a Gauss-Legendre (cos beta) x equispaced alpha
grid, take pointwise powers, project back by quadrature, on the shared point-set engine
(`mace_grid.tp.engine`). The grid is sized from correlation * L_in + L_out so every f^nu Y_LM
is integrated exactly (never from L_out alone).
Same parameters and output as `mace_grid.tp.gaunt.FourierGauntProduct`.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).
"""

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.tp import sphere
from mace_grid.tp.engine import PointSet
from mace_grid.tp.gaunt import GauntProductBasis


def gauss_legendre_points(
    l_in: int, correlation: int, l_out: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``grid`` point set: ``beta [n_beta]`` (Gauss-Legendre in cos beta), ``alpha
    [n_alpha]`` (equispaced), sized by `sphere.grid_resolution`, and ``projector [D_out, G]``
    (quadrature weight x Y_LM of the output degrees ``l_out``, alpha-major points), float64.
    """
    n_beta, n_alpha = sphere.grid_resolution(l_in, correlation, max(l_out))
    beta, alpha, weight = sphere.gauss_legendre_grid(n_beta, n_alpha)
    out_lm = [sphere.lm_index(l, m) for l in l_out for m in range(-l, l + 1)]
    sh = sphere.sh_on_grid(max(l_out), n_beta, n_alpha).transpose(0, 1)
    sh = sh.reshape(n_alpha * n_beta, -1)[:, out_lm]  # alpha-major points
    return beta, alpha, (weight.T.reshape(-1, 1) * sh).T


@compile_mode("script")
class GridGauntProduct(GauntProductBasis):
    """MACE-Gaunt product basis by quadrature on a Gauss-Legendre x equispaced sphere grid
    (``points``, see `gauss_legendre_points`), exact for f^nu Y_LM, nu <= correlation."""

    def __init__(
        self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
    ) -> None:
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        self.n_beta, self.n_alpha = sphere.grid_resolution(self.l_in, correlation, self.l_out_max)
        points = gauss_legendre_points(self.l_in, correlation, self.l_out)
        self.points = PointSet(self.l_in, correlation, *points)

    @torch.jit.unused
    def function_constants(self) -> dict:
        return super().function_constants() | {
            "points": "gauss-legendre",
            "n_beta": self.n_beta,
            "n_alpha": self.n_alpha,
        }

    def project_powers(
        self, features: torch.Tensor, node_attrs: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.points(features)


def build_grid(
    irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
) -> GridGauntProduct:
    """The ``grid`` backend."""
    return GridGauntProduct(irreps_in, irreps_out, correlation, num_elements)
