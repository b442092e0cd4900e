"""A training step against the machine's limit: `mace_grid.tp.work.matmul_rate` and `limit_ratio`
on injected clocks and numbers, and the columns that ``scripts/benchmark_tp.py --model`` and
``scripts/profile_step.py`` write with them (tiny model, CPU; on a GPU also ``--device cuda``)."""

import csv
import importlib
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mace_grid import PROJECT_ROOT
from mace_grid.errors import ConfigError
from mace_grid.tp import work
from mace_grid.tp.work import count_work, limit_ratio, matmul_probe, matmul_rate, timing_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
STEP_COLUMNS = (
    "device",
    "step_ms",
    "step_matmul_gflop",
    "step_pointwise_m",
    "step_aten_ops",
    "matmul_gflop_s",
    "step_over_matmul_time",
)
TINY = ("--repeats", "1", "--threads", "1")


def fake_clock(monkeypatch, durations: list[float]) -> None:
    """``work.time.perf_counter`` gives a start and an end ``durations[i]`` later, pair by pair."""
    durations, stamps = iter(durations), []

    def perf_counter() -> float:
        if not stamps:
            stamps.extend([0.0, next(durations)])
        return stamps.pop(0)

    monkeypatch.setattr(work, "time", SimpleNamespace(perf_counter=perf_counter))


def test_matmul_rate_is_2n3_flops_over_the_median_time_per_product(monkeypatch) -> None:
    n = 16
    # warm-up, calibration (0.02 s per product: 3 products fill min_sample_s=0.05), 5 samples
    fake_clock(monkeypatch, [1.0, 0.02, 0.3, 0.9, 0.06, 0.09, 0.12])
    rate = matmul_rate(torch.device("cpu"), n=n, samples=5, min_sample_s=0.05)
    assert rate == pytest.approx(2 * n**3 / (0.12 / 3))  # median sample / products per sample
    fake_clock(monkeypatch, [1.0, 0.02, 0.3, 0.9, 0.06, 0.09, 0.12])
    counted = count_work(lambda: matmul_rate(torch.device("cpu"), n=n, min_sample_s=0.05))
    assert counted.matmul_flop == (1 + 1 + 5 * 3) * 2 * n**3  # it ran the products it divides by


def test_the_probe_that_benchmarks_interleave_does_the_flops_it_reports() -> None:
    product, flop = matmul_probe(torch.device("cpu"), torch.float64, n=16)
    assert flop == 2 * 16**3 and count_work(product).matmul_flop == flop
    assert product().dtype == torch.float64


def test_a_step_that_is_one_product_at_that_rate_is_at_the_limit(monkeypatch) -> None:
    n = 16
    fake_clock(monkeypatch, [1.0, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05])
    rate = matmul_rate(torch.device("cpu"), n=n, min_sample_s=0.05)
    a, b = torch.randn(n, n), torch.randn(n, n)
    step = count_work(lambda: a @ b)  # count_work and matmul_rate agree on 2 m k n
    assert limit_ratio(0.05, step.matmul_flop, rate) == pytest.approx(1.0)


def test_limit_ratio_is_step_time_over_matmul_time() -> None:
    # issue 20's grid+fast step: 5.7 GFLOP at 110 GFLOP/s take 51.8 ms; the step took 281 ms
    assert limit_ratio(0.281, 5.7e9, 110e9) == pytest.approx(0.281 / (5.7 / 110))
    assert limit_ratio(0.3, 6e9, 120e9) == pytest.approx(6.0)
    assert limit_ratio(0.3, 0, 120e9) == math.inf


def test_matmul_rate_measures_this_machine() -> None:
    rate = matmul_rate(torch.device("cpu"), n=64, samples=3, min_sample_s=0.001)
    assert math.isfinite(rate) and rate > 1e6  # any CPU does a 64^3 product at > 1 MFLOP/s


def test_timing_device_refuses_unknown_devices_in_one_line() -> None:
    assert timing_device("cpu") == torch.device("cpu")
    for name in ("tpu", "not a device"):
        with pytest.raises(ConfigError, match=f"--device {name}: choose cuda or cpu"):
            timing_device(name)


def script(name: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "scripts" / name)]


@NO_CUDA
@pytest.mark.parametrize("name", ["benchmark_tp", "profile_step"])
def test_cuda_without_a_gpu_is_one_line_error(name: str, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "scripts"))
    main = importlib.import_module(name).main
    with pytest.raises(SystemExit) as exit_:
        main(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "error: --device cuda but torch sees no CUDA device (a CPU build of torch, or no "
        "driver); install the CUDA build of torch, or run --device cpu"
    ]
    assert not (tmp_path / "out").exists()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_step_columns(row: dict, device: str) -> None:
    """The step's columns are there and agree with each other: step / matmul time is the step's
    time over its matmul GFLOP at the measured rate (to the CSV's rounding)."""
    assert set(STEP_COLUMNS) <= set(row) and row["device"] == device
    step_ms, gflop, rate = (
        float(row[k]) for k in ("step_ms", "step_matmul_gflop", "matmul_gflop_s")
    )
    assert gflop > 0 and rate > 0 and float(row["step_pointwise_m"]) > 0
    assert int(row["step_aten_ops"]) > 100
    expected = step_ms / 1e3 / (gflop / rate)
    assert float(row["step_over_matmul_time"]) == pytest.approx(expected, rel=0.02)


def run_benchmark_model(tmp_path: Path, device: str) -> list[dict]:
    cmd = [*script("benchmark_tp.py"), "--model", "--device", device, *TINY, "--warmup", "1"]
    cmd += ["--max-l", "1", "--channels", "8", "--nodes", "40", "--backends", "grid"]  # op
    cmd += ["--model-hidden-irreps", "4x0e+4x1o", "--model-molecules", "1"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step / matmul time" in proc.stdout
    (op,) = read_csv(tmp_path / "op.csv")  # the op section: the same ratio per block
    assert op["device"] == device and float(op["step_matmul_mflop"]) > 0
    expected = float(op["step_ms"]) / float(op["step_matmul_mflop"]) * float(op["matmul_gflop_s"])
    assert float(op["step_over_matmul_time"]) == pytest.approx(expected, rel=0.02)
    rows = read_csv(tmp_path / "model.csv")
    assert {(r["tp"], r["conv"]) for r in rows} == {
        (tp, conv) for tp in ("cg", "grid") for conv in ("e3nn", "fast")
    }
    for row in rows:
        assert float(row["speedup_vs_stock"]) > 0  # the columns it had before are kept
        check_step_columns(row, device)
    by = {(r["tp"], r["conv"]): float(r["step_matmul_gflop"]) for r in rows}
    # the same tp, no more matmuls with conv=fast (Y contracted with C once per edge, the
    # radial network once per bond: the edges of one molecule all pair, so less)
    assert 0.5 * by["cg", "e3nn"] < by["cg", "fast"] < by["cg", "e3nn"]
    return rows


def run_profile(tmp_path: Path, device: str) -> list[dict]:
    cmd = [*script("profile_step.py"), "--models", "benchmark", "--device", device, *TINY]
    cmd += ["--hidden-irreps", "4x0e+4x1o", "--molecules", "1", "--tps", "grid"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step / matmul time" in proc.stdout
    rows = read_csv(tmp_path / "profile.csv")
    for conv in ("e3nn", "fast"):
        sub = [r for r in rows if r["conv"] == conv]
        assert sum(float(r["share"]) for r in sub) == pytest.approx(1.0, abs=1e-3)
        assert len({r["step_ms"] for r in sub}) == 1  # one step's numbers on every family row
        check_step_columns(sub[0], device)
    return rows


def test_benchmark_model_writes_work_and_limit_columns(tmp_path: Path) -> None:
    run_benchmark_model(tmp_path, "cpu")


def test_profile_step_writes_work_and_limit_columns(tmp_path: Path) -> None:
    rows = run_profile(tmp_path, "cpu")
    assert all(r["cuda_ms"] == "" and r["cuda_share"] == "" for r in rows)


def test_benchmark_conv_times_every_variant_of_the_step_and_the_conv_alone() -> None:
    """scripts/benchmark_conv.py on a tiny model: all four model steps and the three kernels of
    the fed convolution alone (its messages in the linear's rows layout) run and are reported."""
    cmd = [*script("benchmark_conv.py"), "--hidden-irreps", "4x0e+4x1o", "--molecules", "1"]
    proc = subprocess.run([*cmd, "--repeats", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    conv_alone = proc.stdout.split("convolution alone")[1]
    for label in ("fast-plain", "fast-pytorch", "fast-cpp"):
        assert f"{label}: matmul" in conv_alone and f"{label}:" in proc.stdout.split("conv:")[0]


@CUDA
def test_benchmark_scripts_run_on_cuda(tmp_path: Path) -> None:
    run_benchmark_model(tmp_path / "model", "cuda")
    rows = run_profile(tmp_path / "profile", "cuda")
    for conv in ("e3nn", "fast"):
        sub = [r for r in rows if r["conv"] == conv]
        assert sum(float(r["cuda_share"]) for r in sub) == pytest.approx(1.0, abs=1e-3)
        conv_tp = next(r for r in sub if r["family"] == "conv TP")
        assert float(conv_tp["cuda_ms"]) > 0  # kernels charged to the family that launched them


FAULTS = """
import resource, sys, torch
from mace_grid.utils import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def faults(numel):  # minor page faults of allocating, writing and freeing a float32 tensor
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(numel).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults(64 << 20)  # 256 MiB
print(faults(60 << 20))  # 240 MiB: fits in the memory the first one freed
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_retain_freed_memory_stops_page_faults_of_a_reallocated_tensor() -> None:
    """By default a 240 MiB tensor allocated after a 256 MiB one was freed is mapped afresh (a
    fault per 4 KiB page); after ``retain_freed_memory`` it reuses the freed memory."""

    def second_allocation_faults(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    assert second_allocation_faults("default") > 30_000
    assert second_allocation_faults("retain") < 1_000
