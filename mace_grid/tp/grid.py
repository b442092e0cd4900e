"""Gaunt product on a Gauss-Legendre sphere grid (Xie et al., ICML 2025): the ``grid`` backend.

Evaluate each channel's spherical function on a Gauss-Legendre (cos beta) x equispaced alpha
grid, take pointwise powers, project back by quadrature. The grid is sized from
correlation * L_in + L_out so every f^nu Y_LM is integrated exactly (never from L_out alone).
Same parameters and output as `mace_grid.tp.gaunt.FourierGauntProduct`.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).

Speed: the grid values are the only large tensors ([points, n C]). In eager mode they never
reach autograd: `_PowerProjection` and its hand-written first and second derivatives run over
cache-sized column blocks and recompute the grid values instead of storing them. Under
TorchScript the same math runs as plain differentiable ops.
"""

import math

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.tp import sphere
from mace_grid.tp.gaunt import GauntProductBasis

#: bytes of one grid-sized temporary per block (fits the L2 cache of current CPUs)
_BLOCK_BYTES = 1 << 19
#: evaluate separably when that needs less than this fraction of the dense matmul's flops
_SEPARABLE_BELOW = 0.45


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class _GridOps:
    """The linear maps of one `GridGauntProduct`, cast to the input dtype (eager mode only).

    ``evaluate: [D_in, c] -> [G, c]`` (values of f at the grid points, alpha-major) and its
    transpose ``adjoint``; dense, or separable (per-m Legendre sums in beta by one batched
    matmul, then the dense alpha transform), whichever the module chose. ``project`` and
    ``project_t`` are the dense quadrature projection [D_out, G] and its transpose.
    """

    def __init__(self, module: "GridGauntProduct", dtype: torch.dtype) -> None:
        self.separable = module.separable
        self.project = module.projector.to(dtype)
        self.project_t = module.projector_t.to(dtype)
        if self.separable:
            self.legendre = module.legendre.to(dtype)
            self.legendre_t = module.legendre_t.to(dtype)
            self.azimuth = module.azimuth.to(dtype)
            self.azimuth_t = module.azimuth_t.to(dtype)
            self.pad_index = module.pad_index
            self.n_m, self.n_alpha = self.azimuth_t.shape
            self.n_beta, self.n_l = self.legendre.shape[1], self.legendre.shape[2]
        else:
            self.to_grid = module.to_grid.to(dtype)
            self.to_grid_t = module.to_grid_t.to(dtype)

    def evaluate(self, a: torch.Tensor) -> torch.Tensor:
        if not self.separable:
            return self.to_grid @ a
        c = a.shape[1]
        padded = a.new_zeros(self.n_m * self.n_l, c).index_copy_(0, self.pad_index, a)
        per_m = torch.bmm(self.legendre, padded.view(self.n_m, self.n_l, c))  # [M, beta, c]
        return (self.azimuth @ per_m.view(self.n_m, -1)).view(-1, c)

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        if not self.separable:
            return self.to_grid_t @ g
        c = g.shape[1]
        per_m = (self.azimuth_t @ g.view(self.n_alpha, -1)).view(self.n_m, self.n_beta, c)
        return torch.bmm(self.legendre_t, per_m).view(-1, c).index_select(0, self.pad_index)


class _PowerProjection(torch.autograd.Function):
    """``P[nu - 2] = project @ evaluate(a)^nu`` for nu = 2..correlation.

    a ``[D_in, R]`` -> ``[correlation - 1, D_out, R]``; its backward is `_PowerProjectionVJP`,
    so forces (first derivative) can be differentiated again in training.
    """

    @staticmethod
    def forward(ctx, a, ops, correlation, block):
        ctx.save_for_backward(a)
        ctx.ops, ctx.correlation, ctx.block = ops, correlation, block
        out = a.new_empty(correlation - 1, ops.project.shape[0], a.shape[1])
        for start, stop in _blocks(a.shape[1], block):
            values = ops.evaluate(a[:, start:stop])
            power = values * values
            for k in range(correlation - 1):
                if k:
                    power.mul_(values)
                out[k, :, start:stop] = ops.project @ power
        return out

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        grad_a = _PowerProjectionVJP.apply(a, grad, ctx.ops, ctx.correlation, ctx.block)
        return grad_a, None, None, None


class _PowerProjectionVJP(torch.autograd.Function):
    """``grad_a = adjoint(sum_nu nu v^(nu-1) (project^T grad_nu))`` with v = evaluate(a), by
    Horner's rule; its own backward gives the second derivatives (not differentiable)."""

    @staticmethod
    def forward(ctx, a, grad, ops, correlation, block):
        ctx.save_for_backward(a, grad)
        ctx.ops, ctx.correlation, ctx.block = ops, correlation, block
        out = torch.empty_like(a)
        for start, stop in _blocks(a.shape[1], block):
            values = ops.evaluate(a[:, start:stop])
            acc = ops.project_t @ grad[correlation - 2, :, start:stop]
            acc.mul_(correlation)
            for nu in range(correlation - 1, 1, -1):
                acc.mul_(values).addmm_(ops.project_t, grad[nu - 2, :, start:stop], alpha=nu)
            out[:, start:stop] = ops.adjoint(acc.mul_(values))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_grad_a):
        a, grad = ctx.saved_tensors
        ops, correlation = ctx.ops, ctx.correlation
        need_a, need_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out_a = torch.empty_like(a) if need_a else None
        out_grad = torch.empty_like(grad) if need_grad else None
        for start, stop in _blocks(a.shape[1], ctx.block):
            values = ops.evaluate(a[:, start:stop])
            direction = ops.evaluate(grad_grad_a[:, start:stop])
            if need_grad:  # the projected powers' derivative along grad_grad_a
                tangent = direction.clone()
                for nu in range(2, correlation + 1):
                    tangent.mul_(values)
                    out_grad[nu - 2, :, start:stop] = (ops.project @ tangent).mul_(nu)
            if need_a:  # sum_nu nu (nu-1) v^(nu-2) (project^T grad_nu), times direction
                acc = ops.project_t @ grad[correlation - 2, :, start:stop]
                acc.mul_(correlation * (correlation - 1))
                for nu in range(correlation - 1, 1, -1):
                    acc.mul_(values).addmm_(
                        ops.project_t, grad[nu - 2, :, start:stop], alpha=nu * (nu - 1)
                    )
                out_a[:, start:stop] = ops.adjoint(acc.mul_(direction))
        return out_a, out_grad, None, None, None


@compile_mode("script")
class GridGauntProduct(GauntProductBasis):
    """MACE-Gaunt product basis by quadrature on a Gauss-Legendre x equispaced sphere grid.

    Grid points are alpha-major (p = i_alpha * n_beta + i_beta). ``to_grid [G, D_in]`` evaluates
    f at them, ``projector [D_out, G]`` (quadrature weight x Y_LM) projects; both are exact for
    f^nu Y_LM, nu <= correlation. ``legendre [M, n_beta, L_in+1]`` and ``azimuth [n_alpha, M]``
    are the separable factors of ``to_grid`` (M = 2 L_in + 1), used when they save work.
    """

    def __init__(
        self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
    ) -> None:
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        l_in = self.l_in
        n_beta, n_alpha = sphere.grid_resolution(l_in, correlation, self.l_out_max)
        self.n_beta, self.n_alpha = n_beta, n_alpha
        beta, alpha, weight = sphere.gauss_legendre_grid(n_beta, n_alpha)
        sh = sphere.sh_on_grid(max(l_in, self.l_out_max), n_beta, n_alpha).transpose(0, 1)
        sh = sh.reshape(n_alpha * n_beta, -1)  # alpha-major points
        weight = weight.T.reshape(-1, 1)
        self._constant("to_grid", sh[:, : (l_in + 1) ** 2])
        self._constant("projector", (weight * sh[:, self.out_lm]).T)
        # separable factors: f(alpha, beta) = sum_m S_m(alpha) sum_l P_lm(beta) A_lm
        n_m = 2 * l_in + 1
        lm = [(l, m) for l in range(l_in + 1) for m in range(-l, l + 1)]
        pad = [(m + l_in) * (l_in + 1) + l for l, m in lm]  # (l, m) -> row of [M, L+1]
        legendre = torch.zeros(n_m * (l_in + 1), n_beta, dtype=torch.float64)
        legendre[pad] = sphere.legendre_part(l_in, beta).T
        legendre = legendre.view(n_m, l_in + 1, n_beta).transpose(1, 2)
        self._constant("legendre", legendre)
        self._constant("azimuth", sphere.azimuth_part(l_in, alpha))
        self.register_buffer("pad_index", torch.tensor(pad), persistent=False)
        dense = (l_in + 1) ** 2 * n_alpha * n_beta
        separable = n_m * n_beta * (l_in + 1 + n_alpha)
        self.separable = separable < _SEPARABLE_BELOW * dense
        # columns per block so that one grid-sized float32 temporary is ~_BLOCK_BYTES
        self.block = 2 ** max(7, round(math.log2(_BLOCK_BYTES / 4 / (n_beta * n_alpha))))

    def _constant(self, name: str, value: torch.Tensor) -> None:
        """Register a float64 constant and its transpose as non-persistent buffers."""
        self.register_buffer(name, value.contiguous().clone(), persistent=False)
        self.register_buffer(name + "_t", value.transpose(-1, -2).contiguous(), persistent=False)

    def project_powers(self, features: torch.Tensor) -> torch.Tensor:
        if self.correlation == 1:
            return features.new_zeros(0, self.dim_out, features.shape[1])
        if torch.jit.is_scripting():
            return self._project_autograd(features)
        return self._project_fused(features)

    @torch.jit.unused
    def _project_fused(self, features: torch.Tensor) -> torch.Tensor:
        ops = _GridOps(self, features.dtype)
        block = self.block if features.device.type == "cpu" else features.shape[1]  # GPU: 1 block
        return _PowerProjection.apply(features, ops, self.correlation, block)

    def _project_autograd(self, features: torch.Tensor) -> torch.Tensor:
        """The same as `_PowerProjection` with plain differentiable ops (TorchScript path)."""
        values = self.to_grid.to(features.dtype) @ features  # [G, R]
        projector = self.projector.to(features.dtype)
        power = values
        out = []
        for _ in range(self.correlation - 1):
            power = power * values
            out.append(projector @ power)
        return torch.stack(out, dim=0)


def build_grid(
    irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
) -> GridGauntProduct:
    """The ``grid`` backend."""
    return GridGauntProduct(irreps_in, irreps_out, correlation, num_elements)
