"""The real CLI (`python train.py`) on tiny generated EMT data: run, reload, resume, errors."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mace_grid import PROJECT_ROOT
from mace_grid.lit_module import MaceLitModule

TINY_MODEL = ["model=tiny"]  # conf/model/tiny.yaml

QUIET = ["callbacks.progress_bar=null"]


def tiny_demo(tmp: Path) -> list[str]:
    return [
        "data=demo",
        f"data.demo_dir={tmp}/demo",
        "data.n_frames=24",
        "data.n_test_frames=6",
        "data.frames_per_system=6",
        "data.batch_size=4",
        f"paths.cache_dir={tmp}/cache",
        *TINY_MODEL,
    ]


def train_cli(*overrides: str, check: bool = True, **popen) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "callbacks.progress_bar=null",
        *overrides,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, **popen)
    if check and proc.returncode != 0:
        pytest.fail(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def val_epochs(run: Path) -> list[int]:
    return [int(r["epoch"]) for r in metric_rows(run) if r.get("val/f_mae")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One 3-epoch run on tiny demo data, shared by the tests that inspect its outputs."""
    tmp = tmp_path_factory.mktemp("trained")
    run = tmp / "run"
    train_cli(*tiny_demo(tmp), "trainer.max_epochs=3", f"hydra.run.dir={run}", "optim.lr=0.005")
    return run


def test_run_writes_summary_and_metrics(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["tp"] == "cg" and summary["data"] == "demo"
    assert summary["epochs"] == 3
    assert len(summary["epoch_train_time_s"]) == 3
    assert all(t > 0 for t in summary["epoch_train_time_s"])
    assert summary["train_time_s"] >= sum(summary["epoch_train_time_s"])
    for part in ("initial_val", "val", "test"):
        metrics = summary[part] if part != "test" else summary["test"]["test"]
        assert set(metrics) == {"e_mae", "e_rmse", "f_mae", "f_rmse"}
        assert all(v > 0 for v in metrics.values())
    assert Path(summary["best_checkpoint"]).is_file()
    assert (trained / "splits.json").is_file()
    assert val_epochs(trained) == [0, 1, 2]


def test_training_lowers_the_loss(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["val"]["f_mae"] < summary["initial_val"]["f_mae"]
    losses = [float(r["train/loss"]) for r in metric_rows(trained) if r.get("train/loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_checkpoint_alone_rebuilds_the_model(trained: Path) -> None:
    summary = json.loads((trained / "summary.json").read_text())
    ckpt = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["run_config"]["tp"]["name"] == "cg"
    module = MaceLitModule.load_from_checkpoint(summary["best_checkpoint"], map_location="cpu")
    assert module.hparams.statistics["atomic_numbers"] == [1, 6, 7, 8, 29]
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(tensor, ckpt["state_dict"][name])


def test_kill_during_epoch_3_and_resume_logs_every_epoch_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        *QUIET,
        *tiny_demo(tmp_path),
        "trainer.max_epochs=5",
        f"hydra.run.dir={run}",
    ]
    proc = start_until_epoch(cmd, run, epoch=2, stdout=subprocess.DEVNULL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert val_epochs(run) == [0, 1, 2]
    record = {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")}

    train_cli(f"ckpt_path={run}/checkpoints/last.ckpt", "trainer.max_epochs=5")
    assert val_epochs(run) == [0, 1, 2, 3, 4]
    # The run's record is kept; the resume's command line is recorded beside it.
    assert {p.name: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")} == record
    [resume] = (run / ".hydra").glob("resume-*/overrides.yaml")
    assert "trainer.max_epochs=5" in resume.read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 5
    assert len(summary["epoch_train_time_s"]) == 5
    assert summary["initial_val"] is not None


def test_resume_refuses_to_change_the_run(tmp_path: Path, trained: Path) -> None:
    proc = train_cli(f"ckpt_path={trained}/checkpoints/last.ckpt", "tp=grid", check=False)
    assert proc.returncode == 2
    assert "would change its trained function: tp.name: 'cg' -> 'grid'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_logger_and_validation_every_second_epoch(tmp_path: Path) -> None:
    """logger=none drops the lr monitor (it needs a logger); with validation every 2nd epoch the
    LR scheduler steps on the epochs that have val/loss. Epochs count from 0 in the log line."""
    run = tmp_path / "run"
    args = ["logger=none", "trainer.check_val_every_n_epoch=2", "trainer.max_epochs=2"]
    proc = train_cli(*tiny_demo(tmp_path), *args, f"hydra.run.dir={run}", "threads=1")
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert not (run / "csv").exists()
    lines = [x for x in proc.stdout.splitlines() if "| train loss" in x]
    assert "epoch 0 (1/2 done)" in lines[0] and "val E MAE" not in lines[0]
    assert "epoch 1 (2/2 done)" in lines[1] and "val E MAE" in lines[1]


def test_multirun_goes_on_after_a_failing_member(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["data.batch_size=0,4", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}"]
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), "-m", *QUIET, *tiny_demo(tmp_path)]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: data.batch_size must be an integer >= 1" in proc.stderr
    assert "error: 1 of 2 members failed" in proc.stderr
    table = proc.stdout[proc.stdout.index("member  overrides") :].splitlines()
    assert "data.batch_size=0" in table[1] and "failed" in table[1]
    assert "data.batch_size=4" in table[2] and " ok " in table[2] and "val F MAE" in table[2]
    assert (sweep / "1" / "summary.json").is_file() and not (sweep / "0").exists()
    with open(sweep / "members.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["failed", "ok"]


@pytest.mark.parametrize(
    ("backend", "twins"),
    [
        ("tp=cg", ["conv=e3nn", "conv=fast"]),
        ("tp=gaunt", ["tp.options.method=fused", "tp.options.method=fft"]),
    ],
)
def test_twins_train_the_same_curve(tmp_path: Path, backend: str, twins: list[str]) -> None:
    """Exact twins (another convolution or Gaunt algorithm, the same function and weights)
    train the same validation curve from one seed, float64, 2 epochs: the study times them
    apart and shares the curve."""
    curves = []
    for i, twin in enumerate(twins):
        run = tmp_path / f"run{i}"
        args = [backend, twin, "dtype=float64", "trainer.max_epochs=2", "threads=1"]
        train_cli(*tiny_demo(tmp_path), *args, f"hydra.run.dir={run}")
        rows = [r for r in metric_rows(run) if r.get("val/f_mae")]
        curves.append([float(r[k]) for r in rows for k in ("val/e_mae", "val/f_mae")])
    assert len(curves[0]) == 4
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-9)


def start_until_epoch(cmd: list[str], run: Path, epoch: int, **popen) -> subprocess.Popen:
    """Start ``cmd`` (train.py, or a study training ``run``) and return once ``run`` has
    validated and checkpointed ``epoch``, still running (text mode, output piped)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, text=True, **popen)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpt = run / "checkpoints" / "last.ckpt"
        if ckpt.is_file() and epoch in val_epochs(run):
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"{cmd[1]} ended before it could be stopped"
    return proc


# train.py with faults injected. "epoch1": SIGTERM at the end of epoch 1's checkpointing, whose
# SystemExit is lost (as when the handler runs inside a finalizer, which Python only prints), so
# Lightning's loop stops on its own flag, and a logger whose "failed" finalize then raises (as a
# full disk would). "evaluation": SIGTERM when the final test starts, and again while the run
# says how to continue (a study's death signals its trainings once per exiting study thread).
_SIGTERM_DRIVER = """
import logging, os, runpy, signal, sys
from lightning.pytorch.callbacks import ModelCheckpoint
import mace_grid.cli
from mace_grid.loggers import ResumableCSVLogger
from mace_grid.lit_module import MaceLitModule

def then_sigterm(hook, when=lambda *args: True):
    def wrapped(*args):
        hook(*args)
        if when(*args):
            os.kill(os.getpid(), signal.SIGTERM)
    return wrapped

def finalize(self, status):
    raise OSError(28, "No space left on device")

def sigterm_at_warnings(record):
    if record.levelno >= logging.WARNING:
        os.kill(os.getpid(), signal.SIGTERM)
    return True

if sys.argv[1] == "epoch1":
    ModelCheckpoint.on_validation_end = then_sigterm(
        ModelCheckpoint.on_validation_end, lambda cb, trainer, module: trainer.current_epoch == 1
    )
    ResumableCSVLogger.finalize = finalize
    mace_grid.cli._terminate = lambda signum, frame: None
else:
    MaceLitModule.on_test_start = then_sigterm(MaceLitModule.on_test_start)
    logging.getLogger("mace_grid.train").addFilter(sigterm_at_warnings)
sys.argv = ["train.py", *sys.argv[2:]]
runpy.run_path("train.py", run_name="__main__")
"""


def _stop_by_sigterm(when: str, *overrides: str) -> str:
    """Run train.py under ``_SIGTERM_DRIVER``; assert the clean stop; its output."""
    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_DRIVER, when, "callbacks.progress_bar=null", *overrides],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "Traceback" not in out and "Error executing job" not in out, out[-3000:]
    return out


def test_sigterm_then_resume_continues_the_run_it_resumes(tmp_path: Path) -> None:
    """SIGTERM stops a run cleanly (exit 143) with the command that continues it, also when only
    Lightning's loop saw it and a logger then fails in the teardown (one line says so), and when
    it comes in the final evaluation and again while the run says so (a repeat is ignored); a
    plain resume restores every setting (trainer, callbacks), not the defaults; a resume's own
    change is logged and kept."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    settings = [
        "trainer.max_epochs=4",
        "callbacks.ema.decay=0.5",
        "callbacks.early_stopping.patience=9",
    ]
    first = [*tiny_demo(tmp_path), *settings, f"hydra.run.dir={run}", "threads=1"]
    out = _stop_by_sigterm("epoch1", *first)
    said = "Interrupted: resume from the last completed epoch with"
    assert f"{said}  python train.py ckpt_path={last}" in out, out[-3000:]
    assert "While stopping: OSError: [Errno 28] No space left on device" in out
    assert val_epochs(run) == [0, 1]

    # Same-valued run-defining overrides (as the study passes them) are no change.
    out = _stop_by_sigterm("evaluation", f"ckpt_path={last}", "tp=cg", "seed=123", "threads=1")
    assert "Training for up to 4 epochs" in out and "Resume changes" not in out
    said = "Interrupted after training, before the summary: evaluate the run with"
    assert f"{said}  python train.py ckpt_path={last}" in out, out[-3000:]
    assert val_epochs(run) == [0, 1, 2, 3] and not (run / "summary.json").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["run_config"]["callbacks"]["ema"]["decay"] == 0.5
    assert ckpt["run_config"]["callbacks"]["early_stopping"]["patience"] == 9

    proc = train_cli(f"ckpt_path={last}", "trainer.max_epochs=5", "threads=1")
    assert "Resume changes trainer.max_epochs: 4 -> 5" in proc.stdout
    assert val_epochs(run) == [0, 1, 2, 3, 4]
    proc = train_cli(f"ckpt_path={last}", "threads=1")  # the longer run is now the run's own
    assert "Training for up to 5 epochs" in proc.stdout
    assert json.loads((run / "summary.json").read_text())["epochs"] == 5


def test_resume_after_the_data_changed_is_refused(tmp_path: Path) -> None:
    data = _write_xyz(tmp_path / "train.xyz", "Cu", n=8)
    run = tmp_path / "run"
    common = [*TINY_MODEL, "data=xyz", f"data.train_file={data}", "data.batch_size=4"]
    train_cli(*common, "trainer.max_epochs=1", f"hydra.run.dir={run}", "threads=1")
    splits = (run / "splits.json").read_bytes()
    _write_xyz(data, "Cu", n=9)  # the training file changed on disk: one frame more
    proc = train_cli(f"ckpt_path={run}/checkpoints/last.ckpt", "threads=1", check=False)
    assert proc.returncode == 2
    _expect_one_line_error(proc, "train.xyz differs from the file the run trained on", "Restore")
    assert (run / "splits.json").read_bytes() == splits


def _write_xyz(path: Path, symbols: str, with_labels: bool = True, n: int = 3) -> Path:
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    frames = []
    for i in range(n):
        atoms = bulk(symbols, "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        atoms.rattle(0.05, seed=i)
        if with_labels:
            atoms.calc = EMT()
            atoms.calc = SinglePointCalculator(
                atoms, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
            )
        frames.append(atoms)
    write(path, frames)
    return path


def _expect_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.mark.parametrize(
    "case", ["missing file", "empty file", "no labels", "unknown element", "unknown option"]
)
def test_bad_input_gives_one_line_error(case: str, tmp_path: Path) -> None:
    good = _write_xyz(tmp_path / "cu.xyz", "Cu", n=6)
    args = ["data=xyz", "data.e0s={Cu: 0.0}", f"paths.cache_dir={tmp_path}/cache"]
    args += [f"hydra.run.dir={tmp_path}/run", *TINY_MODEL, "trainer.max_epochs=1"]
    if case == "missing file":
        proc = train_cli(*args, f"data.train_file={tmp_path}/nope.xyz", check=False)
        _expect_one_line_error(proc, "nope.xyz")
    elif case == "empty file":
        (tmp_path / "empty.xyz").write_text("")
        proc = train_cli(*args, f"data.train_file={tmp_path}/empty.xyz", check=False)
        _expect_one_line_error(proc, "empty.xyz")
    elif case == "no labels":
        bare = _write_xyz(tmp_path / "bare.xyz", "Cu", with_labels=False)
        proc = train_cli(*args, f"data.train_file={bare}", check=False)
        _expect_one_line_error(proc, "bare.xyz")
    elif case == "unknown element":
        gold = _write_xyz(tmp_path / "au.xyz", "Au")
        proc = train_cli(
            *args, f"data.train_file={good}", f"+data.test_files.gold={gold}", check=False
        )
        _expect_one_line_error(proc, "Au")
    else:
        proc = train_cli(*args, f"data.train_file={good}", "+model.n_layers=3", check=False)
        _expect_one_line_error(proc, "n_layers")
