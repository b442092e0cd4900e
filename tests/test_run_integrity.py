"""A run never lies (issue 12), through the real CLI on tiny hand-written EMT files: bad frames
and key typos are refused with one `error:` line, duplicates and trajectory splits are reported,
resumes never rewrite the run's record, concurrent runs get their own directories, files respect
the umask, energy-only test sets are evaluated, and failed starts leave nothing behind."""

import json
import logging
import os
import runpy
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from test_train_cli import TINY_MODEL, _expect_one_line_error, _write_xyz

from mace_grid import PROJECT_ROOT
from mace_grid.config import compose_config
from mace_grid.data.io import read_configs
from mace_grid.data.neighbours import cache_path, file_neighbours
from mace_grid.errors import DataError
from mace_grid.utils import file_sha256


def _xyz_args(tmp: Path, train_file=None) -> list[str]:
    """train.py overrides for a 1-epoch tiny run on Cu files, writing under tmp/out/runs."""
    return [
        "data=xyz",
        *([f"data.train_file={train_file}"] if train_file is not None else []),
        "data.e0s={Cu: 0.0}",
        "data.batch_size=4",
        f"paths.cache_dir={tmp}/cache",
        f"paths.log_dir={tmp}/out",
        "trainer.max_epochs=1",
        "threads=1",
        *TINY_MODEL,
    ]


def _runs(tmp: Path) -> list[Path]:
    root = tmp / "out" / "runs"
    return sorted(root.iterdir()) if root.is_dir() else []


@pytest.fixture
def cli(capsys, monkeypatch):
    """``cli("train.py", *args)``: the script's ``__main__`` with these arguments, in this
    process (the same code path as ``python <script>``, without a new interpreter's start-up,
    which costs ~10-20 s on a busy machine); returns code, stdout and stderr."""
    root = logging.getLogger()

    def run(script: str, *args: str) -> subprocess.CompletedProcess:
        path = PROJECT_ROOT / script
        handlers, level = list(root.handlers), root.level
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        finally:  # Hydra configured logging for the job: give pytest its handlers back
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:], root.level = handlers, level
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def _energy_only(path: Path, n: int = 3) -> Path:
    """A lattice-expansion scan of EMT Cu with energies only (no forces), like a dihedral scan."""
    from ase.calculators.emt import EMT

    frames = ase.io.read(_write_xyz(path, "Cu", n=n), index=":")
    for i, atoms in enumerate(frames):
        atoms.set_cell(atoms.cell * (1.0 + 0.02 * (i + 1)), scale_atoms=True)
        atoms.calc = EMT()
        atoms.calc = SinglePointCalculator(atoms, energy=atoms.get_potential_energy())
    ase.io.write(path, frames)
    return path


# -- 1. bad frames -------------------------------------------------------------------------------
def _bad_file(path: Path, case: str) -> Path:
    """Four labelled Cu frames; frame 2 broken as `case` says."""
    frames = ase.io.read(_write_xyz(path, "Cu", n=4), index=":")
    atoms = frames[2]
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    if case == "nan energy":
        energy = float("nan")
    elif case == "nan force":
        forces[3, 1] = np.nan
    else:  # coincident atoms
        atoms.positions[5] = atoms.positions[1]
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    ase.io.write(path, frames)
    return path


@pytest.mark.parametrize("case", ["nan energy", "nan force", "coincident atoms"])
def test_bad_frame_is_refused_with_file_and_frame(cli, case: str, tmp_path: Path) -> None:
    bad = _bad_file(tmp_path / "bad.xyz", case)
    proc = cli("train.py", *_xyz_args(tmp_path, bad))
    assert proc.returncode == 2
    _expect_one_line_error(proc, str(bad), "frame 2")
    assert _runs(tmp_path) == [], "a failed start leaves no run directory"


def test_evaluate_refuses_a_nan_force(cli, trained_run: Path, tmp_path: Path) -> None:
    bad = _bad_file(tmp_path / "bad.xyz", "nan force")
    out = tmp_path / "eval"
    proc = cli(
        "scripts/evaluate.py",
        f"ckpt_path={_last(trained_run)}",
        f"file={bad}",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 2
    _expect_one_line_error(proc, str(bad), "frame 2", "forces")
    assert not out.exists()


def test_non_finite_loss_stops_without_a_best_model(cli, tmp_path: Path) -> None:
    good = _write_xyz(tmp_path / "cu.xyz", "Cu", n=8)
    proc = cli("train.py", *_xyz_args(tmp_path, good), "optim.lr=1e30")
    assert proc.returncode == 2
    _expect_one_line_error(proc, "non-finite training loss")
    [run] = _runs(tmp_path)
    assert not list(run.glob("checkpoints/*.ckpt"))
    assert not (run / "summary.json").exists()


# -- 2. key typos ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["DFT_energy", "no_such_key"])
def test_explicit_label_key_must_exist(cli, key: str, tmp_path: Path) -> None:
    """The file has dft_energy/dft_forces labels and calculator (other theory) labels."""
    frames = ase.io.read(_write_xyz(tmp_path / "multi.xyz", "Cu", n=6), index=":")
    for atoms in frames:
        atoms.info["dft_energy"] = atoms.get_potential_energy() + 1.0
        atoms.arrays["dft_forces"] = atoms.get_forces() * 1.1
    ase.io.write(tmp_path / "multi.xyz", frames)
    if key == "DFT_energy":  # command line through train.py
        args = _xyz_args(tmp_path, tmp_path / "multi.xyz")
        proc = cli("train.py", *args, f"data.energy_key={key}", "data.forces_key=dft_forces")
        assert proc.returncode == 2
        _expect_one_line_error(proc, "multi.xyz", "'DFT_energy'", "dft_energy")
        return
    with pytest.raises(DataError, match="no forces 'no_such_key'.*dft_forces"):
        read_configs(str(tmp_path / "multi.xyz"), "data.train_file", "dft_energy", key)
    [config] = read_configs(str(tmp_path / "multi.xyz"), "x", "dft_energy", "dft_forces")[:1]
    assert config.properties["energy"] == pytest.approx(frames[0].info["dft_energy"])


# -- 3, 5, 6, 8, 9: two runs started at once on a pool with duplicates ---------------------------
@pytest.fixture(scope="module")
def concurrent(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess], list[Path]]:
    """Two train.py runs started together (umask 002): training files a.xyz (6 frames) and
    b.xyz (a's 6 frames + 6 more), an energy-only test set; one epoch each."""
    tmp = tmp_path_factory.mktemp("concurrent")
    a = _write_xyz(tmp / "a.xyz", "Cu", n=6)
    b = _write_xyz(tmp / "b.xyz", "Cu", n=12)
    scan = _energy_only(tmp / "scan.xyz")
    args = _xyz_args(tmp, f"[{a},{b}]") + [f"data.test_files={{scan: {scan}}}", "data.seed=1"]
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *args]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.umask(0o002),
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return tmp, results, _runs(tmp)


@pytest.fixture(scope="module")
def trained_run(concurrent) -> Path:
    return concurrent[2][0]


def _last(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def test_runs_started_together_get_their_own_directories(concurrent) -> None:
    _, _, runs = concurrent
    assert len(runs) == 2
    for run in runs:
        assert json.loads((run / "summary.json").read_text())["epochs"] == 1
        assert len(list(run.glob("checkpoints/best-*.ckpt"))) == 1


def test_written_files_respect_the_umask(concurrent) -> None:
    tmp, _, runs = concurrent
    files = [runs[0] / "summary.json", runs[0] / "splits.json", *(tmp / "cache").glob("*.h5")]
    assert len(files) >= 5
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path
    assert not list((tmp / "cache").glob(".*.tmp"))


def test_duplicates_dropped_and_trajectory_split_reported(concurrent) -> None:
    _, _, runs = concurrent
    log = (runs[0] / "train.log").read_text()
    assert "dropped 6 of 12 configurations" in log and "b.xyz" in log
    assert "data.split_by=frame puts frames of the trajectory" in log
    assert "data.split_by=file" in log
    assert "energy from the calculator results" in log
    splits = json.loads((runs[0] / "splits.json").read_text())
    n_pool = sum(len(idx) for part in ("train", "valid") for idx in splits[part].values())
    assert n_pool == 12  # 18 frames read, 6 of them repeats
    assert list(splits["duplicates"].values()) == [[0, 1, 2, 3, 4, 5]]


def test_energy_only_test_set_gets_energy_metrics(concurrent) -> None:
    _, results, runs = concurrent
    scan = json.loads((runs[0] / "summary.json").read_text())["test"]["scan"]
    assert scan["e_mae"] > 0 and scan["e_rmse"] >= scan["e_mae"]
    assert scan["f_mae"] is None and scan["f_rmse"] is None
    assert "test scan" in results[0].stdout


def test_progress_per_epoch_and_learning_curve(concurrent) -> None:
    _, results, runs = concurrent
    for text in (results[0].stdout, (runs[0] / "train.log").read_text()):
        [line] = [x for x in text.splitlines() if "epoch 0 (1/1 done) | train loss" in x]
        for needle in ("val E MAE", "meV/atom", "F MAE", "meV/Å", "lr 1.00e-02", " s"):
            assert needle in line, line
    png = runs[0] / "learning_curve.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


# -- 4. resume never rewrites the run's record ----------------------------------------------------
def _record(run: Path) -> dict[str, bytes]:
    files = (run / ".hydra").rglob("*")
    return {str(p.relative_to(run)): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize("case", ["refused", "truncated checkpoint"])
def test_failed_resume_leaves_the_record_identical(cli, case: str, trained_run: Path) -> None:
    before = _record(trained_run)
    if case == "refused":
        proc = cli("train.py", f"ckpt_path={_last(trained_run)}", "tp=grid")
        _expect_one_line_error(proc, "ckpt_path resumes a run")
    else:
        truncated = trained_run / "checkpoints" / "truncated.ckpt"
        truncated.write_bytes(_last(trained_run).read_bytes()[:5000])
        try:
            proc = cli("train.py", f"ckpt_path={truncated}")
        finally:
            truncated.unlink()
        _expect_one_line_error(proc, "truncated.ckpt", "not a readable checkpoint")
    assert proc.returncode == 2
    assert _record(trained_run) == before


# -- one-line errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    ["garbage ckpt", "batch_size=0", "valid_fraction=1.5", "no train_file", "format", "directory"],
)
def test_train_errors_are_one_line_and_leave_no_run_dir(cli, case: str, tmp_path: Path) -> None:
    good = _write_xyz(tmp_path / "cu.xyz", "Cu", n=6)
    args = _xyz_args(tmp_path)
    needles = {
        "garbage ckpt": ("garbage.ckpt", "not a readable checkpoint"),
        "batch_size=0": ("data.batch_size",),
        "valid_fraction=1.5": ("data.valid_fraction", "1.5"),
        "no train_file": ("data.train_file",),
        "format": ("cu.foo", "extxyz", ".traj", ".db"),
        "directory": ("is a directory",),
    }[case]
    if case == "garbage ckpt":
        (tmp_path / "garbage.ckpt").write_text("not a checkpoint")
        args += [f"ckpt_path={tmp_path / 'garbage.ckpt'}", f"data.train_file={good}"]
    elif case in ("batch_size=0", "valid_fraction=1.5"):
        args = [a for a in args if not a.startswith("data.batch_size")]
        args += [f"data.{case}", f"data.train_file={good}"]
    elif case == "format":
        shutil.copy(good, tmp_path / "cu.foo")
        args.append(f"data.train_file={tmp_path / 'cu.foo'}")
    else:  # a folder is read as its data files: one without any is refused
        (tmp_path / "empty").mkdir()
        args.append(f"data.train_file={tmp_path / 'empty'}")
    proc = cli("train.py", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    _expect_one_line_error(proc, *needles)
    assert _runs(tmp_path) == []


def test_evaluate_errors_are_one_line(cli, trained_run: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "out"
    proc = cli("scripts/evaluate.py", f"paths.log_dir={log_dir}")
    assert proc.returncode == 2
    _expect_one_line_error(proc, "missing ckpt_path")
    assert not [p for p in log_dir.rglob("*") if p.is_file()], "no stray run directory"
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00" * 100)
    proc = cli(
        "scripts/evaluate.py", f"ckpt_path={tmp_path / 'garbage.ckpt'}", f"paths.log_dir={log_dir}"
    )
    assert proc.returncode == 2
    _expect_one_line_error(proc, "garbage.ckpt", "not a readable checkpoint")


def test_energy_only_file_is_evaluated(cli, trained_run: Path, tmp_path: Path) -> None:
    scan = _energy_only(tmp_path / "dimer_scan.xyz", n=4)
    out = tmp_path / "eval"
    proc = cli(
        "scripts/evaluate.py",
        f"ckpt_path={_last(trained_run)}",
        f"file={scan}",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())["sets"]["dimer_scan"]
    assert metrics["n_structures"] == 4 and metrics["e_mae"] > 0
    assert metrics["f_mae"] is None and metrics["f_mae_per_element"] == {}
    assert (out / "dimer_scan_parity.png").read_bytes()[:4] == b"\x89PNG"
    frames = ase.io.read(out / "dimer_scan_predictions.xyz", index=":")
    assert "REF_forces" not in frames[0].arrays and "MACE_forces" in frames[0].arrays


@pytest.mark.parametrize("case", ["export garbage", "export out=dir", "md index", "md element"])
def test_tool_errors_are_one_line(cli, case: str, trained_run: Path, tmp_path: Path) -> None:
    ckpt = _last(trained_run)
    if case == "export garbage":
        (tmp_path / "x.ckpt").write_text("garbage")
        proc = cli(
            "scripts/export.py", f"ckpt_path={tmp_path / 'x.ckpt'}", f"out={tmp_path}/m.model"
        )
        needles = ("x.ckpt", "not a readable checkpoint")
    elif case == "export out=dir":
        proc = cli("scripts/export.py", f"ckpt_path={ckpt}", f"out={tmp_path}")
        needles = ("is a directory",)
    elif case == "md index":
        cu = _write_xyz(tmp_path / "cu.xyz", "Cu", n=2)
        proc = cli("scripts/md.py", f"ckpt_path={ckpt}", f"file={cu}", "index=999", "steps=1")
        needles = ("index=999", "2 frame(s)")
    else:
        au = _write_xyz(tmp_path / "au.xyz", "Au", n=1)
        proc = cli("scripts/md.py", f"ckpt_path={ckpt}", f"file={au}", "steps=1")
        needles = ("Au", "model's elements")
    assert proc.returncode == 2
    _expect_one_line_error(proc, *needles)


# -- 7. dtype conventions ------------------------------------------------------------------------
def test_calculator_and_export_default_to_float64(cli, trained_run: Path, tmp_path: Path) -> None:
    import torch

    from mace_grid.calculator import MaceGridCalculator

    calc = MaceGridCalculator(_last(trained_run))
    assert next(calc.models[0].parameters()).dtype == torch.float64
    proc = cli("scripts/export.py", f"ckpt_path={_last(trained_run)}", f"out={tmp_path}/m.model")
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = torch.load(tmp_path / "m.model", weights_only=False)
    assert next(model.parameters()).dtype == torch.float64
    assert stat.S_IMODE((tmp_path / "m.model").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- cache files, discoverability ----------------------------------------------------------------
def test_orphan_of_a_killed_cache_writer_is_removed(tmp_path: Path) -> None:
    from mace_grid.utils import _HOST

    path = str(_write_xyz(tmp_path / "cu.xyz", "Cu", n=2))
    configs = read_configs(path, "x")
    target = cache_path(tmp_path / "cache", file_sha256(path), 4.0)
    target.parent.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = target.parent / f".{target.name}.{_HOST}-{dead.pid}.abcd.tmp"
    live = target.parent / f".{target.name}.{_HOST}-{os.getpid()}.abcd.tmp"
    orphan.touch()
    live.touch()
    file_neighbours(path, configs, 4.0, tmp_path / "cache")
    assert target.is_file() and not orphan.exists() and live.exists()


def test_suite_never_writes_into_the_clone_data_dir() -> None:
    cfg = compose_config("train")
    data = (PROJECT_ROOT / "data").resolve()
    for key in ("cache_dir", "work_dir"):
        assert data not in Path(cfg.paths[key]).resolve().parents, cfg.paths[key]


@pytest.mark.parametrize("script", ["export.py", "md.py", "compare_backends.py", "evaluate.py"])
def test_every_script_answers_help(cli, script: str) -> None:
    proc = cli(f"scripts/{script}", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ckpt_path" in proc.stdout or "backends" in proc.stdout
    if script == "evaluate.py":
        assert "tp:" not in proc.stdout and "trainer" not in proc.stdout


def test_console_scripts_point_at_the_entry_points() -> None:
    import importlib

    tomllib = pytest.importorskip("tomllib")

    scripts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"mace-grid-train", "mace-grid-evaluate", "mace-grid-export"} <= set(scripts)
    for target in scripts.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))
