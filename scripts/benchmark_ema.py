"""Training-step time with the EMA callback before and after `mace_grid.callbacks.ParameterEMA`.

    python scripts/benchmark_ema.py [--epochs 3] [--rounds 2] [--threads 1] [overrides ...]

Both in one process, on the default model and data (``train.py``'s config with the overrides):
Lightning's ``EMAWeightAveraging`` (every parameter and buffer, one tensor at a time) and
``ParameterEMA`` (parameters only, multi-tensor), in alternating rounds of ``--epochs``
epochs each (one validation batch), the same seed and initial weights. Reports s/epoch of the
training steps (`mace_grid.callbacks.EpochTrainTimer`) per variant, the after/before ratio, and
the time of the EMA update alone (median of 200 interleaved updates).
"""

import argparse
import statistics
import time

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import OmegaConf

from mace_grid.callbacks import EpochTrainTimer, ParameterEMA
from mace_grid.config import compose_config
from mace_grid.lit_module import MaceLitModule
from mace_grid.model import DTYPES

VARIANTS = {"EMAWeightAveraging": EMAWeightAveraging, "ParameterEMA": ParameterEMA}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("overrides", nargs="*", help="train.py overrides (data=..., model....)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = compose_config("train", args.overrides, output_dir="outputs/benchmark_ema")
    torch.set_default_dtype(DTYPES[cfg.dtype])
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")

    def module() -> MaceLitModule:
        L.seed_everything(cfg.seed, verbose=False)
        return MaceLitModule(
            model=OmegaConf.to_container(cfg.model, resolve=True),
            tp=OmegaConf.to_container(cfg.tp, resolve=True),
            statistics=datamodule.statistics,
            conv=OmegaConf.to_container(cfg.conv, resolve=True),
            **cfg.optim,
            **cfg.loss,
        )

    per_epoch = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, cls in VARIANTS.items():
            timer = EpochTrainTimer()
            trainer = L.Trainer(
                accelerator="cpu",
                devices=1,
                max_epochs=args.epochs,
                limit_val_batches=1,  # the LR scheduler reads val/loss; timer: steps only
                callbacks=[cls(decay=0.99), timer],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                gradient_clip_val=cfg.trainer.gradient_clip_val,
                inference_mode=False,
            )
            trainer.fit(module(), datamodule=datamodule)
            per_epoch[name] += timer.per_epoch
            print(f"{name}: {[round(t, 2) for t in timer.per_epoch]} s/epoch", flush=True)

    # the update alone, interleaved
    lit = module()
    callbacks = {name: cls(decay=0.99) for name, cls in VARIANTS.items()}
    fake = type("T", (), {"global_step": 0})()
    for cb in callbacks.values():
        cb.setup(fake, lit, "fit")
    update_ms = {name: [] for name in VARIANTS}
    for step in range(1, 201):
        fake.global_step = step
        for name, cb in callbacks.items():
            start = time.perf_counter()
            cb.on_train_batch_end(fake, lit, None, None, step - 1)
            update_ms[name].append(1e3 * (time.perf_counter() - start))

    n_params = sum(1 for _ in lit.parameters())
    n_buffers = sum(1 for _ in lit.buffers())
    print(f"\nmodel: {n_params} parameter tensors, {n_buffers} buffers; threads={args.threads}")
    print("| EMA | s/epoch (mean ± std) | update (ms, median) |\n|---|---|---|")
    for name in VARIANTS:
        ts = per_epoch[name]
        print(
            f"| {name} | {statistics.mean(ts):.3f} ± {statistics.stdev(ts):.3f} "
            f"| {statistics.median(update_ms[name]):.3f} |"
        )
    before, after = (statistics.mean(per_epoch[n]) for n in VARIANTS)
    print(f"s/epoch ratio ParameterEMA / EMAWeightAveraging: {after / before:.3f}")


if __name__ == "__main__":
    main()
