"""scripts/evaluate.py: metrics, predictions and plots of a checkpoint trained in the session."""

import json
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
from _helpers import best_checkpoint, one_thread, run, shared_root, trained_runs  # noqa: F401

from mace_grid import PROJECT_ROOT
from mace_grid.cli import exit_on_user_error
from mace_grid.config import compose_config
from mace_grid.evaluate import evaluate


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    return trained_runs(tmp_path_factory)


def test_evaluate_cli_on_another_file(runs, tmp_path_factory, tmp_path: Path) -> None:
    """The grid checkpoint (trained on train.db) evaluated on test.db reproduces the test
    metrics train.py measured, and writes predictions, plots and per-element/-type errors."""
    summary = json.loads((runs["grid"] / "summary.json").read_text())
    test_file = shared_root(tmp_path_factory) / "demo" / "test.db"
    out = tmp_path / "eval"
    proc = run(
        [
            sys.executable,
            str(PROJECT_ROOT / "scripts" / "evaluate.py"),
            f"ckpt_path={best_checkpoint(runs['grid'])}",
            f"file={test_file}",
            f"hydra.run.dir={out}",
            "threads=1",
        ]
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["tp"] == "grid" and report["dtype"] == "float32"
    metrics = report["sets"]["test"]
    for key, value in summary["test"]["test"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-4), key
    assert metrics["n_structures"] == 6 and metrics["time_per_structure_ms"] > 0
    assert set(metrics["f_mae_per_element"]) <= {"H", "C", "N", "O", "Cu"}
    assert "Cu" in metrics["f_mae_per_element"]
    assert set(metrics["per_config_type"]) == {"rattle", "md"}
    assert "e_mae" in proc.stdout and "ms/structure" in proc.stdout

    frames = ase.io.read(out / "test_predictions.xyz", index=":")
    assert len(frames) == 6
    de = [(a.info["MACE_energy"] - a.info["REF_energy"]) / len(a) for a in frames]
    assert 1000 * np.mean(np.abs(de)) == pytest.approx(metrics["e_mae"], rel=1e-6)
    assert all(a.arrays["MACE_forces"].shape == (len(a), 3) for a in frames)
    assert frames[0].constraints, "FixAtoms of the slab's bottom layer is kept"
    png = out / "test_parity.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"


def _compose(*overrides: str):
    return compose_config("evaluate", overrides)


def test_data_group_and_default_sets_agree(runs, tmp_path_factory, tmp_path: Path) -> None:
    """data=demo (its test sets) and no file/data (the checkpoint's own data) give one set."""
    root = shared_root(tmp_path_factory)
    ckpt = best_checkpoint(runs["cg"])
    via_group = evaluate(
        _compose(
            f"ckpt_path={ckpt}",
            f"paths.output_dir={tmp_path}/a",
            "data=demo",
            f"data.demo_dir={root}/demo",
            "data.n_frames=12",
            "data.n_test_frames=6",
            "data.frames_per_system=6",
            f"paths.cache_dir={root}/cache",
        )
    )
    own = evaluate(_compose(f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/b"))
    assert list(via_group["sets"]) == list(own["sets"]) == ["test"]
    for key in ("e_mae", "f_mae", "f_rmse"):
        assert via_group["sets"]["test"][key] == pytest.approx(own["sets"]["test"][key])


def test_unknown_element_is_one_line_error(runs, tmp_path: Path, capsys) -> None:
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    gold = bulk("Au", "fcc", a=4.08, cubic=True)
    gold.calc = EMT()
    gold.calc = SinglePointCalculator(
        gold, energy=gold.get_potential_energy(), forces=gold.get_forces()
    )
    ase.io.write(tmp_path / "au.xyz", gold)
    cfg = _compose(
        f"ckpt_path={best_checkpoint(runs['grid'])}",
        f"file={tmp_path / 'au.xyz'}",
        f"paths.output_dir={tmp_path}/out",
        f"paths.cache_dir={tmp_path}/cache",
    )
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(evaluate)(cfg)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "element Au" in errors[0] and "au.xyz" in errors[0]


def _tampered(ckpt_path: str, out: Path, change) -> Path:
    """A copy of the checkpoint with ``change(extra_state)`` applied to every product block's
    stored function constants (``None`` deletes them, as in checkpoints from before them)."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    for key in [k for k in ckpt["state_dict"] if k.endswith("symmetric_contractions._extra_state")]:
        new = change(ckpt["state_dict"][key])
        if new is None:
            del ckpt["state_dict"][key]
        else:
            ckpt["state_dict"][key] = new
    torch.save(ckpt, out)
    return out


def _n_beta_plus_one(state: dict) -> dict:
    return state | {"constants": state["constants"] | {"n_beta": state["constants"]["n_beta"] + 1}}


@pytest.mark.parametrize(
    "change,needle",
    [(_n_beta_plus_one, "saved state's n_beta=4 differs from this code's n_beta=3"),
     (lambda state: None, "no function constants")],
)  # fmt: skip
def test_checkpoint_with_other_backend_constants_is_refused(
    runs, tmp_path: Path, capsys, change, needle
) -> None:
    ckpt = _tampered(best_checkpoint(runs["grid"]), tmp_path / "tampered.ckpt", change)
    cfg = _compose(f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/out")
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(evaluate)(cfg)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], errors


@pytest.mark.slow  # a whole train.py start-up (~40 s on a busy 2-core machine)
def test_resume_from_tampered_checkpoint_is_one_line_error(runs, tmp_path: Path) -> None:
    last = runs["grid"] / "checkpoints" / "last.ckpt"
    ckpt = _tampered(str(last), tmp_path / "last.ckpt", _n_beta_plus_one)
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "train.py"), f"ckpt_path={ckpt}"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(errors) == 1 and "n_beta=4" in errors[0], errors
