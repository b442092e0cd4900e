"""Lightning DDP on CPU: 2 processes (gloo) against 1 process on the same global batches.

Both runs use ``trainer=ddp``, so both draw batches from Lightning's DistributedSampler (same seed
and epoch → one permutation; rank r takes every world_size-th frame): 1 × batch 8 and 2 × batch 4
see the same frames in every optimiser step. What can still differ (hence a tolerance, not
equality): the force loss is normalised by each rank's free-atom count before DDP averages the
gradients, and float32 all-reduce sums in another order. EMA weights are identical on all ranks,
and torchmetrics syncs the metric states, so the metrics cover exactly the same frames (the 2 valid
and 6 test frames split evenly: no DistributedSampler padding). Measured here: <= 8e-5 relative.
(``trainer=cpu`` shuffles with a RandomSampler, another order: a few % apart after 3 epochs.)
"""

import json
from pathlib import Path

import pytest
from test_train_cli import metric_rows, tiny_demo, train_cli

RTOL = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    out = {}
    for devices, batch in ((1, 8), (2, 4)):
        out[devices] = tmp / f"devices{devices}"
        train_cli(
            *tiny_demo(tmp),
            "trainer=ddp",
            f"trainer.devices={devices}",
            f"data.batch_size={batch}",
            "trainer.max_epochs=3",
            "+trainer.enable_progress_bar=false",
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
