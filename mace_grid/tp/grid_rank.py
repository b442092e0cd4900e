"""Rank-R products of per-degree weighted factors on the sphere grid: the ``grid_rank`` backend.

One pointwise power f^nu learns one map per (nu, L): every coupling of degrees l1, l2, ... into L
shares one weight. Weighting the degrees of each factor separately, f^a = sum_l a_l F_l with
F_l = sum_m A_lm Y_lm, gives path weights a_l1 b_l2 c_l3 x Gaunt (a rank-1 factorisation of the
path-weight tensor), and a sum over R such terms is rank R:

    B_LM = w_1 A_LM + sum_{r < R} sum_{nu=2}^{corr} w_{r,nu,L} P_LM(f^{a_r,1} ... f^{a_r,nu})

(``correlation`` = 3: P(f^a f^b) and P(f^a f^b f^c) per rank). The integrand's degree is that of
f^corr Y_L, so the grid of `grid` (sized for correlation * L_in + L_out) stays exact.
Parameters: ``weight [1 + R (corr - 1), num_elements, len(irreps_out), C]`` (output weights per
element, channel and output irrep, times `grid`'s fixed per-(nu, L) multipliers: they carry the
scale) and ``factor [R, corr, L_in + 1, C]`` (per channel, shared by the elements; O(1)).
Init: rank 0 has all factor weights 1 and grid's initial output weights, so the function starts
as exactly `grid`'s; ranks >= 1 start with N(0, 1) factor weights (the same expected basis size
as all-ones factors) and zero output weights.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).

Factor weights are per channel because the reach is per channel: shared factors would give every
channel the same R coupling maps, leaving only their output weights free, and per-channel
factors cost one multiply of the [D_in, n C] features, nothing on the grid.
"""

import math

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.errors import ConfigError
from mace_grid.tp import sphere
from mace_grid.tp.engine import PointMaps, PointSet, blocks
from mace_grid.tp.gaunt import GauntProductBasis
from mace_grid.tp.grid import gauss_legendre_points

#: bytes of the grid-sized temporaries of one column block (about a CPU's L2 cache)
_BLOCK_BYTES = 1 << 20


class _ProductMaps:
    """The maps of one `GridRankProduct`, cast to the input dtype (eager mode only).

    ``points``: the engine's `PointMaps` of grid's point set (``evaluate [D_in, c] -> [G, c]``,
    dense or separable, its ``adjoint``, ``project [G, c] -> [D_out, c]`` and
    ``project_adjoint``); ``degree_of_lm`` expands per-degree weights to (l, m) rows and
    ``degree_sum [L_in+1, D_in]`` sums rows back; ``trip_*`` are the chain's round-trip maps
    (``chain`` False: no round trip).
    """

    def __init__(self, module: "GridRankProduct", dtype: torch.dtype) -> None:
        self.points = PointMaps(module.points, dtype)
        self.n_points, self.dim_in = module.points.to_points.shape
        self.degree_of_lm = module.degree_of_lm
        self.degree_sum = _degree_sum(module.degree_of_lm, dtype)
        self.correlation = module.correlation
        self.chain = hasattr(module, "trip_project")
        if self.chain:
            self.trip_project = module.trip_project.to(dtype)
            self.trip_project_t = self.trip_project.T.contiguous()
            self.trip_synth = module.trip_synth.to(dtype)
            self.trip_synth_t = self.trip_synth.T.contiguous()
            self.degree_of_k = module.degree_of_k
            self.degree_sum_k = _degree_sum(module.degree_of_k, dtype)


def _degree_sum(degree_of_row: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n_degrees, rows]`` 0/1 matrix summing the rows of each degree."""
    n = int(degree_of_row.max()) + 1
    return torch.nn.functional.one_hot(degree_of_row, n).T.to(dtype)


# Tangent-carrying values: (primal, tangent or None). `_products` runs on them so that one code
# path gives the forward, the vector-Jacobian product, and the forward-mode derivative of both.


def _mul(x, y):
    p = x[0] * y[0]
    if x[1] is None:
        return p, None if y[1] is None else x[0] * y[1]
    return p, x[1] * y[0] if y[1] is None else torch.addcmul(x[1] * y[0], x[0], y[1])


def _add(x, y):
    if x[1] is None or y[1] is None:
        return x[0] + y[0], x[1] if y[1] is None else y[1]
    return x[0] + y[0], x[1] + y[1]


def _add_projected(x, grad, points: PointMaps, project_t):
    """``x + project^T grad`` (x fresh, updated in place by one fused matmul-add)."""
    p = x[0]
    points.project_adjoint_add(p.view(p.shape[0], -1), grad[0].reshape(points.dim_out, -1), 1.0)
    if grad[1] is None:
        return p, x[1]
    extra = project_t(grad[1])
    return p, extra if x[1] is None else x[1] + extra


def _linear(f, x):
    """A linear map applied to a tangent-carrying value."""
    return f(x[0]), None if x[1] is None else f(x[1])


def _sum_middle(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(1)`` for a short middle dimension, as adds (torch's strided reduction is slow)."""
    parts = t.unbind(1)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def _stack(xs, dim: int):
    p = torch.stack([x[0] for x in xs], dim)
    if all(x[1] is None for x in xs):
        return p, None
    return p, torch.stack([torch.zeros_like(x[0]) if x[1] is None else x[1] for x in xs], dim)


def _products(maps: _ProductMaps, a, w, d, grad=None, need_out: bool = True):
    """The rank products of one column block, and with ``grad`` their vector-Jacobian product.

    Arguments and results are (primal, tangent) pairs. ``a [D_in, b]`` features,
    ``w [L_in+1, R corr, b]`` factor weights, ``d [K+1, R, b]`` round-trip weights (chain) ->
    ``out [corr-1, D_out, R, b]``; with ``grad`` (shaped as ``out``) also
    ``(grad_a, grad_w, grad_d)``. The factors are g_j = evaluate(w_j a), j < corr, per rank;
    p_k = left_k g_k is the product of the first k + 1, with left_1 = g_0, left_k = p_{k-1},
    except the chain's left_2 = synth(d project_K(p_1)).
    """
    rank, corr = d[0].shape[1], maps.correlation
    n_points, dim_in, b = maps.n_points, maps.dim_in, a[0].shape[1]
    on_grid = (n_points, rank, b)
    points = maps.points

    def grid_map(matrix, shape):
        return lambda t: (matrix @ t.reshape(matrix.shape[1], -1)).view(shape)

    def point_map(apply, rows: int, shape):
        return lambda t: apply(t.reshape(rows, -1)).view(shape)

    w_lm = _linear(lambda t: t.index_select(0, maps.degree_of_lm), w)  # [D_in, R corr, b]
    a_col = _linear(lambda t: t.unsqueeze(1), a)
    evaluate = point_map(points.evaluate, dim_in, (n_points, rank, corr, b))
    g = _linear(evaluate, _mul(a_col, w_lm))

    def factor(k: int):
        return _linear(lambda t: t[:, :, k], g)

    left, products = [factor(0)], []
    coeff = d_k = None
    for k in range(1, corr):
        if k == 2 and maps.chain:
            n_k = maps.trip_project.shape[0]
            coeff = _linear(grid_map(maps.trip_project, (n_k, rank * b)), products[0])
            d_k = _linear(lambda t, n=n_k: t.index_select(0, maps.degree_of_k).view(n, -1), d)
            left.append(_linear(grid_map(maps.trip_synth, on_grid), _mul(coeff, d_k)))
        elif k >= 2:
            left.append(products[-1])
        products.append(_mul(left[k - 1], factor(k)))
    project = point_map(points.project, n_points, (-1, rank, b))
    out = _stack([_linear(project, p) for p in products], 0) if need_out else None
    if grad is None:
        return out
    project_t = point_map(points.project_adjoint, points.dim_out, on_grid)

    def grad_out(k: int):
        return _linear(lambda t: t[k], grad)

    grad_g = [factor(0)] * corr  # placeholders, all overwritten
    grad_d = (torch.zeros_like(d[0]), None)
    adjoint = _linear(project_t, grad_out(corr - 2))  # of p_{corr-1}
    for k in range(corr - 1, 0, -1):
        grad_g[k] = _mul(adjoint, left[k - 1])
        adj_left = _mul(adjoint, factor(k))
        if k == 1:
            grad_g[0] = adj_left
            break
        if k == 2 and maps.chain:
            t = _linear(grid_map(maps.trip_synth_t, (-1, rank * b)), adj_left)
            grad_d = _linear(grid_map(maps.degree_sum_k, (-1, rank, b)), _mul(coeff, t))
            adj_left = _linear(grid_map(maps.trip_project_t, on_grid), _mul(t, d_k))
        adjoint = _add_projected(adj_left, grad_out(k - 2), points, project_t)
    adjoint_map = point_map(points.adjoint, n_points, (dim_in, rank, b))  # stack the small ones
    grad_z = _linear(
        lambda t: t.view(dim_in, rank * corr, b),
        _stack([_linear(adjoint_map, x) for x in grad_g], 2),
    )
    grad_a = _linear(_sum_middle, _mul(grad_z, w_lm))
    grad_w = _linear(grid_map(maps.degree_sum, (-1, rank * corr, b)), _mul(grad_z, a_col))
    return out, grad_a, grad_w, grad_d


class _RankProduct(torch.autograd.Function):
    """`_products` over cache-sized column blocks; its backward is `_RankProductVJP`, so the
    forces (first derivative) can be differentiated again in training."""

    @staticmethod
    def forward(ctx, a, w, d, maps, block):
        ctx.save_for_backward(a, w, d)
        ctx.maps, ctx.block = maps, block
        out = a.new_empty(maps.correlation - 1, maps.points.dim_out, d.shape[1], a.shape[1])
        for start, stop in blocks(a.shape[1], block):
            cols = slice(start, stop)
            blk = (a[:, cols], None), (w[..., cols], None), (d[..., cols], None)
            out[..., cols] = _products(maps, *blk)[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        a, w, d = ctx.saved_tensors
        grads = _RankProductVJP.apply(a, w, d, grad, ctx.maps, ctx.block)
        return *grads, None, None


class _RankProductVJP(torch.autograd.Function):
    """``(grad_a, grad_w, grad_d)`` of `_products`, blockwise. Its backward (the second
    derivatives) is the forward-mode derivative of `_products` along the incoming cotangents v:
    for phi = <grad, out>, d/d(a, w, d) <v, grad phi> = Hessian(phi) v, the tangent of
    grad phi, and d/d grad <v, grad phi> = the tangent of out."""

    @staticmethod
    def forward(ctx, a, w, d, grad, maps, block):
        ctx.save_for_backward(a, w, d, grad)
        ctx.maps, ctx.block = maps, block
        # Unused outputs (grad_w, grad_d of the forces pass) get None, not zeros: no tangents.
        ctx.set_materialize_grads(False)
        grad_a, grad_w, grad_d = torch.empty_like(a), torch.empty_like(w), torch.empty_like(d)
        for start, stop in blocks(a.shape[1], block):
            cols = slice(start, stop)
            blk = (a[:, cols], None), (w[..., cols], None), (d[..., cols], None)
            _, ga, gw, gd = _products(maps, *blk, (grad[..., cols], None), need_out=False)
            grad_a[:, cols], grad_w[..., cols], grad_d[..., cols] = ga[0], gw[0], gd[0]
        return grad_a, grad_w, grad_d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_a, v_w, v_d):
        a, w, d, grad = ctx.saved_tensors
        need = ctx.needs_input_grad
        if v_a is None and v_w is None and v_d is None:
            return None, None, None, None, None, None
        results = [
            torch.zeros_like(t) if n else None
            for t, n in zip((a, w, d, grad), need[:4], strict=True)
        ]
        for start, stop in blocks(a.shape[1], ctx.block):
            cols = slice(start, stop)

            def part(primal, tangent, cols=cols):
                return primal[..., cols], None if tangent is None else tangent[..., cols]

            blk = part(a, v_a), part(w, v_w), part(d, v_d), (grad[..., cols], None)
            tangents = [x[1] for x in _products(ctx.maps, *blk)]
            for result, tangent in zip(
                results, (tangents[1], tangents[2], tangents[3], tangents[0]), strict=True
            ):
                if result is not None and tangent is not None:
                    result[..., cols] = tangent
        return *results, None, None


@compile_mode("script")
class GridRankProduct(GauntProductBasis):
    """Rank-``rank`` product basis on a Gauss-Legendre x equispaced sphere grid (module doc).

    ``points`` is `grid`'s point set on the engine (`mace_grid.tp.engine.PointSet`: evaluate
    a factor at the points, project a product back); the grid integrates polynomials of degree
    ``degree`` exactly. Subclasses may transform the pair
    product before the third factor multiplies it (`transform_pair`).
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
        l_in = self.l_in
        n_terms = correlation - 1  # products with nu = 2..correlation per rank
        self.n_terms = n_terms
        # output weights: row 0 is nu = 1, row 1 + (nu - 2) * rank + r the (nu, rank r) product;
        # rank 0 takes grid's initial weights and fixed multipliers, the other ranks start at 0
        grid_weight = self.weight.detach()
        weight = grid_weight.new_zeros(1 + rank * n_terms, *grid_weight.shape[1:])
        weight[0] = grid_weight[0]
        weight[1::rank] = grid_weight[1:]
        del self.weight
        self.weight = torch.nn.Parameter(weight)
        repeats = torch.tensor([1] + [rank] * n_terms)
        scale = self.basis_scale / self.init_weight_std  # 0 where L > nu L_in
        self.register_buffer("term_scale", scale.repeat_interleave(repeats, 0), persistent=False)
        factor = torch.randn(rank, correlation, l_in + 1, self.num_features)
        factor[0] = 1.0
        self.factor = torch.nn.Parameter(factor if n_terms else factor[:, :0])
        degree_of_lm = [l for l in range(l_in + 1) for _ in range(2 * l + 1)]
        self.register_buffer("degree_of_lm", torch.tensor(degree_of_lm), persistent=False)

        # `grid`'s point set; subclasses whose intermediate steps need more raise in check_degree
        self.points = PointSet(
            l_in, correlation, *gauss_legendre_points(l_in, correlation, self.l_out)
        )
        n_beta, n_alpha = self.points.n_polar, self.points.n_azimuth
        self.n_beta, self.n_alpha = n_beta, n_alpha
        self.degree = min(2 * n_beta - 1, n_alpha - 1)  # integrated exactly
        self.check_degree()
        # the subclass's maps on the same (alpha-major) points
        quadrature = sphere.gauss_legendre_grid(n_beta, n_alpha)[2].T.reshape(-1, 1)  # [G, 1]
        sh = sphere.sh_on_grid(self.sh_degree(), n_beta, n_alpha).transpose(0, 1)
        self.build_maps(sh.reshape(n_beta * n_alpha, -1), quadrature)
        # columns per block: the ~3 corr R grid-sized float32 temporaries fill ~_BLOCK_BYTES
        temporaries = 3 * correlation * rank * n_beta * n_alpha
        self.block = 2 ** max(6, round(math.log2(_BLOCK_BYTES / 4 / temporaries)))

    @torch.jit.unused
    def function_constants(self) -> dict:
        return super().function_constants() | {
            "points": "gauss-legendre",
            "n_beta": self.n_beta,
            "n_alpha": self.n_alpha,
            "rank": self.rank,
        }

    def check_degree(self) -> None:
        """Subclasses check that the grid integrates their intermediate products exactly."""

    def sh_degree(self) -> int:
        """Highest SH degree of a subclass's own maps on the grid (none here)."""
        return 0

    def build_maps(self, sh: torch.Tensor, quadrature: torch.Tensor) -> None:
        """Register a subclass's own grid maps from ``sh [G, lm]`` and ``quadrature [G, 1]``."""

    def node_weights(self, node_attrs: torch.Tensor) -> torch.Tensor:
        """Per-node weight of every basis row, ``[1 + R (corr - 1), D_out, n * C]``."""
        w = (
            self.weight.to(node_attrs.dtype)
            * self.term_scale.to(node_attrs.dtype)[:, None, :, None]
        )
        w = w.index_select(2, self.col_irrep).transpose(1, 2)
        w = node_attrs @ w.reshape(-1, self.num_elements, self.num_features)  # [T D_out, n, C]
        return w.view(self.weight.shape[0], self.dim_out, -1)

    def transform_pair(self, pair: torch.Tensor) -> torch.Tensor:
        """What the third factor multiplies: the pair product itself, ``[R, G, n C]``."""
        return pair

    def project_powers(self, features: torch.Tensor) -> torch.Tensor:
        """The rank products: ``[D_in, n C] -> [R (corr - 1), D_out, n C]``, rows as `weight`'s."""
        if self.n_terms == 0:
            return features.new_zeros(0, self.dim_out, features.shape[1])
        if torch.jit.is_scripting():
            return self._project_autograd(features)
        return self._project_fused(features)

    def round_trip_weight(self) -> torch.Tensor:
        """Per-degree round-trip weights ``[R, K + 1, C]`` (none here: K + 1 = 0)."""
        return self.factor.new_zeros(self.rank, 0, self.num_features)

    @torch.jit.unused
    def _project_fused(self, features: torch.Tensor) -> torch.Tensor:
        dtype, columns = features.dtype, features.shape[1]
        channel = torch.arange(columns, device=features.device) % self.num_features
        w = self.factor.to(dtype).permute(2, 0, 1, 3).reshape(self.l_in + 1, -1, self.num_features)
        d = self.round_trip_weight().to(dtype).permute(1, 0, 2)  # [K+1, R, C]
        block = self.block if features.device.type == "cpu" else columns  # GPU: 1 block
        maps = _ProductMaps(self, dtype)
        out = _RankProduct.apply(
            features, w.index_select(2, channel), d.index_select(2, channel), maps, block
        )  # [corr - 1, D_out, R, n C]
        return out.transpose(1, 2).reshape(-1, self.dim_out, columns)

    def _project_autograd(self, features: torch.Tensor) -> torch.Tensor:
        """The same as `_RankProduct` with plain differentiable ops (TorchScript path)."""
        dim_in, columns = features.shape
        dtype = features.dtype
        channels = self.num_features
        rank, corr = self.rank, self.correlation
        factor = self.factor.to(dtype).index_select(2, self.degree_of_lm)  # [R, corr, D_in, C]
        scaled = features.view(1, dim_in, -1, channels) * factor.view(rank * corr, dim_in, 1, -1)
        values = self.points.to_points.to(dtype) @ scaled.view(rank * corr, dim_in, columns)
        values = values.view(rank, corr, -1, columns)  # [R, corr, G, n C]
        projector = self.points.projector.to(dtype)
        product = values[:, 0] * values[:, 1]
        out = [projector @ product]
        for k in range(2, corr):
            if k == 2:
                product = self.transform_pair(product)
            product = product * values[:, k]
            out.append(projector @ product)
        return torch.stack(out, dim=0).view(self.n_terms * rank, self.dim_out, columns)

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
