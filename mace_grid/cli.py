"""Entry-point plumbing: user errors become one line on stderr and exit code 2."""

import functools
import logging
import sys

from mace_grid.errors import MaceGridError

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
