"""Lightning DDP on CPU: 2 processes (gloo) against 1 process on the same global batches.

Both runs use ``trainer=ddp``, so both draw batches from Lightning's DistributedSampler (same seed
and epoch → one permutation; rank r takes every world_size-th frame): 1 × batch 8 and 2 × batch 4
see the same frames in every optimiser step. What can still differ (hence a tolerance, not
equality): the force loss is normalised by each rank's free-atom count before DDP averages the
gradients, and float32 all-reduce sums in another order. EMA weights are identical on all ranks,
and torchmetrics syncs the metric states, so the metrics cover exactly the same frames (the 2 valid
and 6 test frames split evenly: no DistributedSampler padding). Measured here: <= 8e-5 relative.
(``trainer=cpu`` shuffles with a RandomSampler, another order: a few % apart after 3 epochs.)
The CPU runs pin ``trainer.accelerator=cpu`` (gloo), whatever GPUs the machine has; the NCCL run
needs two GPUs.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from test_train_cli import _expect_one_line_error, metric_rows, tiny_demo, train_cli

RTOL = 1e-3
CPU_DDP = ["trainer=ddp", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    for devices, batch in ((1, 8), (2, 4)):
        out[devices] = tmp / f"devices{devices}"
        train_cli(
            *tiny_demo(tmp),
            *CPU_DDP,
            f"trainer.devices={devices}",
            f"data.batch_size={batch}",
            "trainer.max_epochs=3",
            f"hydra.run.dir={out[devices]}",
        )
    return out


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_two_processes_ran_and_logged_once(runs: dict[int, Path]) -> None:
    run = runs[2]
    assert (run / "train_ddp_process_1.log").is_file()  # rank 1, relaunched by Lightning
    s = summary(run)
    assert s["epochs"] == 3 and Path(s["best_checkpoint"]).is_file()
    val_epochs = [int(r["epoch"]) for r in metric_rows(run) if r.get("val/f_mae")]
    assert val_epochs == [0, 1, 2]  # rank 0 logs, once per epoch


def test_two_processes_match_one_process(runs: dict[int, Path]) -> None:
    one, two = summary(runs[1]), summary(runs[2])
    for part in ("initial_val", "val"):
        assert two[part] == pytest.approx(one[part], rel=RTOL), part
    assert two["test"]["test"] == pytest.approx(one["test"]["test"], rel=RTOL)


def test_one_rank_with_a_non_finite_loss_stops_every_rank(tmp_path: Path) -> None:
    """Rank 1 alone sees a NaN loss: both ranks decide together and exit with one error line,
    instead of rank 0 waiting in the next all-reduce until the process-group timeout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    proc = train_cli(
        *tiny_demo(tmp_path),
        *CPU_DDP,
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "+callbacks.nan_loss._target_=_callbacks.NonFiniteLossOnRank",
        f"hydra.run.dir={tmp_path}/run",
        check=False,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    _expect_one_line_error(proc, "non-finite training loss at epoch 0")
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.parametrize("tp,correlation", [("grid_rank", 1), ("grid_chain", 2)])
def test_ddp_trains_backends_without_unused_parameters(
    tmp_path: Path, tp: str, correlation: int
) -> None:
    """grid_rank at correlation 1 and grid_chain at 2 have no products (no round trip): they
    must not register parameters that no forward uses, or DDP fails at its second step."""
    run = tmp_path / "run"
    train_cli(
        *tiny_demo(tmp_path),
        *CPU_DDP,
        "trainer.devices=2",
        "trainer.max_epochs=1",
        f"tp={tp}",
        f"model.correlation={correlation}",
        f"hydra.run.dir={run}",
    )
    assert summary(run)["epochs"] == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_two_gpus_match_one_gpu(tmp_path: Path) -> None:
    out = {}
    for devices, batch in ((1, 8), (2, 4)):
        out[devices] = tmp_path / f"gpus{devices}"
        train_cli(
            *tiny_demo(tmp_path),
            "trainer=ddp",
            "trainer.accelerator=gpu",
            f"trainer.devices={devices}",
            f"data.batch_size={batch}",
            "trainer.max_epochs=3",
            "+trainer.enable_progress_bar=false",
            f"hydra.run.dir={out[devices]}",
        )
    one, two = summary(out[1]), summary(out[2])
    assert two["val"] == pytest.approx(one["val"], rel=RTOL)
