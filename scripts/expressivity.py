"""Print what each product-basis backend can learn per (element, channel).

    python scripts/expressivity.py [--correlation 3] [--max-l 3] [--backends cg gaunt grid]
        [--elements 1] [--factors channel]

For irreps_in 0e+1o+...+L_in and irreps_out 0e+1o and 0e (mace's first- and last-layer
product blocks): trainable weights, independent couplings (rank of d(output)/d(weights) over
random inputs, float64) and complete (all O(3)-equivariant polynomial maps of degree <=
correlation, counted without any backend). See `mace_grid.tp.expressivity`. With
``--elements E``: per channel of a model with E elements, measured over all of them at once
(weights the elements share, grid_rank's and grid_chain's factor weights, count once);
``--factors element`` gives those two backends a set of factor weights per element instead
(``tp.options.factors``).
"""

import argparse
import warnings

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import torch

from mace_grid import tp
from mace_grid.tp.grid_rank import FACTORS

#: backends that take ``tp.options.factors``
WITH_FACTORS = ("grid_rank", "grid_chain")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--correlation", type=int, default=3)
    p.add_argument("--max-l", type=int, default=3)
    p.add_argument("--backends", nargs="+", choices=tp.BACKENDS, default=list(tp.BACKENDS))
    p.add_argument("--elements", type=int, default=1, help="elements per channel (default 1)")
    p.add_argument(
        "--factors", choices=FACTORS, default="channel", help="grid_rank/grid_chain factor weights"
    )
    args = p.parse_args(argv)
    if args.elements < 1:
        p.error(f"--elements must be >= 1, got {args.elements}")
    warnings.filterwarnings("ignore", category=UserWarning)  # e3nn/mace TorchScript chatter
    torch.set_num_threads(1)
    per = (
        "per (element, channel)" if args.elements == 1 else f"per channel, {args.elements} elements"
    )
    if args.factors != "channel":
        per += f", factors={args.factors}"
    print(f"correlation {args.correlation}; {per}: weights / independent couplings / complete")
    print(f"{'L_in':>4} {'irreps_out':>10}" + "".join(f"{b:>18}" for b in args.backends))
    for l_in in range(1, args.max_l + 1):
        irreps_in = "+".join(f"{l}{'e' if l % 2 == 0 else 'o'}" for l in range(l_in + 1))
        for irreps_out in ("0e+1o", "0e"):
            line = f"{l_in:>4} {irreps_out:>10}"
            for name in args.backends:
                if args.correlation > tp.max_correlation(name):
                    line += f"{'-':>18}"
                    continue
                options = {"factors": args.factors} if name in WITH_FACTORS else {}
                e = tp.expressivity(
                    name, irreps_in, irreps_out, args.correlation, args.elements, **options
                )
                line += f"{f'{e.weights} / {e.independent} / {e.complete}':>18}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
