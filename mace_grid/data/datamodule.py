"""`AtomsDataModule`: ASE files → mace `AtomicData` graphs → mace's torch_geometric loaders."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from mace.data import AtomicData
from mace.data.utils import Configuration
from mace.modules.utils import compute_avg_num_neighbors, compute_mean_rms_energy_forces
from mace.tools import AtomicNumberTable, atomic_numbers_to_indices, to_one_hot
from mace.tools.torch_geometric.dataloader import DataLoader

from mace_grid.data.checks import MIN_DISTANCE, check_cells, check_distances, check_finite
from mace_grid.data.io import (
    ISOLATED_ATOM,
    expand_files,
    fingerprint,
    read_atoms,
    resolve_e0s,
    split_isolated_atoms,
    symbol,
    to_configs,
)
from mace_grid.data.neighbours import Neighbours, compute_neighbours, file_neighbours
from mace_grid.data.readers import LMDB_SUFFIX, LMDBFrames, ReferenceEnergies
from mace_grid.errors import DataError
from mace_grid.utils import atomic_write_text, file_sha256

log = logging.getLogger("mace_grid.data")
TRAIN_KEY = "data.train_file"


@dataclass
class Source:
    """The frames used of one file with their neighbour lists, and the E0s (eV per Z) of its
    isolated-atom frames when they were taken out (see `split_isolated_atoms`)."""

    path: str
    configs: list[Configuration]
    graphs: list[Neighbours]
    isolated: dict[int, float] = field(default_factory=dict)


def load_source(
    path: str,
    key: str,
    r_max: float,
    energy_key: str,
    forces_key: str,
    cache_dir,
    min_distance: float = MIN_DISTANCE,
    require_forces: bool = True,
    references: ReferenceEnergies | None = None,
    stride: int = 1,
    take_isolated: bool = False,
) -> Source:
    """Read every `stride`-th frame of `path` (`key` = config entry to blame), check it (see
    `mace_grid.data.checks`) and get its neighbour lists (only of these frames). Every reader's
    frames pass here (`AtomsDataModule._load_chunks` checks an .aselmdb's pieces the same
    way). `references`: subtract per-frame reference energies (see `ReferenceEnergies`);
    `take_isolated`: isolated-atom frames among them give E0s instead (training files)."""
    frames = read_atoms(path, key)
    n_frames, indices = len(frames), list(range(0, len(frames), stride))
    isolated = {}
    if take_isolated:
        isolated, indices = split_isolated_atoms(frames, indices, path, key, energy_key)
    frames = [frames[i] for i in indices]
    configs = checked_configs(
        frames, indices, path, key, energy_key, forces_key, require_forces, references
    )
    selection = None if len(indices) == n_frames else indices  # cache key: the frames used
    graphs = file_neighbours(path, configs, r_max, cache_dir, selection)
    check_distances(configs, graphs, path, key, min_distance, indices)
    return Source(path, configs, graphs, isolated)


def checked_configs(
    frames: Sequence,
    indices: Sequence[int],
    path: str,
    key: str,
    energy_key: str,
    forces_key: str,
    require_forces: bool,
    references: ReferenceEnergies | None,
) -> list[Configuration]:
    """`to_configs` of the frames at positions `indices` of `path`, referenced and checked
    (finite values, periodic cells) before any neighbour list is built."""
    configs = to_configs(frames, path, key, energy_key, forces_key, require_forces, indices)
    if references is not None:
        references.subtract(configs, frames, path, key, indices)
    check_finite(configs, path, key, indices)
    check_cells(configs, path, key, indices)
    return configs


def to_atomic_data(
    config: Configuration, graph: Neighbours, z_table: AtomicNumberTable, config_type_id: int = 0
) -> AtomicData:
    """mace AtomicData with energy [] (eV), forces [n, 3] (eV/Å) and extra per-atom `free_mask`
    [n] (1 free, 0 fixed) and `tags` [n] (OC20: 0 fixed, 1 slab, 2 adsorbate) and per-graph
    `config_type_id` []; dtype = torch default dtype."""
    dtype = torch.get_default_dtype()
    indices = atomic_numbers_to_indices(config.atomic_numbers, z_table=z_table)
    one, zero = (torch.tensor(v, dtype=dtype) for v in (1.0, 0.0))
    return AtomicData(
        edge_index=torch.as_tensor(graph.edge_index, dtype=torch.long),
        node_attrs=to_one_hot(torch.as_tensor(indices).long().unsqueeze(-1), len(z_table)),
        positions=torch.tensor(config.positions, dtype=dtype),
        shifts=torch.tensor(graph.shifts, dtype=dtype),
        unit_shifts=torch.tensor(graph.unit_shifts, dtype=dtype),
        cell=torch.tensor(graph.cell, dtype=dtype),
        pbc=torch.tensor([config.pbc], dtype=torch.bool),
        weight=one,
        head=torch.tensor(0, dtype=torch.long),
        energy_weight=one.clone(),
        forces_weight=torch.tensor(float(config.property_weights.get("forces", 1.0)), dtype=dtype),
        stress_weight=zero,
        virials_weight=zero.clone(),
        dipole_weight=None,
        charges_weight=None,
        polarizability_weight=None,
        forces=torch.tensor(config.properties["forces"], dtype=dtype),
        energy=torch.tensor(config.properties["energy"], dtype=dtype),
        stress=torch.zeros(1, 3, 3, dtype=dtype),
        virials=torch.zeros(1, 3, 3, dtype=dtype),
        dipole=None,
        charges=None,
        polarizability=None,
        elec_temp=None,
        free_mask=torch.tensor(config.properties["free_mask"], dtype=dtype),
        tags=torch.as_tensor(np.asarray(config.properties["tags"], dtype=np.int64)),
        config_type_id=torch.tensor(config_type_id, dtype=torch.long),
    )


def check_elements(configs: Sequence[Configuration], z_table: AtomicNumberTable, where: str):
    """DataError naming the first element of `configs` that `z_table` lacks."""
    known = set(z_table.zs)
    for config in configs:
        for z in np.unique(config.atomic_numbers):
            if int(z) not in known:
                elements = ", ".join(symbol(z) for z in z_table.zs)
                raise DataError(
                    f"element {symbol(z)} in {where} is not among the model's elements [{elements}]"
                )


#: loader worker processes per training process on a GPU when ``data.num_workers`` is null
GPU_WORKERS = 4


def make_loader(
    dataset, batch_size: int, shuffle: bool = False, num_workers: int = 0, pin_memory: bool = False
):
    """mace's torch_geometric DataLoader over a list of AtomicData."""
    return DataLoader(
        dataset=dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=False,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def build_loader(
    path: str,
    atomic_numbers: Sequence[int],
    r_max: float,
    batch_size: int = 8,
    energy_key: str = "energy",
    forces_key: str = "forces",
    cache_dir: str | None = None,
    num_workers: int = 0,
    key: str = "path",
    min_distance: float = MIN_DISTANCE,
    references: ReferenceEnergies | None = None,
) -> DataLoader:
    """Unshuffled loader over all frames of an ASE-readable file for a model with elements
    `atomic_numbers` (e.g. from checkpoint statistics); `key` names the option in errors."""
    z_table = AtomicNumberTable(sorted(int(z) for z in atomic_numbers))
    source = load_source(
        str(path), key, r_max, energy_key, forces_key, cache_dir, min_distance, True, references
    )
    check_elements(source.configs, z_table, f"{path} ({key})")
    dataset = [to_atomic_data(c, g, z_table) for c, g in zip(*_pairs(source), strict=True)]
    return make_loader(dataset, batch_size, num_workers=num_workers)


def _pairs(source: Source, indices: Sequence[int] | None = None):
    idx = range(len(source.configs)) if indices is None else indices
    return [source.configs[i] for i in idx], [source.graphs[i] for i in idx]


def _count(fraction: float, n: int) -> int:
    return max(1, int(fraction * n)) if fraction > 0 else 0


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def record_splits(path: Path, splits: dict) -> None:
    """Write ``splits.json``, or (a resumed run's directory) check that the data and the split
    are the ones the run trained on: a changed training file would otherwise re-split and move
    trained frames into validation. Files are compared by content (sha256), so a data root
    mounted elsewhere still matches."""
    splits = json.loads(json.dumps(splits))  # as it reads back
    if not path.is_file():
        _write_json(path, splits)
        log.info("saved data splits to %s", path)
        return
    old = json.loads(path.read_text())
    if "files" not in old:  # recorded before file hashes were: compare by path
        splits = {k: v for k, v in splits.items() if k != "files"}
    if _by_content(old) == _by_content(splits):
        log.info("data and split match the run's %s", path)
        return
    old_files, new_files = old.get("files") or {}, splits.get("files") or {}
    by_sha = {sha: p for p, sha in old_files.items()}
    changed = [p for p, sha in new_files.items() if sha not in by_sha]
    if changed:
        reason = f"{changed[0]} differs from the file the run trained on (sha256)"
    else:
        reason = "the split differs (data settings or files changed)"
    raise DataError(
        f"{path.parent} was trained on other data: {reason}; resuming would re-split it and "
        "move trained frames into validation. Restore the run's data (splits.json lists its "
        "files) or start a new run"
    )


def _by_content(splits: dict) -> dict:
    """``splits`` with each file named by its sha256 (where recorded) instead of its path."""
    sha = splits.get("files") or {}
    return {
        key: {sha.get(p, p): v for p, v in value.items()}
        if isinstance(value, dict) and key != "files"
        else value
        for key, value in splits.items()
        if key != "files" or not sha
    }


class SplitLoaders:
    """Loaders over the `_train`, `_valid` and `_tests` datasets a data module's `setup()` built
    (shared by the in-memory and the HDF5 data modules)."""

    def _ready(self) -> None:
        if self.statistics is None:
            raise RuntimeError("call setup() first")

    def loader_options(self) -> dict:
        """Chosen per trainer: on a GPU pinned batches (copied without blocking,
        `transfer_batch_to_device`) and, for ``num_workers`` null, `GPU_WORKERS`
        persistent worker processes (collation off the GPU's critical path); on the CPU no
        pinning and, for null, no workers (collation in the training process, as before)."""
        trainer = getattr(self, "trainer", None)  # set by Lightning's fit/validate/test
        gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        workers = self.num_workers
        if workers is None:
            workers = min(GPU_WORKERS, os.cpu_count() or 1) if gpu else 0
        return {"num_workers": workers, "pin_memory": gpu}

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """One non-blocking copy per attribute on a GPU (the pinned batches of `loader_options`
        overlap compute); Lightning copies a batch that is not a tensor blocking."""
        if device.type == "cuda" and hasattr(batch, "apply"):
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self):
        self._ready()
        return make_loader(self._train, self.batch_size, True, **self.loader_options())

    def val_dataloader(self):
        self._ready()
        if not len(self._valid):
            return []
        return make_loader(self._valid, self.valid_batch_size, **self.loader_options())

    def test_dataloader(self):
        self._ready()
        options = self.loader_options()
        return [make_loader(d, self.valid_batch_size, **options) for d in self._tests]


class AtomsDataModule(SplitLoaders, L.LightningDataModule):
    """Train/valid/test graphs from ASE-readable files (extxyz(.xz), .traj, .db, .aselmdb).

    train_file: path, folder, glob or list of them (an .aselmdb is read whole into memory
    here; `preprocess` streams it into HDF5 shards instead). Validation comes from `valid_file`
    or a seeded `valid_fraction` of the training pool; `test_fraction` holds out a test set
    named "test"; `split_by` = "frame" (random frames) or "file" (whole files, i.e. systems, per
    split; held-out files are drawn only among those whose elements stay covered by the training
    files).
    valid_file and each of test_files ({name: spec}) is a file, folder, glob or list too (e.g.
    fairchem's data.0000.aselmdb, ... shards); with `drop_train_overlap`, frames also present in
    the training files (same species, positions, energy) are removed from them.
    reference_energies: S2EF reference table (.txt) or folder of them: train on E_total minus
    each frame's reference (OC20 adsorption-energy targets; see `readers.ReferenceEnergies`).
    e0s: isolated-atoms file, {symbol or Z: eV}, "average" or "min_norm" (see `resolve_e0s`);
    null: as mace, the energies of the training files' isolated-atom frames (one atom,
    config_type=IsolatedAtom; never trained on, whatever e0s is) if there are any, else zero
    for every element with reference_energies (referenced targets carry no per-element
    offset), else "average".
    atomic_numbers: fixed z table (e.g. from a checkpoint) instead of the training elements.
    frame_stride: keep every k-th frame of each file (relaxation trajectories are highly
    correlated frame to frame); only those are checked and get neighbour lists. Indices in
    `splits.json` count the kept frames (after the stride, isolated-atom frames and duplicate
    removal; its `duplicates` lists the removed ones, counted after the stride and isolated
    atoms).
    drop_duplicates: drop configurations that repeat an earlier one of the training pool (before
    splitting, so no validation frame is also a training frame); the log gives the count.
    min_distance: refuse frames with two atoms closer than this (Å); every frame is also checked
    for finite energy, forces, positions and cell (`mace_grid.data.checks`).
    Test files without any forces (default forces_key) are energy-only sets: energy metrics.
    After `setup()`: `statistics` (plain dict), `test_names`, `sizes`, `config_types`.
    """

    def __init__(
        self,
        train_file: str | Sequence[str],
        name: str = "data",
        valid_file: str | None = None,
        valid_fraction: float = 0.1,
        test_fraction: float = 0.0,
        test_files: Mapping[str, str] | None = None,
        split_by: str = "frame",
        drop_train_overlap: bool = True,
        energy_key: str = "energy",
        forces_key: str = "forces",
        e0s: str | Mapping | None = None,
        reference_energies: str | None = None,
        r_max: float = 5.0,
        batch_size: int = 8,
        valid_batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        output_dir: str | None = None,
        atomic_numbers: Sequence[int] | None = None,
        frame_stride: int = 1,
        drop_duplicates: bool = True,
        min_distance: float = MIN_DISTANCE,
    ):
        super().__init__()
        for key, value, least in (
            ("batch_size", batch_size, 1),
            ("valid_batch_size", valid_batch_size or batch_size, 1),
            ("num_workers", 0 if num_workers is None else num_workers, 0),
        ):
            if int(value) != value or value < least:
                raise DataError(f"data.{key} must be an integer >= {least}, got {value}")
        if not float(min_distance) >= 0:
            raise DataError(f"data.min_distance must be >= 0 Å, got {min_distance}")
        self.drop_duplicates = bool(drop_duplicates)
        self.duplicates: dict[str, list[int]] = {}  # path -> frames dropped as repeats
        self.min_distance = float(min_distance)
        if int(frame_stride) < 1:
            raise DataError(f"data.frame_stride must be a positive integer, got {frame_stride}")
        self.frame_stride = int(frame_stride)
        if split_by not in ("frame", "file"):
            raise DataError(f"data.split_by must be 'frame' or 'file', got '{split_by}'")
        for key, frac in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= frac < 1.0:
                raise DataError(f"data.{key} must be in [0, 1), got {frac}")
        self.name = name
        self.train_file = train_file if isinstance(train_file, str) else list(train_file)
        self.valid_file = valid_file
        self.valid_fraction = float(valid_fraction)
        self.test_fraction = float(test_fraction)
        self.test_files = {str(k): v for k, v in (test_files or {}).items()}
        if test_fraction > 0 and "test" in self.test_files:
            raise DataError("data.test_files: the name 'test' is taken by data.test_fraction")
        self.split_by = split_by
        self.drop_train_overlap = drop_train_overlap
        self.energy_key, self.forces_key = energy_key, forces_key
        self.e0s = e0s if e0s is None or isinstance(e0s, str) else dict(e0s)
        self.reference_energies = None if reference_energies is None else str(reference_energies)
        self.references = (
            None if reference_energies is None else ReferenceEnergies(self.reference_energies)
        )
        self.r_max = float(r_max)
        self.batch_size = int(batch_size)
        self.valid_batch_size = int(valid_batch_size or batch_size)
        self.num_workers = None if num_workers is None else int(num_workers)  # None: per trainer
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.output_dir = output_dir
        self.atomic_numbers = None if atomic_numbers is None else sorted(map(int, atomic_numbers))
        self.statistics: dict | None = None
        self.test_names: list[str] = []
        self.sizes: dict[str, int] = {}
        self.config_types: list[str] = []
        # Z -> (eV, file) from the training files' isolated-atom frames (`split_isolated_atoms`)
        self.isolated_e0s: dict[int, tuple[float, str]] = {}
        self.z_table: AtomicNumberTable | None = (
            None if self.atomic_numbers is None else AtomicNumberTable(self.atomic_numbers)
        )
        self._train: list = []
        self._valid: list = []
        self._tests: list[list] = []

    # -- setup -------------------------------------------------------------------------------
    def _load(self, path: str, key: str, require_forces: bool = True) -> Source:
        """Every `frame_stride`-th frame of `path`; of a training file without its isolated-atom
        frames (kept in `isolated_e0s`)."""
        src = load_source(
            path,
            key,
            self.r_max,
            self.energy_key,
            self.forces_key,
            self.cache_dir,
            self.min_distance,
            require_forces,
            self.references,
            self.frame_stride,
            take_isolated=key == TRAIN_KEY,
        )
        self._add_isolated(src)
        return src

    def _load_chunks(self, path: str, key: str, chunk_frames: int, require_forces: bool = True):
        """`_load(path)` in pieces of at most `chunk_frames` frames (an .aselmdb: only the kept
        frames are decoded, `chunk_frames` at a time, checked as `load_source` checks, neighbour
        lists not cached); other files whole, as one piece."""
        if not path.endswith(LMDB_SUFFIX):
            yield self._load(path, key, require_forces)
            return
        with LMDBFrames(path) as db:
            if not len(db):
                raise DataError(f"data file has no configurations: {path} ({key})")
            kept = range(0, len(db), self.frame_stride)
            for start in range(0, len(kept), chunk_frames):
                indices = list(kept[start : start + chunk_frames])
                frames = {i: db[i] for i in indices}
                isolated = {}
                if key == TRAIN_KEY:
                    isolated, indices = split_isolated_atoms(
                        frames, indices, path, key, self.energy_key
                    )
                configs = checked_configs(
                    [frames[i] for i in indices],
                    indices,
                    path,
                    key,
                    self.energy_key,
                    self.forces_key,
                    require_forces,
                    self.references,
                )
                graphs = [compute_neighbours(c, self.r_max) for c in configs]
                check_distances(configs, graphs, path, key, self.min_distance, indices)
                src = Source(path, configs, graphs, isolated)
                self._add_isolated(src)
                yield src

    def _add_isolated(self, src: Source) -> None:
        """Merge the E0s of `src`'s isolated-atom frames into `isolated_e0s` (one per element)."""
        for z, energy in src.isolated.items():
            known = self.isolated_e0s.get(z)
            if known is not None and abs(known[0] - energy) > 1e-8:
                raise DataError(
                    f"{TRAIN_KEY}: {ISOLATED_ATOM} frames give {symbol(z)} the energy {known[0]} "
                    f"({known[1]}) and {energy} ({src.path}): keep one isolated-atom frame per "
                    "element"
                )
            self.isolated_e0s[z] = (energy, src.path)

    def _unique(self, src: Source, seen: set[str], offset: int = 0, warn: bool = True) -> Source:
        """`src` without the frames whose fingerprint is in `seen` (earlier training-pool
        frames, or earlier in the same file); adds the kept ones to `seen` and the dropped ones
        to `duplicates` (`offset`: for a piece of a file, the number of its frames read, after
        the stride, before `src`). `warn=False`: the caller reports the count
        (`_warn_duplicates`), e.g. once for all pieces of a file."""
        if not self.drop_duplicates:
            return src
        keep = []
        for i, c in enumerate(src.configs):
            fp = fingerprint(c)
            if fp not in seen:
                seen.add(fp)
                keep.append(i)
        if len(keep) < len(src.configs):
            kept = set(keep)
            dropped = [offset + i for i in range(len(src.configs)) if i not in kept]
            self.duplicates.setdefault(src.path, []).extend(dropped)
        if warn:
            self._warn_duplicates(src.path, len(src.configs) - len(keep), len(src.configs))
        return Source(src.path, *_pairs(src, keep))

    @staticmethod
    def _warn_duplicates(path: str, dropped: int, n: int) -> None:
        if dropped:
            log.warning(
                "data.train_file: dropped %d of %d configurations of %s that repeat earlier "
                "training-pool frames (same species, positions, energy), so that they cannot "
                "be in both training and validation; data.drop_duplicates=false keeps them",
                dropped,
                n,
                path,
            )

    def _warn_split_trajectories(self, pool: list[Source], parts: dict) -> None:
        """Warn when split_by=frame puts frames of one trajectory (a file whose frames are all
        one system) in both training and validation: neighbouring frames are near-copies."""
        if self.split_by != "frame":
            return
        for s in pool:
            one_system = all(
                np.array_equal(c.atomic_numbers, s.configs[0].atomic_numbers) for c in s.configs
            )
            n_train, n_valid = (len(parts[p].get(s.path, [])) for p in ("train", "valid"))
            if len(s.configs) > 1 and one_system and n_train and n_valid:
                log.warning(
                    "data.split_by=frame puts frames of the trajectory %s in training (%d) and "
                    "validation (%d): correlated neighbouring frames make validation "
                    "optimistic; to hold out whole files give one file per trajectory and "
                    "data.split_by=file (or a separate data.valid_file)",
                    s.path,
                    n_train,
                    n_valid,
                )

    def _split_frames(self, sources: list[Source], rng, n_valid_wanted: bool):
        offsets = np.cumsum([0] + [len(s.configs) for s in sources])
        n = int(offsets[-1])
        n_test = _count(self.test_fraction, n)
        n_valid = _count(self.valid_fraction, n) if n_valid_wanted else 0
        if n - n_test - n_valid < 1:
            raise DataError(
                f"data.train_file has {n} frames: too few for valid/test fractions "
                f"{self.valid_fraction}/{self.test_fraction}"
            )
        perm = rng.permutation(n)
        parts = {"test": perm[:n_test], "valid": perm[n_test : n_test + n_valid]}
        parts["train"] = perm[n_test + n_valid :]
        out = {}
        for part, idx in parts.items():
            idx = np.sort(idx)
            f = np.searchsorted(offsets, idx, side="right") - 1
            out[part] = {s.path: (idx[f == i] - offsets[i]).tolist() for i, s in enumerate(sources)}
        return out

    def _split_files(self, sources: list[Source], rng, n_valid_wanted: bool):
        n = len(sources)
        n_test = _count(self.test_fraction, n)
        n_valid = _count(self.valid_fraction, n) if n_valid_wanted else 0
        elements = [
            set(np.unique(np.concatenate([c.atomic_numbers for c in s.configs])).tolist())
            for s in sources
        ]
        remaining = list(range(n))
        held: list[int] = []
        for i in rng.permutation(n).tolist():
            if len(held) == n_test + n_valid:
                break
            rest = [j for j in remaining if j != i]
            if rest and elements[i] <= set().union(*(elements[j] for j in rest)):
                held.append(i)
                remaining = rest
        if len(held) < n_test + n_valid:
            raise DataError(
                f"split_by=file: only {len(held)} of {n} files can be held out without leaving "
                f"an element unseen in training, {n_test + n_valid} requested; lower "
                "data.valid_fraction/test_fraction"
            )
        parts = {"test": held[:n_test], "valid": held[n_test:], "train": sorted(remaining)}
        return {
            part: {sources[i].path: list(range(len(sources[i].configs))) for i in sorted(idx)}
            for part, idx in parts.items()
        }

    def explicit_sets(self) -> dict[str, tuple[str, str, list[str]]]:
        """Part (``valid``, ``test:<name>``) -> (config key, spec, files) of the explicitly given
        validation/test sets; each spec is a file, folder, glob or list of them."""
        specs = {}
        if self.valid_file is not None:
            specs["valid"] = ("data.valid_file", self.valid_file)
        for name, spec in self.test_files.items():
            specs[f"test:{name}"] = (f"data.test_files.{name}", spec)
        train = {os.path.realpath(f) for f in expand_files(self.train_file, "data.train_file")}
        sets = {}
        for part, (key, spec) in specs.items():
            files = expand_files(spec, key)
            clash = [f for f in files if os.path.realpath(f) in train]
            if clash:
                raise DataError(
                    f"{clash[0]} ({key}) is also a training file (data.train_file): give "
                    "validation and test sets apart from the training files"
                )
            sets[part] = (key, str(spec), files)
        return sets

    def _graphs(self, by_path: dict, sources: dict[str, Source], where: str):
        configs, graphs = [], []
        for path, idx in by_path.items():
            c, g = _pairs(sources[path], idx)
            configs += c
            graphs += g
        if self.z_table is not None:
            check_elements(configs, self.z_table, where)
        return configs, graphs

    def _dataset(self, configs, graphs) -> list[AtomicData]:
        ids = []
        for c in configs:
            if c.config_type not in self.config_types:
                self.config_types.append(c.config_type)
            ids.append(self.config_types.index(c.config_type))
        return [
            to_atomic_data(c, g, self.z_table, i)
            for c, g, i in zip(configs, graphs, ids, strict=True)
        ]

    def setup(self, stage: str | None = None) -> None:
        """Read, split, build graphs and statistics once (all stages at the first call)."""
        if self.statistics is not None:
            return
        self.prepare_data()
        train_paths = expand_files(self.train_file, "data.train_file")
        unique: set[str] = set()
        pool = [self._unique(self._load(p, TRAIN_KEY), unique) for p in train_paths]
        pool = [s for s in pool if s.configs]
        sources = {s.path: s for s in pool}
        rng = np.random.default_rng(self.seed)
        split = self._split_frames if self.split_by == "frame" else self._split_files
        parts = split(pool, rng, n_valid_wanted=self.valid_file is None)
        self._warn_split_trajectories(pool, parts)

        train_configs, train_graphs = self._graphs(parts["train"], sources, "data.train_file")
        if self.z_table is None:
            zs = np.unique(np.concatenate([c.atomic_numbers for c in train_configs]))
            self.z_table = AtomicNumberTable([int(z) for z in zs])

        seen = set()
        if self.drop_train_overlap:
            seen = {fingerprint(c) for s in pool for c in s.configs}
        extra = self.explicit_sets()
        for part, (key, spec, files) in extra.items():
            parts[part] = {}
            for path in files:
                src = self._load(path, key, require_forces=part == "valid")
                sources[path] = src
                keep = [i for i, c in enumerate(src.configs) if fingerprint(c) not in seen]
                if len(keep) < len(src.configs):
                    log.info(
                        "%s: dropped %d of %d configurations also in the training file(s)",
                        path,
                        len(src.configs) - len(keep),
                        len(src.configs),
                    )
                parts[part][path] = keep
            if not any(parts[part].values()):
                raise DataError(f"{spec} ({key}): every configuration is also in data.train_file")

        self._train = self._dataset(train_configs, train_graphs)
        where = "the validation split"
        if "valid" in extra:
            where = f"{extra['valid'][1]} ({extra['valid'][0]})"
        self._valid = self._dataset(*self._graphs(parts["valid"], sources, where))
        self.test_names, self._tests = [], []
        test_parts = ["test"] if parts.get("test") and any(parts["test"].values()) else []
        test_parts += [f"test:{n}" for n in self.test_files]
        for part in test_parts:
            name = part.split(":", 1)[1] if ":" in part else "test"
            where = "the held-out test split"
            if part in extra:
                where = f"{extra[part][1]} ({extra[part][0]})"
            self.test_names.append(name)
            self._tests.append(self._dataset(*self._graphs(parts[part], sources, where)))
        self.sizes = {"train": len(self._train), "valid": len(self._valid)}
        self.sizes.update({n: len(d) for n, d in zip(self.test_names, self._tests, strict=True)})

        self.statistics = self._statistics(train_configs)
        self._save_splits(parts)
        s = self.statistics
        log.info(
            "data %s: sizes %s, elements %s, E0s %s, avg_num_neighbors %.3f, mean %.4g, std %.4g",
            self.name,
            self.sizes,
            [symbol(z) for z in s["atomic_numbers"]],
            [round(e, 4) for e in s["atomic_energies"]],
            s["avg_num_neighbors"],
            s["mean"],
            s["std"],
        )

    def _statistics(self, train_configs) -> dict:
        e0 = resolve_e0s(self._e0s_spec(), self.z_table, train_configs, self.energy_key)
        atomic_energies = [float(e0[z]) for z in self.z_table.zs]
        loader = make_loader(self._train, self.batch_size)
        mean, rms = compute_mean_rms_energy_forces(loader, np.array(atomic_energies))
        return {
            "atomic_numbers": [int(z) for z in self.z_table.zs],
            "atomic_energies": atomic_energies,
            "avg_num_neighbors": float(compute_avg_num_neighbors(loader)),
            "mean": float(np.asarray(mean).reshape(-1)[0]),
            "std": float(np.asarray(rms).reshape(-1)[0]),
            "r_max": self.r_max,
        }

    def _e0s_spec(self):
        """`data.e0s` if given, else the isolated-atom frames' energies (as mace takes them),
        else zero with reference_energies, else "average"."""
        iso = self.isolated_e0s
        if self.e0s is not None:
            if iso:
                log.warning(
                    "data.e0s is set: the %d %s frames of %s are not trained on and their "
                    "energies are not used as E0s",
                    len(iso),
                    ISOLATED_ATOM,
                    TRAIN_KEY,
                )
            return self.e0s
        if iso:
            missing = [symbol(z) for z in self.z_table.zs if z not in iso]
            if missing:
                stride = self.frame_stride
                read = f" (data.frame_stride={stride} reads every {stride}-th frame)" * (stride > 1)
                raise DataError(
                    f"{TRAIN_KEY} has {ISOLATED_ATOM} frames for "
                    f"{', '.join(symbol(z) for z in sorted(iso))} but none for "
                    f"{', '.join(missing)}{read}: add one per element or set data.e0s"
                )
            log.info(
                "E0s from the %s frames of %s (not trained on): %s",
                ISOLATED_ATOM,
                TRAIN_KEY,
                {symbol(z): iso[z][0] for z in self.z_table.zs},
            )
            return {z: iso[z][0] for z in self.z_table.zs}
        return {z: 0.0 for z in self.z_table.zs} if self.references is not None else "average"

    def _save_splits(self, parts: dict) -> None:
        if self.output_dir is None:
            return
        files = sorted({path for part in parts.values() for path in part})
        record_splits(
            Path(self.output_dir) / "splits.json",
            {
                "seed": self.seed,
                "split_by": self.split_by,
                "test_names": self.test_names,
                **parts,
                "duplicates": self.duplicates,
                "files": {path: file_sha256(path) for path in files},
            },
        )

    # -- loaders ------------------------------------------------------------------------------

    def loader_for(self, path: str, batch_size: int | None = None) -> DataLoader:
        """Unshuffled loader over all frames of `path` with this module's z table and r_max."""
        if self.z_table is None:
            raise RuntimeError("call setup() first or pass atomic_numbers")
        return build_loader(
            path,
            self.z_table.zs,
            self.r_max,
            batch_size or self.valid_batch_size,
            self.energy_key,
            self.forces_key,
            self.cache_dir,
            key="path",
            min_distance=self.min_distance,
            references=self.references,
        )
