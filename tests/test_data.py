"""Data package: readers, E0s, FixAtoms masks, splits, neighbour cache, errors, configs."""

import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import ase.io
import hydra
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from hydra import compose, initialize_config_dir

from mace_grid import PROJECT_ROOT
from mace_grid.data import AtomsDataModule, build_loader, generate_demo
from mace_grid.data.io import read_configs
from mace_grid.data.neighbours import compute_neighbours, file_neighbours
from mace_grid.errors import DataError

DATA = Path(os.environ.get("MACE_GRID_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()
BPA = DATA / "3bpa"
OC20 = DATA / "oc20_sample"
needs_3bpa = pytest.mark.skipif(not (BPA / "train_300K.xyz").is_file(), reason="no 3BPA data")
needs_oc20 = pytest.mark.skipif(not OC20.is_dir(), reason="no OC20 sample")
# 8 OC20 systems: fast, and two of them (1000100, 1000169) can be held out with seen elements.
OC20_SUBSET = [f"random1000{n}.traj" for n in (100, 120, 142, 156, 159, 163, 169, 194)]
LOG = "mace_grid.data"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_frames=30, n_test_frames=10, seed=0)


def demo_module(demo_dir: Path, tmp_path: Path, **kwargs) -> AtomsDataModule:
    args = dict(
        train_file=str(demo_dir / "train.db"),
        test_files={"test": str(demo_dir / "test.db")},
        e0s=str(demo_dir / "iso_atoms.xyz"),
        r_max=4.0,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "run"),
    )
    return AtomsDataModule(**(args | kwargs))


def compose_data(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.data_dir={DATA}",
                f"paths.work_dir={tmp_path / 'work'}",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )
    return hydra.utils.instantiate(cfg.data)


def one_line_error(fn) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


# -- demo (.db) ---------------------------------------------------------------------------------
def test_demo_generation_is_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    again = generate_demo(tmp_path, n_frames=30, n_test_frames=10, seed=0)
    a, b = (ase.io.read(d / "train.db", ":") for d in (demo_dir, again))
    assert [x.get_potential_energy() for x in a] == [x.get_potential_energy() for x in b]
    assert {len(x) for x in a} <= set(range(28, 34))
    assert len({x.get_chemical_formula() for x in a}) > 1  # compositions vary


def test_demo_db_batches_masks_and_e0s(demo_dir: Path, tmp_path: Path) -> None:
    dm = demo_module(demo_dir, tmp_path)
    dm.setup("fit")
    s = dm.statistics
    assert s["atomic_numbers"] == [1, 6, 7, 8, 29]
    iso = {
        int(a.numbers[0]): a.get_potential_energy()
        for a in ase.io.read(demo_dir / "iso_atoms.xyz", ":")
    }
    assert s["atomic_energies"] == pytest.approx([iso[z] for z in s["atomic_numbers"]])
    assert all(isinstance(v, (float, list)) for v in s.values())
    assert s["r_max"] == 4.0 and s["avg_num_neighbors"] > 5 and s["std"] > 0
    assert dm.test_names == ["test"] and dm.sizes == {"train": 27, "valid": 3, "test": 10}
    assert len(dm.test_dataloader()) == 1

    batch = next(iter(dm.train_dataloader()))
    n = batch.positions.shape[0]
    assert batch.energy.shape == (4,) and batch.forces.shape == (n, 3)
    assert batch.free_mask.shape == (n,) and batch.free_mask.dtype == torch.get_default_dtype()
    assert batch.free_mask.sum() == n - 4 * 9  # bottom Cu layer (9 atoms) fixed by FixAtoms
    assert batch.config_type_id.shape == (4,) and set(dm.config_types) == {"rattle", "md"}
    # raw forces (not zeroed by the constraint) are kept for the fixed atoms
    assert batch.forces[batch.free_mask == 0].abs().sum() > 0


def test_batch_feeds_scale_shift_mace(demo_dir: Path, tmp_path: Path) -> None:
    from e3nn import o3
    from mace.modules import RealAgnosticInteractionBlock, ScaleShiftMACE

    dm = demo_module(demo_dir, tmp_path)
    dm.setup("fit")
    s = dm.statistics
    model = ScaleShiftMACE(
        r_max=s["r_max"],
        num_bessel=4,
        num_polynomial_cutoff=5,
        max_ell=1,
        interaction_cls=RealAgnosticInteractionBlock,
        interaction_cls_first=RealAgnosticInteractionBlock,
        num_interactions=1,
        num_elements=len(s["atomic_numbers"]),
        hidden_irreps=o3.Irreps("4x0e"),
        MLP_irreps=o3.Irreps("4x0e"),
        atomic_energies=np.array(s["atomic_energies"]),
        avg_num_neighbors=s["avg_num_neighbors"],
        atomic_numbers=s["atomic_numbers"],
        correlation=1,
        gate=torch.nn.functional.silu,
        atomic_inter_scale=s["std"],
        atomic_inter_shift=s["mean"],
    )
    batch = next(iter(dm.val_dataloader()))
    out = model(batch.to_dict(), training=True, compute_force=True)
    assert out["energy"].shape == batch.energy.shape
    assert out["forces"].shape == batch.forces.shape


def test_demo_config_composes_and_generates_once(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    small = ["data.n_frames=20", "data.n_test_frames=10", "data.frames_per_system=5"]
    dm = compose_data(["data=demo", *small], tmp_path)
    dm.setup("fit")
    assert dm.sizes == {"train": 18, "valid": 2, "test": 10}
    assert (tmp_path / "work" / "demo" / "train.db").is_file()
    assert (tmp_path / "run" / "splits.json").is_file()
    caplog.clear()
    compose_data(["data=demo", *small], tmp_path).setup("fit")
    assert "generating EMT demo data" not in caplog.text


# -- splits, cache ------------------------------------------------------------------------------
def test_splits_are_seeded_and_saved(demo_dir: Path, tmp_path: Path) -> None:
    def splits(seed: int, run: str) -> dict:
        demo_module(demo_dir, tmp_path, seed=seed, output_dir=str(tmp_path / run)).setup()
        return json.loads((tmp_path / run / "splits.json").read_text())

    a, b, c = splits(1, "a"), splits(1, "b"), splits(2, "c")
    assert a == b and a["valid"] != c["valid"]
    train, valid = (a[k][str(demo_dir / "train.db")] for k in ("train", "valid"))
    assert sorted(train + valid) == list(range(30)) and len(valid) == 3


def test_neighbour_cache_reused_and_equal_to_fresh(demo_dir: Path, tmp_path: Path, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    path = str(demo_dir / "train.db")
    configs = read_configs(path, "data.train_file", "energy", "forces")
    first = file_neighbours(path, configs, 4.0, tmp_path)
    assert "reusing" not in caplog.text
    cached = file_neighbours(path, configs, 4.0, tmp_path)
    assert "reusing neighbour-list cache" in caplog.text
    for config, a, b in zip(configs, first, cached, strict=True):
        fresh = compute_neighbours(config, 4.0)
        for g in (a, b):
            np.testing.assert_array_equal(g.edge_index, fresh.edge_index)
            np.testing.assert_array_equal(g.unit_shifts, fresh.unit_shifts)
            np.testing.assert_allclose(g.shifts, fresh.shifts)
            np.testing.assert_allclose(g.cell, fresh.cell)
    # a second data module setup reuses it too and yields identical graphs
    caplog.clear()
    dm1 = demo_module(demo_dir, tmp_path, cache_dir=str(tmp_path))
    dm1.setup()
    assert caplog.text.count("reusing neighbour-list cache") == 1  # train.db; test.db is new
    dm2 = demo_module(demo_dir, tmp_path, cache_dir=str(tmp_path))
    dm2.setup()
    assert caplog.text.count("reusing neighbour-list cache") == 3
    b1, b2 = (next(iter(dm.val_dataloader())) for dm in (dm1, dm2))
    assert torch.equal(b1.edge_index, b2.edge_index) and torch.equal(b1.shifts, b2.shifts)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_recomputed(demo_dir: Path, tmp_path: Path, caplog, damage: str):
    caplog.set_level(logging.INFO, logger=LOG)
    path = str(demo_dir / "test.db")
    configs = read_configs(path, "data.test_files", "energy", "forces")
    good = file_neighbours(path, configs, 4.0, tmp_path)
    [cache] = tmp_path.glob("neighbours-*.h5")
    data = cache.read_bytes()
    cache.write_bytes(b"not hdf5" if damage == "garbage" else data[: len(data) // 2])
    again = file_neighbours(path, configs, 4.0, tmp_path)
    assert "ignoring unusable neighbour-list cache" in caplog.text
    assert all(np.array_equal(a.edge_index, b.edge_index) for a, b in zip(good, again, strict=True))
    caplog.clear()
    file_neighbours(path, configs, 4.0, tmp_path)  # rewritten: valid again
    assert "reusing neighbour-list cache" in caplog.text


def test_loader_for_other_file(demo_dir: Path, tmp_path: Path) -> None:
    dm = demo_module(demo_dir, tmp_path)
    dm.setup()
    loader = dm.loader_for(str(demo_dir / "test.db"), batch_size=5)
    assert sum(b.num_graphs for b in loader) == 10
    same = build_loader(str(demo_dir / "test.db"), dm.statistics["atomic_numbers"], 4.0, 5)
    assert torch.equal(next(iter(loader)).energy, next(iter(same)).energy)


def test_valid_and_test_sets_from_folders_and_globs(demo_dir: Path, tmp_path: Path) -> None:
    """valid_file and test_files take folders and globs like train_file (fairchem's sharded
    data.NNNN.aselmdb layout): every matching file's frames, in sorted order."""
    shards = tmp_path / "shards"
    shards.mkdir()
    frames = ase.io.read(demo_dir / "test.db", ":")
    ase.io.write(shards / "data.0000.extxyz", frames[:4])
    ase.io.write(shards / "data.0001.extxyz", frames[4:])
    dm = demo_module(
        demo_dir,
        tmp_path,
        valid_file=str(shards),
        test_files={"glob": str(shards / "data.*.extxyz"), "one": str(shards / "data.0001.extxyz")},
    )
    dm.setup()
    assert dm.sizes["valid"] == dm.sizes["glob"] == len(frames)
    assert dm.sizes["one"] == len(frames) - 4
    want = [a.get_potential_energy() for a in frames]
    got = [float(d.energy) for d in dm._valid]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    ase.io.write(shards / "data.0002.extxyz", ase.io.read(demo_dir / "train.db", ":"))
    dm = demo_module(demo_dir, tmp_path, train_file=str(shards / "data.0002.extxyz"))
    dm.test_files = {"all": str(shards)}
    with pytest.raises(DataError, match="data.0002.extxyz .data.test_files.all. is also a train"):
        dm.setup()


def test_frame_stride_keeps_every_kth_frame(demo_dir: Path, tmp_path: Path) -> None:
    full = demo_module(demo_dir, tmp_path / "full", valid_fraction=0.0)
    strided = demo_module(demo_dir, tmp_path / "strided", valid_fraction=0.0, frame_stride=3)
    full.setup()
    strided.setup()
    assert full.sizes["train"] == 30 and strided.sizes["train"] == 10
    assert strided.sizes["test"] == 4  # test files are strided too: frames 0, 3, 6, 9
    every = {round(float(e), 6) for b in full.train_dataloader() for e in b.energy}
    kept = {round(float(e), 6) for b in strided.train_dataloader() for e in b.energy}
    assert len(kept) == 10 and kept < every
    with pytest.raises(DataError, match="frame_stride"):
        demo_module(demo_dir, tmp_path, frame_stride=0)


# -- errors ------------------------------------------------------------------------------------
def test_missing_and_empty_files(demo_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.xyz"
    msg = one_line_error(lambda: demo_module(demo_dir, tmp_path, train_file=str(missing)).setup())
    assert str(missing) in msg and "data.train_file" in msg
    msg = one_line_error(
        lambda: demo_module(demo_dir, tmp_path, test_files={"x": str(missing)}).setup()
    )
    assert str(missing) in msg and "data.test_files.x" in msg
    msg = one_line_error(
        lambda: demo_module(demo_dir, tmp_path, train_file=str(tmp_path / "*.traj")).setup()
    )
    assert "data.train_file" in msg
    for suffix in (".xyz", ".traj", ".db"):
        empty = tmp_path / f"empty{suffix}"
        empty.touch()
        msg = one_line_error(
            lambda e=empty: demo_module(demo_dir, tmp_path, train_file=str(e)).setup()
        )
        assert str(empty) in msg and "empty" in msg


def _write(path: Path, frames: list[Atoms]) -> str:
    ase.io.write(path, frames, format="extxyz")
    return str(path)


def _frame(symbols: str, energy=None, forces=True) -> Atoms:
    atoms = Atoms(symbols)
    atoms.positions = np.arange(3 * len(atoms)).reshape(-1, 3) * 0.7
    if energy is not None or forces:
        f = np.zeros((len(atoms), 3)) if forces else None
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=f)
    return atoms


def test_file_without_energies_or_forces(demo_dir: Path, tmp_path: Path) -> None:
    no_energy = _write(tmp_path / "no_energy.xyz", [_frame("CO", energy=None)] * 2)
    msg = one_line_error(lambda: demo_module(demo_dir, tmp_path, train_file=no_energy).setup())
    assert no_energy in msg and "no energy" in msg and "energy_key" in msg
    no_forces = _write(tmp_path / "no_forces.xyz", [_frame("CO", energy=-1.0, forces=False)] * 2)
    msg = one_line_error(lambda: demo_module(demo_dir, tmp_path, train_file=no_forces).setup())
    assert no_forces in msg and "no forces" in msg and "forces_key" in msg


def test_info_and_arrays_keys(tmp_path: Path) -> None:
    atoms = _frame("CO", energy=None, forces=False)
    atoms.info["REF_energy"] = -3.0
    atoms.arrays["REF_forces"] = np.ones((2, 3))
    path = _write(tmp_path / "keys.xyz", [atoms])
    [config] = read_configs(path, "data.train_file", "REF_energy", "REF_forces")
    assert config.properties["energy"] == -3.0 and config.properties["forces"].sum() == 6


def test_unknown_element_in_test_set(demo_dir: Path, tmp_path: Path) -> None:
    odd = _write(tmp_path / "odd.xyz", [_frame("PtO", energy=-1.0)])
    msg = one_line_error(lambda: demo_module(demo_dir, tmp_path, test_files={"odd": odd}).setup())
    assert "element Pt" in msg and odd in msg


# -- 3BPA (extxyz) -------------------------------------------------------------------------------
@needs_3bpa
def test_3bpa_config_mixedT_without_train_overlap(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    dm = compose_data(["data=3bpa"], tmp_path)
    dm.setup("fit")
    assert dm.test_names == ["mixedT"]
    assert dm.sizes == {"train": 450, "valid": 50, "mixedT": 469}
    assert "dropped 31 of 500" in caplog.text
    s = dm.statistics
    assert s["atomic_numbers"] == [1, 6, 7, 8]
    assert s["atomic_energies"] == pytest.approx(
        [-13.587222780835477, -1029.4889999855063, -1484.9814568572233, -2041.9816003861047]
    )
    assert torch.all(next(iter(dm.train_dataloader())).free_mask == 1)


@needs_3bpa
def test_average_e0s_refuse_on_3bpa(tmp_path: Path) -> None:
    dm = AtomsDataModule(train_file=str(BPA / "train_300K.xyz"), e0s="average", r_max=3.0)
    msg = one_line_error(dm.setup)
    assert "average" in msg and "1 of 4" in msg


# -- OC20 (.traj) ------------------------------------------------------------------------------
@needs_oc20
def test_oc20_per_system_split(tmp_path: Path) -> None:
    files = [str(OC20 / f) for f in OC20_SUBSET]
    kwargs = dict(train_file=files, split_by="file", valid_fraction=0.125, test_fraction=0.125)
    dm = AtomsDataModule(**kwargs, e0s="min_norm", r_max=4.0, output_dir=str(tmp_path))
    dm.setup("fit")
    splits = json.loads((tmp_path / "splits.json").read_text())
    parts = [set(splits[k]) for k in ("train", "valid", "test")]
    assert sum(map(len, parts)) == len(files) and set.union(*parts) == set(files)
    assert len(parts[1]) == len(parts[2]) == 1  # whole systems, each in exactly one split
    assert dm.test_names == ["test"]
    assert set(dm.statistics["atomic_numbers"]) >= {1, 8, 79}
    # FixAtoms masks: free atoms per batch match the trajectories' constraints
    frames = [ase.io.read(f, 0) for f in files]
    n_fixed = {len(a): len(a.constraints[0].get_indices()) for a in frames}
    batch = next(iter(dm.test_dataloader()[0]))
    n = int(batch.ptr[1])
    assert int((batch.free_mask[:n] == 0).sum()) == n_fixed[n]
    # average E0s are undetermined: each trajectory has one composition
    msg = one_line_error(lambda: AtomsDataModule(**kwargs, e0s="average", r_max=4.0).setup())
    assert "data.e0s=average" in msg


@needs_oc20
@pytest.mark.slow
def test_oc20_config_full(tmp_path: Path) -> None:
    dm = compose_data(["data=oc20"], tmp_path)
    dm.setup("fit")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    parts = [set(splits[k]) for k in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [19, 2, 3] and len(set.union(*parts)) == 24


# -- download script ---------------------------------------------------------------------------
SCRIPT = PROJECT_ROOT / "scripts" / "download_3bpa.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_download_offline_message(tmp_path: Path) -> None:
    url = (tmp_path / "unreachable.tar.gz").as_uri()
    result = run_script("--url", url, "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "cannot download" in result.stderr


@needs_3bpa
def test_download_archive_checksums(tmp_path: Path) -> None:
    def archive(name: str, tamper: bool) -> str:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for f in ("train_300K.xyz", "train_mixedT.xyz", "iso_atoms.xyz"):
                tar.add(BPA / f, arcname=f"dataset_3BPA/{f}")
            if tamper:
                extra = tmp_path / "iso_atoms.xyz"
                extra.write_text("tampered\n")
                tar.add(extra, arcname="dataset_3BPA/iso_atoms.xyz")
        return str(path)

    out = tmp_path / "out"
    ok = run_script("--archive", archive("ok.tar.gz", False), "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert (out / "train_mixedT.xyz").read_bytes() == (BPA / "train_mixedT.xyz").read_bytes()
    bad = run_script("--archive", archive("bad.tar.gz", True), "--out", str(tmp_path / "bad"))
    assert bad.returncode != 0 and "checksum mismatch for iso_atoms.xyz" in bad.stderr
    assert not (tmp_path / "bad" / "iso_atoms.xyz").exists()
