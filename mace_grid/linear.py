"""e3nn's ``o3.Linear`` with one matmul per output irrep (same weights, same function).

A linear map of irreps is a sum of per-path channel mixings, y_o = sum_{paths i -> o} w_i x_i W_i.
e3nn's generated code slices the input once per path, so autograd's backward zero-fills a
full-size gradient for every slice and sums them: for mace's linear after the convolution (17
input irreps at max_ell 3, L = 2) that is most of a training step's elementwise passes outside
the kernels. ``StackedLinear`` splits the input once, stacks each output irrep's path inputs
into one [nodes * (2l + 1), paths * channels] matrix and multiplies it by the stacked,
path-normalised weights: one matmul per output, the same numbers.

It also reads its input as ``[nodes, rows, channels]``, one row per (input irrep, m) ordered as
its matmuls read them (``rows_in``): `mace_grid.conv.FastConvolution` writes its messages so in
eager mode, and each output's matrix is then a slice of them, not a gather. With ``rows_out``
set it writes its output in rows too, ``[nodes, rows * channels]``, rows (output irrep, m) in
irreps_out order, as the convolution reads its node features: the matmuls' own layout, no
transposes, and still one vector per node (mace's padding and LAMMPS's ghost exchange of node
features between the linear and the convolution take it as any other).
"""

import torch
from e3nn import o3

from mace_grid.errors import ConfigError


class StackedLinear(o3.Linear):
    """``o3.Linear`` (internal, shared weights, no biases) computed one output irrep at a time.

    A subclass with e3nn's own parameters, so its state_dict is that of the module it replaces;
    under TorchScript and torch.compile it runs e3nn's generated code, in e3nn's layout.
    """

    rows_out: bool = False  # eager output [nodes, rows * channels] (module doc); one multiplicity

    def __init__(self, irreps_in, irreps_out, instructions) -> None:
        super().__init__(irreps_in, irreps_out, instructions=instructions)
        self.in_dims = [mul_ir.dim for mul_ir in self.irreps_in]
        self.path_sizes = [
            self.irreps_in[i.i_in].mul * self.irreps_out[i.i_out].mul for i in self.instructions
        ]
        self.out_paths = [
            [k for k, ins in enumerate(self.instructions) if ins.i_out == o]
            for o in range(len(self.irreps_out))
        ]
        scale = [
            i.path_weight
            for i, n in zip(self.instructions, self.path_sizes, strict=True)
            for _ in range(n)
        ]
        self.register_buffer("path_scale", torch.tensor(scale), persistent=False)
        self.rows_in, self.row_sizes, self.row_channels = _rows_layout(self)

    @classmethod
    def like(cls, linear: o3.Linear) -> "StackedLinear":
        """The stacked version of mace's ``linear`` (its weights are not copied)."""
        if not (linear.internal_weights and linear.shared_weights) or linear.bias_numel:
            raise ConfigError(f"{linear} has external weights or biases; use conv=e3nn")
        stacked = _same_paths(cls, linear)
        if [i.path_weight for i in stacked.instructions] != [
            i.path_weight for i in linear.instructions
        ]:
            raise ConfigError(f"{linear} normalises its paths unlike e3nn's default")
        return stacked

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._compiled_main(features, self.weight, self.bias)
        return self._eager(features)

    @torch.jit.unused
    def _eager(self, features: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # e3nn's layout, as the compiled convolution's
            return self._compiled_main(features, self.weight, self.bias)
        return self._stacked(features)

    @torch.jit.unused
    def _stacked(self, features: torch.Tensor) -> torch.Tensor:
        rows = features.shape[-1] != self.irreps_in.dim  # [nodes, rows, channels]: rows_in
        if rows:
            if self.rows_in is None or features.shape[1:] != (len(self.rows_in), self.row_channels):
                raise ValueError(
                    f"{self}: input {tuple(features.shape)} is neither [..., "
                    f"{self.irreps_in.dim}] nor [nodes, rows, channels] in its rows layout"
                )
            lead, z = features.shape[:1], features.shape[0]
            pieces = features.split(self.row_sizes, dim=1)
        else:
            # split, not slices: autograd's backward of a split is one cat, of each slice a
            # zero-filled full-size gradient
            lead = features.shape[:-1]
            x = features.reshape(-1, self.irreps_in.dim)
            z = x.shape[0]
            inputs = x.split(self.in_dims, dim=1)
        weights = (self.weight * self.path_scale).split(self.path_sizes)
        parts = []
        for o, ((mul, ir), paths) in enumerate(zip(self.irreps_out, self.out_paths, strict=True)):
            if not paths:
                parts.append(features.new_zeros(z, ir.dim * mul))
                continue
            # x_o [z * (2l + 1), paths * u] (rows (z, m)) and w_o [paths * u, w]
            if rows:
                x_o = pieces[o].reshape(z * ir.dim, -1)
            else:
                x_o = torch.cat(
                    [inputs[self.instructions[k].i_in].view(z, -1, ir.dim) for k in paths], 1
                )
                x_o = x_o.transpose(1, 2).reshape(z * ir.dim, -1)
            w_o = torch.cat([weights[k].view(-1, mul) for k in paths])
            y = x_o @ w_o  # rows (z, m)
            if self.rows_out:  # per node: rows m, channels last
                parts.append(y.view(z, ir.dim * mul))
            else:  # e3nn's: channels, then m
                parts.append(y.view(z, ir.dim, mul).transpose(1, 2).reshape(z, mul * ir.dim))
        return torch.cat(parts, dim=1).view(*lead, self.irreps_out.dim)


def _rows_layout(linear: StackedLinear) -> tuple[list[int] | None, list[int], int]:
    """(``rows_in``, ``row_sizes``, channels): the input rows [nodes, rows, channels] in the
    order the matmuls read them, each an index into the input's (irrep, m) rows (irreps_in
    order), and per output the number of its rows (then the rows no output reads). None where
    no such layout exists: an input read by two outputs, or irreps of different
    multiplicities."""
    starts = [0]
    for _, ir in linear.irreps_in:
        starts.append(starts[-1] + ir.dim)
    reads = [i.i_in for i in linear.instructions]
    muls = {mul for mul, _ in linear.irreps_in}
    if len(set(reads)) < len(reads) or len(muls) != 1:
        return None, [], 0
    order, sizes = [], []
    for (_, ir), paths in zip(linear.irreps_out, linear.out_paths, strict=True):
        ins = [linear.instructions[k].i_in for k in paths]
        order += [starts[i] + m for m in range(ir.dim) for i in ins]
        sizes.append(ir.dim * len(ins))
    unread = [
        q
        for i in range(len(linear.irreps_in))
        if i not in reads
        for q in range(starts[i], starts[i + 1])
    ]
    return order + unread, sizes + [len(unread)], muls.pop()


def restore(linear: StackedLinear) -> o3.Linear:
    """e3nn's own module computing ``linear`` (weights not copied)."""
    return _same_paths(o3.Linear, linear)


def _same_paths(cls: type[o3.Linear], linear: o3.Linear) -> o3.Linear:
    """A ``cls`` with ``linear``'s irreps and paths (no biases: e3nn's default). Built without
    moving the global RNG: e3nn draws an initial weight that the caller replaces, and conv=fast
    and conv=e3nn twins must shuffle the same batches."""
    with torch.random.fork_rng(devices=[]):
        return cls(
            linear.irreps_in,
            linear.irreps_out,
            instructions=[(i.i_in, i.i_out) for i in linear.instructions],
        )
