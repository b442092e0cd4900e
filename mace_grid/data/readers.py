"""OC20/OMat data as fairchem ships it: ASE-LMDB databases (``.aselmdb``, read lazily by index,
read-only, no lock files), S2EF reference-energy tables (``system_id,frame,reference`` lines)
and OC20 atom tags (0 fixed subsurface, 1 free slab, 2 adsorbate)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

from mace_grid.errors import DataError

LMDB_SUFFIX = ".aselmdb"
# What a folder given as a data path contributes (sorted): every file with one of these endings.
DATA_SUFFIXES = (LMDB_SUFFIX, ".extxyz", ".extxyz.xz", ".extxyz.gz", ".xyz", ".traj", ".db")
_FRAME_KEYS = ("fid", "frame", "frame_number")
_SID_KEYS = ("sid", "system_id")


def folder_files(folder: str, key: str) -> list[str]:
    """The data files directly in `folder` (endings `DATA_SUFFIXES`), sorted."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(DATA_SUFFIXES))
    files = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not files:
        raise DataError(
            f"{folder} ({key}) is a directory without data files (endings "
            f"{', '.join(DATA_SUFFIXES)}): give a file, a glob or a folder of data files"
        )
    return files


class LMDBFrames(Sequence):
    """The rows of one ``.aselmdb`` file as ``Atoms``, decoded one at a time on access.

    Opened with ase-db-backends' ``LMDBDatabase`` read-only, without ASE's or LMDB's lock files
    and without readahead (random access); opening reads only the id list. LMDB allows one open
    handle per file and process (also none inherited through fork): use it as a context manager.
    ``Atoms.info`` gets the row's key-value pairs and its ``data`` (e.g. ``sid``, ``fid``).
    """

    def __init__(self, path: str):
        self.path = str(path)
        try:
            from ase_db_backends.aselmdb import LMDBDatabase
        except ImportError as exc:  # a dependency, but say what is missing
            raise DataError(
                f"reading {self.path} needs ase-db-backends: pip install ase-db-backends"
            ) from exc
        if not os.path.isfile(self.path):
            raise DataError(f"data file not found: {self.path}")
        try:
            self._db = LMDBDatabase(
                self.path,
                readonly=True,
                use_lock_file=False,
                create_indices=False,
                readahead=False,
            )
        except Exception as exc:  # lmdb.Error and friends
            raise DataError(f"cannot open {self.path} as an ASE LMDB: {exc}") from exc
        self._ids: list[int] = list(self._db.ids)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> LMDBFrames:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self._db.get(id=self._ids[i])
        atoms = row.toatoms(add_additional_information=True)
        atoms.info.update(atoms.info.pop("key_value_pairs", {}))
        return atoms


# -- tags ------------------------------------------------------------------------------------


def oc20_tags(atoms: Atoms, free: np.ndarray) -> np.ndarray:
    """OC20 tags per atom (0 fixed subsurface, 1 free slab, 2 adsorbate).

    The frame's own tags when they are OC20 tags: some non-zero, all in {0, 1, 2}, every fixed
    atom 0 (ASE's layer numbers from ``fcc111`` & co., or all-zero raw DFT output, are not).
    Otherwise derived: fixed atoms 0, free atoms whose element is not among the fixed atoms'
    (the slab composition) 2, other free atoms 1; without fixed atoms there is no slab
    composition to compare with: all 1.
    """
    fixed = np.asarray(free) == 0
    tags = np.asarray(atoms.get_tags(), dtype=np.int64)
    if tags.any() and np.isin(tags, (0, 1, 2)).all() and not tags[fixed].any():
        return tags
    if not fixed.any():
        return np.ones(len(atoms), dtype=np.int64)
    slab = np.unique(atoms.numbers[fixed])
    adsorbate = ~fixed & ~np.isin(atoms.numbers, slab)
    return np.where(fixed, 0, np.where(adsorbate, 2, 1)).astype(np.int64)


# -- reference energies ------------------------------------------------------------------------


def _sid(value) -> str:
    """System id as a string without OC20's ``random`` prefix (``random2181546`` → ``2181546``)."""
    s = str(value).strip()
    return s[len("random") :] if re.fullmatch(r"random\d+", s) else s


def _fid(value) -> int:
    """Frame number from ``frame12`` or ``12``."""
    s = str(value).strip()
    return int(s[len("frame") :] if s.startswith("frame") else s)


def _table_lines(path: str) -> list[tuple[str, int, float]]:
    """(system id, frame number, reference eV) per line of an S2EF ``.txt`` table."""
    rows = []
    with open(path) as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.strip().split(",")
            try:
                rows.append((_sid(parts[0]), _fid(parts[1]), float(parts[2])))
            except (IndexError, ValueError):
                raise DataError(
                    f"{path}:{n}: expected 'system_id,frame,reference_energy' "
                    f"(e.g. random2181546,frame12,-47.23), got {line.strip()[:80]!r}"
                ) from None
    return rows


def _table_files(spec: str) -> list[str]:
    if os.path.isdir(spec):
        paths = sorted(str(p) for p in Path(spec).glob("*.txt"))
        if not paths:
            raise DataError(f"data.reference_energies: folder {spec} holds no .txt tables")
        return paths
    if os.path.isfile(spec):
        return [spec]
    raise DataError(f"data.reference_energies: no such file or folder: {spec}")


def file_stem(path: str) -> str:
    """File name without its format and compression suffixes (``0.extxyz.xz`` → ``0``)."""
    name = os.path.basename(path)
    for suffix in (".xz", ".gz", ".bz2"):
        name = name.removesuffix(suffix)
    return os.path.splitext(name)[0]


def frame_ids(
    path: str, frames: Sequence[Atoms], indices: Sequence[int] | None = None
) -> list[tuple[str, int]]:
    """(system id, frame number) of `frames`, at positions `indices` (default 0, 1, ...) of
    `path`: from ``info`` (``sid``/``system_id`` and ``fid``/``frame``, also inside a db row's
    ``data``) when every frame has them; else from the S2EF table beside the file (``N.txt`` for
    ``N.extxyz.xz``, line i = frame i); else the file is one trajectory: system id = file stem,
    frame number = position in the file."""
    indices = range(len(frames)) if indices is None else indices

    def lookup(atoms: Atoms, keys) -> object | None:
        for where in (atoms.info, atoms.info.get("data")):
            if isinstance(where, Mapping):
                for k in keys:
                    if k in where:
                        return where[k]
        return None

    ids = [(lookup(a, _SID_KEYS), lookup(a, _FRAME_KEYS)) for a in frames]
    if all(s is not None and f is not None for s, f in ids):
        return [(_sid(s), _fid(f)) for s, f in ids]
    companion = os.path.join(os.path.dirname(path), file_stem(path) + ".txt")
    if os.path.isfile(companion):
        lines = _table_lines(companion)
        if len(indices) and max(indices) >= len(lines):
            raise DataError(
                f"{companion} has {len(lines)} lines, fewer than the frames of {path} "
                "(line i names frame i)"
            )
        return [lines[i][:2] for i in indices]
    return [(_sid(file_stem(path)), int(i)) for i in indices]


class ReferenceEnergies:
    """Per-frame reference energies (eV) from one S2EF ``.txt`` table or a folder of them
    (fairchem's ``N.txt`` beside ``N.extxyz.xz``), matched to frames by (system id, frame).

    For a folder, a data file ``N.*`` is first matched against ``N.txt`` alone (read once);
    frames not found there are looked up in every table of the folder (read on first need).
    """

    def __init__(self, spec: str):
        self.spec = str(spec)
        self.files = _table_files(self.spec)
        self._tables: dict[str, dict[tuple[str, int], float]] = {}

    def _table(self, path: str) -> dict[tuple[str, int], float]:
        if path not in self._tables:
            self._tables[path] = {(s, f): ref for s, f, ref in _table_lines(path)}
        return self._tables[path]

    def _all(self) -> dict[tuple[str, int], float]:
        if "*" not in self._tables:
            merged: dict[tuple[str, int], float] = {}
            for path in self.files:
                merged.update(self._table(path))
            self._tables = {"*": merged}  # the per-file tables are inside it now
        return self._tables["*"]

    def subtract(
        self,
        configs,
        frames: Sequence[Atoms],
        path: str,
        key: str,
        indices: Sequence[int] | None = None,
    ) -> None:
        """Energy of each config -= its frame's reference (in place); DataError naming the
        first frame without one. `indices`: the frames' positions in `path`."""
        ids = frame_ids(path, frames, indices)
        own = os.path.join(self.spec, file_stem(path) + ".txt")
        table = self._table(own) if own in self.files and "*" not in self._tables else {}
        if not all(i in table for i in ids):
            table = self._all()
        positions = range(len(frames)) if indices is None else indices
        for config, sid_fid, i in zip(configs, ids, positions, strict=True):
            if sid_fid not in table:
                sid, fid = sid_fid
                raise DataError(
                    f"{path} ({key}): frame {i} (system {sid}, frame {fid}) has no reference "
                    f"energy in data.reference_energies={self.spec}"
                )
            config.properties["energy"] = float(config.properties["energy"]) - table[sid_fid]
