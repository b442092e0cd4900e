"""The backend study: every tp backend × every seed at one budget; time, memory and accuracy.

``python scripts/compare_backends.py [backends=[…] (default: every backend)] [seeds=[0,1,2]]
[epochs=100 | budget_s=<seconds of training steps>] [jobs=1] [name=study] [out_dir=…]
[train.py overrides, e.g. data=3bpa threads=1]`` writes ``results/<data>/study.{md,csv}``, the
plots ``study_*.png`` and ``runs/<tp>/seed<seed>/`` (see :mod:`mace_grid.compare`). Rerunning
the same command reuses every finished run; stop it at any point and rerun to continue. On a
shared, busy CPU pass threads=1: two torch threads competing with other jobs made training
steps 3-15x slower here.
"""

import logging
import sys

from mace_grid.cli import exit_on_user_error, parse_cli
from mace_grid.compare import CompareArgs, compare, split_args


@exit_on_user_error
def main() -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    if {"--help", "-h"} & set(sys.argv[1:]):
        parse_cli(CompareArgs, ["--help"], doc=__doc__ + "\nOther key=value pairs go to train.py.")
    own, overrides = split_args(sys.argv[1:])
    args = parse_cli(CompareArgs, own, doc=__doc__)
    try:
        compare(args, overrides)
    except KeyboardInterrupt:  # run_all has stopped the trainings; the finished ones are kept
        print(
            "interrupted: the finished runs are kept; rerun the same command to resume "
            "(it reuses them and starts the unfinished ones over)",
            file=sys.stderr,
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
