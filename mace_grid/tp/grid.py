"""Gaunt product on a Gauss-Legendre sphere grid (Xie et al., ICML 2025): the ``grid`` backend.

Evaluate each channel's spherical function on a Gauss-Legendre (cos beta) x equispaced alpha
grid, take pointwise powers, project back by quadrature. The grid is sized from
correlation * L_in + L_out so every f^nu Y_LM is integrated exactly (never from L_out alone).
Same parameters and output as `mace_grid.tp.gaunt.FourierGauntProduct`.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).

Speed: the grid values are the only large tensors ([points, C * n]). In eager mode they never
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


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class _PowerProjection(torch.autograd.Function):
    """``P[nu - 2] = projector @ (to_grid @ a)^nu`` for nu = 2..correlation.

    a ``[D_in, R]`` -> ``[correlation - 1, D_out, R]``; its backward is `_PowerProjectionVJP`,
    so forces (first derivative) can be differentiated again in training.
    """

    @staticmethod
    def forward(ctx, a, to_grid, to_grid_t, projector, projector_t, correlation, block):
        ctx.save_for_backward(a, to_grid, to_grid_t, projector, projector_t)
        ctx.correlation, ctx.block = correlation, block
        out = a.new_empty(correlation - 1, projector.shape[0], a.shape[1])
        for start, stop in _blocks(a.shape[1], block):
            values = to_grid @ a[:, start:stop]
            power = values * values
            for k in range(correlation - 1):
                if k:
                    power.mul_(values)
                out[k, :, start:stop] = projector @ power
        return out

    @staticmethod
    def backward(ctx, grad):
        a, to_grid, to_grid_t, projector, projector_t = ctx.saved_tensors
        grad_a = _PowerProjectionVJP.apply(
            a, grad, to_grid, to_grid_t, projector, projector_t, ctx.correlation, ctx.block
        )
        return grad_a, None, None, None, None, None, None


class _PowerProjectionVJP(torch.autograd.Function):
    """``grad_a = to_grid^T [sum_nu nu v^(nu-1) (projector^T grad_nu)]`` with v = to_grid @ a,
    by Horner's rule; its own backward gives the second derivatives (not differentiable)."""

    @staticmethod
    def forward(ctx, a, grad, to_grid, to_grid_t, projector, projector_t, correlation, block):
        ctx.save_for_backward(a, grad, to_grid, to_grid_t, projector, projector_t)
        ctx.correlation, ctx.block = correlation, block
        out = torch.empty_like(a)
        for start, stop in _blocks(a.shape[1], block):
            values = to_grid @ a[:, start:stop]
            acc = projector_t @ grad[correlation - 2, :, start:stop]
            acc.mul_(correlation)
            for nu in range(correlation - 1, 1, -1):
                acc.mul_(values).addmm_(projector_t, grad[nu - 2, :, start:stop], alpha=nu)
            out[:, start:stop] = to_grid_t @ acc.mul_(values)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_grad_a):
        a, grad, to_grid, to_grid_t, projector, projector_t = ctx.saved_tensors
        correlation = ctx.correlation
        need_a, need_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        out_a = torch.empty_like(a) if need_a else None
        out_grad = torch.empty_like(grad) if need_grad else None
        for start, stop in _blocks(a.shape[1], ctx.block):
            values = to_grid @ a[:, start:stop]
            direction = to_grid @ grad_grad_a[:, start:stop]
            if need_grad:  # the projected powers' derivative along grad_grad_a
                tangent = direction.clone()
                for nu in range(2, correlation + 1):
                    tangent.mul_(values)
                    out_grad[nu - 2, :, start:stop] = (projector @ tangent).mul_(nu)
            if need_a:  # sum_nu nu (nu-1) v^(nu-2) (projector^T grad_nu), times direction
                acc = projector_t @ grad[correlation - 2, :, start:stop]
                acc.mul_(correlation * (correlation - 1))
                for nu in range(correlation - 1, 1, -1):
                    acc.mul_(values).addmm_(
                        projector_t, grad[nu - 2, :, start:stop], alpha=nu * (nu - 1)
                    )
                out_a[:, start:stop] = to_grid_t @ acc.mul_(direction)
        return out_a, out_grad, None, None, None, None, None, None


@compile_mode("script")
class GridGauntProduct(GauntProductBasis):
    """MACE-Gaunt product basis by quadrature on a Gauss-Legendre x equispaced sphere grid.

    ``to_grid [G, D_in]`` evaluates f at the G grid points, ``projector [D_out, G]`` (quadrature
    weight x Y_LM) projects; both are exact for f^nu Y_LM, nu <= correlation.
    """

    def __init__(
        self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
    ) -> None:
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        n_beta, n_alpha = sphere.grid_resolution(self.l_in, correlation, self.l_out_max)
        self.n_beta, self.n_alpha = n_beta, n_alpha
        _, _, weight = sphere.gauss_legendre_grid(n_beta, n_alpha)
        sh = sphere.sh_on_grid(max(self.l_in, self.l_out_max), n_beta, n_alpha)
        sh = sh.reshape(n_beta * n_alpha, -1)
        to_grid = sh[:, : (self.l_in + 1) ** 2]
        projector = (weight.reshape(-1, 1) * sh[:, self.out_lm]).T
        for name, value in [("to_grid", to_grid), ("projector", projector)]:
            self.register_buffer(name, value.contiguous().clone(), persistent=False)
            self.register_buffer(name + "_t", value.T.contiguous().clone(), persistent=False)
        # columns per block so that one grid-sized float32 temporary is ~_BLOCK_BYTES
        self.block = 2 ** max(7, round(math.log2(_BLOCK_BYTES / 4 / (n_beta * n_alpha))))

    def project_powers(self, features: torch.Tensor) -> torch.Tensor:
        if self.correlation == 1:
            return features.new_zeros(0, self.dim_out, features.shape[1])
        if torch.jit.is_scripting():
            return self._project_autograd(features)
        return self._project_fused(features)

    @torch.jit.unused
    def _project_fused(self, features: torch.Tensor) -> torch.Tensor:
        dtype = features.dtype
        return _PowerProjection.apply(
            features,
            self.to_grid.to(dtype),
            self.to_grid_t.to(dtype),
            self.projector.to(dtype),
            self.projector_t.to(dtype),
            self.correlation,
            self.block,
        )

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
