"""The fused kernel of ``conv=fast``: gather, per-path products, radial weights and scatter per
block of edges, with hand-written first and second derivatives.

For edges e = j -> i, a group g per input irrep (dimension d_g, its paths' output rows o, path
k(o)), the summed messages are

    out[i, o, c] = sum_{e: j -> i} r[e, k(o), c] * sum_m a[e, o, m] * x[j, m, c]

Layout: ``x [n, d_in, C]`` (irreps_in1 order, channels last), ``a [E, sum_g rows_g d_g]`` (per
group a row-major [rows_g, d_g] block: the edge harmonics contracted with Clebsch-Gordan, the
same for every channel), ``r [B, P, C]`` (paths in any order; one row per bond, ``bond [E]``
each edge's row: the two directions of a bond share their radial weights, and the gradient of a
row sums over its edges), ``row_path [rows]`` (the path of each output row in r) ->
``out [n, rows, C]`` (group order, or row o at ``place[o]``: the layout the next op reads);
`mace_grid.conv.FastConvolution` maps e3nn's layouts to these.

Fused: edges are visited in blocks (sorted by receiver once per call, so a block scatters into
a narrow range of nodes); a block gathers its senders' features and radial weights, forms
a x r and adds it to its receivers. The per-edge tensors ([E, rows, C], the bulk of the work)
exist one cache-sized block at a time and never reach autograd, which keeps only the inputs.
Derivatives written by hand: `_ConvVJP` (d/dx: the transposed matvecs, scattered to senders;
d/da: per edge the upstream gradient times r, times x^T; d/dr: per (edge, path, channel) the
upstream gradient dotted with a x) and its backward (the second derivatives of force
training), the forward-mode tangent of the VJP, which recomputes a block's products instead of
storing them. Third derivatives are not implemented (``once_differentiable``).

On the CPU the same three passes run as compiled C++ (`conv_cpu.cpp`, built with torch's
``cpp_extension`` on first use and cached per CPU): each op one loop over the edges, by
receiver (the forward, the tangent) or by bond (the VJP), from CSR orders built once per call
(`_graph`); every output row is formed in vector registers and added straight to its node or
bond, d/dx and its tangent to their sender's rows (one copy per thread), so nothing per edge is
written but the per-edge derivatives themselves. The blocked PyTorch kernel runs on other
devices, and on the CPU where no compiler can build the C++ one.
"""

import functools
from pathlib import Path
from typing import NamedTuple

import torch

from mace_grid.native import load
from mace_grid.tp import work
from mace_grid.tp.engine import block_size

#: bytes of one [edges, rows, C] temporary of a block (about a CPU L2 cache; 1-4 MB measured alike)
_BLOCK_BYTES = 1 << 21
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
    bond: torch.Tensor | None = None,
    place: torch.Tensor | None = None,
) -> torch.Tensor:
    """The summed messages ``[n, rows, C]`` (module doc), differentiable twice; ``bond``
    (default: each edge its own) as `mace_grid.radial.bonds` returns it, every row of r
    read by at least one edge; ``place`` (default: group order) a permutation of the rows."""
    if bond is None:
        bond = torch.arange(a.shape[0], device=a.device)
    if x.device.type == "cpu" and native() is not None:
        graph = _graph(senders, receivers, x.shape[0], row_path, groups, bond, r.shape[0], place)
        return _NativeConv.apply(x, a, r.contiguous(), graph)
    n_edges, n_rows, channels = a.shape[0], row_path.shape[0], x.shape[2]
    edges = torch.argsort(receivers, stable=True)
    edge_bytes = n_rows * channels * x.element_size()
    cpu_block = max(_MIN_BLOCK, _BLOCK_BYTES // max(edge_bytes, 1))
    block = block_size(n_edges, x.device, cpu_block, _TEMPORARIES * edge_bytes)
    blocks = _blocks(edges, senders, receivers, bond, row_path, groups, r.shape[1], block)
    out = _Conv.apply(x, a, r.contiguous(), blocks, groups)
    return out if place is None else out.index_select(1, torch.argsort(place))


class _Block(NamedTuple):
    """One block of edges: ids, their senders and receivers, and per group the rows of
    ``r [B P, C]`` that its output rows read (edge-major: ``[b rows_g]``)."""

    ids: torch.Tensor
    senders: torch.Tensor
    receivers: torch.Tensor
    r_rows: list[torch.Tensor]


def _blocks(edges, senders, receivers, bond, row_path, groups, n_paths: int, block: int) -> list:
    """The `_Block` list of ``edges`` (a permutation) in pieces of ``block``, built once per
    forward and shared by the derivatives."""
    out = []
    for ids in edges.split(block):
        if len(ids):  # no block for no edges
            first = bond[ids][:, None] * n_paths
            r_rows = [(first + row_path[g.rows]).flatten() for g in groups]
            out.append(_Block(ids, senders[ids], receivers[ids], r_rows))
    return out


def _rows(r: torch.Tensor, rows: torch.Tensor, b: int) -> torch.Tensor:
    """A block's radial weights per output row of a group: ``r [B, P, C] -> [b, rows_g, C]``."""
    channels = r.shape[2]
    return r.reshape(-1, channels).index_select(0, rows).view(b, -1, channels)


def _matrices(g: Group, a: torch.Tensor) -> torch.Tensor:
    """The group's per-edge matrices ``[b, rows_g, d_g]`` of ``a [b, K]``."""
    return a[:, g.cols].view(a.shape[0], g.n_rows, g.dim)


def _apply(g: Group, terms: list[tuple]) -> torch.Tensor:
    """Per edge the sum of a x over ``terms``, pairs (``a [b, K]``, ``x [b, d_in, C]``) ->
    ``[b, rows_g, C]``; two terms (a tangent) by one matmul on the stacked pairs."""
    if len(terms) == 1:
        a, x = _matrices(g, terms[0][0]), terms[0][1][:, g.inputs]
        return a * x if g.dim == 1 else torch.bmm(a, x)  # scalars: an outer product
    a = torch.cat([_matrices(g, a) for a, _ in terms], 2)
    return torch.bmm(a, torch.cat([x[:, g.inputs] for _, x in terms], 1))


def _apply_t(g: Group, a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per edge a^T u: ``a [b, K]``, ``u [b, rows_g, C]`` -> ``[b, d_g, C]``."""
    return torch.bmm(_matrices(g, a).transpose(1, 2), u)


def _outer(g: Group, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per edge u x^T summed over channels, ``[b, rows_g, C], [b, d_in, C] -> [b, rows_g d_g]``
    (the gradient of <u, a x> with respect to the group's part of a)."""
    return torch.bmm(u, x[:, g.inputs].transpose(1, 2)).view(u.shape[0], -1)


def _add_rows(out: torch.Tensor, rows: torch.Tensor, t: torch.Tensor) -> None:
    """``out [B, P, C]`` += a group's rows ``t [b, rows_g, C]`` summed per path (the transpose
    of `_rows`)."""
    channels = out.shape[2]
    out.view(-1, channels).index_add_(0, rows, t.view(-1, channels))


def _sum(*terms: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of the terms that are not None (None if all are)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total.add_(t)
    return total


def _per_edge(like: torch.Tensor, b: int, groups: list[Group]) -> torch.Tensor:
    """An uninitialised ``[b, d_in, C]`` block filled group by group (zeros where an input
    irrep has no path)."""
    covered = sum(g.dim for g in groups) == like.shape[1]
    shape = (b, *like.shape[1:])
    return like.new_empty(shape) if covered else like.new_zeros(shape)


def _per_group(x: torch.Tensor, groups: list[Group]) -> list[torch.Tensor]:
    """Zero node accumulators ``[n, rows_g, C]``, one per group (contiguous, for index_add_;
    concatenated along rows they are the output)."""
    return [x.new_zeros(x.shape[0], g.n_rows, x.shape[2]) for g in groups]


def _used(flags: tuple[bool, ...], inputs: tuple[torch.Tensor, ...]) -> tuple[bool, ...]:
    """``ctx.needs_input_grad`` narrowed to what the running backward uses: an input whose
    producer the engine will not execute gets no gradient. The force pass (``autograd.grad``
    to the positions) needs none for the first layer's x, a function of the parameters only;
    a backward to the parameters (`mace_grid.lit_module.backward_to_parameters`) needs none
    for a, a function of the positions only. Under tracing, or in a backward without explicit
    inputs, every flag stands."""
    if torch.compiler.is_compiling():
        return flags
    try:
        return tuple(
            flag and (t.grad_fn is None or torch._C._will_engine_execute_node(t.grad_fn))
            for flag, t in zip(flags, inputs, strict=True)
        )
    except (RuntimeError, AttributeError):  # not in an engine's backward, or no such query
        return flags


class _Conv(torch.autograd.Function):
    """`convolve` over blocks of edges; its backward is `_ConvVJP`, so the forces (first
    derivative) can be differentiated again in training."""

    @staticmethod
    def forward(ctx, x, a, r, blocks, groups):
        ctx.save_for_backward(x, a, r)
        ctx.blocks, ctx.groups = blocks, groups
        out = _per_group(x, groups)
        for blk in blocks:
            b = len(blk.ids)
            x_e, a_e = x.index_select(0, blk.senders), a.index_select(0, blk.ids)
            for g, rows, out_g in zip(groups, blk.r_rows, out, strict=True):
                messages = _apply(g, [(a_e, x_e)]).mul_(_rows(r, rows, b))
                out_g.index_add_(0, blk.receivers, messages)
        return torch.cat(out, 1)

    @staticmethod
    def backward(ctx, grad):
        x, a, r = ctx.saved_tensors
        want = _used(ctx.needs_input_grad[:3], (x, a, r))
        grads = _ConvVJP.apply(x, a, r, grad.contiguous(), ctx.blocks, ctx.groups, want)
        return *grads, None, None


class _ConvVJP(torch.autograd.Function):
    """``(grad_x, grad_a, grad_r)`` of `_Conv` for the upstream gradient ``grad`` (None where
    ``want`` says not needed). Its backward (the second derivatives) is the forward-mode
    derivative along the incoming cotangents v: for phi = <grad, out>, the VJP is grad phi, so
    d/d(x, a, r) <v, grad phi> = Hessian(phi) v, the tangent of the VJP, and d/d grad
    <v, grad phi> = the tangent of out."""

    @staticmethod
    def forward(ctx, x, a, r, grad, blocks, groups, want):
        ctx.save_for_backward(x, a, r, grad)
        ctx.blocks, ctx.groups = blocks, groups
        ctx.set_materialize_grads(False)
        grad_x = torch.zeros_like(x) if want[0] else None
        grad_a = torch.empty_like(a) if want[1] else None
        grad_r = r.new_zeros(r.shape) if want[2] else None  # contiguous: rows added by view
        grads = [grad[:, g.rows].contiguous() for g in groups]
        for blk in blocks:
            b = len(blk.ids)
            x_e, a_e = x.index_select(0, blk.senders), a.index_select(0, blk.ids)
            gx_e = _per_edge(x, b, groups) if want[0] else None
            ga_e = a.new_empty(b, a.shape[1]) if want[1] else None
            for g, rows, grad_g in zip(groups, blk.r_rows, grads, strict=True):
                g_e = grad_g.index_select(0, blk.receivers)
                if want[0] or want[1]:
                    u = g_e * _rows(r, rows, b)
                    if want[0]:
                        gx_e[:, g.inputs] = _apply_t(g, a_e, u)
                    if want[1]:
                        ga_e[:, g.cols] = _outer(g, u, x_e)
                if want[2]:
                    _add_rows(grad_r, rows, _apply(g, [(a_e, x_e)]).mul_(g_e))
            if want[0]:
                grad_x.index_add_(0, blk.senders, gx_e)
            if want[1]:
                grad_a.index_copy_(0, blk.ids, ga_e)
        return grad_x, grad_a, grad_r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_x, v_a, v_r):
        x, a, r, grad = ctx.saved_tensors
        groups = ctx.groups
        need = _used(ctx.needs_input_grad[:4], (x, a, r, grad))
        nothing = (None,) * 7
        if v_x is None and v_a is None and v_r is None:
            return nothing
        out_x, out_a, out_r = (
            t.new_zeros(t.shape) if n else None for t, n in zip((x, a, r), need[:3], strict=True)
        )
        out_grad = _per_group(x, groups) if need[3] else None
        grads = [grad[:, g.rows].contiguous() for g in groups]
        # which tangents exist: of a^T u (x), of u x^T (a), of a x (r and the messages)
        need_x = need[0] and (v_a is not None or v_r is not None)
        need_a = need[1] and (v_r is not None or v_x is not None)
        for blk in ctx.blocks:
            b, ids = len(blk.ids), blk.ids
            x_e, a_e = x.index_select(0, blk.senders), a.index_select(0, ids)
            vx_e = None if v_x is None else v_x.index_select(0, blk.senders)
            va_e = None if v_a is None else v_a.index_select(0, ids)
            dx_e = _per_edge(x, b, groups) if need_x else None
            da_e = a.new_empty(b, a.shape[1]) if need_a else None
            terms = [
                (t, y) for t, y in ((va_e, x_e), (a_e, vx_e)) if t is not None and y is not None
            ]
            for k, (g, rows) in enumerate(zip(groups, blk.r_rows, strict=True)):
                g_e = grads[k].index_select(0, blk.receivers)
                r_e = _rows(r, rows, b)
                vr_e = None if v_r is None else _rows(v_r, rows, b)
                u = g_e * r_e if need_x or need_a else None
                du = None if vr_e is None else g_e * vr_e
                dax = _apply(g, terms) if terms and (need[2] or need[3]) else None
                if need_x:  # tangent of a^T u, scattered to the senders
                    dx_e[:, g.inputs] = _sum(
                        None if va_e is None else _apply_t(g, va_e, u),
                        None if du is None else _apply_t(g, a_e, du),
                    )
                if need_a:  # tangent of u x^T
                    da_e[:, g.cols] = _sum(
                        None if du is None else _outer(g, du, x_e),
                        None if vx_e is None else _outer(g, u, vx_e),
                    )
                if need[2] and dax is not None:  # tangent of the per-path dot of g with a x
                    _add_rows(out_r, rows, dax * g_e)
                if need[3]:  # tangent of the messages, scattered to the receivers
                    dm = _sum(
                        None if dax is None else dax.mul_(r_e),
                        None if vr_e is None else _apply(g, [(a_e, x_e)]).mul_(vr_e),
                    )
                    if dm is not None:
                        out_grad[k].index_add_(0, blk.receivers, dm)
            if need_x:
                out_x.index_add_(0, blk.senders, dx_e)
            if need_a:
                out_a.index_copy_(0, ids, da_e)
        out_grad = None if out_grad is None else torch.cat(out_grad, 1)
        return out_x, out_a, out_r, out_grad, *nothing[4:]


@functools.cache
def native():
    """``torch.ops.mace_grid_conv``, the C++ CPU kernel of `conv_cpu.cpp` (built on first use,
    `mace_grid.native.load`), or None (with one warning) where it cannot be built."""
    ops = load(Path(__file__).with_name("conv_cpu.cpp"), "mace_grid_conv", "conv=fast")
    if ops is not None:
        for op, passes in _PASSES.items():
            work.register_kernel(getattr(ops, op), functools.partial(_cost, passes))
    return ops


#: per C++ op, how many passes over (edge, row, channel) it makes that cost a x (a^T u, u x^T
#: alike: 2 E C K flop, K = sum_o d_o), from its flags (vjp: want x, a, r; vjp_tangent: v_x,
#: v_a, v_r given, need x, a, r, grad)
_PASSES = {
    "forward": lambda args: 1,
    "vjp": lambda args: sum(args[7:10]),
    "vjp_tangent": lambda args: _tangent_passes(*(v is not None for v in args[4:7]), *args[11:15]),
}


def _tangent_passes(vx, va, vr, need_x, need_a, need_r, need_g) -> int:
    """See conv_cpu.cpp's conv_vjp_tangent: each term it adds is one pass."""
    return need_a * (vr + vx) + (need_r or need_g) * (va + vx) + need_g * vr + need_x * (va + vr)


def _cost(passes, args: tuple, out) -> tuple[int, int]:
    """(matmul flop, elements written) of a C++ op call: 2 E C K per pass; its outputs."""
    x, a = args[0], args[1]
    flop = 2 * a.shape[0] * a.shape[1] * x.shape[2] * passes(args)
    outs = out if isinstance(out, tuple | list) else (out,)
    return flop, sum(t.numel() for t in outs if isinstance(t, torch.Tensor))


class _Graph(NamedTuple):
    """The edges for the C++ kernel: senders, receivers, bonds; the edges sorted by receiver
    and by bond (``order``) with CSR row pointers (``ptr``, [n + 1], [B + 1]); and the output
    rows' int64 table [rows, 5] (first input column, input dimension, first column of a,
    path, place)."""

    senders: torch.Tensor
    receivers: torch.Tensor
    recv_order: torch.Tensor
    recv_ptr: torch.Tensor
    rows: torch.Tensor
    bond: torch.Tensor
    bond_order: torch.Tensor
    bond_ptr: torch.Tensor


def _graph(
    senders, receivers, n_nodes: int, row_path, groups: list[Group], bond, n_bonds: int, place
) -> _Graph:
    """The `_Graph` of a call (CPU tensors: ``.tolist()`` is no device sync)."""
    paths = row_path.tolist()
    places = list(range(len(paths))) if place is None else place.tolist()
    table = [
        [g.inputs.start, g.dim, g.cols.start + t * g.dim, paths[o], places[o]]
        for g in groups
        for t, o in enumerate(range(g.rows.start, g.rows.stop))
    ]
    senders, receivers = senders.contiguous(), receivers.contiguous()
    if senders.numel():
        low, high = (int(v) for v in torch.aminmax(senders))
        if low < 0 or high >= n_nodes:
            raise ValueError(
                f"edge_index refers to node {high if low >= 0 else low} of {n_nodes} nodes"
            )
    return _Graph(
        senders,
        receivers,
        *_csr(receivers, n_nodes),
        torch.tensor(table, dtype=torch.long).view(-1, 5),
        bond.contiguous(),
        *_csr(bond, n_bonds),
    )


def _csr(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges sorted by ``index`` and each node's first position in that order ([n + 1]);
    ValueError for a node index outside [0, n) (the C++ kernel does not check its reads)."""
    counts = torch.bincount(index, minlength=n)  # RuntimeError for a negative index
    if counts.shape[0] != n:
        raise ValueError(f"edge_index refers to node {counts.shape[0] - 1} of {n} nodes")
    ptr = index.new_zeros(n + 1)
    torch.cumsum(counts, 0, out=ptr[1:])
    return torch.argsort(index, stable=True), ptr


class _NativeConv(torch.autograd.Function):
    """`convolve` by the C++ kernel; its backward is `_NativeConvVJP` (as `_Conv`'s)."""

    @staticmethod
    def forward(ctx, x, a, r, graph):
        ctx.save_for_backward(x, a, r)
        ctx.graph = graph
        return native().forward(
            x, a, r, graph.senders, graph.recv_order, graph.recv_ptr, graph.rows, graph.bond
        )

    @staticmethod
    def backward(ctx, grad):
        x, a, r = ctx.saved_tensors
        want = _used(ctx.needs_input_grad[:3], (x, a, r))
        grads = _NativeConvVJP.apply(x, a, r, grad.contiguous(), ctx.graph, want)
        return *grads, None


class _NativeConvVJP(torch.autograd.Function):
    """`_ConvVJP` by the C++ kernel: the VJP, and as its backward the VJP's tangent."""

    @staticmethod
    def forward(ctx, x, a, r, grad, graph, want):
        ctx.save_for_backward(x, a, r, grad)
        ctx.graph = graph
        ctx.set_materialize_grads(False)
        g = graph
        bonds = (g.bond, g.bond_order, g.bond_ptr)
        return native().vjp(x, a, r, grad, g.senders, g.receivers, g.rows, *want, *bonds)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v_x, v_a, v_r):
        x, a, r, grad = ctx.saved_tensors
        need = _used(ctx.needs_input_grad[:4], (x, a, r, grad))
        if (v_x is None and v_a is None and v_r is None) or not any(need):
            return (None,) * 6
        v_x, v_a, v_r = (None if v is None else v.contiguous() for v in (v_x, v_a, v_r))
        g = ctx.graph
        order = (g.senders, g.recv_order, g.recv_ptr)
        bonds = (g.bond, g.bond_order, g.bond_ptr)
        out = native().vjp_tangent(x, a, r, grad, v_x, v_a, v_r, *order, g.rows, *need, *bonds)
        return *out, None, None
