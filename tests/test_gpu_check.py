"""scripts/gpu_check.py --device cpu: the GPU install check runs here as a dry run (so it cannot
rot); the CUDA-test section is pytest itself and is left to the full check. About 1 min of CPU
(3BPA statistics, one train.py run): marked slow."""

import subprocess
import sys
from pathlib import Path

import pytest

from mace_grid import PROJECT_ROOT


@pytest.mark.slow
def test_cpu_dry_run_passes_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_check.py"), "--device", "cpu"]
    cmd += ["--quick", "--backends", "grid", "--sections", "op", "model", "timing", "train"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "FAIL" not in report and "**all checks passed**" in report
    for line in ("PASS grid float32 forces", "PASS grid conv=e3nn float32 gradient"):
        assert line in report
    assert "| grid | PASS |" in report  # two epochs of train.py, sync count n/a on the CPU
    assert "| grid | " in report.split("## timing")[1]


def test_cuda_without_a_gpu_is_one_line_error(tmp_path: Path) -> None:
    if __import__("torch").cuda.is_available():
        return
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_check.py"), "--device", "cuda"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "r.md")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: --device cuda"), proc.stderr
    assert not (tmp_path / "r.md").exists()
