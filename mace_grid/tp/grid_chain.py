"""`grid_rank` plus one weighted round trip through SH space: the ``grid_chain`` backend.

A pointwise product of weighted factors cannot weight the intermediate degree k of a chain
[[A_a A_b]_k A_c]_L. One round trip does: S_r = f^a f^b, h_r = sum_{k <= K} d_{r,k} synth(P_k S_r)
(project the pair product on degrees <= K, weight each degree, resynthesise on the grid), and the
nu >= 3 products become P_LM(h_r f^c ...). K = min(2 L_in, (corr - 2) L_in + L_out), the highest
k that can still couple into L_out, so d = 1 reproduces `grid_rank` exactly. The grid integrates
S Y_k (degree 2 L_in + K) and h f^c ... Y_L (degree K + (corr - 2) L_in + L_out) exactly; both are
<= corr L_in + L_out, so `grid`'s grid suffices (`check_degree` checks).
Parameters: `grid_rank`'s, plus ``trip [R, K + 1, C]`` (per rank, degree and channel; with
``factors="element"`` ``[R, K + 1, num_elements, C]``): 1 for rank 0 (the function starts as
`grid`'s), N(0, 1) for the others.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).
"""

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.tp import sphere
from mace_grid.tp.grid_rank import GridRankProduct


def chain_degree(l_in: int, correlation: int, l_out: int) -> int:
    """K: the highest intermediate degree that can couple into ``l_out`` after the round trip."""
    return min(2 * l_in, (correlation - 2) * l_in + l_out) if correlation >= 3 else 0


@compile_mode("script")
class GridChainProduct(GridRankProduct):
    """`GridRankProduct` whose pair products take one per-degree weighted round trip (module doc).

    ``trip_project [(K+1)^2, G]`` projects on Y_k, k <= K; ``trip_synth [G, (K+1)^2]`` evaluates
    back on the grid.
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        correlation: int,
        num_elements: int,
        rank: int = 2,
        factors: str = "channel",
    ) -> None:
        super().__init__(irreps_in, irreps_out, correlation, num_elements, rank, factors)
        trip = torch.randn(rank, self.trip_degree + 1, *self._sets_shape, self.num_features)
        trip[0] = 1.0
        if correlation >= 3:
            self.trip = torch.nn.Parameter(trip)
        else:  # no round trip: an empty state entry, but no parameter that no forward uses
            self.register_buffer("trip", trip[:, :0])

    @torch.jit.unused
    def function_constants(self) -> dict:
        return super().function_constants() | {"round_trip_degree": self.trip_degree}

    def check_degree(self) -> None:
        l_in, corr, l_out = self.l_in, self.correlation, self.l_out_max
        k = self.trip_degree = chain_degree(l_in, corr, l_out)
        if corr < 3:  # no product follows the pair: no round trip
            return
        needed = max(2 * l_in + k, k + (corr - 2) * l_in + l_out)  # projection, last product
        if needed > self.degree:  # cannot happen for this K; guards a change of K
            raise ValueError(f"round trip needs grid degree {needed} > {self.degree}")

    def build_maps(self, n_beta: int, n_alpha: int) -> None:
        """The round trip on the n_beta x n_alpha Gauss-Legendre grid, dense (TorchScript path)
        and separable (fused kernel): h(a, b) = sum_m S_m(a) sum_b' [sum_k d_k P_km(b) P_km(b')
        q_b'] sum_a' S_m(a') p(a', b') / n_alpha (a, b: azimuth, polar), with q the polar
        quadrature weights; ``trip_analysis [M_K, n_alpha]`` (S_m / n_alpha,
        M_K = 2K + 1) and ``trip_filters [K+1, M_K, n_beta, n_beta]`` (the k-th term; 0 for
        |m| > k). The separable form costs ~2.6x fewer flops than the dense one at K = 5."""
        k = self.trip_degree
        beta, alpha, weight = sphere.gauss_legendre_grid(n_beta, n_alpha)
        sh = sphere.sh_on_grid(k, n_beta, n_alpha).transpose(0, 1).reshape(n_beta * n_alpha, -1)
        quadrature = weight.T.reshape(-1, 1)  # alpha-major points, as the engine's
        self.register_buffer("trip_synth", sh.contiguous(), persistent=False)
        self.register_buffer("trip_project", (quadrature * sh).T.contiguous(), persistent=False)
        degree_of_k = [l for l in range(k + 1) for _ in range(2 * l + 1)]
        self.register_buffer("degree_of_k", torch.tensor(degree_of_k), persistent=False)
        analysis = sphere.azimuth_part(k, alpha).T / n_alpha  # [M_K, n_alpha]
        self.register_buffer("trip_analysis", analysis.contiguous(), persistent=False)
        legendre = sphere.legendre_part(k, beta)  # [n_beta, (K+1)^2]
        polar_weight = weight[:, 0] * n_alpha
        filters = torch.zeros(k + 1, 2 * k + 1, n_beta, n_beta, dtype=torch.float64)
        for l in range(k + 1):
            for m in range(-l, l + 1):
                column = legendre[:, sphere.lm_index(l, m)]
                filters[l, m + k] = column[:, None] * (column * polar_weight)[None, :]
        self.register_buffer("trip_filters", filters, persistent=False)
        # the compiled kernel's polar factors: P_km(beta) with and without the quadrature weight
        self.register_buffer("trip_legendre", legendre.T.contiguous(), persistent=False)
        self.register_buffer(
            "trip_legendre_weighted",
            (legendre * polar_weight[:, None]).T.contiguous(),
            persistent=False,
        )

    def round_trip_weight(self) -> torch.Tensor:
        shape = self.trip.shape
        return self.trip.view(shape[0], shape[1], self.factor_sets, shape[-1])

    def transform_pair(self, pair: torch.Tensor, species: torch.Tensor | None) -> torch.Tensor:
        """``h = synth(d * P_{k <= K}(pair))``, ``[R, G, n C] -> [R, G, n C]``."""
        dtype = pair.dtype
        rank, columns = pair.shape[0], pair.shape[2]
        coeff = self.trip_project.to(dtype) @ pair  # [R, (K+1)^2, n C]
        weight = self.round_trip_weight().to(dtype).index_select(1, self.degree_of_k)
        if species is not None:  # [R, (K+1)^2, sets, C] -> per node
            weight = weight.index_select(2, species)
        coeff = coeff.view(rank, weight.shape[1], -1, self.num_features) * weight
        return self.trip_synth.to(dtype) @ coeff.view(rank, -1, columns)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, K={self.trip_degree}"


def build_grid_chain(
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int,
    rank: int = 2,
    factors: str = "channel",
) -> GridChainProduct:
    """The ``grid_chain`` backend."""
    return GridChainProduct(irreps_in, irreps_out, correlation, num_elements, rank, factors)
