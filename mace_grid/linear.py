"""e3nn's ``o3.Linear`` with one matmul per output irrep (same weights, same function).

A linear map of irreps is a sum of per-path channel mixings, y_o = sum_{paths i -> o} w_i x_i W_i.
e3nn's generated code slices the input once per path, so autograd's backward zero-fills a
full-size gradient for every slice and sums them: for mace's linear after the convolution (17
input irreps at max_ell 3, L = 2) that is most of a training step's elementwise passes outside
the kernels. ``StackedLinear`` splits the input once, stacks each output irrep's path inputs
into one [nodes * (2l + 1), paths * channels] matrix and multiplies it by the stacked,
path-normalised weights: one matmul per output, the same numbers.
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
        return self._stacked(features)

    @torch.jit.unused
    def _stacked(self, features: torch.Tensor) -> torch.Tensor:
        # split, not slices: autograd's backward of a split is one cat, of each slice a
        # zero-filled full-size gradient
        lead = features.shape[:-1]
        x = features.reshape(-1, self.irreps_in.dim)
        z = x.shape[0]
        inputs = x.split(self.in_dims, dim=1)
        weights = (self.weight * self.path_scale).split(self.path_sizes)
        parts = []
        for (mul, ir), paths in zip(self.irreps_out, self.out_paths, strict=True):
            if not paths:
                parts.append(x.new_zeros(z, mul * ir.dim))
                continue
            # [z, paths * u, m] and [paths * u, w]: y[z, w, m] = sum_(path, u) x w
            x_o = torch.cat(
                [inputs[self.instructions[k].i_in].view(z, -1, ir.dim) for k in paths], 1
            )
            w_o = torch.cat([weights[k].view(-1, mul) for k in paths])
            if ir.dim == 1:
                parts.append(x_o.view(z, -1) @ w_o)
                continue
            y = x_o.transpose(1, 2).reshape(z * ir.dim, -1) @ w_o  # rows (z, m)
            parts.append(y.view(z, ir.dim, mul).transpose(1, 2).reshape(z, mul * ir.dim))
        return torch.cat(parts, dim=1).reshape(*lead, self.irreps_out.dim)


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
