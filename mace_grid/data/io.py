"""Read ASE files (extxyz, .traj, .db, .aselmdb) into mace `Configuration`s and resolve E0s."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence

import ase.data
import ase.db
import ase.io
import numpy as np
from ase import Atoms
from ase.constraints import FixAtoms
from ase.io.formats import UnknownFileTypeError
from mace.data.utils import Configuration, compute_average_E0s
from mace.tools import AtomicNumberTable

from mace_grid.data.readers import (
    LMDB_SUFFIX,
    LMDBFrames,
    ReferenceEnergies,
    folder_files,
    oc20_tags,
)
from mace_grid.errors import DataError

log = logging.getLogger("mace_grid.data")

# What `read_atoms` reads (by extension; anything else ASE reads by content may work too).
FORMATS = (
    "extxyz (.xyz, .extxyz, also .xz/.gz-compressed), ASE trajectory (.traj), ASE database "
    "(.db), ASE LMDB (.aselmdb)"
)
# The default label keys: ASE's own names, found in atoms.info/arrays or on the calculator.
ENERGY, FORCES = "energy", "forces"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def expand_files(spec: str | Sequence[str], key: str) -> list[str]:
    """Expand a path, a folder (its data files), a glob or a list of them into sorted existing
    files; `key` names the config entry to blame when nothing matches."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError(f"{key} is empty: give a file path or glob")
    files: list[str] = []
    for s in map(str, specs):
        if glob.has_magic(s):
            matches = sorted(glob.glob(s))
            if not matches:
                raise DataError(f"no file matches {s} (set {key} to an existing path or glob)")
            files.extend(matches)
        elif os.path.isdir(s):
            files.extend(folder_files(s, key))
        else:
            files.append(_existing_file(s, key))
    return files


def _existing_file(path: str, key: str) -> str:
    if os.path.isdir(path):
        raise DataError(f"{path} ({key}) is a directory: give a file or a glob like {path}/*.xyz")
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path} (set {key} to an existing file)")
    return path


def read_atoms(path: str, key: str) -> list[Atoms]:
    """All frames of an ASE-readable file; DataError if missing, unreadable or empty."""
    _existing_file(path, key)
    if os.path.getsize(path) == 0:
        raise DataError(f"data file is empty: {path} ({key})")
    try:
        if path.endswith(LMDB_SUFFIX):
            with LMDBFrames(path) as db:
                frames = list(db)
        elif path.endswith(".db"):  # keep key-value pairs (e.g. config_type) as atoms.info
            with ase.db.connect(path) as db:
                frames = [row.toatoms(add_additional_information=True) for row in db.select()]
            for atoms in frames:
                atoms.info.update(atoms.info.pop("key_value_pairs", {}))
        else:
            frames = ase.io.read(path, index=":")
    except UnknownFileTypeError as exc:
        raise DataError(
            f"cannot read {path} ({key}): unsupported format ({_one_line(exc)}); formats that "
            f"work: {FORMATS}"
        ) from exc
    except Exception as exc:  # ase raises many types; report them as one line
        raise DataError(f"cannot read {path} ({key}): {_one_line(exc)}") from exc
    if isinstance(frames, Atoms):
        frames = [frames]
    if not frames:
        raise DataError(f"data file has no configurations: {path} ({key})")
    return frames


def _energy(atoms: Atoms, key: str, where: str) -> float | None:
    """``info[key]``; for the default key also the calculator's energy (where ASE >= 3.23 puts
    extxyz ``energy=``). A key given explicitly never falls back to other labels. `where`
    (file, key, frame) prefixes the DataError for a label that is not a number."""
    if key in atoms.info:
        value = atoms.info[key]
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: energy '{key}' is {str(value)[:40]!r}, not a number ({_labels(atoms)})"
                "; set data.energy_key to the energy label"
            ) from None
    if key == ENERGY and atoms.calc is not None and "energy" in atoms.calc.results:
        return float(atoms.calc.results["energy"])
    return None


def _forces(atoms: Atoms, key: str, where: str) -> np.ndarray | None:
    """``arrays[key]``; for the default key also the calculator's raw forces (FixAtoms would
    zero the fixed atoms' forces otherwise). DataError (prefixed by `where`) unless the forces
    are numbers of shape [n_atoms, 3]."""
    if key in atoms.arrays:
        value = atoms.arrays[key]
    elif key == FORCES and atoms.calc is not None and "forces" in atoms.calc.results:
        value = atoms.calc.results["forces"]
    else:
        return None
    try:
        forces = np.array(value, dtype=float)
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: forces '{key}' are not numbers ({_labels(atoms)}); set data.forces_key to "
            "the force label"
        ) from None
    if forces.shape != (len(atoms), 3):
        raise DataError(
            f"{where}: forces '{key}' have shape {list(forces.shape)}, expected "
            f"[{len(atoms)}, 3] (one force vector per atom): fix the frame's forces or set "
            "data.forces_key to the force label"
        )
    return forces


def _force_candidates(atoms: Atoms) -> list[str]:
    """Labels of `atoms` that look like forces: per-atom [n, 3] arrays named ...force...,
    calculator forces (momenta and other vectors are not)."""
    arrays = [
        k
        for k, v in atoms.arrays.items()
        if "force" in k.lower() and np.shape(v) == (len(atoms), 3)
    ]
    has_calc = atoms.calc is not None and "forces" in atoms.calc.results
    return arrays + (["calculator forces"] if has_calc else [])


def _labels(atoms: Atoms) -> str:
    """The labels a frame has, for errors about a missing key."""
    info = [k for k in atoms.info if k != "config_type"]
    arrays = [k for k in atoms.arrays if k not in ("numbers", "positions")]
    calc = sorted(atoms.calc.results) if atoms.calc is not None else []
    return f"info keys {info}, arrays keys {arrays}, calculator results {calc}"


def _source(atoms: Atoms, key: str, where: str) -> str:
    return f"{where}['{key}']" if key in getattr(atoms, where) else "the calculator results"


def free_mask(atoms: Atoms) -> np.ndarray:
    """1.0 for free atoms, 0.0 for atoms fixed by an ase FixAtoms constraint."""
    mask = np.ones(len(atoms))
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            mask[constraint.get_indices()] = 0.0
    return mask


def to_configs(
    frames: Sequence[Atoms],
    path: str,
    key: str,
    energy_key: str = ENERGY,
    forces_key: str = FORCES,
    require_forces: bool = True,
    indices: Sequence[int] | None = None,
) -> list[Configuration]:
    """mace Configurations with properties energy, forces, free_mask and (OC20) tags; DataError
    if a frame lacks energy or forces, or has labels that are not numbers of the right shape.
    Without ``require_forces`` (test sets) a file without any force label (no frame has
    ``forces_key`` nor another per-atom [n, 3] array or calculator forces) is an energy-only
    set: zero forces with property weight 0. A single-atom frame without forces gets its exact
    zero forces. `indices`: the frames' positions in `path` (default 0, 1, ...), for messages."""
    indices = range(len(frames)) if indices is None else indices
    where = [f"{path} ({key}): frame {i}" for i in indices]
    forces = [_forces(atoms, forces_key, w) for atoms, w in zip(frames, where, strict=True)]
    labelled = [i for i, f in enumerate(forces) if f is not None and len(frames[i]) > 1]
    energy_only = (
        not require_forces
        and not labelled
        and not any(_force_candidates(atoms) for atoms in frames)
    )
    configs = []
    for i, atoms in enumerate(frames):
        free = free_mask(atoms)
        energy, f = _energy(atoms, energy_key, where[i]), forces[i]
        if f is None and len(atoms) == 1:  # an isolated atom feels no force: an exact label
            f = np.zeros((1, 3))
        if energy is None:
            raise DataError(
                f"{where[i]} has no energy '{energy_key}' ({_labels(atoms)}); set data.energy_key"
            )
        if f is None and not energy_only:
            raise DataError(_no_forces(frames, where, indices, i, labelled, forces_key))
        if energy_only:
            f = np.zeros((len(atoms), 3))
        configs.append(
            Configuration(
                atomic_numbers=np.asarray(atoms.numbers, dtype=int),
                positions=np.array(atoms.positions, dtype=float),
                properties={
                    "energy": energy,
                    "forces": f,
                    "free_mask": free,
                    "tags": oc20_tags(atoms, free),
                },
                property_weights={"energy": 1.0, "forces": 0.0 if energy_only else 1.0},
                cell=np.array(atoms.cell[:], dtype=float),
                pbc=tuple(bool(p) for p in atoms.pbc),
                config_type=str(atoms.info.get("config_type", "Default")),
            )
        )
    if not frames:
        return configs
    first = frames[0]
    forces_from = "none (energy-only set)" if energy_only else _source(first, forces_key, "arrays")
    log.info(
        "%s (%s): energy from %s, forces from %s",
        path,
        key,
        _source(first, energy_key, "info"),
        forces_from,
    )
    return configs


def _no_forces(frames, where, indices, i, labelled, forces_key) -> str:
    """Why frame `i` (position in `frames`) has no forces, and what to change."""
    atoms = frames[i]
    missing = f"{where[i]} has no forces '{forces_key}' ({_labels(atoms)})"
    if labelled:
        return (
            f"{missing}, while frame {indices[labelled[0]]} of the file has: label every frame "
            "with forces or remove this one"
        )
    candidates = _force_candidates(atoms)
    if candidates:
        return f"{missing}; set data.forces_key to the force label (per-atom: {candidates})"
    return (
        f"{missing}: no frame of the file has forces, and training and validation sets need "
        "them (an energy-only file can be a test set, data.test_files; forces under another "
        "label: set data.forces_key)"
    )


def read_configs(
    path: str,
    key: str,
    energy_key: str = ENERGY,
    forces_key: str = FORCES,
    require_forces: bool = True,
    references: ReferenceEnergies | None = None,
) -> list[Configuration]:
    """Read and validate one file (see `read_atoms`, `to_configs`); with `references`, energies
    are E_total - reference per frame."""
    frames = read_atoms(path, key)
    configs = to_configs(frames, path, key, energy_key, forces_key, require_forces)
    if references is not None:
        references.subtract(configs, frames, path, key)
    return configs


ISOLATED_ATOM = "IsolatedAtom"  # mace's config_type of isolated-atom (E0) frames


def split_isolated_atoms(
    frames: Sequence[Atoms] | Mapping[int, Atoms],
    indices: Sequence[int],
    path: str,
    key: str,
    energy_key: str = ENERGY,
) -> tuple[dict[int, float], list[int]]:
    """mace's convention for training files: single-atom frames with ``config_type=IsolatedAtom``
    give E0s and are not trained on. Returns (E0 per Z, the other `indices`) for the frames at
    positions `indices` of `path`; DataError for such a frame without an energy or one element
    given two different energies."""
    e0s: dict[int, float] = {}
    first: dict[int, int] = {}
    rest = []
    for i in indices:
        atoms = frames[i]
        if len(atoms) != 1 or atoms.info.get("config_type") != ISOLATED_ATOM:
            rest.append(i)
            continue
        where = f"{path} ({key}): frame {i} ({ISOLATED_ATOM})"
        energy = _energy(atoms, energy_key, where)
        if energy is None:
            raise DataError(f"{where} has no energy '{energy_key}'; set data.energy_key")
        z = int(atoms.numbers[0])
        if z in e0s and abs(e0s[z] - energy) > 1e-8:
            raise DataError(
                f"{where}: {symbol(z)} has energy {energy} here and {e0s[z]} in frame "
                f"{first[z]}: keep one isolated-atom frame per element"
            )
        e0s[z], first[z] = energy, i
    return e0s, rest


def has_forces(config: Configuration) -> bool:
    """False for frames of an energy-only set (see `to_configs`)."""
    return config.property_weights.get("forces", 1.0) > 0


def fingerprint(config: Configuration) -> str:
    """Identity of a configuration for overlap removal: species, positions and cell (1e-5 Å),
    pbc, energy (frames that differ only in cell or pbc are different structures)."""
    h = hashlib.sha1(np.asarray(config.atomic_numbers, dtype=np.int64).tobytes())
    h.update((np.round(config.positions, 5) + 0.0).tobytes())
    cell = np.zeros((3, 3)) if config.cell is None else np.asarray(config.cell, dtype=float)
    h.update((np.round(cell, 5) + 0.0).tobytes())
    h.update(np.asarray(config.pbc if config.pbc is not None else (False,) * 3, bool).tobytes())
    h.update(np.round(np.float64(config.properties["energy"]), 5).tobytes())
    return h.hexdigest()


def symbol(z: int) -> str:
    return ase.data.chemical_symbols[int(z)]


def _z_of(key) -> int:
    if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
        return int(key)
    if key in ase.data.atomic_numbers:
        return ase.data.atomic_numbers[key]
    raise DataError(f"data.e0s: unknown element '{key}' (use a symbol like 'H' or Z like 1)")


def resolve_e0s(
    e0s: str | Mapping,
    z_table: AtomicNumberTable,
    train: Sequence[Configuration],
    energy_key: str = "energy",
) -> dict[int, float]:
    """E0 per Z of `z_table` from an isolated-atoms file, a {symbol or Z: eV} mapping,
    "average" (least squares over training compositions; refuses when they don't determine
    it) or "min_norm" (the same fit accepting the minimum-norm solution of a rank-deficient
    system, as mace's own "average" silently does)."""
    if isinstance(e0s, Mapping):
        table = {_z_of(k): float(v) for k, v in e0s.items()}
        source = "data.e0s"
    elif e0s in ("average", "min_norm"):
        counts = np.array([[np.sum(c.atomic_numbers == z) for z in z_table.zs] for c in train])
        rank = int(np.linalg.matrix_rank(counts))
        if rank < len(z_table) and e0s == "average":
            raise DataError(
                f"data.e0s=average: the training compositions determine only {rank} of "
                f"{len(z_table)} element energies (too few distinct compositions); give "
                "isolated-atom energies (a file or {symbol: eV}) or e0s=min_norm"
            )
        table = {int(z): float(v) for z, v in compute_average_E0s(list(train), z_table).items()}
        source = f"data.e0s={e0s}"
    else:
        path = str(e0s)
        frames = read_atoms(path, "data.e0s")
        table = {}
        for atoms in frames:
            if len(atoms) == 1:
                energy = _energy(atoms, energy_key, f"{path} (data.e0s)")
                if energy is not None:
                    table[int(atoms.numbers[0])] = energy
        if not table:
            raise DataError(f"data.e0s: {path} has no single-atom configurations with energies")
        source = f"data.e0s ({path})"
    missing = [symbol(z) for z in z_table.zs if z not in table]
    if missing:
        raise DataError(f"{source} has no E0 for element(s) {', '.join(missing)}")
    return {int(z): table[z] for z in z_table.zs}
