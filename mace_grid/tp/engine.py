"""The point-set engine shared by the pointwise-product (Gaunt) backends.

A backend is a point set on the sphere (or its torus cover) and two linear maps: ``evaluate
[P, D_in]`` (the values of f = sum_lm A_lm Y_lm at the points) and ``project [D_out, P]``
(P_LM(g) from the values of g, exact for g = f^nu, nu <= correlation). The engine takes the
powers pointwise: ``P_LM(f^nu) = project(evaluate(A)^nu)``. `PointSet` holds both maps for a
product point set (polar angles x equispaced azimuths; the backend supplies the angles and the
projection) and applies the evaluate map dense or separably (per-m polar sums, then the azimuth
transform), whichever needs fewer flops. The kernels only call the methods of `PointMaps`, so a
backend with other maps passes an object with the same methods; one with other pointwise
products reuses `PointMaps` and `blocks` in its own kernel.

Speed: the point values are the only large tensors ([P, n C]). In eager mode they never reach
autograd: `PowerProjection` and its hand-written first and second derivatives run over
cache-sized column blocks and recompute the point values instead of storing them. Under
TorchScript the same math runs as plain differentiable ops.
Layout: features [D_in, R] (R = n * C columns) -> powers [correlation - 1, D_out, R].
"""

import math

import torch
from e3nn.util.jit import compile_mode

from mace_grid.tp import sphere

#: bytes of one point-sized temporary per block (fits the L2 cache of current CPUs)
_BLOCK_BYTES = 1 << 19
#: evaluate separably when that needs less than this fraction of the dense matmul's flops
_SEPARABLE_BELOW = 0.45
#: bytes of a kernel call's temporaries off the CPU (GPU): one block up to this size, so a large
#: batch of a large model is split instead of running out of memory
DEVICE_BLOCK_BYTES = 1 << 31


def block_size(columns: int, device: torch.device, cpu_block: int, column_bytes: int) -> int:
    """Columns per kernel block: ``cpu_block`` (cache-sized) on the CPU; elsewhere the whole
    batch, capped so that its temporaries (``column_bytes`` per column) fit
    `DEVICE_BLOCK_BYTES`; at least 1, also for an empty batch."""
    if device.type == "cpu":
        return cpu_block
    return max(1, min(columns, DEVICE_BLOCK_BYTES // max(column_bytes, 1)))


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering range(n) in pieces of ``size``."""
    return [(start, min(start + size, n)) for start in range(0, n, size)]


class PointMaps:
    """The linear maps of one point set, cast to the input dtype (eager mode only).

    ``dim_out`` (D_out); ``evaluate: [D_in, c] -> [P, c]`` and its transpose ``adjoint``:
    dense, or separable (``legendre [M, n_polar, L_in+1]`` by one batched matmul, then
    ``azimuth [n_azimuth, M]``; points azimuth-major). ``project: [P, c] -> [D_out, c]``,
    ``project_adjoint`` its transpose and ``project_adjoint_add`` the fused
    ``acc += alpha * project^T g``.
    """

    def __init__(self, module: "PointSet", dtype: torch.dtype) -> None:
        self.dim_out = module.dim_out
        self.separable = module.separable
        self.projector = module.projector.to(dtype)
        self.projector_t = module.projector_t.to(dtype)
        if self.separable:
            self.legendre = module.legendre.to(dtype)
            self.legendre_t = module.legendre_t.to(dtype)
            self.azimuth = module.azimuth.to(dtype)
            self.azimuth_t = module.azimuth_t.to(dtype)
            self.pad_index = module.pad_index
            self.n_m, self.n_azimuth = self.azimuth_t.shape
            self.n_polar, self.n_l = self.legendre.shape[1], self.legendre.shape[2]
        else:
            self.to_points = module.to_points.to(dtype)
            self.to_points_t = module.to_points_t.to(dtype)

    def evaluate(self, a: torch.Tensor) -> torch.Tensor:
        if not self.separable:
            return self.to_points @ a
        c = a.shape[1]
        padded = a.new_zeros(self.n_m * self.n_l, c).index_copy_(0, self.pad_index, a)
        per_m = torch.bmm(self.legendre, padded.view(self.n_m, self.n_l, c))  # [M, polar, c]
        return (self.azimuth @ per_m.view(self.n_m, self.n_polar * c)).view(
            self.n_azimuth * self.n_polar, c
        )

    def adjoint(self, g: torch.Tensor) -> torch.Tensor:
        if not self.separable:
            return self.to_points_t @ g
        c = g.shape[1]
        per_m = self.azimuth_t @ g.view(self.n_azimuth, self.n_polar * c)
        per_m = per_m.view(self.n_m, self.n_polar, c)
        per_lm = torch.bmm(self.legendre_t, per_m).view(self.n_m * self.n_l, c)
        return per_lm.index_select(0, self.pad_index)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return self.projector @ g

    def project_adjoint(self, grad: torch.Tensor) -> torch.Tensor:
        return self.projector_t @ grad

    def project_adjoint_add(self, acc: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
        acc.addmm_(self.projector_t, grad, alpha=alpha)


class PowerProjection(torch.autograd.Function):
    """``P[nu - 2] = project(evaluate(a)^nu)`` for nu = 2..correlation.

    a ``[D_in, R]`` -> ``[correlation - 1, D_out, R]``; its backward is `PowerProjectionVJP`,
    so forces (first derivative) can be differentiated again in training.
    """

    @staticmethod
    def forward(ctx, a, ops, correlation, block):
        ctx.save_for_backward(a)
        ctx.ops, ctx.correlation, ctx.block = ops, correlation, block
        out = a.new_empty(correlation - 1, ops.dim_out, a.shape[1])
        for start, stop in blocks(a.shape[1], block):
            values = ops.evaluate(a[:, start:stop])
            power = values * values
            for k in range(correlation - 1):
                if k:
                    power.mul_(values)
                out[k, :, start:stop] = ops.project(power)
        return out

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        grad_a = PowerProjectionVJP.apply(a, grad, ctx.ops, ctx.correlation, ctx.block)
        return grad_a, None, None, None


class PowerProjectionVJP(torch.autograd.Function):
    """``grad_a = adjoint(sum_nu nu v^(nu-1) project^T(grad_nu))`` with v = evaluate(a), by
    Horner's rule; its own backward gives the second derivatives (not differentiable)."""

    @staticmethod
    def forward(ctx, a, grad, ops, correlation, block):
        ctx.save_for_backward(a, grad)
        ctx.ops, ctx.correlation, ctx.block = ops, correlation, block
        out = torch.empty_like(a)
        for start, stop in blocks(a.shape[1], block):
            values = ops.evaluate(a[:, start:stop])
            acc = ops.project_adjoint(grad[correlation - 2, :, start:stop])
            acc.mul_(correlation)
            for nu in range(correlation - 1, 1, -1):
                acc.mul_(values)
                ops.project_adjoint_add(acc, grad[nu - 2, :, start:stop], nu)
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
        for start, stop in blocks(a.shape[1], ctx.block):
            values = ops.evaluate(a[:, start:stop])
            direction = ops.evaluate(grad_grad_a[:, start:stop])
            if need_grad:  # the projected powers' derivative along grad_grad_a
                tangent = direction.clone()
                for nu in range(2, correlation + 1):
                    tangent.mul_(values)
                    out_grad[nu - 2, :, start:stop] = ops.project(tangent).mul_(nu)
            if need_a:  # sum_nu nu (nu-1) v^(nu-2) project^T(grad_nu), times direction
                acc = ops.project_adjoint(grad[correlation - 2, :, start:stop])
                acc.mul_(correlation * (correlation - 1))
                for nu in range(correlation - 1, 1, -1):
                    acc.mul_(values)
                    ops.project_adjoint_add(acc, grad[nu - 2, :, start:stop], nu * (nu - 1))
                out_a[:, start:stop] = ops.adjoint(acc.mul_(direction))
        return out_a, out_grad, None, None, None


@compile_mode("script")
class PointSet(torch.nn.Module):
    """P_LM(f^nu), nu = 2..correlation, on a product point set: ``polar [n_polar]`` x
    ``azimuth [n_azimuth]`` angles, points azimuth-major (p = i_azimuth * n_polar + i_polar),
    with the backend's ``projector [D_out, P]`` (exact for f^nu Y_LM, nu <= correlation).

    Buffers (float64, with transposes): ``to_points [P, D_in]`` (Y_lm at the points; e3nn's
    Legendre part with the signed sine, so polar angles in (pi, 2pi) give the torus
    continuation), ``projector``, and ``legendre [M, n_polar, L_in+1]``, ``azimuth
    [n_azimuth, M]`` (M = 2 L_in + 1), the separable factors of ``to_points``. No parameters.
    """

    def __init__(
        self,
        l_in: int,
        correlation: int,
        polar: torch.Tensor,
        azimuth: torch.Tensor,
        projector: torch.Tensor,
    ) -> None:
        super().__init__()
        self.correlation = correlation
        self.dim_out = projector.shape[0]
        n_polar, n_azimuth = len(polar), len(azimuth)
        self.n_polar, self.n_azimuth = n_polar, n_azimuth
        self.n_points = n_polar * n_azimuth
        p_lm = sphere.legendre_part(l_in, polar)  # [polar, lm]
        m_in = torch.tensor([m for l in range(l_in + 1) for m in range(-l, l + 1)])
        s_m = sphere.azimuth_part(l_in, azimuth)  # [azimuth, M]
        to_points = s_m[:, None, l_in + m_in] * p_lm[None, :, :]  # [azimuth, polar, lm]
        self._constant("to_points", to_points.reshape(self.n_points, -1))
        self._constant("projector", projector)
        # separable factors: f(azimuth, polar) = sum_m S_m(azimuth) sum_l P_lm(polar) A_lm
        n_m = 2 * l_in + 1
        lm = [(l, m) for l in range(l_in + 1) for m in range(-l, l + 1)]
        pad = [(m + l_in) * (l_in + 1) + l for l, m in lm]  # (l, m) -> row of [M, L+1]
        legendre = torch.zeros(n_m * (l_in + 1), n_polar, dtype=torch.float64)
        legendre[pad] = p_lm.T
        legendre = legendre.view(n_m, l_in + 1, n_polar).transpose(1, 2)
        self._constant("legendre", legendre)
        self._constant("azimuth", s_m)
        self.register_buffer("pad_index", torch.tensor(pad), persistent=False)
        dense = (l_in + 1) ** 2 * self.n_points
        separable = n_m * n_polar * (l_in + 1 + n_azimuth)
        self.separable = separable < _SEPARABLE_BELOW * dense
        # columns per block so that one point-sized float32 temporary is ~_BLOCK_BYTES
        self.block = 2 ** max(7, round(math.log2(_BLOCK_BYTES / 4 / self.n_points)))

    def _constant(self, name: str, value: torch.Tensor) -> None:
        """Register a float64 constant and its transpose as non-persistent buffers."""
        self.register_buffer(name, value.contiguous().clone(), persistent=False)
        self.register_buffer(name + "_t", value.transpose(-1, -2).contiguous(), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[D_in, R] -> [correlation - 1, D_out, R]``: the fused kernel in eager mode, plain
        differentiable ops under TorchScript."""
        if self.correlation == 1:
            return features.new_zeros(0, self.dim_out, features.shape[1])
        if torch.jit.is_scripting():
            return self.project_autograd(features)
        return self._project_fused(features)

    @torch.jit.unused
    def _project_fused(self, features: torch.Tensor) -> torch.Tensor:
        ops = PointMaps(self, features.dtype)
        # ~6 point-sized temporaries per column in the double backward
        column_bytes = 6 * self.n_points * features.element_size()
        block = block_size(features.shape[1], features.device, self.block, column_bytes)
        return PowerProjection.apply(features, ops, self.correlation, block)

    def project_autograd(self, features: torch.Tensor) -> torch.Tensor:
        """The same as `PowerProjection` with plain differentiable ops (TorchScript path)."""
        values = self.to_points.to(features.dtype) @ features  # [P, R]
        projector = self.projector.to(features.dtype)
        power = values
        out = []
        for _ in range(self.correlation - 1):
            power = power * values
            out.append(projector @ power)
        return torch.stack(out, dim=0)
