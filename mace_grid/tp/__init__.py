"""Product-basis backends: a registry mapping names to builders of the symmetric contraction.

Every backend module has ``forward(x, node_attrs)`` with ``x: [n_nodes, channels, (L_in+1)**2]``
(e3nn order) and one-hot ``node_attrs: [n_nodes, num_elements]``, returning
``[n_nodes, irreps_out.dim]`` in mace-torch's ``SymmetricContraction`` layout.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
from e3nn import o3

from mace_grid.tp.cg import build_cg
from mace_grid.tp.gaunt import basis_scale, build_gaunt, validate_irreps
from mace_grid.tp.grid import build_grid

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "cg": build_cg,
    "gaunt": build_gaunt,
    "grid": build_grid,
}
BACKENDS: tuple[str, ...] = tuple(_BUILDERS)


def build(
    name: str,
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int,
    **options,
) -> torch.nn.Module:
    """Build the product-basis contraction of backend ``name``."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown tp backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return _BUILDERS[name](
        o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation, num_elements, **options
    )


class Expressivity(NamedTuple):
    """Per (element, channel): trainable weights, and how many of them multiply a nonzero,
    linearly independent coupling of the input irreps into the output irreps."""

    weights: int
    couplings: int


def expressivity(
    name: str, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int
) -> Expressivity:
    """The "price of freedom": what each backend can learn per element and channel.

    cg counts the columns of mace's U matrices (one weight per symmetric coupling path; all-zero
    U matrices get no trainable weight in mace). gaunt and grid have one weight per
    (nu, output irrep), of which those with P_L(f^nu) = 0 (L > nu * L_in) reach nothing.
    """
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    if name == "cg":
        from mace.tools.cg import U_matrix_real

        coupling_irreps = o3.Irreps([ir for _, ir in irreps_in])
        count = 0
        for _, ir in irreps_out:
            for nu in range(1, correlation + 1):
                u = U_matrix_real(
                    coupling_irreps, o3.Irreps(str(ir)), nu, dtype=torch.float64, use_cueq_cg=False
                )[-1]
                count += u.shape[-1] if bool(u.abs().max() > 0) else 0
        return Expressivity(count, count)
    if name in ("gaunt", "grid"):
        _, l_in, l_out = validate_irreps(irreps_in, irreps_out, correlation)
        alive = int((basis_scale(l_in, correlation, l_out) > 0).sum())
        return Expressivity(correlation * len(l_out), alive)
    raise ValueError(f"unknown tp backend {name!r}; choose one of {', '.join(BACKENDS)}")
