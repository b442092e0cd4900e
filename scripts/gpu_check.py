"""Verify a GPU install in one command (a few minutes on one GPU): run it after installing.

    python scripts/gpu_check.py [--device cuda] [--out results/gpu_check/<device>.md]
        [--backends cg gaunt grid grid_rank grid_chain] [--sections ...] [--quick]

Sections, each line PASS / FAIL / SKIP, written to one Markdown report (``--out``):
  tests    the CUDA-marked tests (``pytest -k "cuda or gpus"``: float64 equivariance, CPU
           agreement, derivatives; the 2-GPU DDP test needs two GPUs);
  op       every backend's contraction on the device against the CPU in float64, in float64
           (relative error < 1e-10) and float32 (< 1e-4): output, forces (dE/dx) and the
           weights' gradient of a force-training step (second derivatives);
  model    every backend x both convolutions (fast, e3nn) on a real 3BPA batch: energies,
           forces, loss and gradients of one training step, device against CPU float64
           (float64 < 1e-9, float32 < 1e-3 relative);
  timing   ms per force-training step of the op (64 channels, L_in 3, 2000 nodes) and of the
           whole model on a 3BPA batch, per backend, the device synchronised around each step;
           the model step's matmul GFLOP and its time over their time at the device's measured
           float32 matmul rate (`mace_grid.tp.work`); the whole-model benchmark at the 3BPA
           architecture is ``benchmark_tp.py --model --device cuda`` / ``profile_step.py
           --device cuda``, whose CUDA paths the ``tests`` section runs on a tiny model;
  train    a two-epoch ``train.py trainer=gpu data=3bpa`` per backend (finite validation
           errors, a checkpoint), with host-device synchronisations per training step counted
           (`mace_grid.callbacks.SyncCounter`, CUDA only).
Exit code 0 when nothing failed. ``--device cpu`` runs the same code on the CPU (a dry run that
keeps the script from rotting; ``--quick`` shrinks every size, the demo data replaces 3BPA in
``train``); the CPU numbers say nothing about a GPU.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import torch
from e3nn import o3

from mace_grid import PROJECT_ROOT, tp
from mace_grid.config import compose_config
from mace_grid.errors import ConfigError
from mace_grid.lit_module import MaceLitModule
from mace_grid.model import DTYPES
from mace_grid.tp.work import count_work, limit_ratio, matmul_rate, synchronize, timing_device
from mace_grid.utils import atomic_write_text

SECTIONS = ("tests", "op", "model", "timing", "train")
#: relative error (max |device - cpu| / max |cpu|) allowed against the CPU float64 reference
OP_TOL = {"float64": 1e-10, "float32": 1e-4}
MODEL_TOL = {"float64": 1e-9, "float32": 1e-3}
TINY_MODEL = ["model=tiny"]  # conf/model/tiny.yaml


class Report:
    """Lines of the report; ``check`` records PASS/FAIL of one comparison."""

    def __init__(self, device: str) -> None:
        self.lines: list[str] = []
        self.failed = 0
        self.device = device

    def section(self, title: str) -> None:
        self.add(f"\n## {title}\n")

    def add(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def check(self, what: str, error: float, tol: float) -> None:
        ok = error < tol
        self.failed += not ok
        self.add(f"- {'PASS' if ok else 'FAIL'} {what}: relative error {error:.1e} (< {tol:g})")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp(min=1e-300)
    return ((got - expected).abs().max() / scale).item() if expected.numel() else 0.0


def natural(mul: int, ls) -> o3.Irreps:
    return o3.Irreps("+".join(f"{mul}x{l}{'e' if l % 2 == 0 else 'o'}" for l in ls))


def op_step(module, x, attrs):
    """Output, forces and the weights' gradients of a force-training step (as in the tests)."""
    x = x.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x, attrs)
    coeff = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)
    energy = (y * coeff).sum()
    (forces,) = torch.autograd.grad(energy, x, create_graph=True)
    (energy + forces.square().sum()).backward()
    grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
    return y, forces, torch.cat(grads) if grads else y.new_zeros(0)


def build_op(name: str, channels: int, l_in: int, elements: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        module = tp.build(
            name, natural(channels, range(l_in + 1)), natural(channels, [0, 1, 2]), 3, elements
        )
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # non-trivial weights everywhere (some start at zero)
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return module.double()


def op_inputs(n: int, channels: int, l_in: int, elements: int = 2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, channels, (l_in + 1) ** 2, generator=gen, dtype=torch.float64)
    attrs = torch.nn.functional.one_hot(torch.arange(n) % elements, elements).double()
    return x, attrs


def check_op(report: Report, device: torch.device, backends: list[str], quick: bool) -> None:
    report.section("op: contraction on the device vs the CPU (float64 reference)")
    channels, n = (3, 7) if quick else (8, 40)
    for name in backends:
        module = build_op(name, channels, 3)
        x, attrs = op_inputs(n, channels, 3)
        expected = op_step(module, x, attrs)
        for dtype_name, tol in OP_TOL.items():
            dtype = DTYPES[dtype_name]
            on_device = build_op(name, channels, 3).to(device, dtype)
            got = op_step(on_device, x.to(device, dtype), attrs.to(device, dtype))
            for label, a, b in zip(
                ("output", "forces", "weight gradient"), got, expected, strict=True
            ):
                report.check(f"{name} {dtype_name} {label}", relative_error(a, b), tol)


def timed_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median ms of ``fn``, the device synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def load_batch(device_data: str, quick: bool, tmp: Path):
    """Statistics and one validation batch of 3BPA (float64), from ``$MACE_GRID_DATA``."""
    overrides = ["data=3bpa", f"paths.cache_dir={tmp}/cache", "data.valid_batch_size=10"]
    if quick:
        overrides += TINY_MODEL
    cfg = compose_config("train", overrides, output_dir=str(tmp / "data_run"))
    import hydra

    torch.set_default_dtype(torch.float64)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    return cfg, datamodule.statistics, batch


def lit_module(cfg, statistics_, name: str, conv: str) -> MaceLitModule:
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    tp_cfg = OmegaConf.to_container(compose_config("train", [f"tp={name}"]).tp, resolve=True)
    return MaceLitModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        tp=tp_cfg,
        statistics=statistics_,
        conv={"name": conv},
    ).double()


def model_step(module: MaceLitModule, batch, device: torch.device, dtype: torch.dtype):
    """Energies, forces, loss and the flattened gradient of one training step."""
    module = module.to(device, dtype)
    data = {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
        for k, v in batch.to_dict().items()
        if torch.is_tensor(v)
    }
    data["positions"].requires_grad_(True)
    module.zero_grad(set_to_none=True)
    pred = module.model(data, training=True, compute_force=True)
    from types import SimpleNamespace

    loss = module.loss(pred, SimpleNamespace(**data))
    module.backward(loss)  # as training takes it: to the parameters
    grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
    return pred["energy"], pred["forces"], loss, grads


def check_model(report, device, backends, quick, tmp) -> tuple:
    report.section("model: ScaleShiftMACE on a 3BPA batch, device vs CPU float64")
    cfg, stats, batch = load_batch(str(device), quick, tmp)
    report.add(f"batch: {batch.num_graphs} structures, {batch.num_nodes} atoms")
    for name in backends:
        for conv in ("fast", "e3nn"):
            reference = lit_module(cfg, stats, name, conv)
            expected = model_step(reference, batch, torch.device("cpu"), torch.float64)
            for dtype_name, tol in MODEL_TOL.items():
                module = lit_module(cfg, stats, name, conv)
                got = model_step(module, batch, device, DTYPES[dtype_name])
                labels = ("energies", "forces", "loss", "gradient")
                for label, a, b in zip(labels, got, expected, strict=True):
                    report.check(
                        f"{name} conv={conv} {dtype_name} {label}", relative_error(a, b), tol
                    )
    return cfg, stats, batch


def check_timing(report, device, backends, quick, model_input) -> None:
    report.section(f"timing: ms per force-training step on {device} (median, synchronised)")
    channels, n, repeats = (4, 50, 3) if quick else (64, 2000, 10)
    cfg, stats, batch = model_input
    rate = matmul_rate(device, torch.float32)
    report.add(f"op: {channels} channels, L_in 3, {n} nodes, float32; model: the 3BPA batch above")
    report.add(
        f"step / matmul time: the model step's time over its matmul flops (`mace_grid.tp.work`) "
        f"at the float32 matmul rate measured on {device} ({rate / 1e9:.1f} GFLOP/s); "
        "1 = arithmetic-bound"
    )
    report.add(
        "\n| tp | op step (ms) | model step (ms) | model matmul GFLOP | step / matmul time |"
        "\n|---|---|---|---|---|"
    )
    for name in backends:
        module = build_op(name, channels, 3).to(device, torch.float32)
        x, attrs = (t.to(device, torch.float32) for t in op_inputs(n, channels, 3))
        op_ms = timed_ms(lambda: op_step(module, x, attrs), device, repeats)  # noqa: B023
        step = functools.partial(
            model_step, lit_module(cfg, stats, name, "fast"), batch, device, torch.float32
        )
        model_ms = timed_ms(step, device, repeats)
        work = count_work(step)
        ratio = limit_ratio(model_ms / 1e3, work.matmul_flop, rate)
        report.add(
            f"| {name} | {op_ms:.2f} | {model_ms:.2f} | {work.matmul_flop / 1e9:.3f} "
            f"| {ratio:.1f} |"
        )


def check_tests(report: Report, device: torch.device) -> None:
    report.section('tests: pytest -k "cuda or gpus" (CUDA-marked tests)')
    files = [
        "tests/test_tp.py",
        "tests/test_tp_rank.py",
        "tests/test_conv.py",
        "tests/test_ddp.py",
        "tests/test_step_limit.py",  # benchmark_tp.py and profile_step.py --device cuda
    ]
    cmd = [sys.executable, "-m", "pytest", *files, "-k", "cuda or gpus", "-q", "-rs"]
    cmd += ["-p", "no:cacheprovider", "-m", "not slow or slow"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else proc.stderr.strip()[-300:]
    failed = proc.returncode not in (0, 5)
    ran = "passed" in last
    report.failed += failed
    word = "FAIL" if failed else ("PASS" if ran else "SKIP")
    skip = " (no CUDA device: skipped)" if device.type == "cpu" else ""
    report.add(f"- {word} {last}{skip}")
    if failed:
        report.add("```\n" + proc.stdout[-3000:] + "\n```")


def check_train(report, device, backends, quick, tmp) -> None:
    report.section("train: two epochs of train.py per backend")
    trainer = "gpu" if device.type == "cuda" else "cpu"
    if quick:
        data = [
            "data=demo",
            f"data.demo_dir={tmp}/demo",
            "data.n_frames=12",
            "data.n_test_frames=6",
            "data.frames_per_system=6",
            "data.batch_size=4",
            *TINY_MODEL,
        ]
    else:
        data = ["data=3bpa"]
    report.add(f"`train.py trainer={trainer} {' '.join(data)} trainer.max_epochs=2`\n")
    report.add("| tp | result | s/epoch | val F MAE (meV/Å) | host-device syncs per step |")
    report.add("|---|---|---|---|---|")
    for name in backends:
        run = tmp / "runs" / name
        cmd = [
            sys.executable,
            str(PROJECT_ROOT / "train.py"),
            f"trainer={trainer}",
            f"tp={name}",
            *data,
            "trainer.max_epochs=2",
            "threads=1" if device.type == "cpu" else "threads=null",
            f"paths.cache_dir={tmp}/cache",
            f"hydra.run.dir={run}",
            "callbacks.progress_bar=null",
            "+callbacks.sync_counter._target_=mace_grid.callbacks.SyncCounter",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT)
        summary_file = run / "summary.json"
        if proc.returncode != 0 or not summary_file.is_file():
            report.failed += 1
            report.add(f"| {name} | FAIL (exit {proc.returncode}) | | | |")
            report.add("```\n" + proc.stderr[-2000:] + "\n```")
            continue
        summary = json.loads(summary_file.read_text())
        f_mae = summary["val"]["f_mae"]
        ok = (
            summary["epochs"] == 2
            and f_mae is not None
            and Path(summary["best_checkpoint"]).is_file()
        )
        report.failed += not ok
        per_epoch = statistics.mean(summary["epoch_train_time_s"])
        counts = json.loads((run / "sync_counts.json").read_text())
        syncs = counts["per_step_median"]
        syncs = "n/a (CPU)" if syncs is None else f"{syncs:g} (max {counts['per_step_max']})"
        report.add(
            f"| {name} | {'PASS' if ok else 'FAIL'} | {per_epoch:.2f} | {f_mae:.1f} | {syncs} |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run)")
    p.add_argument("--backends", nargs="+", choices=list(tp.BACKENDS), default=list(tp.BACKENDS))
    p.add_argument("--quick", action="store_true", help="tiny sizes and demo data (dry runs)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", type=Path, default=None, help="report (results/gpu_check/<device>.md)")
    args = p.parse_args(argv)
    try:
        device = timing_device(args.device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or PROJECT_ROOT / "results" / "gpu_check" / f"{device.type}.md"
    report = Report(str(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report.add(f"# gpu_check on {name} (torch {torch.__version__})")
    given = " ".join(sys.argv[1:] if argv is None else argv)
    report.add(f"command: `python scripts/gpu_check.py {given}`")
    start = time.perf_counter()
    if device.type == "cpu":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_dir:
        tmp = Path(tmp_dir)
        todo = set(args.sections)
        if "tests" in todo:
            check_tests(report, device)
        if "op" in todo:
            check_op(report, device, args.backends, args.quick)
        if todo & {"model", "timing"}:
            model_input = check_model(report, device, args.backends, args.quick, tmp)
            if "timing" in todo:
                check_timing(report, device, args.backends, args.quick, model_input)
        if "train" in todo:
            check_train(report, device, args.backends, args.quick, tmp)
    verdict = "all checks passed" if not report.failed else f"{report.failed} check(s) FAILED"
    report.add(f"\n**{verdict}** in {time.perf_counter() - start:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(report.lines) + "\n")
    print(f"report: {out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
