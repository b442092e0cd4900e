"""Interaction convolutions: ``e3nn`` (mace's own ``conv_tp``) or ``fast`` (the same function).

mace's interaction blocks compute, per edge j -> i, the 'uvu' tensor product of the sender's
features with the edge spherical harmonics Y, one radial weight R per (edge, channel, path), and
sum the messages over senders. ``FastConvolution`` computes exactly that, reordered:

    m_i[c, (k, M)] = sum_j R_ji[c, k] * sum_m1 A_ji[(k, M), (l1, m1)] * x_j[c, (l1, m1)],
    A_ji[(k, M), (l1, m1)] = w_k * sum_m2 C^k[m1, m2, M] * Y_ji[m2]

A (edge harmonics contracted with the Clebsch-Gordan coefficients and e3nn's path weights) is
channel-independent, so the per-channel work per path is a (2 l3 + 1) x (2 l1 + 1) matvec (one
batched matmul per input irrep) instead of a (2 l1 + 1)(2 l2 + 1)(2 l3 + 1) contraction; paths
from scalar features (all of the first layer) are elementwise products, with R * x formed on
the small per-path tensor. Gather, product and scatter are fused in channels-last layout, and
e3nn's layout is restored once per node, not per edge. mace's blocks call this fused form when
the block has a ``conv_fusion`` attribute (their hook for cuequivariance/oeq kernels). In eager
mode (CPU or CUDA) the kernel `mace_grid.conv_kernel` computes it over blocks of edges with
hand-written first and second derivatives; under TorchScript and torch.compile the same math
runs as plain differentiable ops (`FastConvolution.convolve_autograd`, its reference).

``FastConvolution`` subclasses e3nn's ``TensorProduct`` (built with mace's arguments), so a
model's state_dict is the same with either conv and checkpoints load into both. conv=fast also
computes the block's e3nn ``Linear`` after the convolution (17 input irreps at max_ell 3, L = 2)
as `mace_grid.linear.StackedLinear`, one matmul per output irrep, and its radial network as
`mace_grid.radial.RadialMLP`, the activation's derivatives written out, on the same weights. In
eager mode the fused kernel writes the messages as ``[nodes, rows, channels]`` in the order that
linear's matmuls read them (`FastConvolution.feed`), so neither side reorders them; under
TorchScript and torch.compile both keep e3nn's layout.
"""

from collections.abc import Mapping
from typing import Any

import torch
from e3nn import o3
from mace.modules import interaction_classes
from mace.modules.blocks import RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock

from mace_grid.conv_kernel import convolve, groups_of
from mace_grid.errors import ConfigError
from mace_grid.linear import StackedLinear
from mace_grid.linear import restore as restore_linear
from mace_grid.radial import Deferred, RadialMLP
from mace_grid.radial import restore as restore_radial

CONVS = ("e3nn", "fast")
# Interaction blocks whose forward computes exactly gather -> conv_tp -> scatter_sum (or, with
# ``conv_fusion`` set, calls conv_tp(node_feats, edge_attrs, weights, edge_index)).
FAST_BLOCKS = (RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock)


def _init_args(tp: o3.TensorProduct) -> dict:
    """The arguments mace built ``tp`` with (normalisations are recomputed from them)."""
    return dict(
        irreps_in1=tp.irreps_in1,
        irreps_in2=tp.irreps_in2,
        irreps_out=tp.irreps_out,
        instructions=[
            (i.i_in1, i.i_in2, i.i_out, i.connection_mode, i.has_weight) for i in tp.instructions
        ],
        shared_weights=False,
        internal_weights=False,
    )


class FastConvolution(o3.TensorProduct):
    """Fused gather + 'uvu' tensor product + scatter-sum of mace's ``conv_tp`` (same weights).

    ``forward(node_feats [n_nodes, irreps_in1], edge_attrs [n_edges, irreps_in2],
    weights [n_edges, weight_numel], edge_index [2, n_edges]) -> [n_nodes, irreps_out]``: the
    summed messages, as mace's blocks call a fused conv (``conv_fusion``). In eager mode, with
    ``reads_rows`` set, node_feats come as ``[n_nodes, d_in * channels]`` in rows (irrep, m) of
    irreps_in1, channels last (as `StackedLinear` writes them with ``rows_out``); the weights may
    come as `mace_grid.radial.Deferred`, the radial network's call, made here once per bond; and
    once `feed` has set a rows layout the messages come as ``[n_nodes, rows, channels]`` in it.
    """

    reads_rows: bool = False  # eager node_feats in rows (class doc), set by `set_conv`

    def __init__(self, **tp_args) -> None:
        super().__init__(**tp_args)
        mul = {m for m, _ in self.irreps_in1} | {m for m, _ in self.irreps_out}
        outputs = [i.i_out for i in self.instructions]
        if (
            len(mul) != 1
            or any(m != 1 for m, _ in self.irreps_in2)
            or any(i.connection_mode != "uvu" or not i.has_weight for i in self.instructions)
            or sorted(outputs) != list(range(len(self.irreps_out)))
        ):
            raise ConfigError(
                f"conv=fast: {self} is not mace's channel-wise convolution (one multiplicity, "
                "one weighted 'uvu' path per output); use conv=e3nn"
            )
        channels = mul.pop()
        in_offsets = _offsets([ir.dim for _, ir in self.irreps_in1])
        sh_offsets = _offsets([ir.dim for _, ir in self.irreps_in2])
        out_dims = [ir.dim for _, ir in self.irreps_out]
        out_offsets = _offsets(out_dims)
        d_in, d_out, n_sh = in_offsets[-1], out_offsets[-1], sh_offsets[-1]
        # cg[p, o, i]: A[o, i] = sum_p Y[p] cg[p, o, i]; rows o follow irreps_out, columns i
        # irreps_in1 (per-channel m indices); e3nn's path weights folded in.
        cg = torch.zeros(n_sh, d_out, d_in, dtype=torch.float64)
        for ins in self.instructions:
            l1, l2, l3 = (
                self.irreps_in1[ins.i_in1].ir.l,
                self.irreps_in2[ins.i_in2].ir.l,
                self.irreps_out[ins.i_out].ir.l,
            )
            w3j = o3.wigner_3j(l1, l2, l3, dtype=torch.float64)  # [m1, m2, M]
            p0, o0, i0 = sh_offsets[ins.i_in2], out_offsets[ins.i_out], in_offsets[ins.i_in1]
            block = ins.path_weight * w3j.permute(1, 2, 0)  # [m2, M, m1]
            cg[p0 : p0 + 2 * l2 + 1, o0 : o0 + 2 * l3 + 1, i0 : i0 + 2 * l1 + 1] = block
        # One group per input irrep: its paths only read its (2 l1 + 1) columns. The groups'
        # tensors are concatenated buffers of this module (sliced by the python-int bounds
        # below): a child module would come before e3nn's code-generated one in the state, and
        # e3nn re-adds its own last on deepcopy, which reorders buffers (EMA copies the model).
        order, cgs, paths, locals_ = [], [], [], []
        self.group_dims, self.group_rows, self.group_in, self.group_paths = [], [], [], []
        for b in range(len(self.irreps_in1)):
            group = [k for k, ins in enumerate(self.instructions) if ins.i_in1 == b]
            if not group:
                continue
            outs = [self.instructions[k].i_out for k in group]
            rows = [o for i in outs for o in range(out_offsets[i], out_offsets[i + 1])]
            order += rows
            cgs.append(cg[:, rows, in_offsets[b] : in_offsets[b + 1]].reshape(n_sh, -1))
            paths += group
            locals_ += [n for n, i in enumerate(outs) for _ in range(out_dims[i])]
            self.group_dims.append(in_offsets[b + 1] - in_offsets[b])
            self.group_rows.append(len(rows))
            self.group_in.append(in_offsets[b])
            self.group_paths.append(len(group))
        dtype = torch.get_default_dtype()
        self.register_buffer("cg", torch.cat(cgs, dim=1).to(dtype), persistent=False)
        self.register_buffer("paths", torch.tensor(paths, dtype=torch.long), persistent=False)
        self.register_buffer("path_of_row", torch.tensor(locals_), persistent=False)
        # each row's path in the radial weights as they come (instruction order), so the fused
        # kernel reads them in place (no reordering copy, nor its gradient's scatter)
        starts = _offsets(self.group_paths)
        group_of_row = [g for g, n in enumerate(self.group_rows) for _ in range(n)]
        row_path = [paths[starts[g] + k] for g, k in zip(group_of_row, locals_, strict=True)]
        self.register_buffer("row_path", torch.tensor(row_path), persistent=False)
        # e3nn layout of irreps_in1 -> [d_in, channels]; [grouped rows, channels] -> irreps_out.
        in_index = torch.cat(
            [
                off * channels
                + torch.arange(channels)[None, :] * ir.dim
                + torch.arange(ir.dim)[:, None]
                for off, (_, ir) in zip(in_offsets, self.irreps_in1, strict=False)
            ]
        ).flatten()
        position = torch.argsort(torch.tensor(order))  # of each (irrep, m) row, grouped
        out_index = torch.cat(
            [
                (
                    position[off : off + dim][None, :] * channels + torch.arange(channels)[:, None]
                ).flatten()
                for off, dim in zip(out_offsets, out_dims, strict=False)
            ]
        )
        self.register_buffer("in_index", in_index, persistent=False)
        self.register_buffer("out_index", out_index, persistent=False)
        # each grouped row's (irrep, m) row of irreps_out, and where `feed` places it (None:
        # the e3nn layout)
        self.register_buffer("row_irrep_m", torch.tensor(order), persistent=False)
        self.register_buffer("place", None, persistent=False)
        # the edges' directions for pairing them into bonds (`mace_grid.radial.bonds`): the
        # first of edge_attrs' three l = 1 columns (-1: none)
        ones = [k for k, (_, ir) in enumerate(self.irreps_in2) if ir.l == 1]
        self.l1_column = sh_offsets[ones[0]] if ones else -1
        self.channels = channels
        self.num_paths = len(self.instructions)
        self.d_in = d_in
        self.d_out = d_out

    @classmethod
    def like(cls, tp: o3.TensorProduct) -> "FastConvolution":
        """The fast version of mace's ``conv_tp`` module ``tp``."""
        return cls(**_init_args(tp))

    def feed(self, rows: list[int] | None) -> None:
        """Write the eager messages as ``[n_nodes, rows, channels]``, row q being irreps_out's
        (irrep, m) row ``rows[q]`` (a permutation; `StackedLinear.rows_in`), or in e3nn's
        layout (None)."""
        if rows is None:
            self.place = None
            return
        if sorted(rows) != list(range(self.d_out)):
            raise ValueError(f"rows {rows} are not a permutation of the {self.d_out} output rows")
        position = torch.argsort(torch.tensor(rows))  # of each (irrep, m) row in ``rows``
        self.place = position[self.row_irrep_m.cpu()].to(self.row_irrep_m.device)

    def forward(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        """The fused kernel (`mace_grid.conv_kernel`) in eager mode; plain differentiable ops
        under TorchScript and torch.compile."""
        if torch.jit.is_scripting():
            return self.convolve_autograd(node_feats, edge_attrs, weights, edge_index)
        return self._convolve_fused(node_feats, edge_attrs, weights, edge_index)

    @torch.jit.unused
    def _convolve_fused(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.convolve_autograd(node_feats, edge_attrs, weights, edge_index)
        n_nodes, c = node_feats.shape[0], self.channels
        bond = None
        if isinstance(weights, Deferred):
            d = self.l1_column
            directions = edge_attrs[:, d : d + 3] if d >= 0 else None
            weights, bond = weights.per_bond(edge_index, directions, n_nodes)
        x = node_feats.view(n_nodes, self.d_in, c) if self.reads_rows else self._rows(node_feats)
        # per bond (or edge), paths in instruction order, as row_path reads them
        r = weights.view(weights.shape[0], self.num_paths, c)
        a_all = edge_attrs @ self.cg.to(edge_attrs.dtype)  # [E, sum_g rows_g * dim_g]
        groups = groups_of(self.group_dims, self.group_rows, self.group_in)
        senders, receivers = edge_index
        out = convolve(x, a_all, r, senders, receivers, self.row_path, groups, bond, self.place)
        if self.place is not None:
            return out  # [n_nodes, rows, C] as the next linear reads it (`feed`)
        return out.view(n_nodes, self.d_out * c).index_select(1, self.out_index)

    def _rows(self, node_feats: torch.Tensor) -> torch.Tensor:
        """node_feats (e3nn's layout) as ``[n_nodes, d_in, channels]`` (rows (irrep, m) of
        irreps_in1)."""
        return node_feats.index_select(1, self.in_index).view(-1, self.d_in, self.channels)

    def convolve_autograd(
        self,
        node_feats: torch.Tensor,
        edge_attrs: torch.Tensor,
        weights: torch.Tensor,
        edge_index: torch.Tensor,
    ) -> torch.Tensor:
        """The same as the fused kernel with plain differentiable ops (TorchScript path)."""
        n_nodes, n_edges, c = node_feats.shape[0], edge_attrs.shape[0], self.channels
        x = self._rows(node_feats).index_select(0, edge_index[0])  # [E, d_in, C], the senders'
        r = weights.view(n_edges, self.num_paths, c)  # weights come in instruction order
        a_all = edge_attrs @ self.cg.to(edge_attrs.dtype)  # [E, sum_g rows_g * dim_g]
        summed = []
        a0, p0, r0 = 0, 0, 0
        for g in range(len(self.group_dims)):
            dim, rows, i0 = self.group_dims[g], self.group_rows[g], self.group_in[g]
            n_paths = self.group_paths[g]
            # paths starting at input irrep g: R[c, k] * A[(k, M), m1] x[c, m1]
            a = a_all[:, a0 : a0 + rows * dim].reshape(n_edges, rows, dim)
            r_g = r.index_select(1, self.paths[p0 : p0 + n_paths])
            expand = self.path_of_row[r0 : r0 + rows]
            x_g = x[:, i0 : i0 + dim]
            if dim == 1:  # scalars: R * x on the small [E, paths, C] tensor, then expand
                messages = a * (x_g * r_g).index_select(1, expand)
            else:
                messages = torch.bmm(a, x_g) * r_g.index_select(1, expand)
            total = torch.zeros(n_nodes, rows, c, dtype=messages.dtype, device=messages.device)
            summed.append(total.index_add_(0, edge_index[1], messages))
            a0, p0, r0 = a0 + rows * dim, p0 + n_paths, r0 + rows
        out = torch.cat(summed, dim=1).view(n_nodes, self.d_out * c)
        return out.index_select(1, self.out_index)


def _offsets(dims: list[int]) -> list[int]:
    out = [0]
    for d in dims:
        out.append(out[-1] + d)
    return out


def set_conv(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Give every interaction block of ``model`` the convolution ``name``, in place.

    The weights (the radial MLP outputs) and the state_dict are the same for both, so a model
    can be switched at any time; ``e3nn`` restores mace's own modules (``conv_tp`` and the
    ``linear`` after it, on the same Parameter), so the result is a stock mace-torch model.
    """
    if name not in CONVS:
        raise ConfigError(f"conv.name={name!r}; choose one of {', '.join(CONVS)} (conv=<name>)")
    cutoff_folded = getattr(getattr(model, "radial_embedding", None), "apply_cutoff", True)
    for block in interaction_blocks(model):
        tp = block.conv_tp
        if name == "fast" and not isinstance(tp, FastConvolution):
            check_fast_block(block)
            block.conv_tp = FastConvolution.like(tp).to(**_placement(block))
            block.conv_fusion = "mace_grid"  # mace's blocks then call the fused signature
            block.linear = _same_weights(StackedLinear.like(block.linear), block.linear)
            rows = block.linear.rows_in
            if rows is not None and len(rows) > 1:  # one row is e3nn's layout already
                block.conv_tp.feed(rows)
            if type(block.linear_up) is o3.Linear and block.linear_up.irreps_out == tp.irreps_in1:
                block.conv_tp.reads_rows = _stack_linear_up(block)
            block.conv_tp_weights = RadialMLP.like(block.conv_tp_weights)
            # once per bond, unless mace multiplies the weights by the cutoff in between
            block.conv_tp_weights.per_bond = cutoff_folded
        elif name == "e3nn" and isinstance(tp, FastConvolution):
            block.conv_tp = o3.TensorProduct(**_init_args(tp)).to(**_placement(block))
            del block.conv_fusion
            block.linear = _same_weights(restore_linear(block.linear), block.linear)
            if isinstance(block.linear_up, StackedLinear):
                block.linear_up = _same_weights(restore_linear(block.linear_up), block.linear_up)
            block.conv_tp_weights = restore_radial(block.conv_tp_weights)
    return model


def _stack_linear_up(block: torch.nn.Module) -> bool:
    """The block's ``linear_up`` as a `StackedLinear` writing the rows the convolution reads
    (``rows_out``), where it computes it (else mace's own stays: False)."""
    try:
        stacked = StackedLinear.like(block.linear_up)
    except ConfigError:  # biases or another normalisation
        return False
    block.linear_up = _same_weights(stacked, block.linear_up)
    block.linear_up.rows_out = True
    return True


def _same_weights(new: o3.Linear, old: o3.Linear) -> o3.Linear:
    """``new`` on ``old``'s device and dtype, holding ``old``'s weight (the same Parameter, so
    an optimiser built before the swap keeps training it)."""
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight = old.weight
    return new


def check_fast_block(block: torch.nn.Module) -> None:
    if type(block) not in FAST_BLOCKS or hasattr(block, "conv_fusion"):
        names = ", ".join(b.__name__ for b in FAST_BLOCKS)
        raise ConfigError(
            f"conv=fast supports the interaction blocks {names} without cuequivariance/oeq "
            f"fusion, not {type(block).__name__}; use conv=e3nn"
        )


def validate_conv(name: str, model_cfg: Mapping[str, Any]) -> None:
    """Fail fast (``ConfigError``) on an unknown conv or one the model's interactions lack."""
    if name not in CONVS:
        raise ConfigError(f"conv.name={name!r}; choose one of {', '.join(CONVS)} (conv=<name>)")
    for key in ("interaction", "interaction_first"):
        if name == "fast" and interaction_classes[model_cfg[key]] not in FAST_BLOCKS:
            raise ConfigError(
                f"conv=fast does not support model.{key}={model_cfg[key]}; use conv=e3nn"
            )


def interaction_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "conv_tp") and hasattr(m, "conv_tp_weights")]


def _placement(block: torch.nn.Module) -> dict:
    """Device and dtype of the block's radial MLP, for a replacement conv module."""
    weight = next(block.conv_tp_weights.parameters())
    return {"device": weight.device, "dtype": weight.dtype}
