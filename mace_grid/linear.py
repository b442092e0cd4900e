"""e3nn's ``o3.Linear`` with one matmul per output irrep (same weights, same function).

A linear map of irreps is a sum of per-path channel mixings, y_o = sum_{paths i -> o} w_i x_i W_i.
e3nn's generated code slices the input once per path, so autograd's backward zero-fills a
full-size gradient for every slice and sums them: for mace's linear after the convolution (17
input irreps at max_ell 3, L = 2) that is most of a training step's elementwise passes outside
the kernels. ``StackedLinear`` gathers, per output irrep, its paths' inputs into one
[nodes * (2l + 1), paths * channels] matrix (one ``index_select``) and multiplies it by the
stacked, path-normalised weights: one gather and one matmul per output, the same numbers.
"""

import torch
from e3nn import o3

from mace_grid.errors import ConfigError


class StackedLinear(o3.Linear):
    """``o3.Linear`` (internal, shared weights, no biases) computed one output irrep at a time.

    A subclass with e3nn's own parameters, so its state_dict is that of the module it replaces;
    under TorchScript it runs e3nn's generated code.
    """

    def __init__(self, irreps_in, irreps_out, instructions) -> None:
        super().__init__(irreps_in, irreps_out, instructions=instructions, biases=False)
        in_offsets = [0]
        for mul_ir in self.irreps_in:
            in_offsets.append(in_offsets[-1] + mul_ir.dim)
        weight_offsets = [0]
        for ins in self.instructions:
            n = self.irreps_in[ins.i_in].mul * self.irreps_out[ins.i_out].mul
            weight_offsets.append(weight_offsets[-1] + n)
        columns = []
        # per output irrep: its paths (instruction indices), dim, and slice of ``columns``
        self.out_paths, self.out_dims, self.out_columns = [], [], []
        for o, (_, ir) in enumerate(self.irreps_out):
            paths = [k for k, ins in enumerate(self.instructions) if ins.i_out == o]
            start = len(columns)
            # rows (node, m) x columns (path, input channel u): x_i[u, m] at u * dim + m
            columns += [
                in_offsets[self.instructions[k].i_in] + u * ir.dim + m
                for m in range(ir.dim)
                for k in paths
                for u in range(self.irreps_in[self.instructions[k].i_in].mul)
            ]
            self.out_paths.append(paths)
            self.out_dims.append(ir.dim)
            self.out_columns.append((start, len(columns)))
        self.weight_offsets = weight_offsets
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)

    @classmethod
    def like(cls, linear: o3.Linear) -> "StackedLinear":
        """The stacked version of mace's ``linear`` (its weights are not copied)."""
        if not (linear.internal_weights and linear.shared_weights) or linear.bias_numel:
            raise ConfigError(f"{linear} has external weights or biases; use conv=e3nn")
        stacked = cls(
            linear.irreps_in, linear.irreps_out, [(i.i_in, i.i_out) for i in linear.instructions]
        )
        if [i.path_weight for i in stacked.instructions] != [
            i.path_weight for i in linear.instructions
        ]:
            raise ConfigError(f"{linear} normalises its paths unlike e3nn's default")
        return stacked

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._compiled_main(features, self.weight, self.bias)
        return self._stacked(features)

    @torch.jit.unused
    def _stacked(self, features: torch.Tensor) -> torch.Tensor:
        lead = features.shape[:-1]
        x = features.reshape(-1, self.irreps_in.dim)
        z = x.shape[0]
        parts = []
        for (mul, _), paths, dim, (c0, c1) in zip(
            self.irreps_out, self.out_paths, self.out_dims, self.out_columns, strict=True
        ):
            if not paths:
                parts.append(x.new_zeros(z, mul * dim))
                continue
            weight = torch.cat(
                [
                    self.instructions[k].path_weight
                    * self.weight[self.weight_offsets[k] : self.weight_offsets[k + 1]].view(-1, mul)
                    for k in paths
                ]
            )  # [paths * u, mul]
            y = x.index_select(1, self.columns[c0:c1]).view(z * dim, -1) @ weight
            # [z, m, w] -> e3nn's layout [z, w, m]
            parts.append(y.view(z, dim, mul).transpose(1, 2).reshape(z, mul * dim))
        return torch.cat(parts, dim=1).reshape(*lead, self.irreps_out.dim)


def restore(linear: StackedLinear) -> o3.Linear:
    """e3nn's own module computing ``linear`` (weights not copied)."""
    return o3.Linear(
        linear.irreps_in,
        linear.irreps_out,
        instructions=[(i.i_in, i.i_out) for i in linear.instructions],
        biases=False,
    )
