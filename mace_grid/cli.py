"""Entry-point plumbing: user errors become one line on stderr and exit code 2; key=value args;
failed starts leave no run directory behind."""

import dataclasses
import functools
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mace_grid.errors import ConfigError, MaceGridError

log = logging.getLogger("mace_grid")

# Before Hydra creates the run directory: what is newer was written by this process.
_STARTED = time.time()


def exit_on_user_error(fn):
    """Turn a :class:`MaceGridError` raised by ``fn`` (also inside a Hydra-instantiated object)
    into ``error: <message>`` and exit 2, after removing what this failed start wrote (see
    :func:`remove_failed_start`). SIGTERM exits through ``finally`` blocks (temporary files)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except (MaceGridError, InstantiationException) as err:
            cause = err if isinstance(err, MaceGridError) else err.__cause__
            if not isinstance(cause, MaceGridError):
                raise
            log.error("%s", cause)
            if _global_rank_zero():  # every DDP rank raises it; one line is printed
                print(f"error: {cause}", file=sys.stderr)
            remove_failed_start()
            sys.exit(2)

    return wrapper


def _global_rank_zero() -> bool:
    """False in the other processes of a distributed run (Lightning's launcher, torchrun and
    SLURM set these variables; a plain run has none of them)."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _terminate(signum, frame):
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
