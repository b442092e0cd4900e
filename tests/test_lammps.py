"""LAMMPS export: scripts/export.py, then mace's ``mace_create_lammps_model``; the TorchScript
wrapper it writes is loaded with torch alone (no mace_grid, mace or e3nn, as in LAMMPS) and called
as ``pair_style mace`` calls it — local and ghost atoms as one open cluster (zero shifts), the
energy of the local atoms, ghost forces folded onto their owners — and agrees with
MaceGridCalculator on the periodic structure in float64."""

import itertools
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import best_checkpoint, one_thread, shared_root, trained_runs  # noqa: F401
from ase import Atoms
from ase.neighborlist import neighbor_list
from mace.cli import create_lammps_model

from mace_grid import PROJECT_ROOT
from mace_grid.calculator import MaceGridCalculator
from mace_grid.data.io import read_atoms

# What LAMMPS gives the model: libtorch and the inputs; the Python packages are blocked.
CALL_WRAPPER = """
import sys
for name in ("mace_grid", "mace", "e3nn"):
    sys.modules[name] = None
import numpy as np, torch
wrapper = torch.jit.load(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
local_or_ghost = torch.from_numpy(inputs.pop("local_or_ghost"))
data = {k: torch.from_numpy(v) for k, v in inputs.items()}
data["positions"].requires_grad_(True)
out = wrapper(data, local_or_ghost, False)
np.savez(sys.argv[3], energy=out["total_energy_local"].detach().numpy(),
         forces=out["forces"].detach().numpy())
"""


def lammps_inputs(atoms: Atoms, atomic_numbers: list[int], r_max: float, layers: int):
    """pair_style mace's input for ``atoms``: its atoms (local, first) and every periodic image
    within layers × r_max of them (ghosts), edges within r_max, zero shifts and cell; and the
    index of the local atom each cluster atom images."""
    ghost_cut = layers * r_max
    cell = atoms.cell.array
    widths = atoms.cell.volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    reps = [int(np.ceil(ghost_cut / w)) if p else 0 for w, p in zip(widths, atoms.pbc, strict=True)]
    images = sorted(itertools.product(*(range(-r, r + 1) for r in reps)), key=np.any)  # 0 first
    positions = (atoms.positions[None] + (np.array(images) @ cell)[:, None]).reshape(-1, 3)
    owner = np.tile(np.arange(len(atoms)), len(images))
    distance = np.linalg.norm(positions[:, None] - atoms.positions[None], axis=-1).min(axis=1)
    keep = (np.arange(len(positions)) < len(atoms)) | (distance <= ghost_cut)
    positions, owner = positions[keep], owner[keep]
    sender, receiver = neighbor_list("ij", Atoms(positions=positions, pbc=False), r_max)
    n, n_edges = len(positions), len(sender)
    species = [atomic_numbers.index(z) for z in atoms.numbers[owner]]
    inputs = {
        "positions": positions,
        "edge_index": np.stack([sender, receiver]).astype(np.int64),
        "shifts": np.zeros((n_edges, 3)),
        "unit_shifts": np.zeros((n_edges, 3)),
        "cell": np.zeros((3, 3)),
        "node_attrs": np.eye(len(atomic_numbers))[species],
        "batch": np.zeros(n, dtype=np.int64),
        "ptr": np.array([0, n], dtype=np.int64),
        "local_or_ghost": (np.arange(n) < len(atoms)).astype(np.float64),
    }
    return inputs, owner


@pytest.mark.parametrize("tp", ["cg", "grid", "grid_chain"])
def test_lammps_wrapper_matches_calculator(
    tp: str, tmp_path_factory, tmp_path: Path, monkeypatch
) -> None:
    ckpt = best_checkpoint(trained_runs(tmp_path_factory)[tp])
    model_file = tmp_path / f"{tp}.model"
    # The README's commands: scripts/export.py, then mace_create_lammps_model.
    export = ["export.py", f"ckpt_path={ckpt}", f"out={model_file}", "dtype=float64"]
    monkeypatch.setattr(sys, "argv", export)
    runpy.run_path(str(PROJECT_ROOT / "scripts" / "export.py"), run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["mace_create_lammps_model", str(model_file)])
    create_lammps_model.main()
    wrapper = Path(f"{model_file}-lammps.pt")

    atoms = read_atoms(str(shared_root(tmp_path_factory) / "demo" / "test.db"), "test")[0]
    model = torch.load(model_file, weights_only=False)
    inputs, owner = lammps_inputs(
        atoms,
        [int(z) for z in model.atomic_numbers],
        float(model.r_max),
        int(model.num_interactions),
    )
    assert len(owner) > 3 * len(atoms)  # ghosts in every periodic direction
    np.savez(tmp_path / "inputs.npz", **inputs)
    subprocess.run(
        [sys.executable, "-c", CALL_WRAPPER, str(wrapper), "inputs.npz", "out.npz"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    out = np.load(tmp_path / "out.npz")
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, owner, out["forces"])  # LAMMPS's reverse communication

    atoms.calc = MaceGridCalculator(ckpt, dtype="float64")
    assert out["energy"][0] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
    reference = atoms.get_forces(apply_constraint=False)
    np.testing.assert_allclose(forces, reference, atol=1e-8)
    assert np.abs(reference).max() > 1e-3
