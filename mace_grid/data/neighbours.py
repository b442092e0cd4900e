"""Neighbour lists (mace's `get_neighborhood`) computed once per source file, r_max and selection
of frames (e.g. a frame stride), cached in HDF5 under `cache_dir`, keyed by the file's sha256,
r_max and the selected frames."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mace.data.neighborhood import get_neighborhood
from mace.data.utils import Configuration

from mace_grid.data.io import _one_line
from mace_grid.utils import atomic_path, file_sha256

log = logging.getLogger("mace_grid.data")
_VERSION = 1


@dataclass
class Neighbours:
    """One frame's graph as `get_neighborhood` returns it (cell is the one mace then stores)."""

    edge_index: np.ndarray  # [2, n_edges] int
    shifts: np.ndarray  # [n_edges, 3] Å
    unit_shifts: np.ndarray  # [n_edges, 3]
    cell: np.ndarray  # [3, 3]


def compute_neighbours(config: Configuration, r_max: float) -> Neighbours:
    edge_index, shifts, unit_shifts, cell = get_neighborhood(
        positions=config.positions,
        cutoff=r_max,
        pbc=tuple(config.pbc),
        cell=None if config.cell is None else np.array(config.cell, copy=True),
    )
    return Neighbours(edge_index, shifts, unit_shifts, cell)


def cache_path(
    cache_dir: str | os.PathLike, sha256: str, r_max: float, frames: Sequence[int] | None = None
) -> Path:
    """The cache file of a data file's neighbour lists: all its frames, or those at `frames`."""
    name = f"neighbours-{sha256[:24]}-r{float(r_max):g}"
    if frames is not None:
        name += "-f" + hashlib.sha1(np.asarray(frames, dtype=np.int64).tobytes()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}.h5"


def _load(path: Path, sha256: str, r_max: float, configs: Sequence[Configuration]):
    with h5py.File(path, "r") as f:
        a = f.attrs
        if (
            int(a["version"]) != _VERSION
            or str(a["sha256"]) != sha256
            or float(a["r_max"]) != float(r_max)
            or not bool(a["complete"])
        ):
            raise ValueError("cache attributes do not match")
        n_atoms, ptr = f["n_atoms"][()], f["edge_ptr"][()]
        if len(n_atoms) != len(configs) or any(
            n != len(c.atomic_numbers) for n, c in zip(n_atoms, configs, strict=True)
        ):
            raise ValueError("cache frames do not match the file")
        edge_index, shifts = f["edge_index"][()], f["shifts"][()]
        unit_shifts, cells = f["unit_shifts"][()], f["cell"][()]
    if ptr[-1] != edge_index.shape[1] or len(ptr) != len(configs) + 1:
        raise ValueError("truncated cache")
    return [
        Neighbours(edge_index[:, s:e], shifts[s:e], unit_shifts[s:e], cells[i])
        for i, (s, e) in enumerate(zip(ptr[:-1], ptr[1:], strict=True))
    ]


def _save(
    path: Path,
    sha256: str,
    r_max: float,
    configs: Sequence[Configuration],
    graphs: Sequence[Neighbours],
) -> None:
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(version=_VERSION, sha256=sha256, r_max=float(r_max), complete=False)
            counts = [g.edge_index.shape[1] for g in graphs]
            f["n_atoms"] = np.array([len(c.atomic_numbers) for c in configs], dtype=np.int64)
            f["edge_ptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            f["edge_index"] = np.concatenate([g.edge_index for g in graphs], axis=1)
            f["shifts"] = np.concatenate([g.shifts for g in graphs]).reshape(-1, 3)
            f["unit_shifts"] = np.concatenate([g.unit_shifts for g in graphs]).reshape(-1, 3)
            f["cell"] = np.stack([g.cell for g in graphs])
            f.attrs["complete"] = True


def file_neighbours(
    path: str,
    configs: Sequence[Configuration],
    r_max: float,
    cache_dir: str | os.PathLike | None,
    frames: Sequence[int] | None = None,
) -> list[Neighbours]:
    """Neighbour lists of the frames of `path` read into `configs` (all of them, or those at
    positions `frames`), from the cache when a valid entry exists; otherwise computed and
    cached (atomically). Never fails on the cache."""
    if cache_dir is None or not configs:
        return [compute_neighbours(c, r_max) for c in configs]
    sha256 = file_sha256(path)
    cached = cache_path(cache_dir, sha256, r_max, frames)
    if cached.exists():
        try:
            graphs = _load(cached, sha256, r_max, configs)
            log.info("reusing neighbour-list cache %s for %s", cached, path)
            return graphs
        except Exception as exc:  # corrupt, partial or stale: recompute
            log.warning("ignoring unusable neighbour-list cache %s (%s)", cached, _one_line(exc))
    graphs = [compute_neighbours(c, r_max) for c in configs]
    try:
        _save(cached, sha256, r_max, configs, graphs)
        log.info("wrote neighbour-list cache %s for %s", cached, path)
    except OSError as exc:
        log.warning("could not write neighbour-list cache %s (%s)", cached, _one_line(exc))
    return graphs
