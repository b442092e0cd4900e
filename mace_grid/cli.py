"""Entry-point plumbing: user errors become one line on stderr and exit code 2; key=value args;
failed starts leave no run directory behind."""

import csv
import dataclasses
import errno
import functools
import io
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mace_grid.errors import ConfigError, MaceGridError
from mace_grid.utils import atomic_write_text

log = logging.getLogger("mace_grid")

# Before Hydra creates the run directory: what is newer was written by this process.
_STARTED = time.time()


def exit_on_user_error(fn):
    """Turn a :class:`MaceGridError` raised by ``fn`` (also inside a Hydra-instantiated object)
    into ``error: <message>`` and exit 2, after removing what this failed start wrote (see
    :func:`remove_failed_start`); in a multirun the member is recorded as failed instead and the
    sweep goes on (:class:`MultirunSummary`). SIGTERM exits through ``finally`` blocks
    (temporary files); Ctrl-C outside training exits 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            remove_failed_start()
            sys.exit(130)
        except (MaceGridError, InstantiationException, OSError) as err:
            cause = err if isinstance(err, (MaceGridError, OSError)) else err.__cause__
            if isinstance(cause, OSError) and cause.errno in _NOT_WRITABLE and cause.filename:
                hint = _write_hint(args)
                cause = ConfigError(f"cannot access {cause.filename}: {cause.strerror}{hint}")
            elif not isinstance(cause, MaceGridError):
                raise
            remove_failed_start()
            if _in_multirun():  # Hydra records the member as failed; the sweep goes on
                _report(cause)
                raise cause from None
            exit_with_error(cause)

    return wrapper


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _report(err: MaceGridError) -> None:
    if log.hasHandlers():  # else logging's last resort would print it a second time
        log.error("%s", err)
    if _global_rank_zero():  # every DDP rank raises it; one line is printed
        print(f"error: {err}", file=sys.stderr)


def exit_with_error(err: MaceGridError) -> NoReturn:
    """Log ``err``, print ``error: <message>`` on stderr and exit 2. The exit carries ``err`` as
    its cause, so that a sweeper running the task in-process can record the message."""
    _report(err)
    raise SystemExit(2) from err


# A path the user chose cannot be written: read-only, someone else's, or under a regular file.
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


def _write_hint(args: tuple) -> str:
    """What to change for a run that cannot write: the work dir (demo data, neighbour caches)
    or the run's output dir, as the entry point's Hydra config names them."""
    cfg = args[0] if args and isinstance(args[0], DictConfig) else None
    if cfg is None or OmegaConf.select(cfg, "paths") is None:
        return ""
    return (
        "; point the demo data and neighbour caches to a writable place with "
        "MACE_GRID_WORK_DIR=<dir> (or paths.cache_dir=), and this run's outputs with "
        "hydra.run.dir=<dir>"
    )


class WritableOutputDir(Callback):
    """Hydra callback (``hydra.callbacks``): before Hydra creates the run (or sweep) directory,
    refuse one that cannot be created or written (read-only ``outputs/``, a shared run's
    checkpoint folder) with one ``error:`` line naming the override that moves it; exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(config.hydra.sweep.dir, "hydra.sweep.dir")


def _check_writable(path: str, key: str) -> None:
    target = Path(path).absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    print(
        f"error: cannot create the output directory {target}: {problem}; give a writable one "
        f"with {key}=<dir>",
        file=sys.stderr,
    )
    sys.exit(2)


def _global_rank_zero() -> bool:
    """False in the other processes of a distributed run (Lightning's launcher, torchrun and
    SLURM set these variables; a plain run has none of them)."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


_STOPPING = False


def _terminate(signum, frame):
    """Exit through ``finally`` blocks, once: a repeat while they run is ignored, so that it
    cannot cut the cleanup or the resume line short (a study's death signals each training once
    per exiting study thread: PR_SET_PDEATHSIG fires at every reparenting)."""
    global _STOPPING
    if not _STOPPING:
        _STOPPING = True
        raise SystemExit(128 + signum)


def remove_failed_start() -> None:
    """Remove what Hydra wrote for a run that failed before producing anything: the whole run
    directory when it holds only this process's ``.hydra/`` record and log, or (a refused
    resume of an existing run) only this process's record subdirectory."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    output_dir = OmegaConf.select(hc, "runtime.output_dir")  # unset when Hydra never ran a job
    if output_dir is None or not Path(output_dir).is_dir():
        return
    run_dir = Path(output_dir)
    subdir = hc.output_subdir
    record = run_dir / subdir if subdir else None
    entries = list(run_dir.iterdir())
    top = Path(subdir).parts[0] if subdir else None
    only_logs = all(
        (e.name == top and e.is_dir()) or (e.is_file() and e.suffix == ".log") for e in entries
    )
    if only_logs and all(_new(f) for f in run_dir.rglob("*")):
        shutil.rmtree(run_dir, ignore_errors=True)
    elif record is not None and record != run_dir / ".hydra" and _new(record):
        shutil.rmtree(record, ignore_errors=True)


def _new(path: Path) -> bool:
    return path.stat().st_mtime >= _STARTED


def refuse_overwriting_inputs(
    inputs: dict[str, str | Path | None], outputs: dict[str, str | Path | None]
) -> None:
    """ConfigError if an output path (``key: path``; None: not written) is an input's or an
    earlier output's file: writing it would destroy what the tool reads or has just written."""
    taken: list[tuple[str, Path]] = []
    for key, path in [*inputs.items(), *outputs.items()]:
        if path is None:
            continue
        path = Path(path)
        clash = next((k for k, p in taken if _same_file(p, path)), None)
        if clash is not None and key in outputs:
            raise ConfigError(
                f"{key}={path} is the file of {clash}=: writing it would overwrite "
                f"{'what it reads' if clash in inputs else 'that output'}; give {key}= another path"
            )
        taken.append((key, path))


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return a.samefile(b)  # also through hard links
    return a.resolve() == b.resolve()


def parse_cli(schema: type, argv: list[str] | None = None, doc: str | None = None) -> DictConfig:
    """``key=value`` arguments (OmegaConf dotlist, e.g. ``steps=100 out=m.model``) merged into
    the dataclass ``schema``; unknown keys, wrong types and missing values raise ConfigError.
    ``--help``/``-h`` prints ``doc`` and the arguments with their defaults, then exits 0."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage(schema, doc))
        sys.exit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments are key=value pairs (--help lists them); got {bad}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if missing:
        raise ConfigError(f"missing required argument(s): {', '.join(f'{k}=…' for k in missing)}")
    return cfg


def usage(schema: type, doc: str | None = None) -> str:
    """``doc`` and one ``key=default`` line per field of ``schema`` (``???``: required)."""
    lines = [(doc or "").strip(), "", "arguments (key=value):"]
    for field in dataclasses.fields(schema):
        default = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        elif default is dataclasses.MISSING:
            default = "???"
        lines.append(f"  {field.name}={default}")
    return "\n".join(lines).lstrip()


class MultirunSummary(Callback):
    """A multirun's members, status and result (``train.py -m …``): printed as a table when the
    last member ends and written to ``<sweep dir>/members.csv``; exit 1 if any member failed.

    Hydra's basic sweeper otherwise re-raises the first failure only after all members ran (and
    a member's user error used to end the whole sweep): every member runs, one line each here.
    """

    def __init__(self) -> None:
        self.rows: list[tuple[int, str, str, str]] = []
        self.total: int | None = None
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if not config.hydra.sweeper._target_.endswith("BasicSweeper"):
            return  # a search (hparams_search=optuna) records its trials itself
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self.sweep_dir = Path(config.hydra.sweep.dir)
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        self.total = sum(len(b) for b in BasicSweeper.split_arguments(parsed, None))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if self.sweep_dir is None:  # a single run, or a search
            return
        value = job_return._return_value
        if job_return.status == JobStatus.COMPLETED:
            status, result = "ok", "-" if value is None else f"val F MAE {value:.4g} meV/Å"
        else:
            status, result = "failed", " ".join(str(value).split())[:160] or type(value).__name__
        num = int(OmegaConf.select(config, "hydra.job.num", default=len(self.rows)))
        self.rows.append((num, " ".join(job_return.overrides or []), status, result))
        if len(self.rows) == self.total:
            self._finish()

    def _finish(self) -> None:
        rows = sorted(self.rows)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["member", "overrides", "status", "result"])
        writer.writerows(rows)
        atomic_write_text(self.sweep_dir / "members.csv", buffer.getvalue())
        width = max(len(r[1]) for r in rows)
        lines = [f"{'member':>6}  {'overrides':<{width}}  {'status':<6}  result"]
        lines += [f"{n:>6}  {o:<{width}}  {s:<6}  {r}" for n, o, s, r in rows]
        print("\n".join(lines))
        failed = sum(r[2] == "failed" for r in rows)
        if failed:
            print(
                f"error: {failed} of {len(rows)} members failed (members.csv in {self.sweep_dir})",
                file=sys.stderr,
            )
            sys.exit(1)
