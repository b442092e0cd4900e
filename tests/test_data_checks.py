"""Frames that would train a wrong model or crash (issue 21, data side): periodic frames without
a cell, labels of the wrong shape or type, cell/pbc-only differences taken for duplicates,
energy-only test sets (messages, preprocessing, plots), mace's isolated-atom E0 frames and the
frame stride's neighbour lists; bad input through the real CLI gives one `error:` line."""

import json
import logging
from pathlib import Path

import ase.io
import h5py
import matplotlib.image
import numpy as np
import pytest
import test_run_integrity
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from test_data import demo_module
from test_hdf5 import assert_same_data
from test_run_integrity import _energy_only, _runs, _xyz_args
from test_train_cli import _expect_one_line_error, _write_xyz

from mace_grid.compare import plot_front
from mace_grid.data import AtomsDataModule, HDF5DataModule, generate_demo, preprocess
from mace_grid.errors import DataError
from mace_grid.evaluate import parity_plot

LOG = "mace_grid.data"
cli = test_run_integrity.cli  # the fixture: scripts' __main__ in this process


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_frames=30, n_test_frames=10, seed=0)


def _cu(path: Path, n: int = 4) -> list[Atoms]:
    """`n` labelled, rattled 8-atom EMT Cu frames (periodic, 7.2 x 3.6 x 3.6 Å cell)."""
    return ase.io.read(_write_xyz(path, "Cu", n=n), index=":")


def _relabel(atoms: Atoms, energy: float | None = None, forces=None) -> None:
    energy = atoms.get_potential_energy() if energy is None else energy
    forces = atoms.get_forces() if forces is None else forces
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)


# -- periodic frames without a usable cell; close periodic images --------------------------------
@pytest.mark.parametrize("cell", ["zero", "parallel"])
def test_periodic_frame_without_a_cell_is_refused(cli, cell: str, tmp_path: Path) -> None:
    """mace would put such a frame in a 1 Å cube (hundreds of self-image neighbours) and train."""
    path = tmp_path / "cell.xyz"
    frames = _cu(path)
    atoms = frames[2]
    if cell == "zero":
        atoms.cell[:] = 0.0
    else:
        atoms.cell[1] = atoms.cell[0]
    ase.io.write(path, frames)
    proc = cli("train.py", *_xyz_args(tmp_path, path))
    assert proc.returncode == 2
    needles = ("cell is zero",) if cell == "zero" else ("is degenerate",)
    _expect_one_line_error(proc, str(path), "frame 2", "pbc=TTT", 'Lattice="', "pbc=", *needles)
    assert _runs(tmp_path) == []


def test_close_periodic_image_reports_the_real_distance(tmp_path: Path) -> None:
    atoms = Atoms("Cu2", positions=[[0.02, 1, 1], [9.99, 1, 1]], cell=[10, 10, 10], pbc=True)
    _relabel(atoms, -1.0, np.zeros((2, 3)))
    path = tmp_path / "image.xyz"
    ase.io.write(path, [atoms])
    with pytest.raises(DataError) as info:
        AtomsDataModule(train_file=str(path), valid_fraction=0.0, e0s={"Cu": 0.0}).setup()
    msg = str(info.value)
    assert "frame 0" in msg and "periodic image (cell shift" in msg
    assert "0.03 Å apart (in the cell 9.97 Å)" in msg


# -- labels of the wrong shape or type ------------------------------------------------------------
@pytest.mark.parametrize("case", ["forces [n, 2]", "forces [n - 1, 3] (.traj)", "text energy"])
def test_bad_labels_give_one_line_error(cli, case: str, tmp_path: Path) -> None:
    frames = _cu(tmp_path / "cu.xyz")
    extra = []
    if case == "text energy":
        for atoms in frames:
            atoms.info["comment"] = "relaxed"
        path = tmp_path / "labels.xyz"
        ase.io.write(path, frames)
        extra, needles = ["data.energy_key=comment"], ("frame 0", "'relaxed'", "data.energy_key")
    elif case == "forces [n, 2]":
        for atoms in frames:
            atoms.arrays["dft_forces"] = atoms.get_forces()
        frames[3].arrays["dft_forces"] = np.zeros((8, 2))  # kept out of ASE's own checks
        path = tmp_path / "labels.xyz"
        ase.io.write(path, frames)
        extra, needles = ["data.forces_key=dft_forces"], ("frame 3", "[8, 2]", "[8, 3]")
    else:
        _relabel(frames[3], forces=np.zeros((7, 3)))
        path = tmp_path / "labels.traj"
        ase.io.write(path, frames)
        needles = ("frame 3", "[7, 3]", "[8, 3]")
    proc = cli("train.py", *_xyz_args(tmp_path, path), *extra)
    assert proc.returncode == 2
    _expect_one_line_error(proc, str(path), *needles)
    assert _runs(tmp_path) == []


# -- duplicates ------------------------------------------------------------------------------------
def test_frames_differing_only_in_cell_or_pbc_are_not_duplicates(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    [atoms] = _cu(tmp_path / "cu.xyz", n=1)
    bigger, molecule = atoms.copy(), atoms.copy()
    bigger.cell[0] *= 1.5
    molecule.pbc = False
    for a in (bigger, molecule):
        _relabel(a, atoms.get_potential_energy(), atoms.get_forces())
    path = tmp_path / "cells.xyz"
    ase.io.write(path, [atoms, bigger, molecule, atoms])  # the last one is a real repeat
    dm = AtomsDataModule(train_file=str(path), valid_fraction=0.0, e0s={"Cu": 0.0}, r_max=4.0)
    dm.setup()
    assert dm.sizes["train"] == 3
    assert dm.duplicates == {str(path): [3]}
    assert "dropped 1 of 4" in caplog.text


# -- energy-only test sets -------------------------------------------------------------------------
def test_missing_forces_messages_say_what_the_file_holds(demo_dir: Path, tmp_path: Path) -> None:
    scan = str(_energy_only(tmp_path / "scan.xyz"))

    # A test file without any force label is energy-only whatever data.forces_key names.
    def dft_labels(source, target: Path, forces: bool = True) -> str:
        frames = ase.io.read(source, ":")
        for atoms in frames:
            if forces:
                atoms.arrays["dft_forces"] = atoms.get_forces()
            atoms.info["dft_energy"] = atoms.get_potential_energy()
            atoms.calc = None
        ase.io.write(target, frames)
        return str(target)

    relabelled = dft_labels(demo_dir / "train.db", tmp_path / "train.xyz")
    dft_scan = dft_labels(scan, tmp_path / "dft_scan.xyz", forces=False)
    dm = demo_module(
        demo_dir,
        tmp_path,
        train_file=relabelled,
        energy_key="dft_energy",
        forces_key="dft_forces",
        e0s=dict.fromkeys(["H", "C", "N", "O", "Cu"], 0.0),
        test_files={"scan": dft_scan},
    )
    dm.setup()
    assert dm.sizes["scan"] == 3
    assert all(float(d.forces_weight) == 0 for d in dm._tests[0])
    # Training needs forces: the file holds none (not "a wrong forces_key").
    with pytest.raises(DataError, match="no frame of the file has forces.*data.test_files"):
        demo_module(demo_dir, tmp_path, train_file=scan).setup()
    # A test file with forces in some frames only names a labelled frame.
    mixed = ase.io.read(demo_dir / "test.db", ":")
    mixed[1].calc = SinglePointCalculator(mixed[1], energy=mixed[1].get_potential_energy())
    ase.io.write(tmp_path / "mixed.xyz", mixed)
    with pytest.raises(DataError, match="frame 1 has no forces.*while frame 0 of the file has"):
        demo_module(demo_dir, tmp_path, test_files={"mixed": str(tmp_path / "mixed.xyz")}).setup()


def test_preprocess_keeps_energy_only_test_sets(demo_dir: Path, tmp_path: Path) -> None:
    scan = str(_energy_only(tmp_path / "scan.xyz"))
    kwargs = dict(test_files={"scan": scan, "test": str(demo_dir / "test.db")})
    # the demo's Cu-only E0s cover the scan; the scan is Cu
    memory = demo_module(demo_dir, tmp_path / "memory", **kwargs)
    memory.setup()
    preprocess(demo_module(demo_dir, tmp_path / "memory", **kwargs), tmp_path / "h5", 7)
    lazy = HDF5DataModule(tmp_path / "h5", r_max=4.0, num_workers=0, output_dir=tmp_path / "run")
    lazy.setup()
    assert_same_data(memory, lazy)  # forces_weight included
    scan_set = lazy._tests[lazy.test_names.index("scan")]
    assert [float(scan_set[i].forces_weight) for i in range(len(scan_set))] == [0.0] * 3


def test_failed_preprocess_leaves_no_partial_dataset(cli, demo_dir: Path, tmp_path: Path):
    gold = _write_xyz(tmp_path / "au.xyz", "Au")  # read after the training shards are written
    out = tmp_path / "h5"
    proc = cli(
        "scripts/preprocess.py",
        "data=demo",
        f"data.demo_dir={demo_dir}",
        "data.n_frames=30",
        "data.n_test_frames=10",
        f"+data.test_files.gold={gold}",
        f"paths.cache_dir={tmp_path}/cache",
        f"out={out}",
        "model.r_max=4.0",
    )
    assert proc.returncode == 2
    _expect_one_line_error(proc, "element Au", str(gold))
    assert not out.exists()


def test_energy_only_parity_plot_shows_the_path(tmp_path: Path) -> None:
    """A scan with a constant offset: one dot in a parity plot, a curve per frame beside it."""
    frames = []
    for i in range(6):
        atoms = Atoms("Cu2", positions=[[0, 0, 0], [2.0 + 0.1 * i, 0, 0]])
        atoms.info.update(
            config_type="Default", REF_energy=-1.0 + 0.01 * i, MACE_energy=4.0 + 0.011 * i
        )
        atoms.arrays["MACE_forces"] = np.zeros((2, 3))
        frames.append(atoms)
    parity_plot(frames, tmp_path / "scan.png", "scan")
    height, width, _ = matplotlib.image.imread(tmp_path / "scan.png").shape
    assert width > 1.8 * height  # two panels: parity and energy along the path


def test_study_plot_draws_energy_mae_for_an_energy_only_set(tmp_path: Path) -> None:
    rows = [
        {"tp": tp, "seed": 0, "test_set": name, "epoch_time_s": t, "e_mae": 2.0 * t, "f_mae": f}
        for tp, t in (("cg", 1.0), ("grid", 0.5))
        for name, f in (("test", 30.0 * t), ("scan", None))
    ]
    drawn = plot_front(rows, ["cg", "grid"], tmp_path / "front.png", "demo")
    assert drawn == {"test": "f_mae", "scan": "e_mae"}
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"


# -- mace's isolated-atom frames -------------------------------------------------------------------
def _with_isolated(path: Path, atoms: list[tuple[str, float]], n: int = 6) -> Path:
    frames = []
    for symbol, energy in atoms:
        iso = Atoms(symbol, positions=[[0, 0, 0]])
        iso.info.update(config_type="IsolatedAtom", energy=energy)
        frames.append(iso)
    ase.io.write(path, frames + _cu(path.with_suffix(".cu.xyz"), n=n))
    return path


def test_isolated_atom_frames_give_e0s_as_in_mace(cli, tmp_path: Path) -> None:
    path = _with_isolated(tmp_path / "train.xyz", [("Cu", -0.5)])
    dm = AtomsDataModule(train_file=str(path), valid_fraction=0.0, r_max=4.0)
    dm.setup()
    assert dm.statistics["atomic_energies"] == [-0.5]
    assert dm.sizes["train"] == 6  # the isolated atom is not trained on
    assert all(len(d.positions) == 8 for d in dm._train)
    # an explicit data.e0s wins; the frame is still left out of training
    dm = AtomsDataModule(train_file=str(path), valid_fraction=0.0, r_max=4.0, e0s={"Cu": 0.0})
    dm.setup()
    assert dm.statistics["atomic_energies"] == [0.0] and dm.sizes["train"] == 6
    # elsewhere (a test set, evaluate.py file=) such a frame is a structure with zero force
    copy = tmp_path / "copy.xyz"
    copy.write_bytes(path.read_bytes())
    dm = AtomsDataModule(train_file=str(path), test_files={"copy": str(copy)}, r_max=4.0)
    dm.setup()
    [iso] = dm._tests[0]  # the Cu frames are dropped: also in the training file
    assert iso.positions.shape == (1, 3) and float(iso.forces.abs().sum()) == 0
    # through the CLI, without data.e0s; an element without an isolated-atom frame is named
    args = [a for a in _xyz_args(tmp_path, path) if not a.startswith("data.e0s")]
    mixed = tmp_path / "mixed.xyz"
    frames = ase.io.read(path, ":") + ase.io.read(_write_xyz(tmp_path / "ag.xyz", "Ag", n=2), ":")
    ase.io.write(mixed, frames)
    proc = cli(
        "train.py",
        *[a for a in args if not a.startswith("data.train_file")],
        f"data.train_file={mixed}",
    )
    assert proc.returncode == 2
    _expect_one_line_error(proc, "IsolatedAtom frames for Cu but none for Ag", "data.e0s")
    assert _runs(tmp_path) == []
    proc = cli("train.py", *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run] = _runs(tmp_path)
    assert "E0s from the IsolatedAtom frames" in (run / "train.log").read_text()


# -- frame stride ----------------------------------------------------------------------------------
def test_frame_stride_builds_neighbour_lists_for_the_kept_frames_only(
    demo_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    dm = demo_module(demo_dir, tmp_path, frame_stride=3, valid_fraction=0.0, cache_dir=str(cache))
    dm.setup()
    counts = {}
    for path in cache.glob("neighbours-*.h5"):
        with h5py.File(path, "r") as f:
            counts[path.name] = len(f["n_atoms"])
    assert sorted(counts.values()) == [4, 10]  # test.db: 10 frames → 4; train.db: 30 → 10
    again = demo_module(
        demo_dir, tmp_path, frame_stride=3, valid_fraction=0.0, cache_dir=str(cache)
    )
    again.setup()
    assert len(list(cache.glob("neighbours-*.h5"))) == 2  # reused, not rebuilt
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert len(splits["train"][str(demo_dir / "train.db")]) == 10
