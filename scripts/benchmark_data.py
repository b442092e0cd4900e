"""Data-loading cost of a training configuration: memory and the share of step time spent waiting.

    python scripts/benchmark_data.py [--steps 30] [train.py overrides …]
    python scripts/benchmark_data.py data=hdf5 data.path=data/hdf5/oc20 data.batch_size=4

Timed / measured (torch threads and loader workers as configured):
  1. setup: the data module's setup(); resident memory (VmRSS) after it.
  2. pass: one full pass over the training loader (every frame read and collated, no model);
     frames/s, peak RSS of this process (ru_maxrss: setup + pass) and of the largest loader
     worker. With data=hdf5 these stay flat as the dataset grows; in memory they grow with it.
  3. steps: `--steps` training steps of the configured model through a Lightning Trainer with
     its SimpleProfiler. wait = "[_TrainingEpochLoop].train_dataloader_next" (time the loop is
     blocked fetching the next batch; the first batch, fetched while the workers start, is not
     included), compute = "run_training_batch" (forward, forces, loss, backward, optimiser
     step). Prints wait / (wait + compute) (goal: < 5 %).
"""

import argparse
import gc
import resource
import sys
import tempfile
import time

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import hydra
import torch
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import OmegaConf

from mace_grid.config import compose_config
from mace_grid.lit_module import MaceLitModule
from mace_grid.train import DTYPES, validate_config

WAIT = "[_TrainingEpochLoop].train_dataloader_next"
COMPUTE = "run_training_batch"


def rss_mb() -> float:
    """Current resident memory of this process (VmRSS), MB."""
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def peak_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps to time (0: none)")
    args, overrides = parser.parse_known_args()
    out = tempfile.mkdtemp(prefix="benchmark_data-")
    cfg = compose_config("train", overrides, output_dir=out)
    validate_config(cfg)
    torch.set_default_dtype(DTYPES[cfg.dtype])
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    print(
        f"data={cfg.data.name} ({cfg.data._target_}), batch {cfg.data.batch_size}, "
        f"workers {cfg.data.num_workers}, torch threads {torch.get_num_threads()}"
    )

    start = time.perf_counter()
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    print(
        f"setup   {time.perf_counter() - start:7.1f} s   sizes {datamodule.sizes}   "
        f"RSS after setup {rss_mb():.0f} MB"
    )

    loader = datamodule.train_dataloader()
    start, frames = time.perf_counter(), 0
    for batch in loader:
        frames += batch.num_graphs
    elapsed = time.perf_counter() - start
    del loader, batch
    gc.collect()  # shuts the persistent workers down, so their peak RSS is counted
    workers = peak_mb(resource.RUSAGE_CHILDREN) if cfg.data.num_workers else 0.0
    print(
        f"pass    {elapsed:7.1f} s   {frames} frames, {frames / elapsed:.0f} frames/s   "
        f"peak RSS {peak_mb(resource.RUSAGE_SELF):.0f} MB (process), "
        f"{workers:.0f} MB (largest worker)"
    )
    if args.steps <= 0:
        return

    torch.manual_seed(cfg.seed)
    module = MaceLitModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        tp=OmegaConf.to_container(cfg.tp, resolve=True),
        statistics=datamodule.statistics,
        test_names=tuple(datamodule.test_names),
        **cfg.optim,
        **cfg.loss,
    )
    profiler = SimpleProfiler(dirpath=out, filename="profile")
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        profiler=profiler,
        max_epochs=1,
        limit_train_batches=args.steps,
        limit_val_batches=1,  # the LR scheduler monitors val/loss
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    waits, compute = (profiler.recorded_durations[k] for k in (WAIT, COMPUTE))
    wait, step = sum(waits), sum(waits) + sum(compute)
    print(
        f"steps   {step:7.1f} s   {len(compute)} steps of tp={cfg.tp.name}, "
        f"{step / len(compute) * 1e3:.0f} ms/step"
    )
    print(
        f"waiting for data: {wait:.2f} s of {step:.1f} s = {100 * wait / step:.2f} % "
        f"({len(waits)} fetches, max {1e3 * max(waits):.0f} ms)   [{WAIT} / ({WAIT} + {COMPUTE})]"
    )
    print(f"full profile: {out}/fit-profile.txt")


if __name__ == "__main__":
    sys.exit(main())
