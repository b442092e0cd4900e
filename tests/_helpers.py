"""Shared by the checkpoint-tool tests: tiny demo data and one tiny multirun over every backend
(``python train.py -m tp=<every backend>``), trained once per test session."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_cli import TINY_MODEL

from mace_grid import PROJECT_ROOT
from mace_grid.tp import BACKENDS

_SESSION: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Imported by test modules: one torch thread in-process, as tiny_args gives train.py."""
    with threads_set(1):
        yield


@contextlib.contextmanager
def threads_set(n: int):
    """torch's intra-op threads set to ``n`` inside the block (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def require_cpp(native) -> None:
    """Skips without a C++ compiler or ninja (what torch's cpp_extension builds with); with
    both, the C++ kernel of ``native`` (a kernel module's loader) must have been built."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
        pytest.skip("no C++ compiler or no ninja")
    assert native() is not None, "a compiler exists but the kernel did not build"


def shared_root(tmp_path_factory) -> Path:
    """Session directory holding the shared demo data, neighbour cache and trained runs."""
    root = tmp_path_factory.getbasetemp() / "checkpoint_tools"
    root.mkdir(exist_ok=True)
    return root


def tiny_args(root: Path) -> list[str]:
    """train.py overrides: 12 demo frames (3 steps per epoch), the TINY_MODEL, one thread
    (on a busy 2-core machine one torch thread is several times faster than two), quiet."""
    return [
        "data=demo",
        f"data.demo_dir={root}/demo",
        "data.n_frames=12",
        "data.n_test_frames=6",
        "data.frames_per_system=6",
        "data.batch_size=4",
        f"paths.cache_dir={root}/cache",
        "threads=1",
        "callbacks.progress_bar=null",
        *TINY_MODEL,
    ]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{cmd[1]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def trained_runs(tmp_path_factory) -> dict[str, Path]:
    """{tp: job dir} of a 4-epoch tiny multirun over every backend (EMA decay 0.5, so that the
    few steps move the saved weights); also the multirun under test in test_sweeps."""
    if "runs" not in _SESSION:
        root = shared_root(tmp_path_factory)
        sweep = root / "sweep"
        run(
            [
                sys.executable,
                str(PROJECT_ROOT / "train.py"),
                "-m",
                f"tp={','.join(BACKENDS)}",
                *tiny_args(root),
                "trainer.max_epochs=4",
                "callbacks.ema.decay=0.5",
                f"hydra.sweep.dir={sweep}",
            ]
        )
        runs = {}
        for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
            runs[json.loads((job / "summary.json").read_text())["tp"]] = job
        _SESSION["runs"] = runs
    return _SESSION["runs"]


def best_checkpoint(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["best_checkpoint"]
