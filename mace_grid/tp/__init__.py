"""Product-basis backends: a registry mapping names to builders of the symmetric contraction.

Every backend module has ``forward(x, node_attrs)`` with ``x: [n_nodes, channels, (L_in+1)**2]``
(e3nn order) and one-hot ``node_attrs: [n_nodes, num_elements]``, returning
``[n_nodes, irreps_out.dim]`` in mace-torch's ``SymmetricContraction`` layout.
"""

from collections.abc import Callable, Mapping
from typing import Any

import torch
from e3nn import o3

from mace_grid.errors import ConfigError
from mace_grid.tp import gaunt
from mace_grid.tp.cg import MAX_CORRELATION as CG_MAX_CORRELATION
from mace_grid.tp.cg import build_cg, use_reduced_cg
from mace_grid.tp.expressivity import Expressivity, expressivity  # noqa: F401  (re-exported)
from mace_grid.tp.gaunt import build_gaunt, check_method
from mace_grid.tp.grid import build_grid
from mace_grid.tp.grid_chain import build_grid_chain
from mace_grid.tp.grid_rank import build_grid_rank, check_factors, check_rank

_BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {
    "cg": build_cg,
    "gaunt": build_gaunt,
    "grid": build_grid,
    "grid_rank": build_grid_rank,
    "grid_chain": build_grid_chain,
}
BACKENDS: tuple[str, ...] = tuple(_BUILDERS)
#: every ``tp.options`` key of each backend (its builder's keyword arguments) and its check
OPTIONS: dict[str, dict[str, Callable[[Any], object]]] = {
    "cg": {"reduced_cg": use_reduced_cg},
    "gaunt": {"method": check_method},
    "grid": {},
    "grid_rank": {"rank": check_rank, "factors": check_factors},
    "grid_chain": {"rank": check_rank, "factors": check_factors},
}


def validate_options(name: str, options: Mapping[str, Any] | None) -> None:
    """`ConfigError` for an unknown key or a bad value of backend ``name``'s ``tp.options``:
    checked from the config alone, before any data are read."""
    checks = OPTIONS[name]
    unknown = sorted(set(options or {}) - set(checks))
    if unknown:
        valid = ", ".join(checks) or "none"
        raise ConfigError(f"tp.options: unknown key(s) {unknown} for tp={name}; valid: {valid}")
    for key, value in (options or {}).items():
        checks[key](value)


def max_correlation(name: str) -> int:
    """Highest correlation backend ``name`` builds: mace's limit for cg; every other backend is
    a Gaunt-type product basis (`mace_grid.tp.gaunt.GauntProductBasis`) and shares its limit."""
    return CG_MAX_CORRELATION if name == "cg" else gaunt.MAX_CORRELATION


def validate_correlation(name: str, correlation: int) -> None:
    """`ConfigError` naming backend ``name``'s own limit if it cannot build ``correlation``."""
    limit = max_correlation(name)
    if isinstance(correlation, bool) or not isinstance(correlation, int):
        raise ConfigError(f"correlation must be an integer, got {correlation!r}")
    if not 1 <= correlation <= limit:
        others = "" if name != "cg" else f" (the grid-based backends go to {gaunt.MAX_CORRELATION})"
        raise ConfigError(
            f"correlation={correlation}: tp={name} supports correlation 1..{limit}{others}"
        )


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
    validate_correlation(name, correlation)
    return _BUILDERS[name](
        o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation, num_elements, **options
    )
