"""e3nn's ``FullyConnectedNet`` (mace's radial network) with its activation's derivatives
written out (same weights, same function).

mace's ``conv_tp_weights`` maps each edge's radial basis through SiLU layers to the convolution's
weights, and force training differentiates it twice. e3nn composes each layer of a weight
scaling, the matmul, SiLU, the normalising constant and a unit variance factor; autograd's second
derivative of that composition is some thirty elementwise passes over [edges, hidden] per layer,
most of the network's time outside its matmuls. ``RadialMLP`` folds the constants into the
weight and the activation's scale, and computes the scaled SiLU, its first derivative and its
second derivative as one small autograd Function each (`_SiLU`, `_SiLUGrad`).

The network's input depends on an edge's length only, which the two directions of a bond share,
so with conv=fast it runs once per bond: in eager mode ``RadialMLP`` returns its input as
`Deferred` (mace's block passes the weights on to the convolution untouched), and
`mace_grid.conv.FastConvolution`, which sees the edges, evaluates it on one edge of each pair
(`bonds`) and gives both directions the same row: half the matmuls, forward and derivatives.
"""

from typing import NamedTuple

import torch
from e3nn import nn

from mace_grid.errors import ConfigError


class _SiLU(torch.autograd.Function):
    """y = s * silu(z); its backward is `_SiLUGrad`, differentiable once more."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, s: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.s = s
        return torch.nn.functional.silu(z).mul_(s)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        return _SiLUGrad.apply(z, grad, ctx.s), None


class _SiLUGrad(torch.autograd.Function):
    """g * s * silu'(z), silu'(z) = sig (1 + z (1 - sig)); its backward is the second
    derivative, silu''(z) = sig (1 - sig) (2 + z (1 - 2 sig))."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, g: torch.Tensor, s: float) -> torch.Tensor:
        ctx.save_for_backward(z, g)
        ctx.s = s
        return torch.ops.aten.silu_backward(g, z).mul_(s)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, v: torch.Tensor):
        z, g = ctx.saved_tensors
        need_z, need_g = ctx.needs_input_grad[:2]
        grad_z = grad_g = None
        if need_g:
            grad_g = torch.ops.aten.silu_backward(v, z).mul_(ctx.s)
        if need_z:
            sig = torch.sigmoid(z)
            bend = torch.ops.aten.sigmoid_backward(v * g, sig).mul_(ctx.s)  # v g s sig (1 - sig)
            grad_z = sig.mul_(-2).add_(1).mul_(z).add_(2).mul_(bend)
        return grad_z, grad_g, None


class RadialMLP(nn.FullyConnectedNet):
    """``nn.FullyConnectedNet`` with e3nn's parameters (its state_dict is that of the module it
    replaces) computed with `_SiLU`; under TorchScript and torch.compile it runs e3nn's layers.

    ``forward(x, now=False)``: the weights of the rows of ``x``, or, where ``per_bond`` is set
    (by `mace_grid.conv.set_conv`, for a convolution that takes it) and the call is eager and
    not ``now``, `Deferred` (the convolution then calls it back, ``now``, once per bond)."""

    per_bond: bool = False

    @classmethod
    def like(cls, net: nn.FullyConnectedNet) -> "RadialMLP":
        """The same network as mace's ``conv_tp_weights`` ``net``, holding its Parameters."""
        layers = list(net)
        acts = [layer.act for layer in layers]
        if (
            type(net) is not nn.FullyConnectedNet
            or acts[-1] is not None
            or any(act is None or act.f is not torch.nn.functional.silu for act in acts[:-1])
        ):
            raise ConfigError(f"{net} is not mace's SiLU radial network; use conv=e3nn")
        new = _same_layers(cls, net)
        # e3nn's constants, per layer: its weight's scale and (hidden layers) the activation's
        new.weight_scales = [
            (layer.h_in * layer.var_in / (1.0 if layer.act is not None else layer.var_out)) ** -0.5
            for layer in layers
        ]
        new.act_scales = [
            (1.0 if layer.act._is_id else layer.act.cst) * layer.var_out**0.5
            for layer in layers[:-1]
        ]
        return new

    def forward(self, x: torch.Tensor, now: bool = False) -> torch.Tensor:
        if torch.jit.is_scripting():
            for layer in self:
                x = layer(x)
            return x
        return self._eager(x, now)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor, now: bool) -> torch.Tensor:
        if torch.compiler.is_compiling():
            for layer in self:
                x = layer(x)
            return x
        if self.per_bond and not now:
            return Deferred(self, x)
        *hidden, last = self
        for layer, w_scale, act_scale in zip(
            hidden, self.weight_scales[:-1], self.act_scales, strict=True
        ):
            x = _SiLU.apply(x @ (layer.weight * w_scale), act_scale)
        return x @ (last.weight * self.weight_scales[-1])


class Deferred(NamedTuple):
    """A `RadialMLP` call waiting for the edges: ``per_bond`` gives the weights."""

    net: RadialMLP
    features: torch.Tensor

    def per_bond(
        self, edge_index: torch.Tensor, directions: torch.Tensor | None, n_nodes: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weights [B, ...], bond [E])``: the network run once per bond (`bonds`), and each
        edge's row; ``(weights per edge, None)`` where no edges pair (or no ``directions``)."""
        x = self.features
        if directions is None:
            return self.net(x, now=True), None
        first, bond = bonds(edge_index, directions, x, n_nodes)
        if len(first) == len(bond):
            return self.net(x, now=True), None
        return self.net(x.index_select(0, first), now=True), bond


def bonds(
    edge_index: torch.Tensor, directions: torch.Tensor, features: torch.Tensor, n_nodes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bonds of a graph: ``(first [B], bond [E])``, one edge of each bond and each edge's
    bond (an index into ``first``).

    Edges j -> i and i -> j are one bond when their ``directions`` (a row per edge, linear in
    the unit vector: the l = 1 harmonics) are each other's negatives and their radial
    ``features`` (a function of the length) are equal, bit for bit. Then their vectors are
    negatives up to rounding, and their periodic shifts, which could only differ by a lattice
    vector, cancel: the two lengths are one function of the positions, and one evaluation for
    both is exact in every derivative. Edges without such a partner are bonds of their own."""
    senders, receivers = edge_index
    ids = torch.arange(senders.shape[0], device=senders.device)
    if len(ids) < 2:
        return ids, ids
    # both directions of a bond share a key: the atom pair in order, and the direction from
    # the lower atom (between images of one atom, the one whose first nonzero entry is > 0).
    # Where no pair has more than two edges (no periodic images of one pair: molecules), the
    # pair alone orders them; on the CPU that is checked (elsewhere it would be a device sync)
    low, high = torch.minimum(senders, receivers), torch.maximum(senders, receivers)
    pair = low * n_nodes + high
    order = torch.sort(pair, stable=True).indices
    same = pair[order[1:]] == pair[order[:-1]]
    if pair.device.type != "cpu" or bool((same[1:] & same[:-1]).any()):
        sign = (senders < receivers).to(directions.dtype) - (senders > receivers).to(
            directions.dtype
        )
        for column in directions.unbind(1):
            sign = torch.where(sign == 0, torch.sign(column), sign)
        key = [pair, *(directions * sign[:, None]).unbind(1)]
        order = _lexsort(key)
        same = torch.stack([k[order[1:]] == k[order[:-1]] for k in key]).all(0)
    # in each run of one key, pair its 1st and 2nd edge, 3rd and 4th, ...
    start = torch.cat([same.new_ones(1), ~same])
    run = torch.cummax(torch.where(start, ids, 0), 0).values
    pairs = same & ((ids[:-1] - run[:-1]) % 2 == 0)
    partner = ids.clone()
    left, right = order[:-1][pairs], order[1:][pairs]
    partner[left], partner[right] = right, left
    paired = (
        (senders[partner] == receivers)
        & (receivers[partner] == senders)
        & (directions[partner] == -directions).all(1)
        & (features[partner] == features).all(1)
        & (partner != ids)
    )
    paired &= paired[partner]
    first = ~paired | (ids < partner)  # a bond's first edge
    index = torch.cumsum(first, 0) - 1
    bond = torch.where(first, index, index[partner])
    return ids[first], bond


def _lexsort(keys: list[torch.Tensor]) -> torch.Tensor:
    """The permutation sorting rows by ``keys`` (the first the most significant)."""
    order = torch.arange(keys[0].shape[0], device=keys[0].device)
    for key in reversed(keys):
        order = order[torch.sort(key[order], stable=True).indices]
    return order


def restore(net: RadialMLP) -> nn.FullyConnectedNet:
    """e3nn's own network computing ``net``, holding its Parameters."""
    return _same_layers(nn.FullyConnectedNet, net)


def _same_layers(
    cls: type[nn.FullyConnectedNet], net: nn.FullyConnectedNet
) -> nn.FullyConnectedNet:
    """A ``cls`` with ``net``'s layers: its sizes, variances and Parameters. Built without moving
    the global RNG (e3nn draws initial weights that are replaced here), as
    `mace_grid.linear._same_paths` builds its linears."""
    with torch.random.fork_rng(devices=[]):
        new = cls(net.hs, torch.nn.functional.silu)
    for mine, theirs in zip(new, net, strict=True):
        mine.var_in, mine.var_out = theirs.var_in, theirs.var_out
        mine.weight = theirs.weight
    return new
