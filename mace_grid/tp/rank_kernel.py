"""The compiled CPU kernel of `grid_rank` and `grid_chain`'s products (`rank_cpu.cpp`).

The PyTorch kernel (`mace_grid.tp.grid_rank._RankProduct`) runs cache-sized blocks of
(channels x nodes) through small batched matmuls, about 80 ATen calls per block; this one
computes each vector of columns (node x channel) in one pass over the grid points, its factors,
products, round trip and projections held in a per-thread scratch, and writes only its outputs.
Its weights are per column (``w [corr R, L_in+1, N]``, ``d [R, K+1, N]``): `per_column` expands
the shared ones (per channel, or per element and channel) with differentiable ops, so autograd
sums their gradients and the kernel knows nothing of who shares a weight.
Derivatives: `_RankVJP` (the VJP, one pass) and its backward, the forward-mode tangent of the
VJP and of the forward, the same C++ code on dual numbers (``once_differentiable``).
Used on the CPU in eager mode where the kernel builds; CUDA and the fallback run the PyTorch
kernel, TorchScript its plain ops.
"""

import functools
from pathlib import Path

import torch

from mace_grid.native import load
from mace_grid.tp import work


@functools.cache
def native():
    """``torch.ops.mace_grid_rank`` (built on first use, `mace_grid.native.load`), or None with
    one warning where it cannot be built."""
    source = Path(__file__).with_name("rank_cpu.cpp")
    ops = load(source, "mace_grid_rank", "tp=grid_rank/grid_chain")
    if ops is not None:
        for name, passes in _PASSES.items():
            work.register_kernel(getattr(ops, name), functools.partial(_cost, passes))
    return ops


def constant_maps(module, dtype: torch.dtype) -> list[torch.Tensor]:
    """The kernel's constant maps of a `GridRankProduct` in ``dtype``: Y [G, D_in] (the
    harmonics at the points) and the projector P [D_out, G], each followed by its transpose;
    for a round trip (else empty) its azimuth analysis A [2K+1, n_alpha] and polar factors
    P_km(beta) times the polar quadrature weight and alone, [(K+1)^2, n_beta] each."""
    y, p = module.points.to_points, module.points.projector
    out = [y, y.T, p, p.T]
    if module.round_trip_weight().shape[1]:
        out += [module.trip_analysis, module.trip_legendre_weighted, module.trip_legendre]
    else:
        out += [p.new_zeros(0, 0)] * 3
    return [m.to(dtype).contiguous() for m in out]


def per_column(w: torch.Tensor, nodes: int, species: torch.Tensor | None) -> torch.Tensor:
    """Weights ``[C, sets, *rest]`` (one set, or one per element) per column node x channel:
    ``[*rest, nodes C]``, differentiably (autograd sums the columns' gradients)."""
    channels, rest = w.shape[0], w.shape[2:]
    if species is None:
        w = w[:, 0, None].expand(channels, nodes, *rest)
    else:
        w = w.index_select(1, species)  # [C, n, *rest]
    dims = tuple(range(2, w.dim()))
    return w.permute(*dims, 1, 0).reshape(*rest, nodes * channels)


def products(a, w, d, maps, correlation: int) -> torch.Tensor:
    """``[(corr-1) R, D_out, N]`` (row (nu - 2) R + r) of ``a [D_in, N]`` and per-column weights
    (module doc), differentiable twice."""
    return _Rank.apply(a.contiguous(), w.contiguous(), d.contiguous(), maps, correlation)


class _Rank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w, d, maps, correlation):
        ctx.save_for_backward(a, w, d)
        ctx.maps, ctx.correlation = maps, correlation
        return native().forward(a, w, d, maps, correlation)

    @staticmethod
    def backward(ctx, grad):
        a, w, d = ctx.saved_tensors
        grads = _RankVJP.apply(a, w, d, grad.contiguous(), ctx.maps, ctx.correlation)
        return *grads, None, None


class _RankVJP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w, d, grad, maps, correlation):
        ctx.save_for_backward(a, w, d, grad)
        ctx.maps, ctx.correlation = maps, correlation
        ctx.set_materialize_grads(False)
        return native().vjp(a, w, d, grad, maps, correlation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_a, v_w, v_d):
        a, w, d, grad = ctx.saved_tensors
        need = ctx.needs_input_grad
        if v_a is None and v_w is None and v_d is None:
            return None, None, None, None, None, None
        tangents = (None if v is None else v.contiguous() for v in (v_a, v_w, v_d))
        t_a, t_w, t_d, t_out = native().vjp_tangent(
            a, w, d, grad, *tangents, ctx.maps, ctx.correlation, any(need[:3]), need[3]
        )
        keep = [t if n else None for t, n in zip((t_a, t_w, t_d, t_out), need[:4], strict=True)]
        return *keep, None, None


#: per op, how many times it costs the forward's linear maps (`_cost`): the VJP evaluates the
#: factors again and applies the maps' transposes (about twice); the tangent runs dual numbers
#: (two flop per map entry) through the VJP, which then also projects the products, or (only
#: the output's tangent wanted) through the forward
_PASSES = {
    "forward": lambda args: 1,
    "vjp": lambda args: 2,
    "vjp_tangent": lambda args: 2 * (2 * args[9] + (args[10] and not args[9])),
}


def _cost(passes, args: tuple, out) -> tuple[int, int]:
    """(matmul flop, elements written) of a call: per column and pass, the forward's linear
    maps: at every point 2 (D_in + J (L_in+1) + rows D_out) flop, and per rank the round trip's
    2 (2 (2K+1) n_alpha n_beta + 2 (K+1)^2 n_beta); its outputs."""
    a, w, d = args[:3]
    y, _, p, _, analysis, legendre, _ = next(x for x in args if isinstance(x, list | tuple))
    ranks = d.shape[0]
    rows = w.shape[0] - ranks  # (corr - 1) R
    per_column = y.shape[0] * (a.shape[0] + w.shape[0] * w.shape[1] + rows * p.shape[0])
    if legendre.numel():
        per_column += ranks * 2 * (analysis.numel() * legendre.shape[1] + legendre.numel())
    flop = 2 * a.shape[1] * per_column * passes(args)
    outs = out if isinstance(out, tuple | list) else (out,)
    return flop, sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
