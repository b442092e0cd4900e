"""What a product-basis block can learn per (element, channel), measured and counted exactly.

``independent`` is measured on the backend itself: the rank of d(output)/d(weights), stacked
over many random inputs, at a random (generic) weight point, for a block built with one channel
in float64 and one element, or all of a model's elements at once (a channel's total, where
weights shared by the elements, such as grid_rank's factor weights, count once). For a block
linear in its weights it is the number of linearly independent maps it can learn; for one
that is not (e.g. factorised weights) it is the local dimension of the family of maps it
reaches. ``complete`` is counted without any backend: the dimension of all O(3)-equivariant
polynomial maps of degree 1..correlation from one channel of irreps_in to irreps_out, i.e. the
multiplicity of each output irrep in the symmetric powers Sym^nu of the input representation
(an exact weight count, `equivariant_maps`), times the number of elements.
"""

import functools
from typing import NamedTuple

import torch
from e3nn import o3

#: singular values below this fraction of the largest count as zero (float64; measured gaps are
#: ~1e-2 above and ~1e-15 below it)
RANK_TOLERANCE = 1e-9


class Expressivity(NamedTuple):
    """Per channel of one product block, for its ``num_elements`` elements (default 1)."""

    weights: int  # trainable weights
    independent: int  # rank of d(output)/d(weights): independent couplings it can learn
    complete: int  # dimension of all equivariant polynomial maps of degree <= correlation


def one_channel(irreps: o3.Irreps) -> o3.Irreps:
    """One copy of each irrep of ``irreps``: what a single channel carries."""
    return o3.Irreps([(1, ir) for _, ir in o3.Irreps(irreps)])


def equivariant_maps(irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int) -> int:
    """Dimension of the O(3)-equivariant polynomial maps of degree 1..correlation from
    ``one_channel(irreps_in)`` to ``irreps_out``.

    Homogeneous maps of degree nu into an irrep (L, p) correspond to copies of (L, p) in
    Sym^nu(V) (real O(3) irreps are absolutely irreducible). Sym^nu(V) has a basis of multisets
    of nu basis vectors (l, m) of V, with weight sum(m) and parity prod(p_l); the copies of
    (L, p) are the states of weight L minus those of weight L + 1 at parity p.
    """
    basis = [(m, ir.p) for _, ir in one_channel(irreps_in) for m in range(-ir.l, ir.l + 1)]
    # states[nu][(weight, parity)], by the generating function prod_(m, p) 1 / (1 - t z^m s_p)
    states = [{(0, 1): 1}] + [{} for _ in range(correlation)]
    for m, p in basis:
        for nu in range(1, correlation + 1):  # ascending: each basis vector may repeat
            for (weight, parity), count in states[nu - 1].items():
                key = (weight + m, parity * p)
                states[nu][key] = states[nu].get(key, 0) + count
    total = 0
    for _, ir in o3.Irreps(irreps_out):
        for nu in range(1, correlation + 1):
            total += states[nu].get((ir.l, ir.p), 0) - states[nu].get((ir.l + 1, ir.p), 0)
    return total


def weight_jacobian(
    name: str,
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    samples: int | None = None,
    num_elements: int = 1,
    **options,
) -> torch.Tensor:
    """d(output)/d(weights) of backend ``name`` for one channel and ``num_elements`` elements,
    float64, ``[num_elements * samples * irreps_out.dim, weights]``.

    Weights are redrawn N(0, 1) (a generic point, whatever the backend's init). The inputs
    depend only on the irreps and ``samples`` (default: rows about twice `equivariant_maps`,
    which bounds the rank), so Jacobians of two backends can be stacked; every element sees
    the same inputs.
    """
    from mace_grid.tp import build  # the registry imports this module

    irreps_in, irreps_out = one_channel(irreps_in), one_channel(irreps_out)
    if samples is None:
        samples = 2 * equivariant_maps(irreps_in, irreps_out, correlation) // irreps_out.dim + 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 1, irreps_in.dim, generator=gen, dtype=torch.float64)
    x = x.repeat(num_elements, 1, 1)
    species = torch.arange(num_elements).repeat_interleave(samples)
    attrs = torch.nn.functional.one_hot(species, num_elements).to(torch.float64)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mace's U matrices in float64 too
    try:
        module = build(name, irreps_in, irreps_out, correlation, num_elements, **options).double()
    finally:
        torch.set_default_dtype(old)
    params = {
        key: torch.randn(p.shape, generator=gen, dtype=torch.float64)
        for key, p in module.named_parameters()
        if p.requires_grad
    }

    weights = list(params.values())
    for weight in weights:
        weight.requires_grad_(True)
    out = torch.func.functional_call(module, params, (x, attrs)).reshape(-1)
    if not weights:  # e.g. cg with every U matrix zero
        return out.new_zeros(out.numel(), 0)
    rows = []  # one backward pass per output row (the fused kernels do not support vmap)
    for i in range(out.numel()):
        grads = torch.autograd.grad(out[i], weights, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(w) if g is None else g).reshape(-1)
                    for g, w in zip(grads, weights, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def rank(matrix: torch.Tensor) -> int:
    """Numerical rank (singular values above `RANK_TOLERANCE` times the largest)."""
    s = torch.linalg.svdvals(matrix)
    return int((s > RANK_TOLERANCE * s[0]).sum()) if s.numel() and s[0] > 0 else 0


@functools.cache
def _expressivity(
    name: str, irreps_in: str, irreps_out: str, correlation: int, num_elements: int, options: tuple
) -> Expressivity:
    jacobian = weight_jacobian(
        name, irreps_in, irreps_out, correlation, num_elements=num_elements, **dict(options)
    )
    return Expressivity(
        weights=jacobian.shape[1],
        independent=rank(jacobian),
        complete=num_elements * equivariant_maps(irreps_in, irreps_out, correlation),
    )


def expressivity(
    name: str,
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int = 1,
    **options,
) -> Expressivity:
    """The "price of freedom" of backend ``name`` per channel and ``num_elements`` elements
    (default: per (element, channel)): its trainable weights, how many independent couplings
    they reach, and how many exist. Cached per arguments (cg at L_in = 3 takes about a second
    per element)."""
    key = (str(one_channel(irreps_in)), str(one_channel(irreps_out)), correlation, num_elements)
    return _expressivity(name, *key, tuple(sorted(options.items())))
