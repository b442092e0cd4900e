"""Rank-R products of per-degree weighted factors on the sphere grid: the ``grid_rank`` backend.

One pointwise power f^nu learns one map per (nu, L): every coupling of degrees l1, l2, ... into L
shares one weight. Weighting the degrees of each factor separately, f^a = sum_l a_l F_l with
F_l = sum_m A_lm Y_lm, gives path weights a_l1 b_l2 c_l3 x Gaunt (a rank-1 factorisation of the
path-weight tensor), and a sum over R such terms is rank R:

    B_LM = w_1 A_LM + sum_{r < R} sum_{nu=2}^{corr} w_{r,nu,L} P_LM(f^{a_r,1} ... f^{a_r,nu})

(``correlation`` = 3: P(f^a f^b) and P(f^a f^b f^c) per rank). The integrand's degree is that of
f^corr Y_L, so the grid of `grid` (sized for correlation * L_in + L_out) stays exact.
Parameters: ``weight [1 + R (corr - 1), num_elements, len(irreps_out), C]`` (output weights per
element, channel and output irrep; they carry the scale) and ``factor [R, corr, L_in + 1, C]``
(per channel, shared by the elements; O(1)). Init: rank 0 has all factor weights 1 and grid's
output weights, so the function starts as exactly `grid`'s; ranks >= 1 start with N(0, 1) factor
weights and zero output weights.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).

Factor weights are per channel because the reach is per channel: shared factors would give every
channel the same R coupling maps, leaving only their output weights free, and per-channel
factors cost one multiply of the [D_in, n C] features, nothing on the grid.
"""

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.errors import ConfigError
from mace_grid.tp import sphere
from mace_grid.tp.gaunt import GauntProductBasis, basis_scale


def grid_degree(l_in: int, correlation: int, l_out: int) -> int:
    """Polynomial degree the grid must integrate exactly: that of f^corr Y_{L_out}."""
    return correlation * l_in + l_out


@compile_mode("script")
class GridRankProduct(GauntProductBasis):
    """Rank-``rank`` product basis on a Gauss-Legendre x equispaced sphere grid (module doc).

    ``to_grid [G, D_in]`` evaluates a factor's spherical function at the grid points,
    ``projector [D_out, G]`` (quadrature weight x Y_LM) projects a product back; the grid
    integrates degree `degree` exactly. Subclasses may transform the pair product before the
    third factor multiplies it (`transform_pair`).
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        correlation: int,
        num_elements: int,
        rank: int = 2,
    ) -> None:
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ConfigError(f"tp.options.rank must be an integer >= 1, got {rank!r}")
        self.rank = rank
        l_in, l_max = self.l_in, self.l_out_max
        n_terms = correlation - 1  # products with nu = 2..correlation per rank
        self.n_terms = n_terms
        # output weights: row 0 is nu = 1, row 1 + r * n_terms + (nu - 2) the (rank r, nu) product
        scale = basis_scale(l_in, correlation, self.l_out)  # [nu, irrep]
        weight = torch.zeros(1 + rank * n_terms, num_elements, len(self.l_out), self.num_features)
        grid_weight = torch.randn(correlation, num_elements, len(self.l_out), self.num_features)
        grid_weight = grid_weight * scale.to(grid_weight.dtype)[:, None, :, None]
        weight[: 1 + n_terms] = grid_weight
        del self.weight
        self.weight = torch.nn.Parameter(weight)
        factor = torch.randn(rank, correlation, l_in + 1, self.num_features)
        factor[0] = 1.0
        self.factor = torch.nn.Parameter(factor if n_terms else factor[:, :0])
        degree_of_lm = [l for l in range(l_in + 1) for _ in range(2 * l + 1)]
        self.register_buffer("degree_of_lm", torch.tensor(degree_of_lm), persistent=False)

        self.degree = self.required_degree()
        n_beta, n_alpha = self.degree // 2 + 1, self.degree + 1
        self.n_beta, self.n_alpha = n_beta, n_alpha
        quadrature = sphere.gauss_legendre_grid(n_beta, n_alpha)[2].reshape(-1, 1)  # [G, 1]
        sh = sphere.sh_on_grid(max(l_in, l_max, self.sh_degree()), n_beta, n_alpha)
        sh = sh.reshape(n_beta * n_alpha, -1)  # [G, lm]
        self.register_buffer("to_grid", sh[:, : (l_in + 1) ** 2].clone(), persistent=False)
        projector = (quadrature * sh[:, self.out_lm]).T.contiguous()
        self.register_buffer("projector", projector, persistent=False)
        self.build_maps(sh, quadrature)

    def required_degree(self) -> int:
        """Degree the grid must integrate exactly (subclasses add their intermediate steps)."""
        return grid_degree(self.l_in, self.correlation, self.l_out_max)

    def sh_degree(self) -> int:
        """Highest SH degree an intermediate map on the grid needs (none here)."""
        return 0

    def build_maps(self, sh: torch.Tensor, quadrature: torch.Tensor) -> None:
        """Register a subclass's own grid maps from ``sh [G, lm]`` and ``quadrature [G, 1]``."""

    def node_weights(self, node_attrs: torch.Tensor) -> torch.Tensor:
        """Per-node weight of every basis row, ``[1 + R (corr - 1), D_out, n * C]``."""
        w = self.weight.to(node_attrs.dtype).index_select(2, self.col_irrep).transpose(1, 2)
        w = node_attrs @ w.reshape(-1, self.num_elements, self.num_features)  # [T D_out, n, C]
        return w.view(self.weight.shape[0], self.dim_out, -1)

    def transform_pair(self, pair: torch.Tensor) -> torch.Tensor:
        """What the third factor multiplies: the pair product itself, ``[R, G, n C]``."""
        return pair

    def project_powers(self, features: torch.Tensor) -> torch.Tensor:
        """The rank products: ``[D_in, n C] -> [R (corr - 1), D_out, n C]``, rows as `weight`'s."""
        dim_in, columns = features.shape
        if self.n_terms == 0:
            return features.new_zeros(0, self.dim_out, columns)
        dtype = features.dtype
        channels = self.num_features
        rank, corr = self.rank, self.correlation
        factor = self.factor.to(dtype).index_select(2, self.degree_of_lm)  # [R, corr, D_in, C]
        scaled = features.view(1, dim_in, -1, channels) * factor.view(rank * corr, dim_in, 1, -1)
        values = self.to_grid.to(dtype) @ scaled.view(rank * corr, dim_in, columns)
        values = values.view(rank, corr, -1, columns)  # [R, corr, G, n C]
        projector = self.projector.to(dtype)
        product = values[:, 0] * values[:, 1]
        out = [projector @ product]
        for k in range(2, corr):
            if k == 2:
                product = self.transform_pair(product)
            product = product * values[:, k]
            out.append(projector @ product)
        return torch.stack(out, dim=1).view(rank * self.n_terms, self.dim_out, columns)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, grid={self.n_beta}x{self.n_alpha}"


def build_grid_rank(
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int,
    rank: int = 2,
) -> GridRankProduct:
    """The ``grid_rank`` backend."""
    return GridRankProduct(irreps_in, irreps_out, correlation, num_elements, rank)
