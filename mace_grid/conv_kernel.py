"""The fused kernel of ``conv=fast``: gather, per-path products, radial weights and scatter per
block of edges, with hand-written first and second derivatives.

For edges e = j -> i, a group g per input irrep (dimension d_g, its paths' output rows o, path
k(o)), the summed messages are

    out[i, o, c] = sum_{e: j -> i} r[e, k(o), c] * sum_m a[e, o, m] * x[j, m, c]

Layout: ``x [n, d_in, C]`` (irreps_in1 order, channels last), ``a [E, sum_g rows_g d_g]`` (per
group a row-major [rows_g, d_g] block: the edge harmonics contracted with Clebsch-Gordan, the
same for every channel), ``r [E, P, C]`` (paths in group order), ``row_path [rows]`` (the path
of each output row) -> ``out [n, rows, C]`` (group order); `mace_grid.conv.FastConvolution`
maps e3nn's layouts to these.

Fused: edges are visited in blocks (sorted by receiver once per call, so a block scatters into
a narrow range of nodes); a block gathers its senders' features and radial weights, forms
a x r and adds it to its receivers. The per-edge tensors ([E, rows, C], the bulk of the work)
exist one cache-sized block at a time and never reach autograd, which keeps only the inputs.
Derivatives written by hand: `_ConvVJP` (d/dx: the transposed matvecs, scattered to senders;
d/da: per edge the upstream gradient times r, times x^T; d/dr: per (edge, path, channel) the
upstream gradient dotted with a x) and its backward (the second derivatives of force
training), the forward-mode tangent of the VJP, which recomputes a block's products instead of
storing them. Third derivatives are not implemented (``once_differentiable``).
"""

from typing import NamedTuple

import torch

from mace_grid.tp.engine import block_size

#: bytes of one [edges, rows, C] temporary of a block (about a CPU L2 cache)
_BLOCK_BYTES = 1 << 20
#: fewest edges per CPU block, so that the per-call overhead stays small
_MIN_BLOCK = 16
#: [edges, rows, C]-sized temporaries a block holds at once in the double backward
_TEMPORARIES = 8


class Group(NamedTuple):
    """The paths of one input irrep: ``x[:, inputs]`` (``dim`` columns), ``out[:, rows]``
    (``n_rows``), and the [n_rows, dim] block ``a[:, cols]`` of the edge matrices."""

    inputs: slice
    rows: slice
    cols: slice
    dim: int
    n_rows: int


def groups_of(dims: list[int], rows: list[int], starts: list[int]) -> list[Group]:
    """The kernel's `Group` list from each group's input dimension, output rows and first
    input column (`FastConvolution`'s ``group_dims``, ``group_rows``, ``group_in``)."""
    groups, row, col = [], 0, 0
    for dim, n_rows, start in zip(dims, rows, starts, strict=True):
        groups.append(
            Group(
                slice(start, start + dim),
                slice(row, row + n_rows),
                slice(col, col + n_rows * dim),
                dim,
                n_rows,
            )
        )
        row, col = row + n_rows, col + n_rows * dim
    return groups


def convolve(
    x: torch.Tensor,
    a: torch.Tensor,
    r: torch.Tensor,
    senders: torch.Tensor,
    receivers: torch.Tensor,
    row_path: torch.Tensor,
    groups: list[Group],
) -> torch.Tensor:
    """The summed messages ``[n, rows, C]`` (module doc), differentiable twice."""
    n_edges, n_rows, channels = a.shape[0], row_path.shape[0], x.shape[2]
    edges = torch.argsort(receivers, stable=True)
    edge_bytes = n_rows * channels * x.element_size()
    cpu_block = max(_MIN_BLOCK, _BLOCK_BYTES // max(edge_bytes, 1))
    block = block_size(n_edges, x.device, cpu_block, _TEMPORARIES * edge_bytes)
    return _Conv.apply(x, a, r.contiguous(), senders, receivers, edges, row_path, groups, block)


class _Block(NamedTuple):
    """One block of edges: ids, their senders and receivers, and the rows of ``r [E P, C]``
    that its output rows read (edge-major: ``[b rows]``)."""

    ids: torch.Tensor
    senders: torch.Tensor
    receivers: torch.Tensor
    r_rows: torch.Tensor


def _blocks(edges, senders, receivers, row_path, n_paths: int, block: int) -> list[_Block]:
    return [
        _Block(
            ids,
            senders.index_select(0, ids),
            receivers.index_select(0, ids),
            (ids[:, None] * n_paths + row_path).flatten(),
        )
        for ids in edges.split(block)
        if len(ids)  # no block for no edges
    ]


def _rows(r: torch.Tensor, blk: _Block) -> torch.Tensor:
    """The block's radial weights per output row: ``r [E, P, C] -> [b, rows, C]``."""
    channels = r.shape[2]
    return r.reshape(-1, channels).index_select(0, blk.r_rows).view(len(blk.ids), -1, channels)


def _add_path_sums(out: torch.Tensor, blk: _Block, t: torch.Tensor) -> None:
    """``out [E, P, C]`` += the block's rows ``t [b, rows, C]`` summed per path (the transpose
    of `_rows`)."""
    channels = out.shape[2]
    out.view(-1, channels).index_add_(0, blk.r_rows, t.view(-1, channels))


def _apply(groups: list[Group], a: torch.Tensor, x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per edge a x: ``a [b, K]``, ``x [b, d_in, C]`` -> ``[b, rows, C]``."""
    b = a.shape[0]
    out = x.new_empty(b, n_rows, x.shape[2])
    for g in groups:
        a_g, x_g = a[:, g.cols].view(b, g.n_rows, g.dim), x[:, g.inputs]
        if g.dim == 1:  # scalars: an outer product
            torch.mul(a_g, x_g, out=out[:, g.rows])
        else:
            out[:, g.rows] = torch.bmm(a_g, x_g)
    return out


def _apply_t(groups: list[Group], a: torch.Tensor, u: torch.Tensor, d_in: int) -> torch.Tensor:
    """Per edge a^T u: ``a [b, K]``, ``u [b, rows, C]`` -> ``[b, d_in, C]`` (input irreps
    without paths get zeros)."""
    b = a.shape[0]
    out = u.new_zeros(b, d_in, u.shape[2])
    for g in groups:
        a_g = a[:, g.cols].view(b, g.n_rows, g.dim)
        out[:, g.inputs] = torch.bmm(a_g.transpose(1, 2), u[:, g.rows])
    return out


def _outer(groups: list[Group], u: torch.Tensor, x: torch.Tensor, width: int) -> torch.Tensor:
    """Per edge and group u x^T summed over channels: ``[b, rows, C], [b, d_in, C] -> [b, K]``
    (the gradient of <u, a x> with respect to a)."""
    b = u.shape[0]
    out = u.new_empty(b, width)
    for g in groups:
        prod = torch.bmm(u[:, g.rows], x[:, g.inputs].transpose(1, 2))  # [b, rows_g, d_g]
        out[:, g.cols] = prod.view(b, -1)
    return out


def _add(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that are not None (None if all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total.add_(t)
    return total


class _Conv(torch.autograd.Function):
    """`convolve` over blocks of edges; its backward is `_ConvVJP`, so the forces (first
    derivative) can be differentiated again in training."""

    @staticmethod
    def forward(ctx, x, a, r, senders, receivers, edges, row_path, groups, block):
        ctx.save_for_backward(x, a, r, senders, receivers, edges, row_path)
        ctx.groups, ctx.block = groups, block
        n_rows = row_path.shape[0]
        out = x.new_zeros(x.shape[0], n_rows, x.shape[2])
        for blk in _blocks(edges, senders, receivers, row_path, r.shape[1], block):
            x_e = x.index_select(0, blk.senders)
            messages = _apply(groups, a.index_select(0, blk.ids), x_e, n_rows)
            out.index_add_(0, blk.receivers, messages.mul_(_rows(r, blk)))
        return out

    @staticmethod
    def backward(ctx, grad):
        x, a, r, senders, receivers, edges, row_path = ctx.saved_tensors
        want = ctx.needs_input_grad[:3]
        grads = _ConvVJP.apply(
            x, a, r, grad.contiguous(), senders, receivers, edges, row_path, ctx.groups,
            ctx.block, want,
        )  # fmt: skip
        return *grads, None, None, None, None, None, None


class _ConvVJP(torch.autograd.Function):
    """``(grad_x, grad_a, grad_r)`` of `_Conv` for the upstream gradient ``grad`` (None where
    ``want`` says not needed). Its backward (the second derivatives) is the forward-mode
    derivative along the incoming cotangents v: for phi = <grad, out>, the VJP is grad phi, so
    d/d(x, a, r) <v, grad phi> = Hessian(phi) v, the tangent of the VJP, and d/d grad
    <v, grad phi> = the tangent of out."""

    @staticmethod
    def forward(ctx, x, a, r, grad, senders, receivers, edges, row_path, groups, block, want):
        ctx.save_for_backward(x, a, r, grad, senders, receivers, edges, row_path)
        ctx.groups, ctx.block = groups, block
        ctx.set_materialize_grads(False)
        n_rows, d_in = row_path.shape[0], x.shape[1]
        grad_x = torch.zeros_like(x) if want[0] else None
        grad_a = torch.empty_like(a) if want[1] else None
        grad_r = r.new_zeros(r.shape) if want[2] else None  # contiguous: rows added by view
        for blk in _blocks(edges, senders, receivers, row_path, r.shape[1], block):
            x_e, a_e = x.index_select(0, blk.senders), a.index_select(0, blk.ids)
            g_e = grad.index_select(0, blk.receivers)
            if want[0] or want[1]:
                u = g_e * _rows(r, blk)
                if want[0]:
                    grad_x.index_add_(0, blk.senders, _apply_t(groups, a_e, u, d_in))
                if want[1]:
                    grad_a.index_copy_(0, blk.ids, _outer(groups, u, x_e, a.shape[1]))
            if want[2]:
                products = _apply(groups, a_e, x_e, n_rows).mul_(g_e)
                _add_path_sums(grad_r, blk, products)
        return grad_x, grad_a, grad_r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_x, v_a, v_r):
        x, a, r, grad, senders, receivers, edges, row_path = ctx.saved_tensors
        groups = ctx.groups
        need = ctx.needs_input_grad[:4]
        nothing = (None,) * 11
        if v_x is None and v_a is None and v_r is None:
            return nothing
        n_rows, d_in, width = row_path.shape[0], x.shape[1], a.shape[1]
        out_x, out_a, out_r, out_grad = (
            t.new_zeros(t.shape) if n else None for t, n in zip((x, a, r, grad), need, strict=True)
        )
        for blk in _blocks(edges, senders, receivers, row_path, r.shape[1], ctx.block):
            ids = blk.ids
            x_e, a_e = x.index_select(0, blk.senders), a.index_select(0, ids)
            g_e = grad.index_select(0, blk.receivers)
            r_e = _rows(r, blk)
            vx_e = None if v_x is None else v_x.index_select(0, blk.senders)
            va_e = None if v_a is None else v_a.index_select(0, ids)
            vr_e = None if v_r is None else _rows(v_r, blk)
            # tangents of u = g r and of a x
            u = g_e * r_e if need[0] or need[1] else None
            du = None if vr_e is None else g_e * vr_e
            dax = None
            if need[2] or need[3]:
                dax = _add(
                    None if va_e is None else _apply(groups, va_e, x_e, n_rows),
                    None if vx_e is None else _apply(groups, a_e, vx_e, n_rows),
                )
            if need[0]:  # tangent of a^T u, scattered to the senders
                dx = _add(
                    None if va_e is None else _apply_t(groups, va_e, u, d_in),
                    None if du is None else _apply_t(groups, a_e, du, d_in),
                )
                if dx is not None:
                    out_x.index_add_(0, blk.senders, dx)
            if need[1]:  # tangent of u x^T
                da = _add(
                    None if du is None else _outer(groups, du, x_e, width),
                    None if vx_e is None else _outer(groups, u, vx_e, width),
                )
                if da is not None:
                    out_a.index_copy_(0, ids, da)
            if need[2] and dax is not None:  # tangent of the per-path dot of g with a x
                _add_path_sums(out_r, blk, dax.mul(g_e))
            if need[3]:  # tangent of the messages, scattered to the receivers
                dm = _add(
                    None if dax is None else dax.mul_(r_e),
                    None if vr_e is None else _apply(groups, a_e, x_e, n_rows).mul_(vr_e),
                )
                if dm is not None:
                    out_grad.index_add_(0, blk.receivers, dm)
        return out_x, out_a, out_r, out_grad, *nothing[4:]
