"""Console scripts (``pip install -e .``): ``mace-grid-train`` etc. run the clone's ``train.py``
and ``scripts/*.py`` as ``python <script>`` would, with the same arguments."""

import runpy
import sys

from mace_grid import PROJECT_ROOT

SCRIPTS = {
    "train": "train.py",
    "evaluate": "scripts/evaluate.py",
    "export": "scripts/export.py",
    "md": "scripts/md.py",
    "preprocess": "scripts/preprocess.py",
    "compare": "scripts/compare_backends.py",
    "download-3bpa": "scripts/download_3bpa.py",
}


def _run(name: str) -> None:
    path = PROJECT_ROOT / SCRIPTS[name]
    sys.argv[0] = str(path)
    runpy.run_path(str(path), run_name="__main__")


def train() -> None:
    _run("train")


def evaluate() -> None:
    _run("evaluate")


def export() -> None:
    _run("export")


def md() -> None:
    _run("md")


def preprocess() -> None:
    _run("preprocess")


def compare() -> None:
    _run("compare")


def download_3bpa() -> None:
    _run("download-3bpa")
