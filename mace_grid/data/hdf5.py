"""Out-of-core data: ASE files → sharded HDF5 (`preprocess`) → lazily read `HDF5DataModule`.

A preprocessed directory holds
  shard-NNNNN.h5  frames in source order. Per frame: `energy` [n], `cell` [n, 3, 3] (as mace's
                  neighbour list returns it), `pbc` [n, 3], `config_type_id` [n], `forces_weight`
                  [n] (0: a frame of an energy-only test set, its forces zeros), `atom_ptr` and
                  `edge_ptr` [n + 1]; per atom: `atomic_numbers`, `positions` [N, 3] Å, `forces`
                  [N, 3] eV/Å, `free_mask`, `tags` (OC20); per edge: `edge_index` [E, 2]
                  (frame-local), `shifts` [E, 3] Å, `unit_shifts` [E, 3].
  index.h5        frame numbers (int64) of each split: `train`, `valid`, `test/<name>`.
  meta.json       statistics, test_names, config_types, sizes, elements, r_max, shards (written
                  last: a directory without it is incomplete).
  splits.json     the split as `AtomsDataModule` writes it (file → frame indices).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from mace.data import AtomicData
from mace.data.utils import Configuration
from mace.tools import AtomicNumberTable

from mace_grid.data.datamodule import (
    AtomsDataModule,
    Source,
    SplitLoaders,
    _write_json,
    check_elements,
    record_splits,
    to_atomic_data,
)
from mace_grid.data.io import expand_files, fingerprint, symbol
from mace_grid.data.neighbours import Neighbours
from mace_grid.errors import DataError

log = logging.getLogger("mace_grid.data")
_VERSION = 3  # 2: per-atom tags; 3: per-frame forces_weight (energy-only test sets)
_CHUNK_ROWS = 16384  # rows per HDF5 chunk of the per-atom and per-edge arrays
_MAX_OPEN = 64  # shard files a process keeps open


class _ShardWriter:
    """Appends frames to shard-NNNNN.h5 files of at most `shard_frames` frames each."""

    # name: (shape after the first axis, dtype)
    PER_FRAME = {
        "energy": ((), "f8"),
        "cell": ((3, 3), "f8"),
        "pbc": ((3,), "?"),
        "config_type_id": ((), "i4"),
        "forces_weight": ((), "f4"),
    }
    PER_ATOM = {
        "atomic_numbers": ((), "u1"),
        "positions": ((3,), "f8"),
        "forces": ((3,), "f8"),
        "free_mask": ((), "u1"),
        "tags": ((), "i1"),
    }
    PER_EDGE = {"edge_index": ((2,), "i4"), "shifts": ((3,), "f8"), "unit_shifts": ((3,), "i4")}

    def __init__(self, out: Path, shard_frames: int):
        self.out, self.shard_frames = out, shard_frames
        self.counts: list[int] = []  # frames per shard
        self.config_types: list[str] = []  # the ids written, in order of appearance
        self._file: h5py.File | None = None

    def append(self, configs: Sequence[Configuration], graphs: Sequence[Neighbours]) -> int:
        """Write frames; return the pool index of the first."""
        first = sum(self.counts)
        i = 0
        while i < len(configs):
            if self._file is None or self.counts[-1] == self.shard_frames:
                self._next_shard()
            k = min(len(configs) - i, self.shard_frames - self.counts[-1])
            self._write(configs[i : i + k], graphs[i : i + k])
            self.counts[-1] += k
            i += k
        return first

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _next_shard(self) -> None:
        self.close()
        self._file = h5py.File(self.out / shard_name(len(self.counts)), "w")
        self.counts.append(0)
        for group, rows in (
            (self.PER_FRAME, 1024),
            (self.PER_ATOM, _CHUNK_ROWS),
            (self.PER_EDGE, _CHUNK_ROWS),
        ):
            for name, (tail, dtype) in group.items():
                self._create(name, tail, dtype, rows)
        for name in ("atom_ptr", "edge_ptr"):
            self._file.create_dataset(name, data=[0], maxshape=(None,), chunks=(1024,), dtype="i8")

    def _create(self, name: str, tail: tuple, dtype: str, rows: int) -> None:
        self._file.create_dataset(
            name, shape=(0, *tail), maxshape=(None, *tail), chunks=(rows, *tail), dtype=dtype
        )

    def _extend(self, name: str, values) -> None:
        ds = self._file[name]
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def _write(self, configs: Sequence[Configuration], graphs: Sequence[Neighbours]) -> None:
        for c in configs:
            if c.config_type not in self.config_types:
                self.config_types.append(c.config_type)
        columns = {
            "energy": [c.properties["energy"] for c in configs],
            "cell": np.stack([g.cell for g in graphs]),
            "pbc": np.array([c.pbc for c in configs], dtype=bool),
            "config_type_id": [self.config_types.index(c.config_type) for c in configs],
            "forces_weight": [float(c.property_weights.get("forces", 1.0)) for c in configs],
            "atomic_numbers": np.concatenate([c.atomic_numbers for c in configs]),
            "positions": np.concatenate([c.positions for c in configs]),
            "forces": np.concatenate([c.properties["forces"] for c in configs]),
            "free_mask": np.concatenate([c.properties["free_mask"] for c in configs]),
            "tags": np.concatenate([c.properties["tags"] for c in configs]),
            "edge_index": np.concatenate([g.edge_index.T for g in graphs]),
            "shifts": np.concatenate([g.shifts for g in graphs]).reshape(-1, 3),
            "unit_shifts": np.concatenate([g.unit_shifts for g in graphs]).reshape(-1, 3),
        }
        for name, values in columns.items():
            self._extend(name, values)
        for name, sizes in (
            ("atom_ptr", [len(c.atomic_numbers) for c in configs]),
            ("edge_ptr", [g.edge_index.shape[1] for g in graphs]),
        ):
            self._extend(name, self._file[name][-1] + np.cumsum(sizes))


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.h5"


class ShardedFrames(torch.utils.data.Dataset):
    """Frames `indices` (pool numbering) of a preprocessed directory as mace `AtomicData` (fields
    as `to_atomic_data`: energy, forces, free_mask, tags, config_type_id), read from disk on access.
    Each process (DataLoader worker) opens the shards itself; nothing else is held in memory."""

    def __init__(
        self,
        directory: str | Path,
        shard_counts: Sequence[int],
        indices,
        z_table: AtomicNumberTable,
    ):
        self.files = [str(Path(directory) / shard_name(i)) for i in range(len(shard_counts))]
        self.starts = np.concatenate([[0], np.cumsum(shard_counts)]).astype(np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.z_table = z_table
        self._open: dict[int, tuple[h5py.File, dict[str, h5py.Dataset]]] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}, "_pid": None}  # workers open their own handles

    def _shard(self, s: int) -> dict[str, h5py.Dataset]:
        """The datasets of shard `s`, opened once per process (looked up once: lookups cost)."""
        if self._pid != os.getpid():  # fresh, or inherited through fork: never share handles
            self._open, self._pid = {}, os.getpid()
        if s not in self._open:
            if len(self._open) >= _MAX_OPEN:
                self._open.pop(next(iter(self._open)))[0].close()  # the oldest
            # No chunk cache: frames are read at random, and HDF5 then reads the selection of an
            # uncompressed chunk directly (a cache would cost ~1 MB per dataset and open shard).
            f = h5py.File(self.files[s], "r", rdcc_nbytes=0)
            self._open[s] = f, {name: f[name] for name in f}
        return self._open[s][1]

    def __getitem__(self, i: int) -> AtomicData:
        g = int(self.indices[i])
        s = int(np.searchsorted(self.starts, g, side="right")) - 1
        f, j = self._shard(s), g - int(self.starts[s])
        a0, a1 = f["atom_ptr"][j : j + 2]
        e0, e1 = f["edge_ptr"][j : j + 2]
        config = Configuration(
            atomic_numbers=f["atomic_numbers"][a0:a1].astype(np.int64),
            positions=f["positions"][a0:a1],
            properties={
                "energy": float(f["energy"][j]),
                "forces": f["forces"][a0:a1],
                "free_mask": f["free_mask"][a0:a1],
                "tags": f["tags"][a0:a1],
            },
            property_weights={"energy": 1.0, "forces": float(f["forces_weight"][j])},
            pbc=tuple(bool(p) for p in f["pbc"][j]),
        )
        graph = Neighbours(
            edge_index=f["edge_index"][e0:e1].T,
            shifts=f["shifts"][e0:e1],
            unit_shifts=f["unit_shifts"][e0:e1],
            cell=f["cell"][j],
        )
        return to_atomic_data(config, graph, self.z_table, int(f["config_type_id"][j]))


def _light(config: Configuration) -> Configuration:
    """What splits, element checks and E0s need of a frame: species, energy, config_type."""
    return Configuration(
        atomic_numbers=np.asarray(config.atomic_numbers, dtype=np.uint8),
        positions=None,
        properties={"energy": config.properties["energy"]},
        property_weights={},
        config_type=config.config_type,
    )


def preprocess(dm: AtomsDataModule, out: str | Path, shard_frames: int = 1000) -> dict:
    """Write the data of `dm` into sharded HDF5 under `out` and return its meta.json content.

    Files, frame stride, split, overlap removal, E0s, neighbour lists and statistics come from
    `dm`'s own code (the split and statistics methods are called on per-frame metadata), so
    training from `out` sees the frames `dm.setup()` would give. Memory: one source file (an
    .aselmdb: `shard_frames` of its frames at a time), plus species/energy/fingerprint per frame
    and mace's force RMS over the training atoms.
    """
    out = Path(out)
    if (out / "meta.json").exists():
        raise DataError(f"{out} already holds a preprocessed dataset: remove it or set out=…")
    if int(shard_frames) < 1:
        raise DataError(f"shard_frames must be a positive integer, got {shard_frames}")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out, int(shard_frames))
    try:
        return _write_dataset(dm, out, writer)
    except BaseException:  # a refused file, Ctrl-C: leave no partial dataset behind
        writer.close()
        names = [shard_name(i) for i in range(len(writer.counts))]
        for name in [*names, "index.h5", "splits.json", "meta.json"]:
            (out / name).unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _write_dataset(dm: AtomsDataModule, out: Path, writer: _ShardWriter) -> dict:
    """`preprocess` into `out` (checked, created) through `writer`."""
    shard_frames = writer.shard_frames
    dm.prepare_data()
    pool: list[Source] = []  # light configs only
    pool_index: dict[str, np.ndarray] = {}  # path -> pool index of each (kept) frame
    seen: set[str] = set()
    unique: set[str] = set()
    try:
        for path in expand_files(dm.train_file, "data.train_file"):
            first, light_configs, n_read = sum(writer.counts), [], 0
            for src in dm._load_chunks(path, "data.train_file", shard_frames):
                n = len(src.configs)
                src = dm._unique(src, unique, offset=n_read, warn=False)
                n_read += n
                writer.append(src.configs, src.graphs)
                light_configs += [_light(c) for c in src.configs]
                if dm.drop_train_overlap:
                    seen.update(fingerprint(c) for c in src.configs)
            dm._warn_duplicates(path, n_read - len(light_configs), n_read)
            if not light_configs:
                continue
            pool_index[path] = first + np.arange(len(light_configs))
            pool.append(Source(path, light_configs, []))
            log.info("%s: %d frames -> %s", path, len(light_configs), out)
        light = {s.path: s.configs for s in pool}
        split = dm._split_frames if dm.split_by == "frame" else dm._split_files
        parts = split(pool, np.random.default_rng(dm.seed), n_valid_wanted=dm.valid_file is None)
        dm._warn_split_trajectories(pool, parts)

        extra = dm.explicit_sets()
        for part, (key, spec, files) in extra.items():
            parts[part] = {}
            for path in files:
                keep, indices, light[path] = [], [], []
                chunks = dm._load_chunks(path, key, shard_frames, require_forces=part == "valid")
                for src in chunks:
                    new = [i for i, c in enumerate(src.configs) if fingerprint(c) not in seen]
                    index = np.full(len(src.configs), -1, dtype=np.int64)
                    index[new] = writer.append(
                        [src.configs[i] for i in new], [src.graphs[i] for i in new]
                    ) + np.arange(len(new))
                    keep += [len(light[path]) + i for i in new]
                    indices.append(index)
                    light[path] += [_light(c) for c in src.configs]
                n = len(light[path])
                if len(keep) < n:
                    log.info(
                        "%s: dropped %d of %d configurations also in the training file(s)",
                        path,
                        n - len(keep),
                        n,
                    )
                pool_index[path] = np.concatenate(indices)
                parts[part][path] = keep
            if not any(parts[part].values()):
                raise DataError(f"{spec} ({key}): every configuration is also in data.train_file")
    finally:
        writer.close()

    def frames(part: str) -> tuple[list[Configuration], np.ndarray]:
        by_path = parts[part].items()
        configs = [light[p][i] for p, idx in by_path for i in idx]
        index = [pool_index[p][idx] for p, idx in by_path if len(idx)]
        return configs, np.concatenate(index) if index else np.zeros(0, dtype=np.int64)

    names = ["test"] if parts.get("test") and any(parts["test"].values()) else []
    names += list(dm.test_files)
    split_parts = {
        "train": "train",
        "valid": "valid",
        **{f"test/{n}": ("test" if f"test:{n}" not in parts else f"test:{n}") for n in names},
    }
    split_frames = {key: frames(part) for key, part in split_parts.items()}
    train_configs = split_frames["train"][0]
    if dm.z_table is None:
        zs = np.unique(np.concatenate([c.atomic_numbers for c in train_configs]))
        dm.z_table = AtomicNumberTable([int(z) for z in zs])
    else:
        check_elements(train_configs, dm.z_table, "data.train_file")
    for key, part in split_parts.items():
        if key != "train":
            where = "the validation split" if key == "valid" else "the held-out test split"
            if part in extra:
                where = f"{extra[part][1]} ({extra[part][0]})"
            check_elements(split_frames[key][0], dm.z_table, where)

    # config_type ids as AtomsDataModule assigns them: first appearance over train, valid, tests
    config_types: list[str] = []
    for configs, _ in split_frames.values():
        for c in configs:
            if c.config_type not in config_types:
                config_types.append(c.config_type)
    lut = np.array([config_types.index(t) for t in writer.config_types], dtype=np.int32)
    for i in range(len(writer.counts)):
        with h5py.File(out / shard_name(i), "r+") as f:
            f["config_type_id"][...] = lut[f["config_type_id"][()]]
    with h5py.File(out / "index.h5", "w") as f:
        for key, (_, index) in split_frames.items():
            f[key] = index

    # Statistics by AtomsDataModule's own method, over the training shards (float64).
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dm._train = ShardedFrames(out, writer.counts, split_frames["train"][1], dm.z_table)
        statistics = dm._statistics(train_configs)
    finally:
        torch.set_default_dtype(default_dtype)
    dm.test_names, dm.statistics = names, statistics
    dm.output_dir = str(out)
    dm._save_splits(parts)

    elements = set()
    for configs, _ in split_frames.values():
        for c in configs:
            elements.update(np.unique(c.atomic_numbers).tolist())
    meta = {
        "version": _VERSION,
        "r_max": dm.r_max,
        "statistics": statistics,
        "test_names": names,
        "config_types": config_types,
        "sizes": {k.split("/")[-1]: len(v[1]) for k, v in split_frames.items()},
        "elements": sorted(int(z) for z in elements),
        "shards": writer.counts,
        "source": {
            "name": dm.name,
            "train_file": dm.train_file,
            "split_by": dm.split_by,
            "seed": dm.seed,
            "frame_stride": dm.frame_stride,
        },
    }
    _write_json(out / "meta.json", meta)
    log.info(
        "wrote %s: %d shards, sizes %s, elements %s",
        out,
        len(writer.counts),
        meta["sizes"],
        [symbol(z) for z in meta["elements"]],
    )
    return meta


class HDF5DataModule(SplitLoaders, L.LightningDataModule):
    """Train/valid/test graphs from a directory written by `preprocess` (scripts/preprocess.py),
    read lazily by DataLoader workers: memory does not grow with the dataset.

    The split, E0s and statistics are those of preprocessing; `r_max` must equal its r_max.
    atomic_numbers: the model's z table (e.g. from a checkpoint) instead of the stored one; it
    must contain the dataset's elements. After `setup()`: `statistics`, `test_names`, `sizes`,
    `config_types` (as `AtomsDataModule`).
    """

    def __init__(
        self,
        path: str,
        name: str = "hdf5",
        r_max: float = 5.0,
        batch_size: int = 8,
        valid_batch_size: int | None = None,
        num_workers: int | None = 2,
        output_dir: str | None = None,
        atomic_numbers: Sequence[int] | None = None,
    ):
        super().__init__()
        self.path = Path(path)
        self.name = name
        self.r_max = float(r_max)
        self.batch_size = int(batch_size)
        self.valid_batch_size = int(valid_batch_size or batch_size)
        self.num_workers = None if num_workers is None else int(num_workers)  # None: per trainer
        self.output_dir = output_dir
        self.atomic_numbers = None if atomic_numbers is None else sorted(map(int, atomic_numbers))
        self.statistics: dict | None = None
        self.test_names: list[str] = []
        self.sizes: dict[str, int] = {}
        self.config_types: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        """Read meta.json and the split indices (once); the frames stay on disk."""
        if self.statistics is not None:
            return
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(
                f"data.path={self.path} is not a preprocessed dataset (no meta.json): "
                "run python scripts/preprocess.py data=<source> out=<dir> first"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != _VERSION:
            raise DataError(
                f"data.path={self.path} was preprocessed by another version of mace-grid "
                f"(format {meta.get('version')}, this one reads {_VERSION}): preprocess again"
            )
        if float(meta["r_max"]) != self.r_max:
            raise DataError(
                f"data.path={self.path} was preprocessed with r_max={meta['r_max']}, the model has "
                f"r_max={self.r_max}: preprocess again with model.r_max={self.r_max}"
            )
        zs = self.atomic_numbers or meta["statistics"]["atomic_numbers"]
        missing = sorted(set(meta["elements"]) - set(zs))
        if missing:
            raise DataError(
                f"elements {[symbol(z) for z in missing]} in data.path={self.path} are not among "
                f"the model's elements {[symbol(z) for z in zs]}"
            )
        z_table = AtomicNumberTable(list(zs))
        self.test_names = list(meta["test_names"])
        with h5py.File(self.path / "index.h5", "r") as f:
            index = {key: f[key][()] for key in ["train", "valid"]}
            index.update({name: f[f"test/{name}"][()] for name in self.test_names})
        self._train, self._valid, *self._tests = (
            ShardedFrames(self.path, meta["shards"], index[key], z_table)
            for key in ["train", "valid", *self.test_names]
        )
        self.sizes, self.config_types = meta["sizes"], meta["config_types"]
        self.statistics = meta["statistics"]
        if self.output_dir is not None:  # every DDP rank does this: write atomically
            splits = json.loads((self.path / "splits.json").read_text())
            record_splits(Path(self.output_dir) / "splits.json", splits)
        log.info(
            "data %s (%s): sizes %s, %d shards, read lazily",
            self.name,
            self.path,
            self.sizes,
            len(meta["shards"]),
        )
