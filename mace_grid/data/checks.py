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
# Periodic cell vectors spanning less than this (Å, smallest singular value) are degenerate.
MIN_CELL_WIDTH = 1e-3


def _numbers(configs: Sequence, indices: Sequence[int] | None) -> Sequence[int]:
    return range(len(configs)) if indices is None else indices


def check_finite(
    configs: Sequence[Configuration], path: str, key: str, indices: Sequence[int] | None = None
) -> None:
    """DataError naming the first frame with a non-finite energy, force, position or cell
    (`indices`: the frames' positions in `path`, default 0, 1, ...)."""
    for i, c in zip(_numbers(configs, indices), configs, strict=True):
        values = {"energy": c.properties["energy"], "positions": c.positions, "cell": c.cell}
        if has_forces(c):
            values["forces"] = c.properties["forces"]
        for name, value in values.items():
            if value is not None and not np.isfinite(value).all():
                raise DataError(f"{path} ({key}): frame {i} has a non-finite {name} (NaN or inf)")


def check_cells(
    configs: Sequence[Configuration], path: str, key: str, indices: Sequence[int] | None = None
) -> None:
    """DataError naming the first periodic frame whose cell vectors along its periodic
    directions are zero or linearly dependent: mace would silently put such a frame in a 1 Å
    cube, with hundreds of self-image neighbours."""
    for i, c in zip(_numbers(configs, indices), configs, strict=True):
        periodic = np.flatnonzero(np.asarray(c.pbc, dtype=bool))
        if not len(periodic):
            continue
        cell = np.zeros((3, 3)) if c.cell is None else np.asarray(c.cell, dtype=float)
        vectors = cell[periodic]
        if np.linalg.svd(vectors, compute_uv=False).min() >= MIN_CELL_WIDTH:
            continue
        pbc = "".join("T" if p else "F" for p in c.pbc)
        what = "is zero" if not vectors.any() else f"{np.round(cell, 4).tolist()} is degenerate"
        raise DataError(
            f"{path} ({key}): frame {i} is periodic (pbc={pbc}) but its cell {what} (cell "
            "vectors along periodic directions zero or parallel): give the frame its cell "
            '(extxyz Lattice="...") or make it non-periodic (extxyz pbc="F F F")'
        )


def check_distances(
    configs: Sequence[Configuration],
    graphs: Sequence[Neighbours],
    path: str,
    key: str,
    min_distance: float = MIN_DISTANCE,
    indices: Sequence[int] | None = None,
) -> None:
    """DataError naming the first frame with two atoms (or an atom and a periodic image of an
    atom) closer than ``min_distance``, with their real distance; uses the neighbour list's
    edges (cutoff >> min_distance)."""
    for i, c, g in zip(_numbers(configs, indices), configs, graphs, strict=True):
        if g.edge_index.shape[1] == 0:
            continue
        sender, receiver = g.edge_index
        d = np.linalg.norm(c.positions[receiver] - c.positions[sender] + g.shifts, axis=1)
        j = int(np.argmin(d))
        if d[j] >= min_distance:
            continue
        a, b = int(sender[j]), int(receiver[j])
        shift = np.asarray(g.unit_shifts[j]).astype(int)
        if shift.any():
            inside = np.linalg.norm(c.positions[b] - c.positions[a])
            pair = (
                f"atom {a} and the periodic image (cell shift {shift.tolist()}) of atom {b} "
                f"are {d[j]:.3g} Å apart (in the cell {inside:.3g} Å)"
            )
            hint = "a cell too small for its atoms, or wrong units?"
        else:
            pair = f"atoms {a} and {b} are {d[j]:.3g} Å apart"
            hint = "a duplicated atom or wrong units?"
        raise DataError(
            f"{path} ({key}): frame {i}: {pair}, closer than min_distance={min_distance:g} Å "
            f"({hint})"
        )
