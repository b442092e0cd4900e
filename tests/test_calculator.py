"""MaceGridCalculator (float64): forces and stress are derivatives of its energy; NVE conserves
energy on the demo slab; scripts/md.py reports the drift."""

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import best_checkpoint, one_thread, shared_root, trained_runs  # noqa: F401

from mace_grid import PROJECT_ROOT
from mace_grid.calculator import MaceGridCalculator, run_md
from mace_grid.data.io import read_atoms
from mace_grid.errors import ConfigError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return best_checkpoint(trained_runs(tmp_path_factory)["grid"])


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    """A demo test frame: periodic Cu(111) slab with adsorbates, bottom layer fixed."""
    return read_atoms(str(shared_root(tmp_path_factory) / "demo" / "test.db"), "test")[0]


def test_forces_are_minus_the_energy_gradient(ckpt, slab) -> None:
    atoms = slab.copy()
    del atoms.constraints  # finite differences move every atom
    atoms.calc = MaceGridCalculator(ckpt, dtype="float64")
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1e-2, "forces too small for the comparison to mean anything"
    h, positions = 1e-4, atoms.get_positions()
    rng = np.random.default_rng(0)
    for i in rng.choice(len(atoms), size=4, replace=False):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                shifted = positions.copy()
                shifted[i, k] += sign * h
                atoms.set_positions(shifted)
                energies.append(atoms.get_potential_energy())
            atoms.set_positions(positions)
            assert forces[i, k] == pytest.approx(-(energies[0] - energies[1]) / (2 * h), abs=1e-7)


def test_stress_is_the_strain_derivative(ckpt, slab) -> None:
    atoms = slab.copy()
    atoms.calc = MaceGridCalculator(ckpt, dtype="float64")
    stress = atoms.get_stress(voigt=False)
    assert np.abs(stress).max() > 1e-5
    cell, volume, h = atoms.get_cell().array, atoms.get_volume(), 1e-5
    for i, j in ((0, 0), (2, 2), (0, 1), (1, 2)):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / (2 if i != j else 1)
            strain[j, i] += sign * h / 2 if i != j else 0
            strained = atoms.copy()
            strained.calc = atoms.calc
            strained.set_cell(cell @ strain, scale_atoms=True)
            energies.append(strained.get_potential_energy())
        fd = (energies[0] - energies[1]) / (2 * h) / volume
        assert stress[i, j] == pytest.approx(fd, abs=1e-7), (i, j)


def test_nve_energy_drift_is_small(ckpt, slab) -> None:
    calc = MaceGridCalculator(ckpt, dtype="float64")
    result = run_md(slab, calc, steps=100, timestep_fs=0.5, temperature_K=600.0, seed=1)
    # The potential energy moves (forces act) while the total energy stays put.
    assert result["potential_energy_std_meV_per_atom"] > 0.5
    assert result["max_deviation_meV_per_atom"] < 0.02 * result["potential_energy_std_meV_per_atom"]
    assert abs(result["drift_meV_per_atom_per_ps"]) < 0.5


def test_md_script(ckpt, tmp_path_factory, tmp_path: Path, monkeypatch, capsys) -> None:
    test_file = shared_root(tmp_path_factory) / "demo" / "test.db"
    out = tmp_path / "md.json"
    args = [f"ckpt_path={ckpt}", f"file={test_file}", "steps=10", f"out={out}"]
    args.append(f"trajectory={tmp_path / 'md.traj'}")
    monkeypatch.setattr(sys, "argv", ["md.py", *args])
    runpy.run_path(str(PROJECT_ROOT / "scripts" / "md.py"), run_name="__main__")
    assert "NVE drift" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert len(result["energy_per_atom_meV"]) == 11  # t = 0 and 10 steps
    assert (tmp_path / "md.traj").is_file()


@pytest.mark.parametrize(
    "option", [{"compile_mode": "default"}, {"enable_cueq": True}, {"enable_oeq": True}]
)
def test_stock_kernel_options_are_refused_for_gaunt_backends(ckpt, option) -> None:
    """mace would rebuild a stock contraction (and fail) for a tp=grid model: one clear line."""
    (key,) = option
    with pytest.raises(ConfigError, match=rf"{key}=.*tp=grid model.*tp=cg only") as err:
        MaceGridCalculator(ckpt, **option)
    assert "\n" not in str(err.value)
