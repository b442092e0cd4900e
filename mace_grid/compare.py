"""The backend study: every tp backend × every seed at one budget (``scripts/compare_backends.py``).

Each run is ``train.py`` in its own subprocess (same data, model and budget; early stopping off)
into ``<out_dir>/runs/<tp>/seed<seed>``, then :func:`mace_grid.evaluate.evaluate` of its best
(EMA) checkpoint; ``jobs`` runs go at a time, each with ``threads`` torch threads, queued seed
by seed so that backends alternate and machine drift hits all alike. The budget is ``epochs`` or
``budget_s`` seconds of training steps (:class:`mace_grid.callbacks.EpochTrainTimer`).

Resumable: a run's command is recorded (``resources.json``) when it starts and its results
(``summary.json``, ``evaluate/metrics.json``) when it ends; a finished run of the same command
is not trained again, an interrupted one (or a finished one given a longer budget) continues
from its ``last.ckpt`` as ``train.py ckpt_path=`` resumes it, in the same directory; a killed
study takes its trainings down with it (SIGTERM: they exit cleanly, checkpoints kept). The
tables are rebuilt from those files every time: ``<name>.md`` (mean ± std over seeds),
``<name>.csv`` (one row per (tp, seed, test set)) and the plots
``<name>_val_f_mae_vs_time.png`` and ``<name>_f_mae_vs_epoch_time.png``.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import json
import logging
import math
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mace_grid import PROJECT_ROOT
from mace_grid.calculator import model_from_checkpoint, read_checkpoint
from mace_grid.config import compose_config
from mace_grid.conv import CONVS
from mace_grid.errors import ConfigError, MaceGridError
from mace_grid.evaluate import evaluate
from mace_grid.model import count_parameters, product_expressivity
from mace_grid.tp import BACKENDS
from mace_grid.tp.gaunt import METHODS
from mace_grid.utils import atomic_path, atomic_write_text

log = logging.getLogger("mace_grid.compare")

# Keys train.py must not get from the command line: the study sets them per run.
STUDY_KEYS = {
    "tp": "backends=[…]",
    "seed": "seeds=[…]",
    "trainer.max_epochs": "epochs=…",
    "budget_s": "budget_s=… (as a study argument)",
    "hydra.run.dir": "out_dir=…",
}
DEFAULT_EPOCHS = 100
# Per-run CSV columns after tp, seed, test_set. Run-level values repeat on each test-set row.
RUN_COLUMNS = (
    "epochs",
    "train_step_time_s",
    "epoch_time_s",
    "fit_time_s",
    "wall_time_s",
    "peak_rss_mb",
    "parameters",
    "product_weights",
    "product_independent",
    "product_complete",
    "weights",
    "independent",
    "complete",
    "equal_epochs",
    "val_e_mae_equal_epochs",
    "val_f_mae_equal_epochs",
)
COST_TABLE = {
    "epochs": "epochs reached",
    "epoch_time_s": "s/epoch (training steps)",
    "speedup_vs_cg": "speed-up vs cg",
    "train_step_time_s": "training-step time (s)",
    "wall_time_s": "process wall (s)",
    "peak_rss_mb": "peak RSS (MB)",
    "parameters": "parameters",
    "product_weights": "product-basis weights",
    "product_independent": "independent",
    "product_complete": "complete",
    "weights": "per (element, channel): weights",
    "independent": "independent",
    "complete": "complete",
}
SET_TABLE = {
    "inference_ms": "inference (ms/structure)",
    "e_mae": "E MAE (meV/atom)",
    "e_rmse": "E RMSE (meV/atom)",
    "f_mae": "F MAE (meV/Å)",
    "f_rmse": "F RMSE (meV/Å)",
}
# OC20's S2EF metrics (`mace_grid.evaluate.oc20_metrics`), tabled for data=oc20*.
S2EF_TABLE = {
    "energy_mae_eV": "energy MAE (eV/structure)",
    "forces_cosine": "force cosine",
    "efwt": "EFwT",
}
# Per-test-set CSV columns: the set's size, then every tabled metric.
SET_COLUMNS = ("n_structures", *SET_TABLE, *S2EF_TABLE)
EQUAL_EPOCHS_TABLE = {
    "val_e_mae_equal_epochs": "val E MAE (meV/atom)",
    "val_f_mae_equal_epochs": "val F MAE (meV/Å)",
}
# (cumulative training-step seconds, validation force MAE) per validated epoch.
Curve = tuple[list[float], list[float]]


@dataclass
class CompareArgs:
    """Own arguments of compare_backends.py; every other ``key=value`` goes to train.py."""

    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Epoch budget (default 100); with budget_s a cap (default none).
    epochs: int | None = None
    # Seconds of training steps per run (EpochTrainTimer), the same for every backend.
    budget_s: float | None = None
    # Trainings at a time, each with train.py's threads= (default: CPUs // jobs).
    jobs: int = 1
    # Configurations to time, "<tp>+<conv>[+<gaunt method>]" (e.g. cg+e3nn = stock mace, cg+fast,
    # gaunt+fast+fft, grid+fast): s/epoch measured one at a time, apart from the trainings, and
    # combined with each function's validation curve (cg+e3nn is the stock reference).
    configs: list[str] = field(default_factory=list)
    # Epochs per timing run (the first is warm-up and not counted unless it is the only one).
    timing_epochs: int = 3
    # Equal training time T (timed seconds): each backend trains until its fastest timed
    # configuration covers T (at least `epochs`); needs configs.
    time_s: float | None = None
    # Only the timing pass: time `configs` and table them, train nothing (e.g. a width too
    # slow to train here; pass trainer.limit_train_batches=N to time N steps per epoch). Where
    # out_dir holds a study's curves (<name>_curves.csv), also the time to stock accuracy from
    # them on the new clocks (with the study's time_s): a re-timing without the runs.
    timing_only: bool = False
    # With time_s: after a re-timing (faster kernels, so T covers more epochs), false keeps
    # the epoch budget a backend's runs were started with instead of extending them (an exact
    # kernel changes time per epoch, not accuracy per epoch); its runs not yet started get the
    # same, and curves that then end before T are marked so in the tables.
    extend: bool = True
    # File stem of the table, CSV and plots in out_dir.
    name: str = "study"
    out_dir: str | None = None  # default: results/<data>


@dataclass(frozen=True)
class Run:
    """One training of the study: backend ``tp`` with ``seed``, in ``dir``."""

    tp: str
    seed: int
    dir: Path

    @property
    def log(self) -> Path:
        return self.dir.parent / f"seed{self.seed}.log"


STOCK = "cg+e3nn"  # mace-torch as users run it: its contraction and its e3nn convolution


@dataclass(frozen=True)
class Config:
    """A timed configuration: backend ``tp`` with convolution ``conv`` and (gaunt) ``method``.
    Configurations of one backend compute the same function (exact twins), so they share the
    backend's validation curve and differ only in seconds per epoch."""

    tp: str
    conv: str
    method: str | None = None

    @classmethod
    def parse(cls, text: str) -> Config:
        parts = text.split("+")
        tp, conv, method = (parts + [None, None])[:3] if len(parts) <= 3 else (None, None, None)
        if tp not in BACKENDS or conv not in CONVS or (method and tp != "gaunt"):
            raise ConfigError(
                f"configs: {text!r} is not <tp>+<conv>[+<method>] with tp in {list(BACKENDS)}, "
                f"conv in {list(CONVS)} and a method for gaunt only"
            )
        if method is not None and method not in METHODS:
            raise ConfigError(f"configs: {text!r}: gaunt's method is one of {list(METHODS)}")
        return cls(tp, conv, method)

    @property
    def name(self) -> str:
        return "+".join(p for p in (self.tp, self.conv, self.method) if p)

    def overrides(self) -> list[str]:
        method = [f"tp.options.method={self.method}"] if self.method else []
        return [f"tp={self.tp}", f"conv={self.conv}", *method]


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(own arguments, train.py overrides)."""
    own_keys = set(CompareArgs.__dataclass_fields__)
    own = [a for a in argv if a.split("=", 1)[0] in own_keys]
    return own, [a for a in argv if a not in own]


def _override(overrides: list[str], key: str) -> str | None:
    return next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), None)


def validate_args(args, overrides: list[str]) -> None:
    """Fail before anything runs, saying what to change."""
    unknown = [tp for tp in args.backends if tp not in BACKENDS]
    if unknown or not args.backends or len(set(args.backends)) < len(args.backends):
        raise ConfigError(f"backends={list(args.backends)}; choose among {list(BACKENDS)}")
    if not args.seeds or len(set(args.seeds)) < len(args.seeds):
        raise ConfigError(f"seeds={list(args.seeds)} must be a non-empty list of distinct seeds")
    if args.epochs is not None and args.epochs < 1:
        raise ConfigError(f"epochs={args.epochs} must be >= 1")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ConfigError(f"budget_s={args.budget_s} must be a positive number of seconds")
    if args.jobs < 1:
        raise ConfigError(f"jobs={args.jobs} must be >= 1")
    configs = [Config.parse(c) for c in args.configs]
    missing = sorted({c.tp for c in configs} - set(args.backends))
    if missing:
        raise ConfigError(f"configs time backends {missing}: add them to backends=[…]")
    if args.timing_epochs < 1:
        raise ConfigError(f"timing_epochs={args.timing_epochs} must be >= 1")
    if args.timing_only and not configs:
        raise ConfigError("timing_only=true needs configs=[…] to time")
    if args.time_s is not None and (args.time_s <= 0 or not configs):
        raise ConfigError(f"time_s={args.time_s} needs configs=[…] and a positive T in seconds")
    if not args.extend and args.time_s is None:
        raise ConfigError("extend=false only applies with time_s (equal training time T)")
    if configs and any(o.split("=", 1)[0] in ("conv", "tp.options.method") for o in overrides):
        raise ConfigError("configs=[…] sets conv and gaunt's method; drop conv=/tp.options.method=")
    for key, instead in STUDY_KEYS.items():
        if any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides):
            raise ConfigError(f"the study sets {key} for each run; give {instead} instead")


def train_command(run: Run, args, overrides: list[str], epochs: int | None = None) -> list[str]:
    """train.py for one run of the study (``epochs``: instead of ``args.epochs``)."""
    epochs = epochs or args.epochs
    if args.budget_s is None:
        budget = [f"trainer.max_epochs={epochs or DEFAULT_EPOCHS}"]
    else:  # stop at the budget, even inside the first epoch
        cap = epochs if epochs is not None else -1
        budget = [f"budget_s={args.budget_s}", f"trainer.max_epochs={cap}", "trainer.min_epochs=0"]
    # At equal time T each configuration stops at another epoch: keep every epoch's weights.
    keep = (
        []
        if args.time_s is None
        else [
            "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.model_checkpoint.filename='epoch{epoch:03d}'",
        ]
    )
    return [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        f"tp={run.tp}",
        f"seed={run.seed}",
        *budget,
        "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
        *keep,
        *overrides,
        f"hydra.run.dir={run.dir}",
    ]


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def gpu_slots(jobs: int, overrides: list[str], gpus: int) -> queue.Queue | None:
    """For ``trainer=gpu`` with ``jobs`` > 1: one GPU index per concurrent run, round-robin over
    the ``gpus`` visible ones (a run takes one, `_run_logged`, and gives it back), so parallel runs
    don't all land on cuda:0. None otherwise (CUDA_VISIBLE_DEVICES left as it is)."""
    if jobs < 2 or _override(overrides, "trainer") != "gpu" or gpus < 1:
        return None
    slots: queue.Queue = queue.Queue()
    for job in range(jobs):
        slots.put(job % gpus)
    return slots


def _run_logged(
    cmd: list[str], log_path: Path, what: str, slots: queue.Queue | None = None
) -> tuple[float, float]:
    """Run ``cmd`` with output appended to ``log_path`` (on a GPU of ``slots``, if given);
    (wall seconds, peak RSS in MB)."""
    env, gpu = None, None
    if slots is not None:
        gpu = slots.get()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": _visible_gpu(gpu)}
        what = f"{what} on GPU {env['CUDA_VISIBLE_DEVICES']}"
    log.info("%s: %s (log %s)", what, " ".join(cmd[1:]), log_path)
    start = time.perf_counter()
    try:
        return _wait_logged(cmd, log_path, what, env, start)
    finally:
        if gpu is not None:
            slots.put(gpu)


def _visible_gpu(index: int) -> str:
    """The ``index``-th GPU this process sees, as a CUDA_VISIBLE_DEVICES entry."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def _wait_logged(cmd, log_path: Path, what: str, env, start: float) -> tuple[float, float]:
    with open(log_path, "a") as handle:
        proc = subprocess.Popen(
            cmd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        with _LIVE_LOCK:
            _LIVE.add(proc)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all runs).
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        with _LIVE_LOCK:
            _LIVE.discard(proc)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        why = _failure_line(log_path.read_text(errors="replace"))
        raise MaceGridError(f"{what} {_ended(proc.returncode)} ({why}); see {log_path}")
    return wall, usage.ru_maxrss / 1024.0


# Lines of a training log that say nothing about why it ended: progress-bar refreshes (written
# last, at exit) and Hydra's hint after a traceback.
_NOISE = re.compile(r"\d+%\||\d+/\?|it/s\]|HYDRA_FULL_ERROR")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def _ended(returncode: int) -> str:
    """``exited with 1``, or ``was killed by SIGKILL`` (the kernel's OOM killer sends that)."""
    if returncode >= 0:
        return f"exited with {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def _failure_line(log: str) -> str:
    """Why a training ended badly, from its log: its ``error:`` line, else a traceback's
    exception line, else the last line that is not a progress bar."""
    lines = [line.strip() for line in re.split(r"[\r\n]", log)]
    lines = [line for line in lines if line and not _NOISE.search(line)]
    for wanted in (lambda line: line.startswith("error: "), _EXCEPTION.match, bool):
        found = [line for line in lines if wanted(line)]
        if found:
            return found[-1]
    return "empty log"


def run_job(run: Run, cmd: list[str], threads: int, slots: queue.Queue | None = None) -> bool:
    """Train (unless the same command finished before) and evaluate one run; True if trained.

    An interrupted run (killed, pre-empted, Ctrl-C) of the same command, or a finished one whose
    command differs only in its budget (a longer ``epochs=``/``budget_s=``), is resumed from its
    ``last.ckpt`` in the same directory through ``train.py ckpt_path=``; anything else starts
    over."""
    record_path = run.dir / "resources.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if _finished(run.dir, record, cmd):
        log.info("tp=%s seed=%d: reusing the finished run in %s", run.tp, run.seed, run.dir)
        trained = False
    else:
        last = run.dir / "checkpoints" / "last.ckpt"
        resumable = (
            record is not None
            and last.is_file()
            and _without_budget(record["command"][2:-1]) == _without_budget(cmd[2:-1])
        )
        train_cmd = cmd
        if resumable:
            log.info(
                "tp=%s seed=%d: resuming the run in %s from %s", run.tp, run.seed, run.dir, last
            )
            train_cmd = [*cmd, f"ckpt_path={last}"]
            (run.dir / "summary.json").unlink(missing_ok=True)
            shutil.rmtree(run.dir / "evaluate", ignore_errors=True)
        else:
            if run.dir.exists():  # no checkpoint, or another command: start over
                shutil.rmtree(run.dir)
            run.dir.mkdir(parents=True)
            run.log.write_text("")
            record = {"command": cmd, "started": time.time(), "wall_time_s": 0.0, "peak_rss_mb": 0}
        # Recorded before training, so that an interrupted run is recognised and resumed.
        record = {**record, "command": cmd}
        atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
        wall, rss = _run_logged(train_cmd, run.log, f"train.py tp={run.tp} seed={run.seed}", slots)
        record["wall_time_s"] = record.get("wall_time_s", 0.0) + wall  # finished processes
        record["peak_rss_mb"] = max(record.get("peak_rss_mb", 0), rss)
        atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
        trained = True
    if not (run.dir / "evaluate" / "metrics.json").is_file():
        evaluate_run(run.dir, threads)
    return trained


def _finished(run_dir: Path, record: dict[str, Any] | None, cmd: list[str]) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cmd``: its ``resources.json`` ``record``
    has the same train.py arguments (the interpreter, script and run dir may have moved)."""
    same = record is not None and record["command"][2:-1] == cmd[2:-1]
    return same and (run_dir / "summary.json").is_file()


def _trained_epochs(runs: list[Run]) -> int | None:
    """The epoch budget the started ones of ``runs`` were started with (their recorded
    command), or None (none started, or budgets that differ)."""
    budgets = set()
    for run in runs:
        record_path = run.dir / "resources.json"
        if record_path.is_file():
            command = json.loads(record_path.read_text())["command"]
            budgets |= {a.split("=", 1)[1] for a in command if a.startswith("trainer.max_epochs=")}
    return int(budgets.pop()) if len(budgets) == 1 else None


def _without_budget(args: list[str]) -> list[str]:
    """train.py arguments without the budget (what a longer study extends)."""
    budget = ("trainer.max_epochs=", "budget_s=", "trainer.min_epochs=")
    return [a for a in args if not a.startswith(budget)]


def _die_with_parent() -> None:
    """Linux: the training gets SIGTERM (checkpoint kept, clean exit) when the study process
    dies, even by SIGKILL, instead of training on unwatched; once per exiting study thread (it
    is reparented to each in turn), and train.py acts on the first."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_EVALUATING = threading.Lock()


def evaluate_run(run_dir: Path, threads: int) -> dict[str, Any]:
    """``evaluate`` the run's best checkpoint on its test sets into ``<run_dir>/evaluate``, in
    this process (no second start-up per run), one run at a time (torch's thread count and
    default dtype are process-wide)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    overrides = [
        f"ckpt_path={summary['best_checkpoint']}",
        f"paths.output_dir={run_dir / 'evaluate'}",
        f"threads={threads}",
    ]
    with _EVALUATING:
        return evaluate(compose_config("evaluate", overrides))


def evaluate_epoch(run_dir: Path, epoch: int, threads: int) -> dict[str, Any] | None:
    """Test metrics of the weights after epoch ``epoch`` (0-based: the per-epoch checkpoint a
    time_s study keeps, with the EMA weights validated then), evaluated once into
    ``<run_dir>/evaluate_epochNNN``; None without that checkpoint."""
    out = run_dir / f"evaluate_epoch{epoch:03d}"
    if not (out / "metrics.json").is_file():
        ckpt = run_dir / "checkpoints" / f"epoch{epoch:03d}.ckpt"
        if not ckpt.is_file():
            return None
        overrides = [f"ckpt_path={ckpt}", f"paths.output_dir={out}", f"threads={threads}"]
        with _EVALUATING:
            evaluate(compose_config("evaluate", overrides))
    return json.loads((out / "metrics.json").read_text())


def time_configs(
    configs: list[Config], args, overrides: list[str], out_dir: Path
) -> dict[str, dict[str, Any]]:
    """The timing pass: ``{config name: {"s_per_epoch", "val_f_mae", "dir"}}``. Each
    configuration trains ``timing_epochs`` epochs from the first seed in
    ``<out_dir>/timing/<config>``, one at a time (whatever ``jobs`` is), on the same batches;
    s/epoch is the mean over the epochs after the first (warm-up). A finished timing of the same
    command is reused; delete ``timing/`` to re-time after a kernel change (no retraining)."""
    timings = {}
    for config in configs:
        run_dir = out_dir / "timing" / config.name
        cmd = [
            sys.executable,
            str(PROJECT_ROOT / "train.py"),
            *config.overrides(),
            f"seed={args.seeds[0]}",
            f"trainer.max_epochs={args.timing_epochs}",
            "callbacks.early_stopping=null",
            "callbacks.progress_bar=null",
            *overrides,
            f"hydra.run.dir={run_dir}",
        ]
        record_path = run_dir / "resources.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if not _finished(run_dir, record, cmd):
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            wall, rss = _run_logged(cmd, run_dir / "train.out", f"timing {config.name}")
            record = {"command": cmd, "wall_time_s": wall, "peak_rss_mb": rss}
            atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
        summary = json.loads((run_dir / "summary.json").read_text())
        epochs = summary["epoch_train_time_s"]
        timings[config.name] = {
            "s_per_epoch": statistics.fmean(epochs[1:] or epochs),
            "val_f_mae": [h["f_mae"] for _, h in sorted(val_history(run_dir).items())],
            "dir": run_dir,
        }
        log.info("timing %s: %.3g s/epoch", config.name, timings[config.name]["s_per_epoch"])
    return timings


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def timing_report(configs, timings, args, overrides: list[str], stem: Path) -> list[dict]:
    """The timing pass alone: ``<stem>_timing.{csv,md}``, s/epoch per configuration and its
    speed-up against stock mace where stock was timed, and the time to stock accuracy where a
    study's curves are kept beside it (`timed_curves_section`); the CSV rows."""
    stock = timings.get(STOCK, {}).get("s_per_epoch")
    rows = [
        {
            "config": c.name,
            "s_per_epoch": timings[c.name]["s_per_epoch"],
            "speedup_vs_stock": stock / timings[c.name]["s_per_epoch"] if stock else None,
        }
        for c in configs
    ]
    write_csv(rows, Path(f"{stem}_timing.csv"))
    limit = _override([o.lstrip("+") for o in overrides], "trainer.limit_train_batches")
    steps = f"; an epoch is {limit} training steps (trainer.limit_train_batches)" if limit else ""
    command = " ".join(
        [
            f"configs=[{','.join(args.configs)}]",
            "timing_only=true",
            f"timing_epochs={args.timing_epochs}",
            f"seeds=[{args.seeds[0]}]",
            *([f"time_s={args.time_s:g}"] if args.time_s is not None else []),
            *overrides,
        ]
    )
    lines = [
        "# Timing pass (no training)",
        "",
        f"Command: `python scripts/compare_backends.py {command}`  ",
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}, one configuration at a "
        "time. s/epoch: training steps (forward with forces, loss, backward, optimiser) of the "
        f"epochs after the first (warm-up){steps}.",
        "",
        "| config | s/epoch | speed-up vs stock (cg+e3nn) |",
        "|---|---|---|",
        *(
            f"| {r['config']} | {_number(r['s_per_epoch'])} | {_speedup(r['speedup_vs_stock'])} |"
            for r in rows
        ),
        "",
        *twin_agreement(configs, timings),
        *timed_curves_section(configs, timings, args.time_s, stem),
    ]
    atomic_write_text(Path(f"{stem}_timing.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def timed_curves_section(configs, timings, time_s: float | None, stem: Path) -> list[str]:
    """With a study's curves at ``<stem>_curves.csv`` (`write_curves`), stock among the timings
    and every configuration's backend among the curves: the time to stock accuracy on these
    timings (the study's ``time_to_accuracy.csv`` rewritten); the markdown lines (none else)."""
    path = Path(f"{stem}_curves.csv")
    if not path.is_file() or STOCK not in timings:
        return []
    curves = read_curves(path)
    if any(c.tp not in curves for c in configs):
        return []
    rows, level, horizon = time_to_stock(curves, configs, timings, time_s)
    write_csv(rows, _time_to_accuracy_path(stem))
    seeds = ", ".join(f"{tp} {len(c)}" for tp, c in curves.items())
    return [
        "",
        "## Time to stock accuracy",
        "",
        f"The study's validation curves (`{path.name}`: seeds per backend {seeds}) on these "
        "clocks; an exact kernel changes the seconds per epoch, not the accuracy per epoch.",
        "",
        *time_to_stock_table(rows, level, horizon),
    ]


def read_curves(path: Path) -> dict[str, list[Curve]]:
    """The curves `write_curves` kept: per backend, one (cumulative training-step seconds,
    validation force MAE) per seed, NaN where a run had no initial validation."""
    curves: dict[str, dict[str, Curve]] = {}
    with open(path) as handle:
        for row in csv.DictReader(handle):
            times, values = curves.setdefault(row["tp"], {}).setdefault(row["seed"], ([], []))
            times.append(float(row["train_step_time_s"]))
            values.append(float(row["val_f_mae"]) if row["val_f_mae"] else float("nan"))
    return {tp: list(seeds.values()) for tp, seeds in curves.items()}


def _time_to_accuracy_path(stem: Path) -> Path:
    return (
        stem.parent / "time_to_accuracy.csv"
        if stem.name == "study"
        else Path(f"{stem}_time_to_accuracy.csv")
    )


def twin_agreement(configs: list[Config], timings: dict[str, dict[str, Any]]) -> list[str]:
    """Twins (configurations of one backend) trained from one seed on the same batches in the
    timing pass: the largest relative difference of their validation F MAE per epoch."""
    lines = []
    for tp in dict.fromkeys(c.tp for c in configs):
        names = [c.name for c in configs if c.tp == tp]
        for other in names[1:]:
            a, b = (np.array(timings[n]["val_f_mae"]) for n in (names[0], other))
            diff = float(np.max(np.abs(a - b) / np.abs(a))) if len(a) == len(b) else float("nan")
            lines.append(
                f"- `{names[0]}` vs `{other}`: validation F MAE over {len(a)} epochs from one "
                f"seed agrees to {diff:.1e} (relative, float32)"
            )
    return lines


def config_curve(curve: Curve, s_per_epoch: float) -> Curve:
    """A backend's validation curve on a configuration's clock: epoch e ends at (e+1) s/epoch."""
    _, values = curve
    return [i * s_per_epoch for i in range(len(values))], list(values)


def best_within(curve: Curve, horizon: float) -> float:
    """The best validation F MAE of ``curve`` up to time ``horizon`` (the start included)."""
    return min(v for t, v in zip(*curve, strict=True) if t <= horizon)


def time_to_stock(
    curves: dict[str, list[Curve]],
    configs: list[Config],
    timings: dict[str, dict[str, Any]],
    time_s: float | None,
) -> tuple[list[dict[str, Any]], float, float]:
    """Per configuration, the training-step seconds to reach stock mace's accuracy: (rows,
    level, T). T is ``time_s`` or the time stock's shortest seed covers; the level is the worst
    stock seed's best validation F MAE within T, so every stock seed reaches it."""
    stock_s = timings[STOCK]["s_per_epoch"]
    stock = [config_curve(c, stock_s) for c in curves["cg"]]
    horizon = time_s if time_s is not None else min(t[-1] for t, _ in stock)
    level = max(best_within(c, horizon) for c in stock)
    rows = []
    for config in configs:
        s = timings[config.name]["s_per_epoch"]
        mine = [config_curve(c, s) for c in curves[config.tp]]
        reached = [t for t in (time_to_reach(c, level) for c in mine) if t is not None]
        at_t = [best_within(c, horizon) for c in mine]
        stat = mean_std(reached)
        rows.append(
            {
                "config": config.name,
                "s_per_epoch": s,
                "seconds_to_stock": stat[0] if stat else None,
                "seconds_to_stock_std": stat[1] if stat else None,
                "reached": f"{len(reached)}/{len(mine)}",
                "covers_T": all(t[-1] >= horizon for t, _ in mine),
                "val_f_mae_at_T": statistics.fmean(at_t),
                "level": level,
                "T": horizon,
            }
        )
    stock_time = next(r["seconds_to_stock"] for r in rows if r["config"] == STOCK)
    for row in rows:
        t = row["seconds_to_stock"]
        row["speedup_vs_stock"] = stock_time / t if t and stock_time else None
    return rows, level, horizon


def epochs_within(horizon: float, s_per_epoch: float) -> int:
    """Whole epochs a configuration completes within ``horizon`` seconds on its clock."""
    return int(horizon / s_per_epoch + 1e-9)


def checkpoint_test_rows(
    key: dict[str, Any], run: Run, epochs: int, threads: int
) -> list[dict[str, Any]]:
    """Test errors of ``run`` after ``epochs`` epochs (capped at the epochs it trained), one row
    per test set, prefixed by ``key``; none without the epoch's checkpoint."""
    summary = json.loads((run.dir / "summary.json").read_text())
    done = min(epochs, int(summary["epochs_reached"]))
    report = evaluate_epoch(run.dir, done - 1, threads) if done >= 1 else None
    if report is None:
        return []
    return [
        {
            **key,
            "seed": run.seed,
            "test_set": name,
            "epochs": done,
            "covers": done == epochs,
            **{k: m[k] for k in ("e_mae", "e_rmse", "f_mae", "f_rmse")},
        }
        for name, m in report["sets"].items()
    ]


def equal_time_rows(configs, timings, runs: list[Run], horizon: float, threads: int) -> list:
    """Per configuration and seed: test errors of the weights it has after T seconds on its own
    clock (its last whole epoch within T)."""
    rows = []
    for config in configs:
        epochs = epochs_within(horizon, timings[config.name]["s_per_epoch"])
        for run in (r for r in runs if r.tp == config.tp):
            rows += checkpoint_test_rows({"config": config.name}, run, epochs, threads)
    return rows


def equal_epoch_rows(runs: list[Run], epochs: int, threads: int) -> list[dict[str, Any]]:
    """Per backend and seed: test errors after ``epochs`` epochs."""
    rows = []
    for run in runs:
        rows += checkpoint_test_rows({"tp": run.tp}, run, epochs, threads)
    return rows


def test_table(rows: list[dict[str, Any]], key: str, what: str) -> list[str]:
    """Markdown: mean ± std over seeds of each ``key`` group's test errors, per test set."""
    lines = []
    for test_set in dict.fromkeys(r["test_set"] for r in rows):
        mine = [r for r in rows if r["test_set"] == test_set]
        lines += [
            f"Test set `{test_set}`, {what}:",
            "",
            f"| {key} | seeds | epochs | E MAE (meV/atom) | E RMSE (meV/atom) | F MAE (meV/Å) | "
            "F RMSE (meV/Å) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(r[key] for r in mine):
            group = [r for r in mine if r[key] == name]
            epochs = sorted({r["epochs"] for r in group})
            short = "" if all(r["covers"] for r in group) else " (curve ends first)"
            cells = [
                _cell(mean_std([r[k] for r in group]))
                for k in ("e_mae", "e_rmse", "f_mae", "f_rmse")
            ]
            lines.append(
                f"| {name} | {len(group)} | {'/'.join(map(str, epochs))}{short} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    return lines


def plot_time_front(rows: list[dict[str, Any]], timings, path: Path) -> None:
    """The accuracy-cost front: test force MAE at T vs s/epoch, per configuration (mean ± std
    over seeds), on the first test set."""
    plt = _pyplot()
    first = rows[0]["test_set"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for name in dict.fromkeys(r["config"] for r in rows):
        stat = mean_std(
            [r["f_mae"] for r in rows if r["config"] == name and r["test_set"] == first]
        )
        if stat is None:
            continue
        y, dy = stat
        ax.errorbar(timings[name]["s_per_epoch"], y, yerr=dy, fmt="o", capsize=3, label=name)
    ax.set(
        xlabel="s/epoch (timed training steps)",
        ylabel=f"test force MAE at T (meV/Å), {first}",
        xscale="log",
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curves(runs: list[Run], path: Path) -> None:
    """Every run's validation curve (the study's accuracy per epoch, kept beside the tables so
    a re-timing can be combined with it without the run directories)."""
    rows = [{"tp": r.tp, "seed": r.seed, **p} for r in runs for p in val_points(r.dir)]
    write_csv(rows, path)


def time_to_stock_table(rows: list[dict[str, Any]], level: float, horizon: float) -> list[str]:
    lines = [
        f"Training-step seconds (timed, one job at a time) until the validation F MAE is at or "
        f"below {level:.3g} meV/Å, the worst stock seed's best within T = {horizon:.4g} s; "
        "each configuration on its own clock (its s/epoch) along its backend's curve.",
        "",
        "| config | s/epoch | seconds to stock accuracy | reached | speed-up vs stock | "
        "val F MAE at T (meV/Å) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        reached = r["seconds_to_stock"] is not None
        t = _cell((r["seconds_to_stock"], r["seconds_to_stock_std"]) if reached else None)
        speed = _speedup(r["speedup_vs_stock"] or None)
        at_t = f"{r['val_f_mae_at_T']:.3g}" + ("" if r["covers_T"] else " (curve ends before T)")
        lines.append(
            f"| {r['config']} | {_number(r['s_per_epoch'])} | {t} | {r['reached']} | {speed} | "
            f"{at_t} |"
        )
    return lines


def plot_config_curves(
    curves: dict[str, list[Curve]], configs: list[Config], timings, level: float, path: Path
):
    """Validation F MAE vs timed training time per configuration (mean over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for config in configs:
        mine = [config_curve(c, timings[config.name]["s_per_epoch"]) for c in curves[config.tp]]
        n = min(len(v) for _, v in mine)
        times = mine[0][0][:n]
        ax.plot(times, np.mean([v[:n] for _, v in mine], axis=0), label=config.name)
    ax.axhline(level, color="grey", ls="--", lw=1, label="stock accuracy")
    ax.set(
        xlabel="training time (s, timed training steps)",
        ylabel="validation force MAE (meV/Å)",
        yscale="log",
    )
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configs_section(configs, timings, curves, args, stem: Path, runs, threads: int) -> list[str]:
    """The study's configurations: twins' agreement, and with the stock configuration the time
    to its accuracy (``<stem>_time_to_accuracy.csv`` and a plot) and the test errors at equal
    time T (``<stem>_equal_time.csv``, the accuracy-cost front); the markdown lines."""
    lines = ["## Configurations (timing pass)", "", *twin_agreement(configs, timings)]
    if STOCK not in timings or "cg" not in curves:
        lines += ["", f"(no time to stock accuracy: configs lacks {STOCK})"]
        return lines
    rows, level, horizon = time_to_stock(curves, configs, timings, args.time_s)
    write_csv(rows, _time_to_accuracy_path(stem))
    plot = Path(f"{stem}_configs_val_f_mae_vs_time.png")
    plot_config_curves(curves, configs, timings, level, plot)
    lines += ["", *time_to_stock_table(rows, level, horizon), "", f"![configurations]({plot.name})"]
    tests = equal_time_rows(configs, timings, runs, horizon, threads)
    if tests:
        write_csv(tests, Path(f"{stem}_equal_time.csv"))
        front = Path(f"{stem}_equal_time_front.png")
        plot_time_front(tests, timings, front)
        what = (
            f"equal time T = {horizon:.4g} s (each configuration's weights after its last whole "
            "epoch within T on its own clock; EMA weights; mean ± std over seeds)"
        )
        lines += ["", "## Test errors at equal time", "", *test_table(tests, "config", what)]
        lines += [f"![accuracy-cost front]({front.name})"]
    return lines


def run_all(
    runs: list[Run],
    commands: list[list[str]],
    threads: int,
    jobs: int,
    slots: queue.Queue | None = None,
    finished: Callable[[Run], None] | None = None,
) -> int:
    """Run the jobs ``jobs`` at a time in the given order (each on a GPU of ``slots``, if
    given); the number trained. ``finished(run)`` is called (in this thread) as each run ends
    well, trained or reused. Failures are collected (the other runs go on) and raised together
    at the end."""
    failures, trained = [], 0
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {
            pool.submit(run_job, run, cmd, threads, slots): run
            for run, cmd in zip(runs, commands, strict=True)
        }
        for future in as_completed(futures):
            try:
                trained += future.result()
            except MaceGridError as err:
                failures.append(str(err))
                continue
            if finished is not None:
                finished(futures[future])
    except BaseException:  # Ctrl-C: start nothing new, stop what runs; finished runs are kept
        pool.shutdown(wait=False, cancel_futures=True)
        with _LIVE_LOCK:
            for proc in _LIVE:
                proc.terminate()
        raise
    pool.shutdown()
    if failures:
        raise MaceGridError("; ".join(failures))
    return trained


def val_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """{epoch: {"e_mae", "f_mae"}} of the per-epoch validation (EMA weights) in metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/f_mae") and r.get("epoch")]
    return {
        int(r["epoch"]): {"e_mae": float(r["val/e_mae"]), "f_mae": float(r["val/f_mae"])}
        for r in rows
    }


def val_points(run_dir: Path) -> list[dict[str, float | None]]:
    """The validation curve of a run: per validated epoch (and the initial model, epochs 0) the
    epochs done, cumulative training-step seconds and validation E and F MAE."""
    summary = json.loads((run_dir / "summary.json").read_text())
    history = val_history(run_dir)
    initial = summary.get("initial_val") or {}
    points = [
        {"epochs": 0, "train_step_time_s": 0.0, "val_e_mae": initial.get("e_mae"),
         "val_f_mae": initial.get("f_mae")}
    ]  # fmt: skip
    t = 0.0
    for epoch, seconds in enumerate(summary["epoch_train_time_s"]):
        t += seconds
        if epoch in history:
            points.append(
                {"epochs": epoch + 1, "train_step_time_s": t,
                 "val_e_mae": history[epoch]["e_mae"], "val_f_mae": history[epoch]["f_mae"]}
            )  # fmt: skip
    return points


def val_curve(run_dir: Path) -> Curve:
    """(cumulative training-step seconds, validation force MAE) per epoch, initial model at 0
    (NaN when the run has no initial validation)."""
    points = val_points(run_dir)
    times = [p["train_step_time_s"] for p in points]
    return times, [float("nan") if p["val_f_mae"] is None else p["val_f_mae"] for p in points]


def model_counts(ckpt_path: str) -> dict[str, int]:
    """Parameters and product-basis expressivity (:func:`mace_grid.tp.expressivity`) of a
    checkpoint's model: trainable weights, independent couplings they reach and all equivariant
    maps, in total over blocks, elements and channels (``product_*``) and per (element,
    channel) summed over the blocks (``weights``, ``independent``, ``complete``).

    The totals measure each block over all of the model's elements at once, since a backend may
    share weights between elements (grid_rank's factor weights): then a channel reaches fewer
    maps than its elements would apart, and never more than its weights."""
    ckpt = read_checkpoint(ckpt_path)
    model, hp = model_from_checkpoint(ckpt), ckpt["hyper_parameters"]
    correlation = int(hp["model"]["correlation"])
    elements = len(hp["statistics"]["atomic_numbers"])
    products = product_expressivity(model, hp["tp"], correlation)
    totals = product_expressivity(model, hp["tp"], correlation, num_elements=elements)
    counts = {
        "parameters": count_parameters(model),
        "product_weights": sum(count_parameters(sc) for sc, _ in products),
    }
    for name in ("independent", "complete"):  # channels share no weights: C copies of each
        counts[f"product_{name}"] = sum(sc.irreps_out[0].mul * getattr(e, name) for sc, e in totals)
    for name in ("weights", "independent", "complete"):
        counts[name] = sum(getattr(e, name) for _, e in products)
    return counts


def run_rows(run: Run, counts: dict[str, Any], equal_epochs: int) -> list[dict[str, Any]]:
    """CSV rows of one finished run, one per test set."""
    summary = json.loads((run.dir / "summary.json").read_text())
    record = json.loads((run.dir / "resources.json").read_text())
    report = json.loads((run.dir / "evaluate" / "metrics.json").read_text())
    step_time = float(sum(summary["epoch_train_time_s"]))
    epochs = summary["epochs_reached"]
    val = val_history(run.dir).get(equal_epochs - 1, {}) if equal_epochs else {}
    shared = {
        "epochs": epochs,
        "train_step_time_s": step_time,
        "epoch_time_s": step_time / epochs,
        "fit_time_s": summary["train_time_s"],
        "wall_time_s": record["wall_time_s"],
        "peak_rss_mb": record["peak_rss_mb"],
        **counts,
        "equal_epochs": equal_epochs or None,
        "val_e_mae_equal_epochs": val.get("e_mae"),
        "val_f_mae_equal_epochs": val.get("f_mae"),
    }
    tp_options = (summary.get("tp_options") or {}) if run.tp == "gaunt" else {}
    return [
        {
            "tp": run.tp,
            "conv": summary.get("conv"),
            "method": tp_options.get("method"),
            "seed": run.seed,
            "test_set": name,
            **shared,
            "n_structures": m["n_structures"],
            "inference_ms": m["time_per_structure_ms"],
            **{k: m[k] for k in ("e_mae", "e_rmse", "f_mae", "f_rmse")},
            **{k: m.get("oc20", {}).get(k) for k in S2EF_TABLE},
        }
        for name, m in report["sets"].items()
    ]


def mean_std(values: list[float | None]) -> tuple[float, float | None] | None:
    """(mean, sample std or None for one value) of the non-missing values; None if none.
    Tables print "mean ± std", or the mean alone for one value or a constant."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _cell(stat: tuple[float, float | None] | None) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return _number(mean) if not std else f"{_number(mean)} ± {_number(std)}"


def _table(columns: dict[str, str], rows: list[dict[str, Any]], backends: list[str]) -> list[str]:
    """Markdown table, one line per backend: mean ± std over its rows of each column."""
    lines = [
        "| tp | seeds | " + " | ".join(columns.values()) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for tp in backends:
        mine = [r for r in rows if r["tp"] == tp]
        if mine:
            cells = [_cell(mean_std([r.get(k) for r in mine])) for k in columns]
            lines.append(f"| {tp} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines


def time_to_reach(curve: Curve, level: float) -> float | None:
    """Training-step seconds at the end of the first validated epoch with F MAE <= ``level``
    (None if never)."""
    return next((t for t, v in zip(*curve, strict=True) if v <= level), None)


def reach_table(curves: dict[str, list[Curve]], backends: list[str]) -> list[str]:
    """Training time each backend needs to reach each backend's final accuracy (the best
    validation F MAE of its worst seed, which all its seeds reach): mean ± std over the seeds
    that reach it, with "(k/n)" when only k of n seeds do."""
    finals = {tp: max(float(np.nanmin(v)) for _, v in curves[tp]) for tp in backends}
    levels = sorted(finals.items(), key=lambda item: -item[1])
    lines = [
        "| tp | " + " | ".join(f"<= {v:.3g} meV/Å ({tp}'s)" for tp, v in levels) + " |",
        "|" + "---|" * (len(levels) + 1),
    ]
    for tp in backends:
        cells = []
        for _, level in levels:
            times = [time_to_reach(c, level) for c in curves[tp]]
            reached = [t for t in times if t is not None]
            cell = _cell(mean_std(reached))
            cells.append(
                cell if len(reached) in (0, len(times)) else f"{cell} ({len(reached)}/{len(times)})"
            )
        lines.append(f"| {tp} | " + " | ".join(cells) + " |")
    return lines


def markdown(
    rows: list[dict[str, Any]],
    backends: list[str],
    header: str,
    curves: dict[str, list[Curve]] | None = None,
    s2ef: bool = False,
) -> str:
    """The study table: cost per backend, errors per test set (with OC20's S2EF metrics if
    ``s2ef``), validation at equal epochs and, from the validation ``curves``, the training time
    to reach each backend's final accuracy."""
    first_set = rows[0]["test_set"]
    cg = mean_std([r["epoch_time_s"] for r in rows if r["tp"] == "cg"])
    per_run = [
        {**r, "speedup_vs_cg": cg[0] / r["epoch_time_s"] if cg else None}
        for r in rows
        if r["test_set"] == first_set
    ]
    lines = [header, "", "## Cost", "", *_table(COST_TABLE, per_run, backends)]
    for test_set in dict.fromkeys(r["test_set"] for r in rows):
        mine = [r for r in rows if r["test_set"] == test_set]
        lines += ["", f"## Test set `{test_set}` ({mine[0]['n_structures']} structures)", ""]
        lines += _table(SET_TABLE | (S2EF_TABLE if s2ef else {}), mine, backends)
    if per_run[0]["equal_epochs"]:
        epochs = per_run[0]["equal_epochs"]
        lines += ["", f"## At equal epochs ({epochs}, from the validation curves)", ""]
        lines += _table(EQUAL_EPOCHS_TABLE, per_run, backends)
    if curves:
        lines += ["", "## Training time (s) to reach each backend's validation F MAE", ""]
        lines += [
            "Training-step seconds to the end of the first epoch at or below each backend's "
            "final validation force MAE (the best of its worst seed).",
            "",
            *reach_table(curves, [tp for tp in backends if tp in curves]),
        ]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[Curve]], path: Path, title: str):
    """Validation F MAE vs training-step time: per backend the mean over seeds (interpolated
    onto common times, up to the shortest seed's) and the min-max band over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    for tp, seed_curves in curves.items():
        end = min(times[-1] for times, _ in seed_curves)
        grid = np.linspace(0.0, end, 100)
        values = np.array([np.interp(grid, t, v) for t, v in seed_curves])
        (line,) = ax.plot(grid, values.mean(0), label=f"{tp} ({len(seed_curves)} seeds)")
        if len(seed_curves) > 1:
            ax.fill_between(grid, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set(
        xlabel="training time (s, training steps only)",
        ylabel="validation force MAE (meV/Å)",
        yscale="log",
        title=title,
    )
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_front(
    rows: list[dict[str, Any]], backends: list[str], path: Path, title: str
) -> dict[str, str]:
    """Test error vs s/epoch per test set (mean ± std over seeds; the accuracy-speed front):
    force MAE, or energy MAE for an energy-only set. Returns the metric drawn per test set."""
    plt = _pyplot()
    sets = list(dict.fromkeys(r["test_set"] for r in rows))
    drawn = {
        s: "f_mae" if any(r["f_mae"] is not None for r in rows if r["test_set"] == s) else "e_mae"
        for s in sets
    }
    fig, axes = plt.subplots(
        1, len(sets), figsize=(5 * len(sets), 4), constrained_layout=True, squeeze=False
    )
    for ax, test_set in zip(axes[0], sets, strict=True):
        metric = drawn[test_set]
        for tp in backends:
            mine = [r for r in rows if r["tp"] == tp and r["test_set"] == test_set]
            x, y = (mean_std([r[k] for r in mine]) for k in ("epoch_time_s", metric))
            if x is None or y is None:  # no run of this backend
                continue
            (x, dx), (y, dy) = x, y
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="o", capsize=3, label=tp)
        ylabel = "test force MAE (meV/Å)" if metric == "f_mae" else "test energy MAE (meV/atom)"
        ax.set(xlabel="s/epoch (training steps)", ylabel=ylabel, title=f"{title}: {test_set}")
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


STUDY_COLUMNS = ["tp", "conv", "method", "seed", "test_set", *RUN_COLUMNS, *SET_COLUMNS]


def write_csv(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    """``rows`` under ``columns`` (default: the first row's keys), missing values empty."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def compare(args, overrides: list[str]) -> list[dict[str, Any]]:
    """Run (or reuse) every (backend, seed) of the study and write its tables and plots;
    return the CSV rows."""
    validate_args(args, overrides)
    data = _override(overrides, "data") or "demo"
    threads = _override(overrides, "threads")
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        overrides = [*overrides, f"threads={threads}"]
    default_dir = PROJECT_ROOT / "results" / data
    out_dir = Path(args.out_dir) if args.out_dir else default_dir
    runs = [
        Run(tp, seed, out_dir / "runs" / tp / f"seed{seed}")
        for seed in args.seeds
        for tp in args.backends
    ]
    configs = [Config.parse(c) for c in args.configs]
    timings = time_configs(configs, args, overrides, out_dir) if configs else {}
    if args.timing_only:
        return timing_report(configs, timings, args, overrides, out_dir / args.name)
    epochs = {tp: args.epochs for tp in args.backends}
    if args.time_s is not None:  # each backend's fastest configuration covers T
        for tp in epochs:
            fastest = min(timings[c.name]["s_per_epoch"] for c in configs if c.tp == tp)
            epochs[tp] = max(args.epochs or 1, math.ceil(args.time_s / fastest))
        if not args.extend:
            for tp in epochs:
                trained = _trained_epochs([run for run in runs if run.tp == tp])
                epochs[tp] = trained or epochs[tp]
        log.info("epochs to cover T = %g s: %s", args.time_s, epochs)
    commands = [train_command(run, args, overrides, epochs[run.tp]) for run in runs]
    slots = gpu_slots(args.jobs, overrides, torch.cuda.device_count())
    stem = out_dir / args.name
    done: list[Run] = []

    def keep_curve(run: Run) -> None:  # each run's curve on disk as soon as it ends
        done.append(run)
        write_curves(sorted(done, key=runs.index), Path(f"{stem}_curves.csv"))

    trained = run_all(runs, commands, int(threads), args.jobs, slots, keep_curve)
    log.info("%d of %d runs trained now, %d reused", trained, len(runs), len(runs) - trained)

    summaries = {run: json.loads((run.dir / "summary.json").read_text()) for run in runs}
    equal_epochs = int(min(s["epochs_reached"] for s in summaries.values()))
    counts: dict[str, dict[str, Any]] = {}
    rows, curves = [], {}
    for run in runs:
        if run.tp not in counts:
            counts[run.tp] = model_counts(summaries[run]["best_checkpoint"])
        rows += run_rows(run, counts[run.tp], equal_epochs)
        curves.setdefault(run.tp, []).append(val_curve(run.dir))
    rows.sort(key=lambda r: (args.backends.index(r["tp"]), args.seeds.index(r["seed"])))

    write_csv(rows, stem.with_suffix(".csv"), STUDY_COLUMNS)  # curves: keep_curve, per run
    title = f"{data}: validation force MAE (mean, band: min-max over seeds)"
    plot_curves(curves, Path(f"{stem}_val_f_mae_vs_time.png"), title)
    plot_front(rows, list(args.backends), Path(f"{stem}_f_mae_vs_epoch_time.png"), data)
    command = " ".join(
        [
            f"backends=[{','.join(args.backends)}]",
            f"seeds=[{','.join(map(str, args.seeds))}]",
            *([f"epochs={args.epochs}"] if args.epochs is not None else []),
            *([f"budget_s={args.budget_s}"] if args.budget_s is not None else []),
            *([f"configs=[{','.join(args.configs)}]"] if args.configs else []),
            *([f"timing_epochs={args.timing_epochs}"] if args.configs else []),
            *([f"time_s={args.time_s:g}"] if args.time_s is not None else []),
            *(["extend=false"] if not args.extend else []),
            f"jobs={args.jobs}",
            *([f"name={args.name}"] if args.name != "study" else []),
            *([f"out_dir={args.out_dir}"] if out_dir.resolve() != default_dir.resolve() else []),
            *overrides,
        ]
    )
    if args.time_s is not None:
        per_tp = ", ".join(f"{tp} {n}" for tp, n in epochs.items())
        budget = f"epochs covering T = {args.time_s:g} s on each backend's fastest clock ({per_tp})"
    elif args.budget_s is None:
        budget = f"{args.epochs or DEFAULT_EPOCHS} epochs per run"
    else:
        cap = f" (at most {args.epochs} epochs)" if args.epochs is not None else ""
        budget = f"{args.budget_s:g} s of training steps per run{cap}"
    header = (
        f"# tp backends on {data}: {budget}, {len(args.seeds)} seeds\n\n"
        f"Command: `python scripts/compare_backends.py {command}`  \n"
        f"Machine: {os.cpu_count()} CPUs, torch {torch.__version__}; {args.jobs} run(s) at a "
        f"time, {threads} thread(s) each (training and inference).  \n"
        "Values: mean ± std over seeds. Time per epoch counts training steps only; test errors "
        "of the best (EMA) checkpoint; inference = forward + forces. Product basis "
        "(`mace_grid.tp.expressivity`): trainable weights, independent couplings they reach "
        "(rank of d(output)/d(weights)) and all equivariant polynomial maps of degree <= "
        "correlation: in total (each block measured over all elements at once, since "
        "weights shared between elements count once; summed over blocks and channels), then "
        "per (element, channel) summed over blocks.\n\n"
        f"![validation force MAE vs training time]({stem.name}_val_f_mae_vs_time.png)\n"
        f"![test force MAE vs time per epoch]({stem.name}_f_mae_vs_epoch_time.png)"
    )
    table = markdown(rows, list(args.backends), header, curves, s2ef=data.startswith("oc20"))
    if configs:
        section = configs_section(configs, timings, curves, args, stem, runs, int(threads))
        tests = equal_epoch_rows(runs, equal_epochs, int(threads)) if args.time_s else []
        if tests:
            write_csv(tests, Path(f"{stem}_equal_epochs.csv"))
            what = f"equal epochs ({equal_epochs}, the fewest any run trained; EMA weights)"
            section += ["", "## Test errors at equal epochs", "", *test_table(tests, "tp", what)]
        table += "\n" + "\n".join(section) + "\n"
    atomic_write_text(stem.with_suffix(".md"), table)
    print(table + f"\nwritten to {out_dir}")
    return rows
