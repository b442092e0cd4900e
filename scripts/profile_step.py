"""Where a training step spends its time: share per block family, for each (tp, conv).

    python scripts/profile_step.py [--device cpu] [--threads 1] [--models default benchmark]
        [--tps cg grid] [--convs e3nn fast] [--molecules 10] [--hidden-irreps 64x0e+64x1o]
        [--repeats 5] [--out results/conv]

One training step = forward with forces (autograd.grad, create_graph) + energy/forces MSE +
backward, float32, on the whole-model benchmark's batch of random 27-atom molecules
(``benchmark_tp.py --model``). ``default`` is ``conf/model/mace.yaml``, ``benchmark`` the 3BPA-size
model of the benchmark (--hidden-irreps, default 64x0e+64x1o; max_ell 3, correlation 3, 2 layers).

Attribution (torch.profiler, CPU self time of every op): forward ops belong to the innermost
block family whose module is running (forward hooks open a ``record_function`` range);
a backward or double-backward op belongs to the family of the op that created its autograd node
(matched by sequence number), so the force pass and the final backward are charged to the block
that caused them. Families: spherical harmonics, radial embedding (Bessel basis and cutoff),
radial MLP (``conv_tp_weights``), conv TP (``conv_tp``; with conv=fast this includes the gather
and scatter it fuses), gather/scatter (the rest of an interaction block: e3nn's gather and
scatter), linears (node embedding, interaction and product linears, skip connections), product
basis (``symmetric_contractions``), readouts, other (force/loss glue, scale-shift, sums).
With ``--device cuda`` the profiler also records CUDA activity, and each family is charged the
GPU time of the kernels its ops launched (``cuda_ms``, ``cuda_share``; the table shows these).

Against the machine's limit, per configuration (`mace_grid.tp.work`): the median time of
--repeats unprofiled steps (the device synchronised around each), what one step computed
(matmul GFLOP, pointwise elements written, ATen calls) and that time over the step's matmul
flops at the device's float32 matmul rate, timed in the same rounds as the steps (a 1024^3
``a @ b`` on the CPU at --threads, 4096^3 on a GPU): 1 would be arithmetic-bound.
Writes <out>/profile.csv (model, tp, conv, family, ms, share, then the step's columns repeated
on each family's row) and prints one table per model.
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
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_tp import (  # noqa: E402
    MATMUL,
    benchmark_model_config,
    interleaved_medians,
    molecule_batch,
    training_step,
)

from mace_grid import PROJECT_ROOT  # noqa: E402
from mace_grid.cli import exit_with_error  # noqa: E402
from mace_grid.errors import ConfigError  # noqa: E402
from mace_grid.model import build_model  # noqa: E402
from mace_grid.tp.work import count_work, limit_ratio, matmul_probe, timing_device  # noqa: E402
from mace_grid.utils import atomic_path, retain_freed_memory  # noqa: E402

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


def model_config(name: str, hidden_irreps: str) -> dict:
    if name == "default":
        return OmegaConf.to_container(OmegaConf.load(PROJECT_ROOT / "conf/model/mace.yaml"))
    return benchmark_model_config(hidden_irreps)


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


def family_times(events) -> tuple[dict[str, float], dict[str, float]]:
    """(CPU self time, GPU time of the kernels launched) in ms per family; see the module
    docstring for the attribution rule. Kernel events themselves are skipped: each is counted
    once, through the op that launched it."""
    family_of_seq: dict[int, str] = {}
    family_of_event: dict[int, str] = {}
    times: dict[str, float] = defaultdict(float)
    device_times: dict[str, float] = defaultdict(float)
    cpu_events = (e for e in events if e.device_type == DeviceType.CPU)
    for event in sorted(cpu_events, key=lambda e: (e.time_range.start, -e.time_range.end)):
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
        device_times[family] += event.self_device_time_total / 1e3
    return times, device_times


def profile_step(model_cfg: dict, tp: str, conv: str, data: dict, statistics: dict, args):
    """(CPU ms per family, CUDA ms per family, median unprofiled step ms, `Work` of one step,
    matmul FLOP/s timed in the same rounds as the unprofiled steps)."""
    torch.manual_seed(0)
    model = build_model(model_cfg, {"name": tp}, statistics, {"name": conv}).to(args.device)
    add_family_ranges(model)
    step = training_step(model, data)
    probe, probe_flop = matmul_probe(args.device, torch.float32)
    # warm-up: allocations, and TorchScript's profiling executor optimises e3nn's scripted
    # modules during their first calls
    timings = interleaved_medians({"step": step, MATMUL: probe}, args.repeats, 3, args.device)
    step_ms, rate = timings["step"][0], probe_flop / (timings[MATMUL][0] / 1e3)
    work = count_work(step)
    activities = [ProfilerActivity.CPU]
    if args.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
    return *family_times(prof.events()), step_ms, work, rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--models", nargs="+", choices=["default", "benchmark"], default=["default", "benchmark"]
    )
    p.add_argument("--tps", nargs="+", default=["cg", "grid"])
    p.add_argument("--convs", nargs="+", choices=["e3nn", "fast"], default=["e3nn", "fast"])
    p.add_argument("--molecules", type=int, default=10)
    p.add_argument("--hidden-irreps", default="64x0e+64x1o", help="of the benchmark model")
    p.add_argument("--repeats", type=int, default=5, help="unprofiled steps timed (median)")
    p.add_argument("--out", type=Path, default=Path("results/conv"))
    args = p.parse_args(argv)
    try:
        args.device = timing_device(args.device)
    except ConfigError as err:
        exit_with_error(err)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as training runs (mace_grid.train)
    torch.set_default_dtype(torch.float32)
    data, statistics = molecule_batch(args.molecules, device=args.device)
    on_gpu = args.device.type == "cuda"
    rows = []
    for model_name in args.models:
        cfg = model_config(model_name, args.hidden_irreps)
        columns = [(tp, conv) for tp in args.tps for conv in args.convs]
        table, steps = {}, {}
        for tp, conv in columns:
            cpu, gpu, step_ms, work, rate = profile_step(cfg, tp, conv, data, statistics, args)
            table[tp, conv] = gpu if on_gpu else cpu
            step = dict(
                device=args.device.type,
                step_ms=round(step_ms, 2),
                step_matmul_gflop=round(work.matmul_flop / 1e9, 6),
                step_pointwise_m=round(work.pointwise / 1e6, 2),
                step_aten_ops=work.ops,
                matmul_gflop_s=round(rate / 1e9, 2),
                step_over_matmul_time=round(limit_ratio(step_ms / 1e3, work.matmul_flop, rate), 3),
            )
            steps[tp, conv] = step
            total, gpu_total = sum(cpu.values()), sum(gpu.values())
            for family in FAMILIES:
                ms, gpu_ms = cpu.get(family, 0.0), gpu.get(family, 0.0)
                rows.append(
                    dict(
                        model=model_name,
                        tp=tp,
                        conv=conv,
                        family=family,
                        ms=round(ms, 2),
                        share=round(ms / total, 4),
                        cuda_ms=round(gpu_ms, 3) if on_gpu else None,
                        cuda_share=round(gpu_ms / gpu_total, 4) if on_gpu and gpu_total else None,
                        **step,
                    )
                )
        what = "GPU time of the kernels each family launched" if on_gpu else "CPU self time"
        print(
            f"\n{model_name} model ({cfg['hidden_irreps']}, max_ell {cfg['max_ell']}, correlation "
            f"{cfg['correlation']}), {args.molecules} x 27 atoms, float32, on {args.device}, "
            f"{args.threads} thread(s); share of one training step (forward + forces + "
            f"backward), {what} under the profiler"
        )
        print(f"{'family':<20}" + "".join(f"{f'{tp}+{conv}':>14}" for tp, conv in columns))
        for family in FAMILIES:
            line = f"{family:<20}"
            for key in columns:
                line += f"{100 * table[key].get(family, 0.0) / sum(table[key].values()):>13.1f}%"
            print(line)
        summed = "kernels (ms)" if on_gpu else "profiled (ms)"
        print(f"{summed:<20}" + "".join(f"{sum(table[k].values()):>14.1f}" for k in columns))
        print(
            f"against the limit: median of {args.repeats} unprofiled steps, and of a float32 "
            "a @ b timed in the same rounds (the matmul rate)"
        )
        for label, key, fmt in (
            ("step (ms)", "step_ms", ".1f"),
            ("matmul GFLOP/s", "matmul_gflop_s", ".1f"),
            ("matmul GFLOP", "step_matmul_gflop", ".2f"),
            ("pointwise M", "step_pointwise_m", ".1f"),
            ("ATen calls", "step_aten_ops", "d"),
            ("step / matmul time", "step_over_matmul_time", ".2f"),
        ):
            print(f"{label:<20}" + "".join(f"{steps[k][key]:>14{fmt}}" for k in columns))
    with atomic_path(args.out / "profile.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / 'profile.csv'}")


if __name__ == "__main__":
    main()
