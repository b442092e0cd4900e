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
scale) and ``factor [R, corr, L_in + 1, C]`` (per channel, shared by the elements; O(1)), or with
``factors="element"`` ``factor [R, corr, L_in + 1, num_elements, C]``.
Init: rank 0 has all factor weights 1 and grid's initial output weights, so the function starts
as exactly `grid`'s; ranks >= 1 start with N(0, 1) factor weights (the same expected basis size
as all-ones factors) and zero output weights.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).

Factor weights are per channel because the reach is per channel: shared factors would give every
channel the same R coupling maps, leaving only their output weights free. They cost nothing
extra: the kernels evaluate the per-degree parts F_l on the grid once per column and mix every
factor from them, g = w F, instead of evaluating each factor (R corr evaluations). The same
argument holds for elements: with factors shared by the elements (``factors="channel"``, the
default) a channel of an E-element model reaches fewer maps than E times one element's
(`mace_grid.tp.expressivity`); ``factors="element"`` gives every (element, channel) its own.
Kernels: on the CPU the compiled one (`mace_grid.tp.rank_kernel`: one pass per vector of
columns, weights gathered per column); elsewhere, or without a compiler, `_RankProduct` below,
channels as its blocks (layout [C, ..., n]) and one small matmul per channel, per-element
weights gathered per node into one call off the CPU and one call per element on its nodes on
the CPU (`_gathers_per_node`).
"""

import math

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.errors import ConfigError
from mace_grid.tp import rank_kernel
from mace_grid.tp.engine import PointSet, block_size
from mace_grid.tp.gaunt import GauntProductBasis
from mace_grid.tp.grid import gauss_legendre_points

#: who owns a set of factor (and round-trip) weights: each channel, or each (element, channel)
FACTORS = ("channel", "element")


def check_rank(rank: int) -> None:
    """`ConfigError` unless ``rank`` (``tp.options.rank``) is an integer >= 1."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"tp.options.rank must be an integer >= 1, got {rank!r}")


def check_factors(factors: str) -> None:
    """`ConfigError` unless ``factors`` (``tp.options.factors``) is one of `FACTORS`."""
    if factors not in FACTORS:
        raise ConfigError(f"tp.options.factors must be one of {FACTORS}, got {factors!r}")


#: bytes of the grid-sized temporaries of one block (measured best at about two CPU L2 caches)
_BLOCK_BYTES = 1 << 21


class _ProductMaps:
    """The maps of one `GridRankProduct`, cast to the input dtype (eager mode only).

    From grid's point set (the engine's `PointSet`): ``degree_points [L_in+1, G, M]``, Y_lm at
    the points for each degree l (column m + l, padded to M = 2 L_in + 1), with ``pad_index``
    ((l, m) -> row of [L_in+1, M]) and its transpose; ``projector [D_out, G]`` and its
    transpose. ``chain``: the chain's separable round trip (`GridChainProduct.build_maps`):
    ``trip_analysis [M_K, n_alpha]``, ``trip_synthesis`` = its transpose times n_alpha, and
    ``trip_filters [K+1, M_K n_beta n_beta]``.
    """

    def __init__(self, module: "GridRankProduct", dtype: torch.dtype) -> None:
        to_points = module.points.to_points.to(dtype)  # [G, D_in]
        self.n_points = to_points.shape[0]
        self.n_degrees = module.l_in + 1
        width = 2 * module.l_in + 1
        self.pad_index = module.degree_pad_index
        padded = to_points.new_zeros(self.n_degrees * width, self.n_points)
        padded.index_copy_(0, self.pad_index, to_points.T)
        self.degree_points_t = padded.view(self.n_degrees, width, -1)  # [L_in+1, M, G]
        self.degree_points = self.degree_points_t.transpose(1, 2).contiguous()
        self.width = width
        self.projector = module.points.projector.to(dtype)
        self.projector_t = module.points.projector_t.to(dtype)
        self.dim_out = self.projector.shape[0]
        self.correlation = module.correlation
        self.chain = hasattr(module, "trip_project")
        if self.chain:  # the separable round trip, see `GridChainProduct.build_maps`
            self.n_beta = module.n_beta
            self.trip_analysis = module.trip_analysis.to(dtype)
            self.trip_analysis_t = self.trip_analysis.T.contiguous()
            self.trip_synthesis = self.trip_analysis_t * self.trip_analysis.shape[1]
            self.trip_synthesis_t = self.trip_synthesis.T.contiguous()
            self.trip_filters = module.trip_filters.to(dtype).flatten(1)  # [K+1, M_K n_b n_b]
            self.trip_filters_t = self.trip_filters.T.contiguous()
            terms = module.trip_filters.to(dtype)  # [K+1, M_K, n_b, n_b]
            self.trip_terms = list(terms.unbind(0))
            self.trip_terms_t = list(terms.transpose(-1, -2).unbind(0))

    def _to_frequencies(self, matrix: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``matrix [M_K, n_alpha]`` along the azimuths: ``[c, R, G, b] -> [c, R, M_K, n_b, b]``."""
        c, r, _, b = p.shape
        return (matrix @ p.view(c, r, matrix.shape[1], -1)).view(c, r, -1, self.n_beta, b)

    def _to_azimuths(self, matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``matrix [n_alpha, M_K]`` along frequencies: ``[c, R, M_K, n_b, b] -> [c, R, G, b]``."""
        c, r, _, _, b = x.shape
        return (matrix @ x.view(c, r, matrix.shape[1], -1)).view(c, r, -1, b)

    def analyse(self, p: torch.Tensor) -> torch.Tensor:
        """Azimuthal frequencies m <= K of grid values."""
        return self._to_frequencies(self.trip_analysis, p)

    def analyse_t(self, x: torch.Tensor) -> torch.Tensor:
        return self._to_azimuths(self.trip_analysis_t, x)

    def synthesise(self, x: torch.Tensor) -> torch.Tensor:
        """Back to grid values."""
        return self._to_azimuths(self.trip_synthesis, x)

    def synthesise_t(self, p: torch.Tensor) -> torch.Tensor:
        return self._to_frequencies(self.trip_synthesis_t, p)

    def filters(self, d: torch.Tensor) -> torch.Tensor:
        """Per-m polar filters sum_k d_k B_km: ``[c, R, K+1] -> [c, R, M_K, n_b, n_b]``."""
        c, r, _ = d.shape
        return (d @ self.trip_filters).view(c, r, -1, self.n_beta, self.n_beta)

    def filter_terms(self, x: torch.Tensor, transpose: bool = False) -> list[torch.Tensor]:
        """Each term B_k (or B_k^T) applied to ``x [c, R, M_K, n_b, b]``, k = 0..K."""
        terms = self.trip_terms_t if transpose else self.trip_terms
        return [term @ x for term in terms]

    def apply_filters(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """sum_k d_k B_k x, bilinear in (d, x): ``d [c, R, K+1]`` (per node: ``[c, R, K+1, b]``)."""
        if d.dim() == 3:
            return self.filters(d) @ x
        return _weighted_sum(d, self.filter_terms(x))

    def apply_filters_t(self, d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """sum_k d_k B_k^T x (the transpose of `apply_filters` in x)."""
        if d.dim() == 3:
            return self.filters(d).transpose(-1, -2) @ x
        return _weighted_sum(d, self.filter_terms(x, transpose=True))

    def filters_grad(self, t: torch.Tensor, x: torch.Tensor, per_node: bool) -> torch.Tensor:
        """d <t, apply_filters(d, x)> / d d: ``[c, R, K+1]``, summed over nodes unless
        ``per_node`` (``[c, R, K+1, b]``)."""
        if not per_node:
            c, r = t.shape[:2]
            return (t @ x.transpose(-1, -2)).reshape(c, r, -1) @ self.trip_filters_t
        return torch.stack([(t * bx).sum((2, 3)) for bx in self.filter_terms(x)], 2)

    def evaluate_degrees(self, a: torch.Tensor) -> torch.Tensor:
        """``[c, D_in, b] -> [c, L_in+1, G b]``: F_l = sum_m A_lm Y_lm at the points, per l."""
        c, _, b = a.shape
        padded = a.new_zeros(c, self.n_degrees * self.width, b).index_copy_(1, self.pad_index, a)
        values = self.degree_points @ padded.view(c, self.n_degrees, self.width, b)
        return values.view(c, self.n_degrees, -1)

    def adjoint_degrees(self, grad: torch.Tensor) -> torch.Tensor:
        """The transpose of `evaluate_degrees`: ``[c, L_in+1, G b] -> [c, D_in, b]``."""
        c = grad.shape[0]
        per_m = self.degree_points_t @ grad.view(c, self.n_degrees, self.n_points, -1)
        return per_m.view(c, self.n_degrees * self.width, -1).index_select(1, self.pad_index)


# Tangent-carrying values: (primal, tangent or None). `_products` runs on them so that one code
# path gives the forward, the vector-Jacobian product, and the forward-mode derivative of both.
# ``primal=False`` skips a result's primal where only its tangent is wanted.


def _mul(x, y, primal: bool = True):
    p = x[0] * y[0] if primal else None
    if x[1] is None:
        return p, None if y[1] is None else x[0] * y[1]
    return p, x[1] * y[0] if y[1] is None else torch.addcmul(x[1] * y[0], x[0], y[1])


def _bilinear(f, x, y, primal: bool = True):
    """``f(x, y)`` for a bilinear f: tangent f(x', y) + f(x, y')."""
    tangent = None if x[1] is None else f(x[1], y[0])
    if y[1] is not None:
        extra = f(x[0], y[1])
        tangent = extra if tangent is None else tangent.add_(extra)
    return f(x[0], y[0]) if primal else None, tangent


def _add(x, y):
    if x[1] is None or y[1] is None:
        return x[0] + y[0], x[1] if y[1] is None else y[1]
    return x[0] + y[0], x[1] + y[1]


def _linear(f, x, primal: bool = True):
    """A linear map applied to a tangent-carrying value."""
    return f(x[0]) if primal else None, None if x[1] is None else f(x[1])


def _mul_into(x, y, out) -> None:
    """`_mul` written into ``out`` (primal buffer, tangent buffer or None)."""
    torch.mul(x[0], y[0], out=out[0])
    if out[1] is not None:
        if x[1] is None and y[1] is None:
            out[1].zero_()
        elif x[1] is None or y[1] is None:
            torch.mul(*((x[0], y[1]) if x[1] is None else (x[1], y[0])), out=out[1])
        else:
            torch.mul(x[1], y[0], out=out[1]).addcmul_(x[0], y[1])


def _stack(xs, dim: int):
    p = None if xs[0][0] is None else torch.stack([x[0] for x in xs], dim)
    if all(x[1] is None for x in xs):
        return p, None
    like = next(x[1] for x in xs if x[1] is not None)
    return p, torch.stack([torch.zeros_like(like) if x[1] is None else x[1] for x in xs], dim)


def _weighted_sum(weights: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
    """sum_k weights[:, :, k] * terms[k], per node: ``weights [c, R, K, b]``, terms
    ``[c, R, ..., b]``."""
    shape = (*weights.shape[:2], *(1,) * (terms[0].dim() - 3), weights.shape[3])
    out = terms[0] * weights[:, :, 0].view(shape)
    for k in range(1, len(terms)):
        out.addcmul_(terms[k], weights[:, :, k].view(shape))
    return out


def _mix(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The factors g_j = sum_l w_jl F_l: ``w [c, J, L_in+1]`` (per node ``[c, J, L_in+1, b]``),
    ``values [c, L_in+1, G b] -> [c, J, G b]``."""
    if w.dim() == 3:
        return torch.bmm(w, values)
    c, j, degrees, b = w.shape
    f = values.view(c, degrees, -1, b)
    out = w[:, :, 0, None] * f[:, None, 0]
    for l in range(1, degrees):
        out.addcmul_(w[:, :, l, None], f[:, None, l])
    return out.reshape(c, j, -1)


def _mix_grad_w(grad_g: torch.Tensor, values: torch.Tensor, b: int | None) -> torch.Tensor:
    """d <grad_g, _mix(w, values)> / d w, summed over nodes (``b`` None) or per node."""
    if b is None:
        return grad_g @ values.transpose(1, 2)
    c, j = grad_g.shape[:2]
    g = grad_g.view(c, j, -1, b)
    f = values.view(c, values.shape[1], -1, b)
    return torch.stack([(g * f[:, None, l]).sum(2) for l in range(f.shape[1])], 2)


def _mix_t(w: torch.Tensor, grad_g: torch.Tensor) -> torch.Tensor:
    """The transpose of `_mix` in ``values``: ``[c, J, G b] -> [c, L_in+1, G b]``."""
    if w.dim() == 3:
        return w.transpose(1, 2) @ grad_g
    c, j, degrees, b = w.shape
    g = grad_g.view(c, j, -1, b)
    parts = [(g * w[:, :, l, None]).sum(1) for l in range(degrees)]
    return torch.stack(parts, 1).view(c, degrees, -1)


def _products(maps: _ProductMaps, a, w, d, grad=None, primal: bool = True, need_out: bool = True):
    """The rank products of one block of c channels x b nodes, and with ``grad`` their VJP.

    Arguments and results are (primal, tangent) pairs. ``a [c, D_in, b]`` features,
    ``w [c, corr R, L_in+1]`` factor weights (factor-major), ``d [c, R, K+1]`` round-trip
    weights (chain) -> ``out [c, corr-1, R, D_out, b]``; with ``grad`` (shaped as ``out``) also
    ``(grad_a, grad_w, grad_d)``, the weights' summed over the block's nodes. Per-node weights
    (``w [c, corr R, L_in+1, b]``, ``d [c, R, K+1, b]``: factors per element, gathered) get
    per-node gradients. The per-degree
    parts F_l are evaluated once; factor j is g_j = sum_l w_jl F_l (one small matmul per
    channel, instead of one evaluation per factor); p_k = left_k g_k is the product of the
    first k + 1, with left_1 = g_0, left_k = p_{k-1}, except the chain's
    left_2 = synth(d project_K(p_1)).
    """
    rank, corr = d[0].shape[1], maps.correlation
    c, b, n_points = a[0].shape[0], a[0].shape[2], maps.n_points
    tangents = any(x[1] is not None for x in (a, w, d))
    nodes = b if w[0].dim() == 4 else None  # per-node weights

    values = _linear(maps.evaluate_degrees, a)  # [c, L_in+1, G b]
    g = _linear(lambda t: t.view(c, corr, rank, n_points, b), _bilinear(_mix, w, values))

    def factor(k: int):
        return _linear(lambda t: t[:, k], g)  # [c, R, G, b]

    left, products = [factor(0)], []  # left[k - 1] multiplies factor k into p_k
    pair = None
    for k in range(1, corr):
        if k == 2 and maps.chain:  # synthesise(filters(d) analyse(p_1)), per azimuthal m
            pair = _linear(maps.analyse, products[0])
            left.append(_linear(maps.synthesise, _bilinear(maps.apply_filters, d, pair)))
        elif k >= 2:
            left.append(products[-1])
        if k < corr - 1:
            products.append(_mul(left[k - 1], factor(k)))
        elif need_out:  # the last product only feeds `out`
            products.append(_mul(left[k - 1], factor(k), primal))
    out = None
    if need_out:
        out = _stack([_linear(lambda t: maps.projector @ t, p, primal) for p in products], 1)
    if grad is None:
        return out
    # project^T of the cotangents of p_1 .. p_{corr-1}, [c, corr-1, R, G, b]
    adjoints = _linear(lambda t: maps.projector_t @ t, grad)
    grad_g = a[0].new_empty(c, corr, rank, n_points, b)  # filled factor by factor
    grad_g = grad_g, torch.empty_like(grad_g) if tangents else None
    grad_d = (torch.zeros_like(d[0]) if primal else None, None)

    def slot(k: int):
        return grad_g[0][:, k], None if grad_g[1] is None else grad_g[1][:, k]

    adjoint = _linear(lambda t: t[:, corr - 2], adjoints)
    for k in range(corr - 1, 0, -1):
        _mul_into(adjoint, left[k - 1], slot(k))
        if k == 1:
            _mul_into(adjoint, factor(k), slot(0))
            break
        adj_left = _mul(adjoint, factor(k))
        if k == 2 and maps.chain:
            t = _linear(maps.synthesise_t, adj_left)
            grad_d = _bilinear(
                lambda x, y: maps.filters_grad(x, y, nodes is not None), t, pair, primal
            )
            adj_left = _linear(maps.analyse_t, _bilinear(maps.apply_filters_t, d, t))
        adjoint = _add(adj_left, _linear(lambda t, k=k: t[:, k - 2], adjoints))
    grad_g = _linear(lambda t: t.view(c, corr * rank, -1), grad_g)  # [c, corr R, G b]
    grad_w = _bilinear(lambda x, y: _mix_grad_w(x, y, nodes), grad_g, values, primal)
    grad_values = _bilinear(_mix_t, w, grad_g, primal)
    grad_a = _linear(maps.adjoint_degrees, grad_values, primal)
    return out, grad_a, grad_w, grad_d


#: most channels in one block: with few nodes, the batched small matmuls of many channels lose
#: more than the fewer blocks save (measured at 27 nodes, L_in = 3)
_MAX_CHANNELS = 8


def _blocks(channels: int, nodes: int, size: int | None) -> list[tuple[slice, slice]]:
    """(channels, nodes) slices of about ``size`` columns (None: one block): whole channels,
    up to `_MAX_CHANNELS`, while a channel has fewer nodes than that, else one channel and
    balanced node ranges."""
    if size is None:
        return [(slice(None), slice(None))]
    if nodes > size:
        step = -(-nodes // -(-nodes // size))
        return [
            (slice(ch, ch + 1), slice(start, min(start + step, nodes)))
            for ch in range(channels)
            for start in range(0, nodes, step)
        ]
    step = min(_MAX_CHANNELS, max(1, round(size / max(nodes, 1))))
    return [
        (slice(ch, min(ch + step, channels)), slice(0, nodes)) for ch in range(0, channels, step)
    ]


def _gathers_per_node(device: torch.device) -> bool:
    """Per-element factor weights (``factors="element"``): gathered per node into one kernel
    call off the CPU (no host sync for the element counts, no E-fold launches); on the CPU, where
    reading the counts costs nothing, one call per element on its nodes mixes its factors by
    matmuls, 1.4x (grid_rank) and 1.9x (grid_chain) faster per step (C=32, L_in=3, 135 nodes;
    both paths timed in one process while a study held the machine)."""
    return device.type != "cpu"


def _weight_index(w: torch.Tensor, ch: slice, nd: slice) -> tuple:
    """A block's part of the weights: its channels, and its nodes where weights are per node."""
    return (ch,) if w.dim() == 3 else (ch, Ellipsis, nd)


class _RankProduct(torch.autograd.Function):
    """`_products` over cache-sized blocks; its backward is `_RankProductVJP`, so the forces
    (first derivative) can be differentiated again in training. Layout (channel-major):
    a [C, D_in, n], w [C, corr R, L_in+1], d [C, R, K+1] -> [C, corr-1, R, D_out, n]."""

    @staticmethod
    def forward(ctx, a, w, d, maps, block):
        ctx.save_for_backward(a, w, d)
        ctx.maps, ctx.block = maps, block
        channels, _, nodes = a.shape
        out = a.new_empty(channels, maps.correlation - 1, d.shape[1], maps.dim_out, nodes)
        for ch, nd in _blocks(channels, nodes, block):
            wi = _weight_index(w, ch, nd)
            blk = (a[ch, :, nd], None), (w[wi], None), (d[wi], None)
            out[ch, ..., nd] = _products(maps, *blk)[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        a, w, d = ctx.saved_tensors
        # one bulk copy: the incoming gradient is a permuted view (see `_project_fused`)
        grads = _RankProductVJP.apply(a, w, d, grad.contiguous(), ctx.maps, ctx.block)
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
        grad_a, grad_w, grad_d = torch.empty_like(a), torch.zeros_like(w), torch.zeros_like(d)
        for ch, nd in _blocks(a.shape[0], a.shape[2], block):
            wi = _weight_index(w, ch, nd)
            blk = (a[ch, :, nd], None), (w[wi], None), (d[wi], None)
            _, ga, gw, gd = _products(maps, *blk, (grad[ch, ..., nd], None), need_out=False)
            grad_a[ch, :, nd] = ga[0]
            grad_w[wi] += gw[0]
            grad_d[wi] += gd[0]
        return grad_a, grad_w, grad_d

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_a, v_w, v_d):
        a, w, d, grad = ctx.saved_tensors
        need = ctx.needs_input_grad
        if v_a is None and v_w is None and v_d is None:
            return None, None, None, None, None, None
        grad_a, grad_w, grad_d, grad_grad = (
            torch.zeros_like(t) if n else None
            for t, n in zip((a, w, d, grad), need[:4], strict=True)
        )
        for ch, nd in _blocks(a.shape[0], a.shape[2], ctx.block):

            def part(primal, tangent, index):
                return primal[index], None if tangent is None else tangent[index]

            wi = _weight_index(w, ch, nd)
            blk = part(a, v_a, (ch, slice(None), nd)), part(w, v_w, wi), part(d, v_d, wi)
            out, ga, gw, gd = _products(
                ctx.maps, *blk, (grad[ch, ..., nd], None), primal=False, need_out=need[3]
            )
            if grad_a is not None and ga[1] is not None:
                grad_a[ch, :, nd] = ga[1]
            if grad_w is not None and gw[1] is not None:
                grad_w[wi] += gw[1]
            if grad_d is not None and gd[1] is not None:
                grad_d[wi] += gd[1]
            if grad_grad is not None and out[1] is not None:
                grad_grad[ch, ..., nd] = out[1]
        return grad_a, grad_w, grad_d, grad_grad, None, None


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
        factors: str = "channel",
    ) -> None:
        check_rank(rank)
        check_factors(factors)
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        self.rank = rank
        self.factors = factors
        # sets of factor weights: one per channel, or one per (element, channel)
        self.factor_sets = num_elements if factors == "element" else 1
        self._sets_shape = (num_elements,) if factors == "element" else ()
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
        factor = torch.randn(rank, correlation, l_in + 1, *self._sets_shape, self.num_features)
        factor[0] = 1.0
        if n_terms:
            self.factor = torch.nn.Parameter(factor)
        else:  # no products: an empty state entry, but no parameter that no forward uses (DDP)
            self.register_buffer("factor", factor[:, :0])
        degree_of_lm = [l for l in range(l_in + 1) for _ in range(2 * l + 1)]
        self.register_buffer("degree_of_lm", torch.tensor(degree_of_lm), persistent=False)
        # (l, m) -> row of the kernel's [L_in+1, 2 L_in+1] padding: a buffer, not rebuilt from a
        # Python list (a host-to-device copy) in every forward
        pad = [l * (2 * l_in + 1) + m + l for l in range(l_in + 1) for m in range(-l, l + 1)]
        self.register_buffer("degree_pad_index", torch.tensor(pad), persistent=False)

        # `grid`'s point set; subclasses whose intermediate steps need more raise in check_degree
        self.points = PointSet(
            l_in, correlation, *gauss_legendre_points(l_in, correlation, self.l_out)
        )
        n_beta, n_alpha = self.points.n_polar, self.points.n_azimuth
        self.n_beta, self.n_alpha = n_beta, n_alpha
        self.degree = min(2 * n_beta - 1, n_alpha - 1)  # integrated exactly
        self.check_degree()
        self.build_maps(n_beta, n_alpha)  # the subclass's maps on the same points
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

    def factor_weights(self) -> torch.Tensor:
        """``factor`` as ``[R, corr, L_in + 1, sets, C]`` (sets: 1, or one per element)."""
        shape = self.factor.shape
        return self.factor.view(shape[0], shape[1], shape[2], self.factor_sets, shape[-1])

    def check_degree(self) -> None:
        """Subclasses check that the grid integrates their intermediate products exactly."""

    def build_maps(self, n_beta: int, n_alpha: int) -> None:
        """Register a subclass's own maps on the n_beta x n_alpha grid (none here)."""

    def node_weights(self, node_attrs: torch.Tensor) -> torch.Tensor:
        """Per-node weight of every basis row, ``[1 + R (corr - 1), D_out, n * C]``."""
        w = (
            self.weight.to(node_attrs.dtype)
            * self.term_scale.to(node_attrs.dtype)[:, None, :, None]
        )
        w = w.index_select(2, self.col_irrep).transpose(1, 2)
        w = node_attrs @ w.reshape(-1, self.num_elements, self.num_features)  # [T D_out, n, C]
        return w.view(self.weight.shape[0], self.dim_out, -1)

    def transform_pair(self, pair: torch.Tensor, species: torch.Tensor | None) -> torch.Tensor:
        """What the third factor multiplies: the pair product itself, ``[R, G, n C]``
        (``species [n]``: each node's element, where the weights are per element)."""
        return pair

    def node_species(self, node_attrs: torch.Tensor | None) -> torch.Tensor | None:
        """Each node's element ``[n]`` where the factor weights are per element, else None."""
        if self.factor_sets == 1:
            return None
        if node_attrs is None:
            raise ValueError("factors='element' needs node_attrs to pick each node's weights")
        return node_attrs.argmax(1)

    def project_powers(
        self, features: torch.Tensor, node_attrs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The rank products: ``[D_in, n C] -> [R (corr - 1), D_out, n C]``, rows as `weight`'s."""
        if self.n_terms == 0:
            return features.new_zeros(0, self.dim_out, features.shape[1])
        species = self.node_species(node_attrs)
        if torch.jit.is_scripting():
            return self._project_autograd(features, species)
        return self._project_fused(features, species)

    def round_trip_weight(self) -> torch.Tensor:
        """Per-degree round-trip weights ``[R, K + 1, sets, C]`` (none here: K + 1 = 0)."""
        return self.factor.new_zeros(self.rank, 0, self.factor_sets, self.num_features)

    @torch.jit.unused
    def _project_fused(self, features: torch.Tensor, species: torch.Tensor | None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the kernels' ops have no fake tensors to trace
            return self._project_autograd(features, species)
        dtype, columns = features.dtype, features.shape[1]
        channels = self.num_features
        nodes = columns // channels
        if nodes == 0:  # an empty batch: nothing to compute (the kernels' views need nodes)
            return features.new_zeros(self.n_terms * self.rank, self.dim_out, 0)
        factor = self.factor_weights().to(dtype)  # [R, corr, L_in+1, sets, C]
        trip = self.round_trip_weight().to(dtype)  # [R, K+1, sets, C]
        # [C, sets, corr R, L_in+1] and [C, sets, R, K+1]
        w = factor.permute(4, 3, 1, 0, 2).reshape(channels, self.factor_sets, -1, self.l_in + 1)
        d = trip.permute(3, 2, 0, 1)
        if features.device.type == "cpu" and rank_kernel.native() is not None:
            w, d = (rank_kernel.per_column(t, nodes, species) for t in (w, d))
            constants = rank_kernel.constant_maps(self, dtype)
            return rank_kernel.products(features, w, d, constants, self.correlation)
        a = features.view(features.shape[0], nodes, channels).permute(2, 0, 1).contiguous()
        maps = _ProductMaps(self, dtype)
        # off the CPU one block unless its temporaries (~6 corr R grid-sized ones per column in
        # the double backward, primal and tangent) exceed engine.DEVICE_BLOCK_BYTES
        column_bytes = 6 * self.correlation * self.rank * maps.n_points * features.element_size()
        block = block_size(columns, features.device, self.block, column_bytes)
        if features.device.type != "cpu" and block >= columns:
            block = None  # one block
        if species is None:
            out = _RankProduct.apply(a, w[:, 0], d[:, 0], maps, block)
        elif _gathers_per_node(features.device):  # each node's element's weights: one call
            w = w.index_select(1, species).permute(0, 2, 3, 1).contiguous()  # [C, corr R, L+1, n]
            d = d.index_select(1, species).permute(0, 2, 3, 1).contiguous()  # [C, R, K+1, n]
            out = _RankProduct.apply(a, w, d, maps, block)
        else:  # one kernel call per element, on its nodes (the counts are read on the host)
            order = torch.argsort(species, stable=True)
            counts = torch.bincount(species, minlength=self.factor_sets).tolist()
            parts = a.index_select(2, order).split(counts, dim=2)
            out = torch.cat(
                [
                    _RankProduct.apply(part.contiguous(), w[:, e], d[:, e], maps, block)
                    for e, part in enumerate(parts)
                    if counts[e]
                ],
                dim=4,
            ).index_select(4, torch.argsort(order))
        # [C, corr-1, R, D_out, n] -> rows (nu - 2) R + r, columns node-major as the features
        return out.permute(1, 2, 3, 4, 0).reshape(-1, self.dim_out, columns)

    def _project_autograd(
        self, features: torch.Tensor, species: torch.Tensor | None
    ) -> torch.Tensor:
        """The same as `_RankProduct` with plain differentiable ops (TorchScript path)."""
        dim_in, columns = features.shape
        dtype = features.dtype
        channels = self.num_features
        rank, corr = self.rank, self.correlation
        factor = self.factor_weights().to(dtype).index_select(2, self.degree_of_lm)
        if species is not None:  # [R, corr, D_in, sets, C] -> per node
            factor = factor.index_select(3, species)
        factor = factor.reshape(rank * corr, dim_in, -1, channels)  # [R corr, D_in, n or 1, C]
        scaled = features.view(1, dim_in, -1, channels) * factor
        values = self.points.to_points.to(dtype) @ scaled.view(rank * corr, dim_in, columns)
        values = values.view(rank, corr, -1, columns)  # [R, corr, G, n C]
        projector = self.points.projector.to(dtype)
        product = values[:, 0] * values[:, 1]
        out = [projector @ product]
        for k in range(2, corr):
            if k == 2:
                product = self.transform_pair(product, species)
            product = product * values[:, k]
            out.append(projector @ product)
        return torch.stack(out, dim=0).view(self.n_terms * rank, self.dim_out, columns)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, factors={self.factors}, "
            f"grid={self.n_beta}x{self.n_alpha}"
        )


def build_grid_rank(
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int,
    rank: int = 2,
    factors: str = "channel",
) -> GridRankProduct:
    """The ``grid_rank`` backend."""
    return GridRankProduct(irreps_in, irreps_out, correlation, num_elements, rank, factors)
