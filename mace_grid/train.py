"""The training pipeline behind ``train.py``: validate → data → statistics → model → fit → test.

Each step logs the object it built. ``run(cfg)`` returns the run summary that is also written
to ``<run dir>/summary.json``.
"""

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, WeightAveraging
from lightning.pytorch.trainer.states import TrainerStatus
from omegaconf import DictConfig, OmegaConf, open_dict

from mace_grid import tp as tp_backends
from mace_grid.calculator import read_checkpoint
from mace_grid.callbacks import EpochTrainTimer
from mace_grid.conv import validate_conv
from mace_grid.errors import ConfigError
from mace_grid.lit_module import METRIC_NAMES, MaceLitModule
from mace_grid.loggers import ResumableCSVLogger
from mace_grid.model import DTYPES, count_parameters, describe_products, validate_model_config
from mace_grid.resume import RUN_DEFINING, resume_config
from mace_grid.utils import atomic_write_text, format_metrics_table, retain_freed_memory

log = logging.getLogger("mace_grid.train")


def validate_config(cfg: DictConfig) -> None:
    """Fail fast, before anything is built, with a message that says what to change."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(f'{k}=…' for k in missing)} "
            "(e.g. data=xyz data.train_file=<file or glob>)"
        )
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype={cfg.dtype!r}; choose one of {sorted(DTYPES)}")
    if cfg.tp.name not in tp_backends.BACKENDS:
        raise ConfigError(
            f"tp.name={cfg.tp.name!r}; choose one of {', '.join(tp_backends.BACKENDS)} (tp=<name>)"
        )
    tp = OmegaConf.to_container(cfg.tp, resolve=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    validate_model_config(model_cfg, tp)
    validate_conv(cfg.conv.name, model_cfg)
    precision = str(cfg.trainer.get("precision", "32-true"))
    if tp["name"] != "cg" and ("16" in precision or "mixed" in precision):
        raise ConfigError(
            f"trainer.precision={precision}: the Gaunt product backends (tp={tp['name']}) do "
            "not support autocast / mixed precision; use trainer.precision=32-true"
        )
    if cfg.budget_s is not None:
        if float(cfg.budget_s) <= 0:
            raise ConfigError(f"budget_s={cfg.budget_s} must be a positive number of seconds")
        if (cfg.get("callbacks") or {}).get("epoch_timer") is None:
            raise ConfigError("budget_s needs callbacks.epoch_timer (it counts the time)")
    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs < 1 and (max_epochs != -1 or cfg.budget_s is None):
        raise ConfigError(
            f"trainer.max_epochs={max_epochs} must be >= 1 (or -1 with a budget_s=<seconds>)"
        )
    batches = cfg.trainer.get("limit_train_batches")
    if batches is not None and not batches > 0:
        raise ConfigError(
            f"trainer.limit_train_batches={batches} trains nothing: give a fraction in (0, 1] or "
            "a number of batches >= 1 (or drop it)"
        )
    if not isinstance(cfg.compile, bool):
        raise ConfigError(f"compile={cfg.compile!r} must be true or false")
    if cfg.threads is not None and int(cfg.threads) < 1:
        raise ConfigError(f"threads={cfg.threads} must be a positive integer or null")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")


def load_resume_checkpoint(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any] | None]:
    """``(config, checkpoint)`` of the run; for ``ckpt_path=`` the resumed run's own config with
    the command's overrides on top (:func:`mace_grid.resume.resume_config`), each change logged."""
    if cfg.ckpt_path is None:
        return cfg, None
    ckpt = read_checkpoint(cfg.ckpt_path)
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg else []
    groups = list(hydra_cfg.runtime.choices) if hydra_cfg else []
    saved = ckpt.get("run_config_unresolved")
    if saved is None:  # written before resumes restored the whole run: its resolved config
        saved = {
            **OmegaConf.to_container(cfg, resolve=False),
            **{k: ckpt["run_config"][k] for k in RUN_DEFINING},
        }
        log.warning(
            "%s predates whole-run resumes: only %s come from it, the rest from this command",
            cfg.ckpt_path,
            ", ".join(RUN_DEFINING),
        )
    resumed, changes = resume_config(cfg, saved, overrides, groups)
    with open_dict(resumed):
        if ckpt.get("wandb_run_id") and (resumed.get("logger") or {}).get("wandb") is not None:
            resumed.logger.wandb.id = ckpt["wandb_run_id"]  # continue the same W&B run
    log.info("Resuming run from %s (after epoch %d)", cfg.ckpt_path, ckpt["epoch"])
    for change in changes:
        log.info("Resume changes %s", change)
    return resumed, ckpt


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, test the best checkpoint, write and return the run summary."""
    validate_config(cfg)
    cfg, resume = load_resume_checkpoint(cfg)
    if resume is not None:
        validate_config(cfg)
    torch.set_default_dtype(DTYPES[cfg.dtype])
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    retain_freed_memory()
    out_dir = Path(cfg.paths.output_dir)

    log.info("Instantiating data <%s> (%s)", cfg.data._target_, cfg.data.name)
    z_table = resume["hyper_parameters"]["statistics"]["atomic_numbers"] if resume else None
    datamodule = hydra.utils.instantiate(cfg.data, atomic_numbers=z_table)
    datamodule.prepare_data()
    datamodule.setup("fit")
    statistics = resume["hyper_parameters"]["statistics"] if resume else datamodule.statistics
    log.info("Data statistics: %s", json.dumps(statistics))
    # Seeded after the data are read (which may draw random numbers, e.g. loader seeds), so the
    # initial weights and the shuffling don't depend on how the data were loaded (memory/HDF5).
    L.seed_everything(cfg.seed, workers=True)

    module = MaceLitModule(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        tp=OmegaConf.to_container(cfg.tp, resolve=True),
        statistics=statistics,
        conv=OmegaConf.to_container(cfg.conv, resolve=True),
        compile=bool(cfg.compile),
        test_names=tuple(datamodule.test_names),
        **cfg.optim,
        **cfg.loss,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    module.run_config_unresolved = OmegaConf.to_container(cfg, resolve=False)
    module.run_dir = str(out_dir)
    log.info(
        "Built ScaleShiftMACE with tp=%s, conv=%s: %d parameters (%s)",
        cfg.tp.name,
        cfg.conv.name,
        count_parameters(module.model),
        describe_products(module.model, module.hparams.tp, cfg.model.correlation),
    )

    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers and any(isinstance(c, LearningRateMonitor) for c in callbacks):
        log.info("No logger: callbacks.lr_monitor is left out (the epoch line shows the lr)")
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    log.info("Instantiating trainer with callbacks %s", [type(c).__name__ for c in callbacks])
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    evaluator: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )

    if resume is not None:
        for logger in loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.drop_after(resume["epoch"])
    else:
        log.info("Validating the untrained model (initial_val)")
        module.initial_val = _metrics(evaluator.validate(module, datamodule, verbose=False), "val")
    budget = f" or {cfg.budget_s} s of training steps" if cfg.budget_s is not None else ""
    log.info("Training for up to %s epochs%s", cfg.trainer.max_epochs, budget)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except BaseException as raised:  # Ctrl-C (Lightning exits 1) or SIGTERM, maybe re-raised
        stop = _stop_in(raised)
        if trainer.state.status != TrainerStatus.INTERRUPTED or stop is None:
            raise
        if stop is not raised:  # a hook or logger failed while the run was stopping
            log.warning("While stopping: %s: %s", type(raised).__name__, raised)
        _report_interrupt(trainer)
        code = getattr(stop, "code", 1)
        if code is None:  # Lightning's SIGTERMException: its loop saw the signal
            code = 128 + signal.SIGTERM
        raise SystemExit(130 if code == 1 else code) from None
    train_time = module.fit_time_offset + time.perf_counter() - start
    try:
        return _test_and_summarise(cfg, trainer, evaluator, module, datamodule, train_time)
    except (SystemExit, KeyboardInterrupt):
        last = _last_checkpoint(trainer)
        if trainer.is_global_zero and last is not None:
            log.warning(
                "Interrupted after training, before the summary: evaluate the run with  "
                "python train.py ckpt_path=%s",
                last,
            )
        raise


def _test_and_summarise(cfg, trainer, evaluator, module, datamodule, train_time) -> dict:
    """Validate and test the best checkpoint; write ``summary.json`` and print the table."""
    out_dir, callbacks = Path(cfg.paths.output_dir), trainer.callbacks

    best = _best_checkpoint(trainer)
    # announce what is there: callbacks=none has Lightning's own last-epoch checkpoint, no EMA
    monitored = trainer.checkpoint_callback.monitor is not None
    which = "best" if monitored and trainer.checkpoint_callback.best_model_path else "last"
    weights = "EMA" if any(isinstance(c, WeightAveraging) for c in callbacks) else "trained"
    log.info("Evaluating %s checkpoint %s (%s weights)", which, best, weights)
    module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    val = _metrics(evaluator.validate(module, datamodule, verbose=False), "val")
    test_results = evaluator.test(module, datamodule, verbose=False)
    test = {
        name: _metrics(test_results, f"test/{name}", index=i)
        for i, name in enumerate(datamodule.test_names)
    }
    for logger in trainer.loggers:
        logger.log_metrics(
            {
                f"test/{name}/{k}": v
                for name, m in test.items()
                for k, v in m.items()
                if v is not None
            },
            step=trainer.global_step,
        )
        logger.save()
    timer = next((c for c in callbacks if isinstance(c, EpochTrainTimer)), None)
    summary = {
        "tp": cfg.tp.name,
        "conv": cfg.conv.name,
        "tp_options": dict(module.hparams.tp.get("options") or {}),
        "data": cfg.data.name,
        "epochs": trainer.current_epoch,
        # Optimiser steps over steps per epoch: a budget can end an epoch early.
        "epochs_reached": trainer.global_step / trainer.num_training_batches,
        "train_time_s": train_time,
        "epoch_train_time_s": timer.per_epoch if timer else [],
        "initial_val": module.initial_val,
        "val": val,
        "test": test,
        "best_checkpoint": best,
    }
    if trainer.is_global_zero:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        rows = {"initial val": module.initial_val, "val (best)": val}
        rows.update({f"test {name}": m for name, m in test.items()})
        print(format_metrics_table(rows, METRIC_NAMES))
        print(f"{which} checkpoint: {best}\nsummary: {out_dir / 'summary.json'}")
    return summary


def _stop_in(raised: BaseException) -> BaseException | None:
    """The SystemExit or KeyboardInterrupt that stopped the run: ``raised`` itself, or the one
    being handled when a callback or logger raised ``raised`` while Lightning tore down."""
    seen = raised
    while seen is not None:
        if isinstance(seen, (SystemExit, KeyboardInterrupt)):
            return seen
        seen = seen.__context__
    return None


def _last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The run's ``last.ckpt`` (its last completed epoch), if it has one."""
    ckpt = trainer.checkpoint_callback
    last = Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None
    return last if last is not None and last.is_file() else None


def _report_interrupt(trainer: L.Trainer) -> None:
    """Say how to continue an interrupted run (its last completed epoch is checkpointed)."""
    last = _last_checkpoint(trainer)
    if not trainer.is_global_zero:
        return
    if last is not None:
        log.warning(
            "Interrupted: resume from the last completed epoch with  python train.py ckpt_path=%s",
            last,
        )
    else:
        log.warning("Interrupted before the first checkpoint: nothing to resume")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a dict-valued group; ``key=null`` disables an entry."""
    return [hydra.utils.instantiate(c) for c in (group or {}).values() if c is not None]


def _best_checkpoint(trainer: L.Trainer) -> str:
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        raise ConfigError(
            "no checkpoint to test: trainer.enable_checkpointing=false without "
            "callbacks.model_checkpoint; keep one of them"
        )
    if not (ckpt.best_model_path or ckpt.last_model_path):
        raise ConfigError(
            f"no checkpoint was written after {trainer.global_step} training steps: check "
            "trainer.limit_train_batches / min_epochs and callbacks.model_checkpoint's settings"
        )
    return ckpt.best_model_path or ckpt.last_model_path


def _metrics(
    results: list[dict[str, float]], prefix: str, index: int = 0
) -> dict[str, float | None]:
    """``{e_mae, e_rmse, f_mae, f_rmse}`` from Lightning's validate/test result list; None for
    a metric without data (the force metrics of an energy-only test set)."""
    values = {name: float(results[index][f"{prefix}/{name}"]) for name in METRIC_NAMES}
    return {name: v if math.isfinite(v) else None for name, v in values.items()}
