"""Entry-point plumbing: user errors become one line on stderr and exit code 2; key=value args."""

import functools
import logging
import sys

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mace_grid.errors import ConfigError, MaceGridError

log = logging.getLogger("mace_grid")


def exit_on_user_error(fn):
    """Turn a :class:`MaceGridError` raised by ``fn`` into ``error: <message>`` and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MaceGridError as err:
            log.error("%s", err)
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_cli(schema: type, argv: list[str] | None = None) -> DictConfig:
    """``key=value`` arguments (OmegaConf dotlist, e.g. ``steps=100 out=m.model``) merged into
    the dataclass ``schema``; unknown keys, wrong types and missing values raise ConfigError."""
    argv = sys.argv[1:] if argv is None else argv
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments are key=value pairs; got {bad}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if missing:
        raise ConfigError(f"missing required argument(s): {', '.join(f'{k}=…' for k in missing)}")
    return cfg
