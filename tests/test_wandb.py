"""logger=wandb: offline by default, and a resumed run continues the same W&B run id."""

import os
from pathlib import Path

import hydra
import torch
from lightning.pytorch.loggers import WandbLogger
from test_configs import compose_train
from test_train_cli import tiny_demo, train_cli


def test_wandb_logger_is_offline_and_resumable(tmp_path: Path) -> None:
    cfg = compose_train(["logger=wandb"], tmp_path)
    (logger,) = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    assert isinstance(logger, WandbLogger)
    assert logger._offline and logger.save_dir == str(tmp_path)
    assert logger._wandb_init["resume"] == "allow" and logger._wandb_init["id"] is None


def offline_run_ids(run: Path) -> list[str]:
    """Run id of each offline-run-<date>_<time>-<id> directory, oldest first."""
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert all((d / f"run-{d.name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0 for d in dirs)
    return [d.name.rsplit("-", 1)[1] for d in dirs]


def test_resume_continues_the_same_wandb_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_SILENT": "true"}
    common = ["logger=wandb", "+trainer.enable_progress_bar=false"]
    train_cli(
        *tiny_demo(tmp_path), *common, "trainer.max_epochs=1", f"hydra.run.dir={run}", env=env
    )
    (run_id,) = offline_run_ids(run)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["wandb_run_id"] == run_id

    train_cli(f"ckpt_path={run}/checkpoints/last.ckpt", *common, "trainer.max_epochs=2", env=env)
    assert offline_run_ids(run) == [run_id, run_id]  # `wandb sync` uploads both into one run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["wandb_run_id"] == run_id  # epoch 1 = the second
