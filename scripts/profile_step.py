"""Where a training step spends its time: share per block family, for each (tp, conv).

    python scripts/profile_step.py [--threads 1] [--models default benchmark]
        [--tps cg grid] [--convs e3nn fast] [--molecules 10] [--out results/conv]

One training step = forward with forces (autograd.grad, create_graph) + energy/forces MSE +
backward, float32, on the whole-model benchmark's batch of random 27-atom molecules
(``benchmark_tp.py --model``). ``default`` is ``conf/model/mace.yaml``, ``benchmark`` the 3BPA-size
model of the benchmark (64x0e+64x1o, max_ell 3, correlation 3, 2 layers).

Attribution (torch.profiler, CPU self time of every op): forward ops belong to the innermost
block family whose module is running (forward hooks open a ``record_function`` range);
a backward or double-backward op belongs to the family of the op that created its autograd node
(matched by sequence number), so the force pass and the final backward are charged to the block
that caused them. Families: spherical harmonics, radial embedding (Bessel basis and cutoff),
radial MLP (``conv_tp_weights``), conv TP (``conv_tp``; with conv=fast this includes the gather
and scatter it fuses), gather/scatter (the rest of an interaction block: e3nn's gather and
scatter), linears (node embedding, interaction and product linears, skip connections), product
basis (``symmetric_contractions``), readouts, other (force/loss glue, scale-shift, sums).
Writes <out>/profile.csv (model, tp, conv, family, ms, share) and prints one table per model.
"""

import argparse
import csv
import re
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_tp import benchmark_model_config, molecule_batch, training_step  # noqa: E402

from mace_grid import PROJECT_ROOT  # noqa: E402
from mace_grid.model import build_model  # noqa: E402
from mace_grid.utils import atomic_path  # noqa: E402

FAMILY_OF_MODULE = (
    (r"spherical_harmonics", "spherical harmonics"),
    (r"radial_embedding", "radial embedding"),
    (r"node_embedding", "linears"),
    (r"interactions\.\d+", "gather/scatter"),
    (r"interactions\.\d+\.conv_tp_weights", "radial MLP"),
    (r"interactions\.\d+\.conv_tp", "conv TP"),
    (r"interactions\.\d+\.(linear_up|linear|skip_tp)", "linears"),
    (r"products\.\d+\.symmetric_contractions", "product basis"),
    (r"products\.\d+\.linear", "linears"),
    (r"readouts\.\d+", "readouts"),
)
FAMILIES = (
    "spherical harmonics",
    "radial embedding",
    "radial MLP",
    "conv TP",
    "gather/scatter",
    "linears",
    "product basis",
    "readouts",
    "other",
)
PREFIX = "family::"


def model_config(name: str) -> dict:
    if name == "default":
        return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/model/mace.yaml"))
    return benchmark_model_config()


def add_family_ranges(model: torch.nn.Module) -> None:
    """Forward hooks that run each block family's modules inside a ``record_function`` range."""
    for path, module in model.named_modules():
        family = next((f for pat, f in FAMILY_OF_MODULE if re.fullmatch(pat, path)), None)
        if family is None:
            continue

        def enter(mod, args, family=family):
            mod._profile_range = record_function(PREFIX + family)
            mod._profile_range.__enter__()

        def leave(mod, args, out):
            mod._profile_range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def family_times(events) -> dict[str, float]:
    """CPU self time (ms) per family; see the module docstring for the attribution rule."""
    family_of_seq: dict[int, str] = {}
    family_of_event: dict[int, str] = {}
    times: dict[str, float] = defaultdict(float)
    for event in sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end)):
        family, parent = None, event.cpu_parent
        if event.name.startswith(PREFIX):
            family = event.name[len(PREFIX) :]
        elif event.name.startswith("autograd::engine::evaluate_function"):
            family = family_of_seq.get(event.sequence_nr)
        if family is None:
            family = family_of_event.get(id(parent), "other") if parent is not None else "other"
        family_of_event[id(event)] = family
        is_node = not event.name.startswith("autograd::engine")
        if is_node and event.sequence_nr >= 0 and event.sequence_nr not in family_of_seq:
            family_of_seq[event.sequence_nr] = family
        times[family] += event.self_cpu_time_total / 1e3
    return times


def profile_step(model_name: str, tp: str, conv: str, data: dict, statistics: dict) -> dict:
    torch.manual_seed(0)
    model = build_model(model_config(model_name), {"name": tp}, statistics, {"name": conv})
    add_family_ranges(model)
    step = training_step(model, data)
    for _ in range(3):  # warm-up: allocations, and TorchScript's profiling executor optimises
        step()  # e3nn's scripted modules during their first calls
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return family_times(prof.events())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--models", nargs="+", choices=["default", "benchmark"], default=["default", "benchmark"]
    )
    p.add_argument("--tps", nargs="+", default=["cg", "grid"])
    p.add_argument("--convs", nargs="+", choices=["e3nn", "fast"], default=["e3nn", "fast"])
    p.add_argument("--molecules", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("results/conv"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    data, statistics = molecule_batch(args.molecules)
    rows = []
    for model_name in args.models:
        columns = [(tp, conv) for tp in args.tps for conv in args.convs]
        table = {}
        for tp, conv in columns:
            times = profile_step(model_name, tp, conv, data, statistics)
            table[tp, conv] = times
            total = sum(times.values())
            for family in FAMILIES:
                ms = times.get(family, 0.0)
                rows.append(
                    dict(
                        model=model_name,
                        tp=tp,
                        conv=conv,
                        family=family,
                        ms=round(ms, 2),
                        share=round(ms / total, 4),
                    )
                )
        cfg = model_config(model_name)
        print(
            f"\n{model_name} model ({cfg['hidden_irreps']}, max_ell {cfg['max_ell']}, correlation "
            f"{cfg['correlation']}), {args.molecules} x 27 atoms, float32, {args.threads} "
            "thread(s); share of one training step (forward + forces + backward), CPU self time "
            "under the profiler"
        )
        print(f"{'family':<20}" + "".join(f"{f'{tp}+{conv}':>14}" for tp, conv in columns))
        for family in FAMILIES:
            line = f"{family:<20}"
            for key in columns:
                line += f"{100 * table[key].get(family, 0.0) / sum(table[key].values()):>13.1f}%"
            print(line)
        print(f"{'step (ms)':<20}" + "".join(f"{sum(table[k].values()):>14.0f}" for k in columns))
    with atomic_path(args.out / "profile.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'profile.csv'}")


if __name__ == "__main__":
    main()
