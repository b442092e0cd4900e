"""Checks of every frame read (any reader; training and evaluation): one bad frame must stop
the run with the file and frame named, not give NaN statistics or a NaN model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from mace.data.utils import Configuration

from mace_grid.data.io import has_forces
from mace_grid.data.neighbours import Neighbours
from mace_grid.errors import DataError

# Closer than this (Å) two atoms are a broken frame (duplicated atom, unit error), not physics.
MIN_DISTANCE = 0.1


def check_finite(configs: Sequence[Configuration], path: str, key: str) -> None:
    """DataError naming the first frame with a non-finite energy, force, position or cell."""
    for i, c in enumerate(configs):
        values = {"energy": c.properties["energy"], "positions": c.positions, "cell": c.cell}
        if has_forces(c):
            values["forces"] = c.properties["forces"]
        for name, value in values.items():
            if value is not None and not np.isfinite(value).all():
                raise DataError(f"{path} ({key}): frame {i} has a non-finite {name} (NaN or inf)")


def check_distances(
    configs: Sequence[Configuration],
    graphs: Sequence[Neighbours],
    path: str,
    key: str,
    min_distance: float = MIN_DISTANCE,
) -> None:
    """DataError naming the first frame with two atoms (or an atom and a periodic image of it)
    closer than ``min_distance``; uses the neighbour list's edges (cutoff >> min_distance)."""
    for i, (c, g) in enumerate(zip(configs, graphs, strict=True)):
        if g.edge_index.shape[1] == 0:
            continue
        sender, receiver = g.edge_index
        d = np.linalg.norm(c.positions[receiver] - c.positions[sender] + g.shifts, axis=1)
        j = int(np.argmin(d))
        if d[j] < min_distance:
            raise DataError(
                f"{path} ({key}): frame {i}: atoms {sender[j]} and {receiver[j]} are "
                f"{d[j]:.3g} Å apart, closer than min_distance={min_distance:g} Å (a "
                "duplicated atom or wrong units?)"
            )
