"""scripts/export.py: a plain mace-torch model file that mace's MACECalculator loads and a
TorchScript model (e3nn.util.jit.compile), both agreeing with MaceGridCalculator, per backend."""

import runpy
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import best_checkpoint, one_thread, shared_root, trained_runs  # noqa: F401
from mace.calculators import MACECalculator
from mace.tools.torch_tools import default_dtype

from mace_grid import PROJECT_ROOT
from mace_grid.calculator import MaceGridCalculator
from mace_grid.data import build_loader
from mace_grid.data.io import read_atoms
from mace_grid.tp import BACKENDS


@pytest.mark.parametrize("tp", BACKENDS)
def test_export_loads_in_mace_and_compiles(
    tp: str, tmp_path_factory, tmp_path: Path, monkeypatch, capsys
) -> None:
    ckpt = best_checkpoint(trained_runs(tmp_path_factory)[tp])
    model_file, script_file = tmp_path / f"{tp}.model", tmp_path / f"{tp}.pt"
    argv = [f"ckpt_path={ckpt}", f"out={model_file}", "dtype=float64"]
    monkeypatch.setattr(sys, "argv", ["export.py", *argv, f"torchscript={script_file}"])
    runpy.run_path(str(PROJECT_ROOT / "scripts" / "export.py"), run_name="__main__")
    assert "TorchScript model" in capsys.readouterr().out
    # The export carries mace's own convolution (the run trained with conv=fast), so a tp=cg
    # model file needs no mace_grid to unpickle.
    with zipfile.ZipFile(model_file) as archive:
        pickled = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".pkl"))
    assert (b"mace_grid" in pickled) == (tp != "cg")

    test_file = str(shared_root(tmp_path_factory) / "demo" / "test.db")
    ours, theirs = (read_atoms(test_file, "test")[0] for _ in range(2))
    ours.calc = MaceGridCalculator(ckpt, dtype="float64")
    theirs.calc = MACECalculator(model_paths=str(model_file), device="cpu", default_dtype="float64")
    assert theirs.get_potential_energy() == pytest.approx(ours.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(
        theirs.get_forces(apply_constraint=False),
        ours.get_forces(apply_constraint=False),
        atol=1e-10,
    )
    np.testing.assert_allclose(theirs.get_stress(), ours.get_stress(), atol=1e-10)

    # TorchScript: standalone file, same energies and forces on a batch of structures.
    eager = torch.load(model_file, weights_only=False)
    scripted = torch.jit.load(str(script_file))
    atomic_numbers = [int(z) for z in eager.atomic_numbers]
    with default_dtype(torch.float64):
        batch = next(iter(build_loader(test_file, atomic_numbers, float(eager.r_max), 3)))
    ref = eager(batch.to_dict(), compute_force=True)
    out = scripted(batch.to_dict(), compute_force=True)
    assert ref["energy"][0].item() == pytest.approx(ours.get_potential_energy(), abs=1e-10)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["forces"], ref["forces"], rtol=0, atol=1e-10)
    assert ref["forces"].abs().max() > 1e-3
