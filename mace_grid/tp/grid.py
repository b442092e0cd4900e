"""Gaunt product on a Gauss-Legendre sphere grid (Xie et al., ICML 2025): the ``grid`` backend.

Evaluate each channel's spherical function on a Gauss-Legendre (cos beta) x equispaced alpha
grid, take pointwise powers, project back by quadrature. The grid is sized from
correlation * L_in + L_out so every f^nu Y_LM is integrated exactly (never from L_out alone).
Same parameters and output as `mace_grid.tp.gaunt.FourierGauntProduct`.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).
"""

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.tp import sphere
from mace_grid.tp.gaunt import GauntProductBasis


@compile_mode("script")
class GridGauntProduct(GauntProductBasis):
    """MACE-Gaunt product basis by quadrature on a Gauss-Legendre x equispaced sphere grid."""

    def __init__(
        self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
    ) -> None:
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        n_beta, n_alpha = sphere.grid_resolution(self.l_in, correlation, self.l_out_max)
        self.n_beta, self.n_alpha = n_beta, n_alpha
        l_max = max(self.l_in, self.l_out_max)
        _, _, weight = sphere.gauss_legendre_grid(n_beta, n_alpha)
        sh = sphere.sh_on_grid(l_max, n_beta, n_alpha).reshape(n_beta * n_alpha, -1)
        # to_grid [D_in, G]: values of f; projector [G, D_out]: quadrature weight * Y_LM
        self.register_buffer(
            "to_grid",
            sh[:, : (self.l_in + 1) ** 2].T.clone(memory_format=torch.contiguous_format),
            persistent=False,
        )
        projector = weight.reshape(-1, 1) * sh[:, self.out_lm]
        self.register_buffer("projector", projector.contiguous(), persistent=False)

    def project_powers(self, x: torch.Tensor) -> torch.Tensor:
        n, channels = x.shape[0], x.shape[1]
        k = self.correlation - 1
        if k == 0:
            return x.new_zeros(n, channels, 0, self.dim_out)
        values = x.reshape(n * channels, -1) @ self.to_grid.to(x.dtype)
        power = values
        powers = []
        for _ in range(k):
            power = power * values
            powers.append(power)
        projected = torch.stack(powers, dim=1) @ self.projector.to(x.dtype)
        return projected.view(n, channels, k, self.dim_out)


def build_grid(
    irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
) -> GridGauntProduct:
    """The ``grid`` backend."""
    return GridGauntProduct(irreps_in, irreps_out, correlation, num_elements)
