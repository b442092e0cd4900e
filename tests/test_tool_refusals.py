"""Issue 21, the tools side: export/md/evaluate/calculator refuse what would destroy an input or
report a meaningless number; config values, unwritable places, Ctrl-C and a few messages give
one `error:` line (exit 2, nothing left on disk) through the real CLI."""

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import test_run_integrity
from _helpers import best_checkpoint, one_thread, shared_root, trained_runs  # noqa: F401
from ase.calculators.calculator import Calculator, all_changes
from test_run_integrity import _runs, _xyz_args
from test_train_cli import _expect_one_line_error, _write_xyz

from mace_grid import tp as tp_backends
from mace_grid.calculator import MaceGridCalculator, run_md
from mace_grid.data.io import read_atoms
from mace_grid.errors import DataError, DivergedError

cli = test_run_integrity.cli  # the scripts' __main__ in this process


@pytest.fixture(scope="module")
def grid_ckpt(tmp_path_factory) -> Path:
    return Path(best_checkpoint(trained_runs(tmp_path_factory)["grid"]))


@pytest.fixture(scope="module")
def slab(grid_ckpt, tmp_path_factory):
    """A demo test frame (the demo data are written by the training of `grid_ckpt`)."""
    return read_atoms(str(shared_root(tmp_path_factory) / "demo" / "test.db"), "test")[0]


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# -- item 4: an export never overwrites what it reads ---------------------------------------------
@pytest.mark.parametrize("case", ["out=ckpt", "torchscript=ckpt", "torchscript=out"])
def test_export_refuses_an_output_equal_to_an_input(cli, case, grid_ckpt, tmp_path) -> None:
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(grid_ckpt.read_bytes())
    out = tmp_path / "m.model"
    args = {
        "out=ckpt": [f"out={tmp_path}/./run.ckpt"],
        "torchscript=ckpt": [f"out={out}", f"torchscript={ckpt}"],
        "torchscript=out": [f"out={out}", f"torchscript={out}"],
    }[case]
    proc = cli("scripts/export.py", f"ckpt_path={ckpt}", *args)
    assert proc.returncode == 2
    key = case.split("=")[0]
    _expect_one_line_error(proc, f"{key}=", "another path")
    assert ckpt.read_bytes() == grid_ckpt.read_bytes()
    assert _files(tmp_path) == [ckpt], "nothing written"


# -- item 5: md.py refuses settings without a meaningful result -----------------------------------
@pytest.mark.parametrize(
    "arg, needle",
    [
        ("steps=0", "steps=0"),
        ("timestep_fs=0", "timestep_fs=0.0"),
        ("timestep_fs=-0.5", "timestep_fs=-0.5"),
        ("temperature_K=-10", "temperature_K=-10.0"),
        ("out=CKPT", "out="),
        ("trajectory=FILE", "trajectory="),
    ],
)
def test_md_refuses_bad_settings(cli, arg, needle, grid_ckpt, tmp_path) -> None:
    cu = _write_xyz(tmp_path / "cu.xyz", "Cu", n=1)
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(grid_ckpt.read_bytes())
    arg = arg.replace("CKPT", str(ckpt)).replace("FILE", str(cu))
    extra = [] if arg.startswith(("out=", "trajectory=")) else [f"out={tmp_path}/md.json"]
    proc = cli("scripts/md.py", f"ckpt_path={ckpt}", f"file={cu}", "steps=2", arg, *extra)
    assert proc.returncode == 2
    _expect_one_line_error(proc, needle)
    assert ckpt.read_bytes() == grid_ckpt.read_bytes()
    assert _files(tmp_path) == sorted([ckpt, cu]), "nothing written"


class _NaNCalculator(Calculator):
    """Energy NaN from the second call on, zero forces: a model that blows up mid-run."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls = getattr(self, "calls", 0) + 1
        energy = 0.0 if self.calls == 1 else float("nan")
        self.results = {"energy": energy, "forces": np.zeros((len(atoms), 3))}


def test_md_stops_at_a_non_finite_energy_without_a_drift(tmp_path) -> None:
    from ase.build import bulk

    traj = tmp_path / "md.traj"
    with pytest.raises(DivergedError, match="non-finite total energy.*no drift"):
        run_md(bulk("Cu", cubic=True), _NaNCalculator(), steps=5, trajectory=traj)
    assert _files(tmp_path) == [], "no partial trajectory"


# -- item 6: the calculator refuses overlapping atoms instead of returning NaN -------------------
@pytest.mark.parametrize("case", ["coincident", "close", "nan position"])
def test_calculator_refuses_overlapping_atoms(case, grid_ckpt, slab) -> None:
    atoms = slab.copy()
    atoms.calc = MaceGridCalculator(grid_ckpt)
    assert np.isfinite(atoms.get_potential_energy())
    if case == "nan position":
        atoms.positions[5, 0] = np.nan
        match = "non-finite"
    else:
        atoms.positions[5] = atoms.positions[1] + (0.0 if case == "coincident" else 0.05)
        match = "atoms 1 and 5 are .* Å apart, closer than min_distance"
    with pytest.raises(DataError, match=match):
        atoms.get_potential_energy()


# -- item 8: evaluate refuses an override that cannot apply to a checkpoint -----------------------
@pytest.mark.parametrize(
    "override, needles",
    [
        ("+tp=cg", ("tp=cg", "holds tp=grid")),
        ("+tp.options.rank=3", ("tp.options.rank=3", "holds tp=grid")),
        ("+model.r_max=3.0", ("model.r_max=3.0", "holds model.r_max=4.0")),
        ("+trainer.max_epochs=9", ("trainer.max_epochs=9", "holds trainer.max_epochs=4")),
    ],
)
def test_evaluate_refuses_an_override_for_the_checkpoint(
    cli, override, needles, grid_ckpt, tmp_path
) -> None:
    out = tmp_path / "eval"
    proc = cli("scripts/evaluate.py", f"ckpt_path={grid_ckpt}", override, f"hydra.run.dir={out}")
    assert proc.returncode == 2
    _expect_one_line_error(proc, *needles, "drop the override")
    assert not out.exists()


# -- tracebacks -> one line: config values checked before the data are read ----------------------
def _with(args: list[str], **values: str) -> list[str]:
    """``args`` with ``key=value`` replaced (Hydra refuses one key given twice)."""
    kept = [a for a in args if a.split("=", 1)[0] not in values]
    return kept + [f"{k}={v}" for k, v in values.items()]


@pytest.mark.parametrize(
    "values, needles",
    [
        ({"tp": "cg", "model.hidden_irreps": "8x0e+8x1e"}, ("1e is a pseudo-tensor", "8x0e+8x1o")),
        ({"tp": "grid", "model.hidden_irreps": "8x0o+8x1o"}, ("0o is a pseudo-tensor",)),
        ({"tp": "grid_rank", "tp.options.rank": "0"}, ("tp.options.rank", "got 0")),
        ({"tp": "grid_chain", "tp.options.rank": "-1"}, ("tp.options.rank", "got -1")),
        ({"tp": "grid_rank", "tp.options.rank": "two"}, ("tp.options.rank", "'two'")),
        ({"tp": "grid_chain", "tp.options.factors": "atom"}, ("tp.options.factors", "'atom'")),
        ({"tp": "gaunt", "tp.options.method": "fast"}, ("tp.options.method", "'fast'")),
        ({"tp": "grid", "+tp.options.rank": "2"}, ("unknown key(s) ['rank'] for tp=grid",)),
        (
            {"+trainer.limit_train_batches": "0"},
            ("trainer.limit_train_batches=0", "trains nothing"),
        ),
    ],
)
def test_bad_values_are_refused_before_the_data_are_read(cli, values, needles, tmp_path) -> None:
    good = _write_xyz(tmp_path / "cu.xyz", "Cu", n=6)
    proc = cli("train.py", *_with(_xyz_args(tmp_path, good), **values))
    assert proc.returncode == 2
    _expect_one_line_error(proc, *needles)
    assert _runs(tmp_path) == [], "no run directory"
    assert not (tmp_path / "cache").exists(), "no neighbour lists built"


def test_every_builder_option_has_a_check() -> None:
    for name, checks in tp_backends.OPTIONS.items():
        params = list(inspect.signature(tp_backends._BUILDERS[name]).parameters)[4:]
        assert sorted(checks) == sorted(params), name


# -- unwritable places ---------------------------------------------------------------------------
def test_run_dir_that_cannot_be_created_is_one_line(cli, grid_ckpt, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    good = _write_xyz(tmp_path / "cu.xyz", "Cu", n=6)
    for script, args in (
        ("train.py", [*_xyz_args(tmp_path, good), f"hydra.run.dir={blocker}/run"]),
        ("scripts/evaluate.py", [f"ckpt_path={grid_ckpt}", f"hydra.run.dir={blocker}/eval"]),
        ("train.py", ["-m", *_xyz_args(tmp_path, good), f"hydra.sweep.dir={blocker}/sweep"]),
    ):
        proc = cli(script, *args)
        assert proc.returncode == 2, (script, proc.stderr[-2000:])
        key = "hydra.sweep.dir=" if "-m" in args else "hydra.run.dir="
        _expect_one_line_error(proc, f"{blocker} is not a directory", key)
    assert _files(tmp_path) == sorted([blocker, good])


def test_evaluating_a_read_only_run_is_one_line(cli, monkeypatch, tmp_path) -> None:
    """A shared run (read-only to this user) is evaluated into <run>/evaluate/ by default."""
    run = tmp_path / "shared_run"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"never read")
    access = os.access  # as root, chmod would not stop a write: pretend the run is read-only
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: str(p) != str(run) and access(p, mode, **kw)
    )
    proc = cli("scripts/evaluate.py", f"ckpt_path={ckpt}")
    assert proc.returncode == 2
    _expect_one_line_error(proc, f"{run} is not writable", "hydra.run.dir=<dir>")
    assert sorted(p.name for p in run.rglob("*")) == [".hydra", "checkpoints", "last.ckpt"]


def test_unwritable_work_dir_names_mace_grid_work_dir(cli, monkeypatch, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MACE_GRID_WORK_DIR", str(blocker / "work"))
    args = ["data=demo", "data.n_frames=6", f"paths.log_dir={tmp_path}/out", "threads=1"]
    proc = cli("train.py", *args)
    assert proc.returncode == 2
    _expect_one_line_error(
        proc, f"cannot access {blocker}", "MACE_GRID_WORK_DIR=", "hydra.run.dir="
    )
    assert _runs(tmp_path) == []


# -- Ctrl-C on the study --------------------------------------------------------------------------
def test_ctrl_c_on_compare_says_rerun_resumes(cli, monkeypatch, tmp_path) -> None:
    import mace_grid.compare

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mace_grid.compare, "run_all", interrupted)
    proc = cli("scripts/compare_backends.py", "epochs=1", f"out_dir={tmp_path}/study")
    assert proc.returncode == 130
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert "rerun the same command to resume" in proc.stderr


# -- messages -------------------------------------------------------------------------------------
def test_compare_help_names_every_backend_as_the_default(cli) -> None:
    proc = cli("scripts/compare_backends.py", "--help")
    assert proc.returncode == 0
    assert "[cg,gaunt,grid]]" not in proc.stdout
    [line] = [x for x in proc.stdout.splitlines() if x.strip().startswith("backends=")]
    assert all(repr(name) in line for name in tp_backends.BACKENDS), line


def test_callbacks_none_announces_only_what_is_there(cli, tmp_path) -> None:
    good = _write_xyz(tmp_path / "cu.xyz", "Cu", n=8)
    args = [a for a in _xyz_args(tmp_path, good) if not a.startswith("callbacks.")]
    proc = cli("train.py", *args, "callbacks=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run] = _runs(tmp_path)
    log = (run / "train.log").read_text()
    assert "Evaluating last checkpoint" in log and "(trained weights)" in log, log[-2000:]
    assert "EMA" not in log and "best checkpoint" not in log
    assert "last checkpoint:" in proc.stdout and "best checkpoint:" not in proc.stdout
