"""scripts/compare_backends.py (the backend study) on tiny settings: runs, reuse, budget, jobs."""

import csv
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _helpers import shared_root, tiny_args
from lightning.pytorch.trainer.states import TrainerFn
from test_train_cli import start_until_epoch, val_epochs

import mace_grid.compare
from mace_grid import PROJECT_ROOT
from mace_grid.callbacks import EpochTrainTimer
from mace_grid.cli import parse_cli
from mace_grid.compare import (
    CompareArgs,
    Run,
    _run_logged,
    compare,
    gpu_slots,
    markdown,
    reach_table,
    run_all,
    split_args,
    time_to_reach,
)
from mace_grid.errors import ConfigError, MaceGridError


def study(argv: list[str]) -> list[dict]:
    own, overrides = split_args(argv)
    return compare(parse_cli(CompareArgs, own), overrides)


def train_args(tmp_path_factory) -> list[str]:
    root = shared_root(tmp_path_factory)
    # A second test set (the same frames under another name): one table per test set.
    return [*tiny_args(root), f"+data.test_files.again={root}/demo/test.db"]


def table_row(table: str, heading: str, tp: str) -> list[str]:
    """Cells of backend ``tp``'s line in the markdown table under ``heading``."""
    lines = table.split(heading, 1)[1].splitlines()
    line = next(x for x in lines if x.startswith(f"| {tp} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_study_two_backends_two_seeds(tmp_path_factory, tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = [
        "backends=[cg,grid]",
        "seeds=[0,1]",
        "epochs=1",
        "jobs=2",
        f"out_dir={out}",
        *train_args(tmp_path_factory),
    ]
    rows = study(argv)

    keys = [(r["tp"], r["seed"], r["test_set"]) for r in rows]
    assert keys == [
        (tp, seed, s) for tp in ("cg", "grid") for seed in (0, 1) for s in ("test", "again")
    ]
    runs = {
        (tp, seed): out / "runs" / tp / f"seed{seed}" for tp in ("cg", "grid") for seed in (0, 1)
    }
    for (tp, seed), run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert (summary["tp"], summary["epochs"], summary["epochs_reached"]) == (tp, 1, 1.0)
        mine = [r for r in rows if (r["tp"], r["seed"]) == (tp, seed)]
        for row in mine:  # evaluate.py and train.py's own test pass agree
            assert row["f_mae"] == pytest.approx(summary["test"]["test"]["f_mae"], rel=1e-4)
            assert row["product_weights"] < row["parameters"]
            assert 0 < row["independent"] <= min(row["weights"], row["complete"])
            totals = row["product_independent"], row["product_weights"], row["product_complete"]
            assert 0 < totals[0] <= min(totals[1:])
            assert row["peak_rss_mb"] > 100  # torch + mace alone take more
            assert row["wall_time_s"] > row["fit_time_s"] > row["train_step_time_s"] > 0
            assert row["equal_epochs"] == 1
    cg, grid = (next(r for r in rows if r["tp"] == tp) for tp in ("cg", "grid"))
    # cg's U columns are redundant but reach every map; the grid's weights are all independent
    assert cg["product_independent"] == cg["product_complete"] < cg["product_weights"]
    assert grid["product_independent"] == grid["product_weights"] < grid["product_complete"]
    assert grid["product_complete"] == cg["product_complete"]
    assert (cg["independent"], grid["independent"]) == (cg["complete"], grid["weights"])
    # Seeds are applied: another seed, another model.
    f_mae = {(r["tp"], r["seed"]): r["f_mae"] for r in rows if r["test_set"] == "test"}
    assert f_mae["cg", 0] != f_mae["cg", 1] and f_mae["grid", 0] != f_mae["grid", 1]
    # jobs=2: trainings overlapped in time.
    spans = sorted(
        (rec["started"], rec["started"] + rec["wall_time_s"])
        for rec in (json.loads((d / "resources.json").read_text()) for d in runs.values())
    )
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))

    with open(out / "study.csv") as handle:
        saved = list(csv.DictReader(handle))
    assert [(r["tp"], int(r["seed"]), r["test_set"]) for r in saved] == keys
    table = (out / "study.md").read_text()
    # The F MAE cell is mean ± std over the seeds of the CSV's values.
    for test_set in ("test", "again"):
        values = [
            float(r["f_mae"]) for r in saved if r["tp"] == "grid" and r["test_set"] == test_set
        ]
        mean, std = statistics.fmean(values), statistics.stdev(values)
        cells = table_row(table, f"## Test set `{test_set}`", "grid")
        assert cells[1] == "2"  # seeds
        assert cells[-2] == f"{mean:.3g} ± {std:.3g}"
    cost = table_row(table, "## Cost", "cg")
    assert cost[1] == "2" and cost[2] == "1" and "±" in cost[3]
    assert "## At equal epochs (1" in table
    for plot in ("study_val_f_mae_vs_time.png", "study_f_mae_vs_epoch_time.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"

    # The same command again reuses every finished run and writes the same table.
    stamps = {
        p: p.stat().st_mtime_ns
        for d in runs.values()
        for p in (d / "summary.json", d / "evaluate" / "metrics.json")
    }
    assert study(argv) == rows
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "study.md").read_text() == table

    # Stopped between a run's training and its evaluation: the rerun only evaluates it.
    metrics = runs["grid", 1] / "evaluate" / "metrics.json"
    metrics.unlink()
    again = study(argv)
    assert metrics.is_file()
    assert {p: p.stat().st_mtime_ns for p in stamps if p != metrics} == {
        p: t for p, t in stamps.items() if p != metrics
    }
    assert [r["f_mae"] for r in again] == pytest.approx([r["f_mae"] for r in rows], rel=1e-6)


def test_killed_study_resumes_its_run_in_the_same_directory(tmp_path_factory, tmp_path) -> None:
    """SIGKILL of the study takes its training down (SIGTERM, clean exit); the same command
    again continues that run from its last checkpoint through train.py ckpt_path=."""
    out = tmp_path / "study"
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "scripts" / "compare_backends.py"),
        "backends=[grid]",
        "seeds=[1]",
        "epochs=4",
        "jobs=1",
        f"out_dir={out}",
        *tiny_args(shared_root(tmp_path_factory)),
    ]
    run = out / "runs" / "grid" / "seed1"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    proc = start_until_epoch(cmd, run, epoch=1, **quiet)
    deadline = time.time() + 300
    proc.kill()
    proc.wait()
    log = out / "runs" / "grid" / "seed1.log"
    while time.time() < deadline and "Interrupted: resume" not in log.read_text():
        time.sleep(0.2)
    assert "Interrupted: resume" in log.read_text(), log.read_text()[-4000:]
    done = val_epochs(run)
    assert done[:2] == [0, 1] and len(done) < 4

    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, capture_output=True)
    assert val_epochs(run) == [0, 1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 4
    [resume] = (run / ".hydra").glob("resume-*/overrides.yaml")
    assert f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}" in resume.read_text()
    assert (out / "study.csv").is_file()


BAR = "\rEpoch 1:  33%|███▎      | 1/3 [00:00<00:00,  5.03it/s, loss=24.10]"  # tqdm's last
HINT = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
STOPPED = "[..][WARNING] - Interrupted: resume with  python train.py ckpt_path=x"


@pytest.mark.parametrize(
    "lines, ended, reported",
    [
        (["[..][INFO] - epoch 0", "error: no key x"], "exited with 1", "error: no key x"),
        (
            ["Traceback (most recent call last):", "OSError: [Errno 28] Full", HINT],
            "exited with 1",
            "OSError: [Errno 28] Full",
        ),
        ([STOPPED], "exited with 1", STOPPED),
        ([], "was killed by SIGKILL", "empty log"),
    ],
)
def test_a_failed_training_is_reported_by_its_reason(lines, ended, reported, tmp_path) -> None:
    """A study names why a training ended badly: its `error:` line, a traceback's exception, or
    its last words, never the progress bar tqdm writes last; a signal is named (SIGKILL: the
    OOM killer's)."""
    log = tmp_path / "seed0.log"
    end = "os.kill(os.getpid(), 9)" if "SIGKILL" in ended else "raise SystemExit(1)"
    output = "".join(line + "\n" for line in lines) + BAR
    script = f"import os, sys; sys.stdout.write({output!r}); sys.stdout.flush(); {end}"
    with pytest.raises(MaceGridError) as failed:
        _run_logged([sys.executable, "-c", script], log, "train.py tp=grid seed=0")
    assert str(failed.value) == f"train.py tp=grid seed=0 {ended} ({reported}); see {log}"


def test_each_run_is_reported_as_it_ends(monkeypatch) -> None:
    """run_all calls finished(run) in its caller's thread as each run ends well, trained or
    reused (the study writes that run's curve at once), not for a failed run, whose error is
    raised once the others are done."""

    def job(run, cmd, threads, slots=None):
        if run.seed == 2:
            raise MaceGridError("tp=grid seed=2: train.py failed")
        return run.seed == 1  # seed 1 trained, seed 3 reused

    monkeypatch.setattr(mace_grid.compare, "run_job", job)
    runs = [Run("grid", seed, Path(f"seed{seed}")) for seed in (1, 2, 3)]
    caller, seen = threading.get_ident(), []
    with pytest.raises(MaceGridError, match="seed=2"):
        run_all(
            runs, [[]] * 3, 1, 2, finished=lambda r: seen.append((r.seed, threading.get_ident()))
        )
    assert sorted(seen) == [(1, caller), (3, caller)]


def test_configurations_are_timed_apart_and_combined_with_the_curves(tmp_path_factory, tmp_path):
    """configs: each configuration timed once (one at a time, same seed and batches; alone with
    timing_only), twins' agreement reported, the time to stock mace's accuracy derived from the
    backends' validation curves on each configuration's clock, and the test errors of the
    weights each configuration has at T."""
    out = tmp_path / "results"
    common = [
        "backends=[cg]",
        "seeds=[0]",
        "configs=[cg+e3nn,cg+fast]",
        "timing_epochs=2",
        f"out_dir={out}",
        *tiny_args(shared_root(tmp_path_factory)),
    ]
    timed = study([*common, "timing_only=true"])  # the timing pass alone: nothing trained
    assert [r["config"] for r in timed] == ["cg+e3nn", "cg+fast"] and not (out / "runs").exists()
    assert "| cg+e3nn |" in (out / "study_timing.md").read_text()
    s_stock = timed[0]["s_per_epoch"]
    argv = [*common, f"time_s={2 * s_stock}"]  # T: two stock epochs
    rows = study(argv)
    assert {(r["tp"], r["conv"]) for r in rows} == {("cg", "fast")}
    with open(out / "time_to_accuracy.csv") as handle:
        table = {r["config"]: r for r in csv.DictReader(handle)}
    assert list(table) == ["cg+e3nn", "cg+fast"]
    stock, fast = table["cg+e3nn"], table["cg+fast"]
    assert stock["reached"] == "1/1" and fast["reached"] == "1/1"
    for row in table.values():  # timed apart: the mean of the epochs after the warm-up one
        name = row["config"]
        timed = json.loads((out / "timing" / name / "summary.json").read_text())
        assert float(row["s_per_epoch"]) == pytest.approx(timed["epoch_train_time_s"][1])
    # cg+fast is cg's function on another clock: it reaches the level after as many epochs.
    epochs = float(stock["seconds_to_stock"]) / float(stock["s_per_epoch"])
    assert epochs == pytest.approx(round(epochs)) and round(epochs) >= 1
    assert float(fast["seconds_to_stock"]) == pytest.approx(epochs * float(fast["s_per_epoch"]))
    # At equal time each configuration is tested with the weights of its last epoch within T.
    with open(out / "study_equal_time.csv") as handle:
        at_t = {r["config"]: r for r in csv.DictReader(handle)}
    run = out / "runs" / "cg" / "seed0"
    reached = int(json.loads((run / "summary.json").read_text())["epochs_reached"])
    assert int(at_t["cg+e3nn"]["epochs"]) == 2
    for name, row in at_t.items():
        within = int(2 * s_stock / float(table[name]["s_per_epoch"]) + 1e-9)
        assert int(row["epochs"]) == min(within, reached)
        evaluated = run / f"evaluate_epoch{int(row['epochs']) - 1:03d}" / "metrics.json"
        metrics = json.loads(evaluated.read_text())["sets"][row["test_set"]]
        assert float(row["f_mae"]) == pytest.approx(metrics["f_mae"])
    with open(out / "study_curves.csv") as handle:  # the curves, kept beside the tables
        curve = [r for r in csv.DictReader(handle)]
    assert [int(r["epochs"]) for r in curve] == list(range(reached + 1))
    report = (out / "study.md").read_text()
    assert "`cg+e3nn` vs `cg+fast`: validation F MAE over 2 epochs" in report
    assert "seconds to stock accuracy" in report and "Test errors at equal time" in report
    assert (out / "study_configs_val_f_mae_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {p: p.stat().st_mtime_ns for p in (out / "timing").glob("*/summary.json")}
    study(argv)  # timings are reused, not measured again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A re-timing that makes cg+fast 4x faster (faster kernels): T now covers more epochs, and
    # extend=false keeps the finished run instead of extending it; the tables use the new clock.
    timing = out / "timing" / "cg+fast" / "summary.json"
    timed = json.loads(timing.read_text())
    timed["epoch_train_time_s"] = [t / 4 for t in timed["epoch_train_time_s"]]
    timing.write_text(json.dumps(timed))
    finished = (run / "summary.json").stat().st_mtime_ns
    study([*argv, "extend=false"])
    assert (run / "summary.json").stat().st_mtime_ns == finished  # reused, not trained
    header = (out / "study.md").read_text().split("\n\n")[:2]  # the title and the command
    assert f"epochs covering T = {2 * s_stock:g} s" in header[0] and f"cg {reached}" in header[0]
    for arg in ("configs=[cg+e3nn,cg+fast]", "timing_epochs=2", f"time_s={2 * s_stock:g}"):
        assert arg in header[1]
    assert "extend=false" in header[1]
    with open(out / "time_to_accuracy.csv") as handle:
        retimed_all = {r["config"]: r for r in csv.DictReader(handle)}
    retimed = retimed_all["cg+fast"]
    assert float(retimed["s_per_epoch"]) == pytest.approx(float(fast["s_per_epoch"]) / 4)
    assert float(retimed["seconds_to_stock"]) == pytest.approx(float(fast["seconds_to_stock"]) / 4)
    # Without the run directories (a clone keeps the curves, not the runs) the timing pass alone,
    # given the study's T, derives the same time to stock accuracy from the kept curves.
    shutil.rmtree(out / "runs")
    (out / "time_to_accuracy.csv").unlink()
    study([*common, "timing_only=true", f"time_s={2 * s_stock}"])
    with open(out / "time_to_accuracy.csv") as handle:
        rederived = {r["config"]: r for r in csv.DictReader(handle)}
    assert rederived.keys() == retimed_all.keys()
    for name, row in rederived.items():
        for key in ("s_per_epoch", "seconds_to_stock", "level", "T", "speedup_vs_stock"):
            assert float(row[key]) == pytest.approx(float(retimed_all[name][key]))
        assert row["reached"] == retimed_all[name]["reached"]
    report = (out / "study_timing.md").read_text()
    assert "seconds to stock accuracy" in report and f"time_s={2 * s_stock:g}" in report


def test_budget_stops_a_run(tmp_path_factory, tmp_path: Path) -> None:
    """A budget shorter than one step stops after the first step (of 3 per epoch), inside the
    first epoch, which is then validated, checkpointed and evaluated."""
    out = tmp_path / "results"
    rows = study(
        ["backends=[grid]", "seeds=[0]", "budget_s=1e-6", "epochs=5", f"out_dir={out}"]
        + tiny_args(shared_root(tmp_path_factory))
    )
    summary = json.loads((out / "runs" / "grid" / "seed0" / "summary.json").read_text())
    assert summary["epochs_reached"] == pytest.approx(1 / 3)
    assert len(summary["epoch_train_time_s"]) == 1
    (row,) = rows
    assert row["epochs"] == pytest.approx(1 / 3) and row["equal_epochs"] is None
    table = (out / "study.md").read_text()
    assert "budget_s=1e-06" in table and f"out_dir={out}" in table  # the command to rerun


def test_budget_counts_the_epochs_before_a_resume() -> None:
    """The budget is for the whole run: epochs restored from a checkpoint count."""
    timer = EpochTrainTimer(budget_s=1.0)
    timer.load_state_dict({"epoch_times": {"0": 0.6, "1": 0.3}})
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    trainer = SimpleNamespace(current_epoch=2, should_stop=False, strategy=strategy)
    module = SimpleNamespace(device=torch.device("cpu"))
    timer.on_train_epoch_start(trainer, module)
    timer.on_train_batch_start(trainer, module, None, 0)
    timer.on_train_batch_end(trainer, module, None, None, 0)
    assert not trainer.should_stop  # 0.9 s + one instant step
    timer.on_train_batch_start(trainer, module, None, 1)
    time.sleep(0.15)
    timer.on_train_batch_end(trainer, module, None, None, 1)
    assert trainer.should_stop


def test_epoch_timer_waits_for_the_gpu(monkeypatch) -> None:
    """On CUDA the step's kernels are still running when the host reaches the step's end: the
    timer synchronises the device (here a fake sync that takes 0.2 s) before reading the
    clock, and before starting it (earlier queued work is not the step's)."""
    calls = []

    def fake_sync(device):
        calls.append(device)
        time.sleep(0.2 if len(calls) % 2 == 0 else 0.0)  # the step's queued kernels

    monkeypatch.setattr(torch.cuda, "synchronize", fake_sync)
    gpu = torch.device("cuda", 0)
    timer = EpochTrainTimer()
    strategy = SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision)
    fitting = SimpleNamespace(fn=TrainerFn.FITTING)
    trainer = SimpleNamespace(
        current_epoch=0, should_stop=False, strategy=strategy, state=fitting, sanity_checking=False
    )
    module = SimpleNamespace(device=gpu)
    timer.on_train_epoch_start(trainer, module)
    timer.on_train_batch_start(trainer, module, None, 0)
    timer.on_train_batch_end(trainer, module, None, None, 0)
    timer.on_train_epoch_end(trainer, module)
    assert calls == [gpu, gpu]
    assert timer.per_epoch[0] >= 0.2
    timer.on_train_batch_start(trainer, SimpleNamespace(device=torch.device("cpu")), None, 1)
    assert len(calls) == 2  # nothing to wait for on the CPU


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["backends=[cg,nope]"], "choose among"),
        (["seeds=[]"], "seeds="),
        (["budget_s=0"], "budget_s=0"),
        (["jobs=0"], "jobs=0"),
        (["seed=3"], "seeds=[…]"),
        (["trainer.max_epochs=3"], "epochs=…"),
        (["configs=[cg+e3nn]", "backends=[grid]"], "configs time backends ['cg']"),
        (["configs=[grid+fast+fft]"], "a method for gaunt only"),
        (["time_s=60"], "time_s=60.0 needs configs"),
        (["extend=false"], "extend=false only applies with time_s"),
    ],
)
def test_bad_arguments_are_refused_before_running(argv, message, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        study([*argv, f"out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_time_to_reach_each_backends_accuracy() -> None:
    """Hand-made curves: a backend's level is the best value of its worst seed; a seed that
    never gets to a level is counted as k/n."""
    curves = {
        "cg": [([0, 10, 20, 30], [100, 60, 40, 30]), ([0, 10, 20, 30], [100, 50, 45, 40])],
        "grid": [([0, 5, 10, 15, 20], [100, 70, 50, 44, 38]), ([0, 5, 10], [100, 60, 50])],
    }
    assert time_to_reach(curves["cg"][0], 40) == 20
    assert time_to_reach(curves["grid"][1], 40) is None
    # levels: grid max(38, 50) = 50, cg max(30, 40) = 40
    header, _, cg, grid = reach_table(curves, ["cg", "grid"])
    assert header.split("|")[2:4] == [" <= 50 meV/Å (grid's) ", " <= 40 meV/Å (cg's) "]
    assert cg.split("|")[2:4] == [" 15 ± 7.07 ", " 25 ± 7.07 "]
    assert grid.split("|")[2:4] == [" 10 ", " 20 (1/2) "]


def test_s2ef_metrics_are_tabled_for_oc20_only() -> None:
    row = {
        "tp": "grid",
        "seed": 1,
        "test_set": "test",
        "n_structures": 3,
        "epoch_time_s": 2.0,
        "equal_epochs": None,
        **dict.fromkeys(("inference_ms", "e_mae", "e_rmse", "f_mae", "f_rmse"), 1.0),
        "energy_mae_eV": 0.25,
        "forces_cosine": 0.5,
        "efwt": 0.0,
    }
    oc20 = markdown([row], ["grid"], "# t", s2ef=True)
    assert table_row(oc20, "## Test set `test`", "grid")[-3:] == ["0.25", "0.5", "0"]
    assert "EFwT" in oc20 and "EFwT" not in markdown([row], ["grid"], "# t")


def test_parallel_gpu_runs_get_their_own_gpu(tmp_path: Path, monkeypatch) -> None:
    """trainer=gpu jobs=3 on 2 GPUs: slots 0, 1, 0 (round-robin); a run sees only its GPU
    (CUDA_VISIBLE_DEVICES, mapped through the one this process was given) and gives it back."""
    assert gpu_slots(3, ["trainer=cpu"], 2) is None and gpu_slots(1, ["trainer=gpu"], 2) is None
    slots = gpu_slots(3, ["data=3bpa", "trainer=gpu"], 2)
    assert [slots.get() for _ in range(3)] == [0, 1, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    slots.put(1)
    log_file = tmp_path / "run.log"
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'])"
    _run_logged([sys.executable, "-c", show], log_file, "probe", slots)
    assert log_file.read_text().strip() == "6"
    assert slots.get_nowait() == 1  # returned
