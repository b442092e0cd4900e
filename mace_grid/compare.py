"""Compare tp backends at an equal budget (logic of ``scripts/compare_backends.py``).

Each backend is trained by ``train.py`` in its own subprocess (same data, seed, model and epoch
count; early stopping off), one after the other, into ``<out_dir>/runs/<tp>``. Measured: time
per epoch (training steps only, ``summary.json``), fit and process wall-clock, peak RSS of the
process, inference time per test structure and test errors of the best checkpoint (via
:func:`mace_grid.evaluate.evaluate`). Writes ``compare.md``, ``compare.csv`` and
``f_mae_vs_time.png`` into ``out_dir``. A backend whose run dir holds the results of the
identical command is not retrained.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mace_grid import PROJECT_ROOT
from mace_grid.calculator import model_from_checkpoint, read_checkpoint
from mace_grid.config import compose_config
from mace_grid.errors import ConfigError, MaceGridError
from mace_grid.evaluate import evaluate
from mace_grid.model import count_parameters, product_expressivity
from mace_grid.tp import BACKENDS
from mace_grid.utils import atomic_write_text

log = logging.getLogger("mace_grid.compare")

COLUMNS = {
    "tp": "tp",
    "parameters": "parameters",
    "product_weights": "product-basis weights",
    "product_independent": "independent",
    "product_complete": "complete",
    "epochs": "epochs",
    "epoch_time_s": "s/epoch (median)",
    "speedup_vs_cg": "epoch speed-up vs cg",
    "train_time_s": "fit time (s)",
    "wall_time_s": "process wall (s)",
    "peak_rss_mb": "peak RSS (MB)",
    "inference_ms": "inference (ms/structure)",
    "e_mae": "E MAE (meV/atom)",
    "e_rmse": "E RMSE (meV/atom)",
    "f_mae": "F MAE (meV/Å)",
    "f_rmse": "F RMSE (meV/Å)",
}


@dataclass
class CompareArgs:
    """Own arguments of compare_backends.py; every other ``key=value`` goes to train.py."""

    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    epochs: int = 100
    out_dir: str | None = None  # default: results/<data>


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own arguments, train.py overrides)."""
    own_keys = set(CompareArgs.__dataclass_fields__)
    own = [a for a in argv if a.split("=", 1)[0] in own_keys]
    return own, [a for a in argv if a not in own]


def train_backend(tp: str, epochs: int, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Run train.py for one backend; return its resources record (also ``resources.json``)."""
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        f"tp={tp}",
        f"trainer.max_epochs={epochs}",
        "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]
    record_path = run_dir / "resources.json"
    if record_path.is_file() and (run_dir / "summary.json").is_file():
        record = json.loads(record_path.read_text())
        if record["command"][1:] == cmd[1:]:
            log.info("tp=%s: reusing the finished run in %s", tp, run_dir)
            return record
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{tp}.log"
    log.info("tp=%s: training (%s), log %s", tp, " ".join(cmd[2:]), log_path)
    start = time.perf_counter()
    with open(log_path, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all runs).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(empty log)"]
        raise MaceGridError(
            f"train.py tp={tp} exited with {proc.returncode} ({tail[0]}); see {log_path}"
        )
    record = {"command": cmd, "wall_time_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0}
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    return record


def evaluate_run(run_dir: Path, threads: int | None) -> dict[str, Any]:
    """``evaluate`` the run's best checkpoint on its test sets into ``<run_dir>/evaluate``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    overrides = [
        f"ckpt_path={summary['best_checkpoint']}",
        f"paths.output_dir={run_dir / 'evaluate'}",
    ]
    if threads is not None:
        overrides.append(f"threads={threads}")
    return evaluate(compose_config("evaluate", overrides))


def backend_row(tp: str, run_dir: Path, record: dict, report: dict) -> dict[str, Any]:
    """One table row: cost and test errors (first test set) of a finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = read_checkpoint(summary["best_checkpoint"])
    model, hp = model_from_checkpoint(ckpt), ckpt["hyper_parameters"]
    products = product_expressivity(model, hp["tp"], hp["model"]["correlation"])
    elements = len(hp["statistics"]["atomic_numbers"])
    copies = [(elements * sc.irreps_out[0].mul, e) for sc, e in products]  # (element, channel)
    test_name, test = next(iter(report["sets"].items()))
    return {
        "tp": tp,
        "parameters": count_parameters(model),
        "product_weights": sum(count_parameters(sc) for sc, _ in products),
        "product_independent": sum(n * e.independent for n, e in copies),
        "product_complete": sum(n * e.complete for n, e in copies),
        "epochs": summary["epochs"],
        "epoch_time_s": statistics.median(summary["epoch_train_time_s"]),
        "speedup_vs_cg": None,
        "train_time_s": summary["train_time_s"],
        "wall_time_s": record["wall_time_s"],
        "peak_rss_mb": record["peak_rss_mb"],
        "inference_ms": test["time_per_structure_ms"],
        "test_set": test_name,
        **{k: test[k] for k in ("e_mae", "e_rmse", "f_mae", "f_rmse")},
    }


def val_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(cumulative training-step seconds, validation force MAE) per epoch, initial model at 0."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/f_mae") and r.get("epoch")]
    f_mae = {int(r["epoch"]): float(r["val/f_mae"]) for r in rows}
    times, t = [0.0], 0.0
    values = [summary["initial_val"]["f_mae"]] if summary.get("initial_val") else [float("nan")]
    for epoch, seconds in enumerate(summary["epoch_train_time_s"]):
        t += seconds
        if epoch in f_mae:
            times.append(t)
            values.append(f_mae[epoch])
    return times, values


def plot_curves(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    for tp, (times, values) in curves.items():
        ax.plot(times, values, marker="o", ms=3, label=tp)
    ax.set(
        xlabel="training time (s, training steps only)",
        ylabel="validation force MAE (meV/Å)",
        yscale="log",
        title=title,
    )
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| " + " | ".join(COLUMNS.values()) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r[k]) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(args, overrides: list[str]) -> list[dict[str, Any]]:
    """Train, evaluate and tabulate every backend of ``args.backends``; return the rows."""
    unknown = [tp for tp in args.backends if tp not in BACKENDS]
    if unknown or not args.backends:
        raise ConfigError(f"backends={list(args.backends)}; choose among {list(BACKENDS)}")
    if args.epochs < 1:
        raise ConfigError(f"epochs={args.epochs} must be >= 1")
    data = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), "demo")
    threads = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("threads=")), None)
    out_dir = Path(args.out_dir or PROJECT_ROOT / "results" / data)
    backends = ",".join(args.backends)
    command = " ".join([f"backends=[{backends}]", f"epochs={args.epochs}", *overrides])
    records = {
        tp: train_backend(tp, args.epochs, overrides, out_dir / "runs" / tp) for tp in args.backends
    }
    if threads is not None:
        torch.set_num_threads(threads)
    rows, curves = [], {}
    for tp, record in records.items():
        run_dir = out_dir / "runs" / tp
        rows.append(backend_row(tp, run_dir, record, evaluate_run(run_dir, threads)))
        curves[tp] = val_curve(run_dir)
    cg = next((r for r in rows if r["tp"] == "cg"), None)
    for row in rows:
        if cg is not None:
            row["speedup_vs_cg"] = cg["epoch_time_s"] / row["epoch_time_s"]
    with open(out_dir / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"# tp backends on {data}: {args.epochs} epochs each\n\n"
        f"Command: `python scripts/compare_backends.py {command}`  \n"
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads for inference.  \n"
        "Product basis, summed over blocks, elements and channels: trainable weights, "
        "independent couplings they reach (rank of d(output)/d(weights)) and all equivariant "
        "polynomial maps of degree <= correlation (`mace_grid.tp.expressivity`).  \n"
        f"Errors: best checkpoint (EMA) on test set `{rows[0]['test_set']}`; "
        "time per epoch counts training steps only; inference = forward + forces.\n\n"
        "![validation force MAE vs training time](f_mae_vs_time.png)"
    )
    table = markdown(rows, header)
    atomic_write_text(out_dir / "compare.md", table)
    plot_curves(curves, out_dir / "f_mae_vs_time.png", f"{data}: validation force MAE")
    print(table + f"\nwritten to {out_dir}")
    return rows
