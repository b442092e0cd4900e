"""Time the product-basis backends (cg, gaunt, grid, grid_rank, grid_chain) as training uses them.

Labels name a backend, or a backend with options: gaunt-fft / gaunt-direct (tp.options.method),
grid_rank-element / grid_chain-element (tp.options.factors=element).

    python scripts/benchmark_tp.py [--device cpu] [--threads 1] [--dtype float32 float64]
        [--max-l 6] [--max-cg-l 3] [--backends cg gaunt grid grid_rank grid_chain]
        [--correlation 3] [--model] [--out results/benchmark_tp]

Op section: one symmetric contraction, C channels, n nodes, correlation 3 (or --correlation,
up to 6; cg only up to 4), irreps_in 0e+1o+...+L_in, irreps_out 0e..min(L_in, 2) (mace's
layout), E elements one-hot. Two numbers per backend, median over repeats after warm-up
(the CSV also has the minimum):
  step    = forward + d(sum of outputs * fixed weights)/dx with create_graph=True + backward of
            (energy + |dE/dx|^2) into x and the weights  -- what a force-training step does;
  forward = forward alone under torch.no_grad().
Then one more step per backend is counted, not timed (`mace_grid.tp.work`): matmul flops,
pointwise outputs, ATen calls, and the time ratio to grid per unit of the flop ratio.
Model section (--model): one whole ScaleShiftMACE training step (forward with forces, energy +
forces MSE loss, backward) on a batch of random 27-atom H/C/N/O molecules, for (tp, conv) in
{cg, grid} x {e3nn, fast} (--convs); speed-ups against tp=cg conv=e3nn, stock mace; and one more
step per configuration counted the same way.
Both sections time the device's matmul rate in the same interleaved rounds as the steps
(`mace_grid.tp.work.matmul_probe`: a 1024^3 ``a @ b`` on the CPU at --threads, 4096^3 on a GPU,
in the section's dtype) and report step time / (the step's matmul flops at that rate): how far
a step is from arithmetic-bound (`limit_ratio`). --device cuda runs the op and model sections
on the GPU, the device synchronised around every timed call; the step-size section runs on the
CPU (it measures learning speed, not time).
Step-size section (--step-size): learning speed per optimiser step. For L_in in --step-size-l,
C=32, 4 elements, N(0,1) features, 128 nodes, outputs 0e+1o and 0e: the relative change
|y1 - y0| / |y0| of the block's output after one Adam step (lr 0.01) on a random linear loss
(`mace_grid.tp.step_size.adam_step_change`), per backend, and its ratio to cg's.
--pytorch-kernels runs the PyTorch kernels where compiled C++ ones exist (conv=fast's,
grid_rank's and grid_chain's), as a machine without a compiler would: the before of a kernel change.
Writes <out>/op.csv, <out>/op.png (log-log time vs L_in), <out>/model.csv, <out>/step_size.csv.
"""

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import numpy as np
import torch
from e3nn import o3

from mace_grid import conv_kernel, tp
from mace_grid.cli import exit_with_error
from mace_grid.errors import ConfigError
from mace_grid.lit_module import backward_to_parameters
from mace_grid.model import DTYPES
from mace_grid.tp import rank_kernel
from mace_grid.tp.step_size import adam_step_change
from mace_grid.tp.work import count_work, limit_ratio, matmul_probe, synchronize, timing_device
from mace_grid.utils import retain_freed_memory

BACKEND_SPECS = {
    "cg": ("cg", {}),
    "gaunt": ("gaunt", {}),
    "gaunt-fft": ("gaunt", {"method": "fft"}),
    "gaunt-direct": ("gaunt", {"method": "direct"}),
    "grid": ("grid", {}),
    "grid_rank": ("grid_rank", {}),
    "grid_chain": ("grid_chain", {}),
    "grid_rank-element": ("grid_rank", {"factors": "element"}),
    "grid_chain-element": ("grid_chain", {"factors": "element"}),
}


MATMUL = "matmul"  # the reference product (`matmul_probe`), timed in the same rounds as the steps


def natural(mul: int, lmax: int) -> o3.Irreps:
    return o3.Irreps("+".join(f"{mul}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1)))


def interleaved_medians(fns: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """(median, min) ms of each function; rounds alternate between them, so a change in machine
    load hits every backend alike and the ratios stay fair. ``device`` is synchronised before
    and after each call (on a GPU the host clock would otherwise time kernel launches)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: (1e3 * statistics.median(ts), 1e3 * min(ts)) for key, ts in times.items()}


def op_timers(module, x, attrs):
    """(step, forward) closures; see the module docstring for what each one times."""
    coeff = torch.linspace(
        -1, 1, module(x[:1], attrs[:1]).shape[-1], dtype=x.dtype, device=x.device
    )
    x = x.clone().requires_grad_(True)

    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        energy = (module(x, attrs) * coeff).sum()
        (forces,) = torch.autograd.grad(energy, x, create_graph=True)
        (energy + forces.square().sum()).backward()

    def forward():
        with torch.no_grad():
            module(x, attrs)

    return step, forward


def point_count(module) -> int | None:
    """Points the backend evaluates each channel's function on (None: no point set, cg)."""
    points = getattr(module, "points", None)
    return points.n_points if points is not None else None


def scaling_exponent(ls: list[int], times: list[float]) -> float:
    """Slope of log(time) against log(L_in), least squares."""
    if len(ls) < 2:
        return float("nan")
    return float(np.polyfit(np.log(ls), np.log(times), 1)[0])


def run_op(args) -> list[dict]:
    rows = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        torch.set_default_dtype(dtype)
        probe, probe_flop = matmul_probe(args.device, dtype)
        for l_in in range(args.min_l, args.max_l + 1):
            l_out = min(l_in, 2)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.nodes, args.channels, (l_in + 1) ** 2, generator=gen, dtype=dtype)
            species = torch.randint(0, args.elements, (args.nodes,), generator=gen)
            attrs = torch.nn.functional.one_hot(species, args.elements).to(dtype)
            x, attrs = x.to(args.device), attrs.to(args.device)
            cg_ok = l_in <= args.max_cg_l and args.correlation <= tp.max_correlation("cg")
            labels = [b for b in args.backends if b != "cg" or cg_ok]
            fns, build_s, points = {}, {}, {}
            for label in labels:
                name, options = BACKEND_SPECS[label]
                start = time.perf_counter()
                module = tp.build(
                    name,
                    natural(args.channels, l_in),
                    natural(args.channels, l_out),
                    args.correlation,
                    args.elements,
                    **options,
                ).to(args.device, dtype)
                build_s[label] = time.perf_counter() - start
                points[label] = point_count(module)
                fns[label, "step"], fns[label, "forward"] = op_timers(module, x, attrs)
            fns[MATMUL] = probe
            medians = interleaved_medians(fns, args.repeats, args.warmup, args.device)
            rate = probe_flop / (medians[MATMUL][0] / 1e3)
            print(f"  {dtype_name} L_in={l_in} matmul rate: {rate / 1e9:.1f} GFLOP/s", flush=True)
            for label in labels:
                work = count_work(fns[label, "step"])
                (step, step_min), (forward, forward_min) = (
                    medians[label, "step"],
                    medians[label, "forward"],
                )
                rows.append(
                    dict(
                        backend=label,
                        dtype=dtype_name,
                        l_in=l_in,
                        l_out=l_out,
                        correlation=args.correlation,
                        channels=args.channels,
                        nodes=args.nodes,
                        threads=args.threads,
                        step_ms=round(step, 3),
                        forward_ms=round(forward, 3),
                        step_min_ms=round(step_min, 3),
                        forward_min_ms=round(forward_min, 3),
                        build_s=round(build_s[label], 2),
                        points=points[label],
                        step_matmul_mflop=round(work.matmul_flop / 1e6, 2),
                        step_pointwise_m=round(work.pointwise / 1e6, 2),
                        step_aten_ops=work.ops,
                        device=args.device.type,
                        matmul_gflop_s=round(rate / 1e9, 2),
                        step_over_matmul_time=round(
                            limit_ratio(step / 1e3, work.matmul_flop, rate), 3
                        ),
                    )
                )
                print(
                    f"  {dtype_name} L_in={l_in} {label:>12}: step {step:9.2f} ms, "
                    f"forward {forward:8.2f} ms, {points[label] or '-'} points "
                    f"(build {build_s[label]:.1f} s)",
                    flush=True,
                )
    torch.set_default_dtype(torch.float32)
    return rows


def print_op_table(rows: list[dict], backends: list[str]) -> None:
    """Per dtype: each backend's step / forward time and point count, cg/backend ratios, and
    the gaunt/grid time ratio beside their point ratio."""
    both = "gaunt" in backends and "grid" in backends
    for dtype in sorted({r["dtype"] for r in rows}):
        sub = [r for r in rows if r["dtype"] == dtype]
        table = {(r["backend"], r["l_in"]): r for r in sub}
        ls = sorted({r["l_in"] for r in sub})
        print(
            f"\n{dtype}, C={sub[0]['channels']}, n={sub[0]['nodes']}, correlation "
            f"{sub[0]['correlation']}, L_out=min(L_in,2), {sub[0]['threads']} thread(s); "
            "median ms; step = forward + forces (create_graph) + backward; "
            "xN = cg time / backend time (speed-up over cg in this run); [P] = points"
        )
        for key in ("step_ms", "forward_ms"):
            header = f"{key[:-3]:>8} L_in" + "".join(f"{b:>29}" for b in backends)
            if both:
                header += f"{'gaunt/grid time (points)':>27}"
            print(header)
            for l_in in ls:
                line = f"{'':>8} {l_in:>4}"
                cg = table.get(("cg", l_in))
                for b in backends:
                    r = table.get((b, l_in))
                    if r is None:
                        line += f"{'-':>29}"
                        continue
                    ratio = f" (x{cg[key] / r[key]:.1f})" if cg and b != "cg" else ""
                    pts = f" [{r['points']}]" if r["points"] else ""
                    line += f"{r[key]:>13.2f}{ratio:>9}{pts:>7}"
                if both:
                    g, s = table.get(("gaunt", l_in)), table.get(("grid", l_in))
                    if g and s:
                        line += f"{g[key] / s[key]:>19.1f} ({g['points'] / s['points']:.1f})"
                    else:
                        line += f"{'-':>27}"
                print(line)
            slopes = []
            for b in backends:
                pts = [(l, table[(b, l)][key]) for l in ls if (b, l) in table]
                if len(pts) > 1:
                    exp = scaling_exponent([p[0] for p in pts], [p[1] for p in pts])
                    slopes.append(f"{b} L^{exp:.2f} (L_in {pts[0][0]}-{pts[-1][0]})")
            print(f"{'':>8} log-log fit: " + ", ".join(slopes))


def print_work_table(rows: list[dict], backends: list[str]) -> None:
    """Per dtype and L_in: what one step computed (`mace_grid.tp.work`), each backend's matmul
    flops against grid's, and its time ratio to grid divided by that (1 = its matmuls and
    everything else cost what grid's do per flop; the flop ratio is the floor of the time
    ratio for equally efficient kernels); last, its step time over its matmul flops' time at
    the matmul rate measured in the same rounds (1 = arithmetic-bound)."""
    for dtype in sorted({r["dtype"] for r in rows}):
        table = {(r["backend"], r["l_in"]): r for r in rows if r["dtype"] == dtype}
        print(
            f"\n{dtype} work per step: matmul MFLOP (xgrid) | pointwise outputs (M, copies "
            "included) | ATen calls | time xgrid / flop xgrid | step time / matmul time (at the "
            "L_in's matmul rate above)"
        )
        print(f"{'L_in':>8}" + "".join(f"{b:>52}" for b in backends))
        for l_in in sorted({r["l_in"] for r in table.values()}):
            grid = table.get(("grid", l_in))
            line = f"{l_in:>8}"
            for b in backends:
                r = table.get((b, l_in))
                if r is None:
                    line += f"{'-':>52}"
                    continue
                flop = r["step_matmul_mflop"] / grid["step_matmul_mflop"] if grid else None
                cell = f"{r['step_matmul_mflop']:.1f}" + (f" (x{flop:.2f})" if grid else "")
                cell += f" | {r['step_pointwise_m']:.1f} | {r['step_aten_ops']}"
                if grid:
                    cell += f" | {r['step_ms'] / grid['step_ms'] / flop:.2f}"
                cell += f" | {r['step_over_matmul_time']:.1f}"
                line += f"{cell:>52}"
            print(line)


def plot_op(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in zip(
        axes, ("step_ms", "forward_ms"), ("forward + forces + backward", "forward"), strict=True
    ):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            for dtype, style in (("float32", "-o"), ("float64", "--s")):
                pts = [
                    (r["l_in"], r[key])
                    for r in rows
                    if (r["backend"], r["dtype"]) == (backend, dtype)
                ]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{backend} {dtype}")
        ax.set(xscale="log", yscale="log", xlabel="L_in", title=title)
        ax.set_xticks(sorted({r["l_in"] for r in rows}), labels=sorted({r["l_in"] for r in rows}))
        ax.grid(True, which="both", alpha=0.3)
    r0 = rows[0]
    axes[0].set_ylabel("median time (ms)")
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"symmetric contraction, C={r0['channels']}, n={r0['nodes']}, correlation "
        f"{r0['correlation']}, L_out=min(L_in,2), {r0['threads']} thread(s)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def random_molecule(rng: np.random.Generator, n_atoms: int = 27):
    """A branched chain of H/C/N/O with 3BPA's composition (C12H12N2O) and 1.1-1.5 Å bonds."""
    from ase import Atoms

    symbols = ["C"] * 12 + ["H"] * 12 + ["N"] * 2 + ["O"]
    rng.shuffle(symbols)
    positions = [np.zeros(3)]
    while len(positions) < n_atoms:
        anchor = positions[rng.integers(len(positions))]
        step = rng.normal(size=3)
        candidate = anchor + rng.uniform(1.1, 1.5) * step / np.linalg.norm(step)
        if min(np.linalg.norm(candidate - p) for p in positions) > 1.05:
            positions.append(candidate)
    return Atoms(symbols[:n_atoms], positions=np.array(positions))


MODEL_TPS = ("cg", "grid")


def benchmark_model_config(hidden_irreps: str = "64x0e+64x1o", max_ell: int = 3) -> dict:
    """The whole-model benchmark's architecture (3BPA-size MACE, correlation 3, 2 layers)."""
    return dict(
        r_max=5.0,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=max_ell,
        num_interactions=2,
        hidden_irreps=hidden_irreps,
        MLP_irreps="16x0e",
        correlation=3,
        radial_MLP=[64, 64, 64],
        gate="silu",
        interaction="RealAgnosticResidualInteractionBlock",
        interaction_first="RealAgnosticResidualInteractionBlock",
    )


def molecule_batch(
    n_molecules: int, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[dict, dict]:
    """(batch dict on ``device``, data statistics) of ``n_molecules`` random 27-atom molecules,
    forces drawn at random (a training step's cost does not depend on the labels), default
    dtype."""
    from mace.data import AtomicData, config_from_atoms
    from mace.tools import AtomicNumberTable
    from mace.tools.torch_geometric.dataloader import DataLoader

    z_table = AtomicNumberTable([1, 6, 7, 8])
    rng = np.random.default_rng(seed)
    graphs = []
    for _ in range(n_molecules):
        atoms = random_molecule(rng)
        atoms.info["REF_energy"] = 0.0
        atoms.arrays["REF_forces"] = rng.normal(size=(len(atoms), 3))
        graphs.append(AtomicData.from_config(config_from_atoms(atoms), z_table, cutoff=5.0))
    batch = next(iter(DataLoader(graphs, batch_size=len(graphs))))
    statistics_ = dict(
        atomic_numbers=[1, 6, 7, 8],
        atomic_energies=[-13.587, -1029.489, -1484.981, -2041.982],
        avg_num_neighbors=batch.edge_index.shape[1] / batch.num_nodes,
        mean=0.0,
        std=1.0,
    )
    data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.to_dict().items()}
    return data, statistics_


def training_step(model: torch.nn.Module, data: dict):
    """Closure: forward with forces, energy + 100 * forces MSE, backward to the parameters (one
    training step, as `mace_grid.lit_module` takes it)."""

    def step():
        model.zero_grad(set_to_none=True)
        out = model(data, training=True, compute_force=True)
        forces_error = (out["forces"] - data["forces"]).square().mean()
        backward_to_parameters(out["energy"].square().mean() + 100 * forces_error, model)

    return step


def run_model(args) -> list[dict]:
    from mace_grid.model import build_model

    dtype = DTYPES[args.dtype[0]]
    torch.set_default_dtype(dtype)
    model_cfg = benchmark_model_config(args.model_hidden_irreps)
    data, statistics_ = molecule_batch(args.model_molecules, device=args.device)
    print(
        f"\nwhole model: ScaleShiftMACE, hidden {args.model_hidden_irreps}, max_ell 3, "
        f"correlation 3, 2 layers, {dtype}, batch of {args.model_molecules} x 27 atoms, "
        f"{statistics_['avg_num_neighbors']:.1f} neighbours/atom, on {args.device}, "
        f"{args.threads} thread(s); median ms of one training step = forward with forces + "
        "energy/forces MSE + backward"
    )
    steps = {}
    for label in MODEL_TPS:
        for conv in args.convs:
            torch.manual_seed(0)
            model = build_model(model_cfg, {"name": label}, statistics_, {"name": conv})
            steps[label, conv] = training_step(model.to(args.device), data)
    rows = []
    probe, probe_flop = matmul_probe(args.device, dtype)
    timings = interleaved_medians({**steps, MATMUL: probe}, args.repeats, args.warmup, args.device)
    rate = probe_flop / (timings.pop(MATMUL)[0] / 1e3)
    stock = timings.get(("cg", "e3nn"), (None,))[0]
    for (label, conv), (ms, ms_min) in timings.items():
        work = count_work(steps[label, conv])
        rows.append(
            dict(
                tp=label,
                conv=conv,
                dtype=args.dtype[0],
                threads=args.threads,
                hidden_irreps=args.model_hidden_irreps,
                step_ms=round(ms, 2),
                step_min_ms=round(ms_min, 2),
                speedup_vs_stock=round(stock / ms, 2) if stock else None,
                device=args.device.type,
                step_matmul_gflop=round(work.matmul_flop / 1e9, 6),
                step_pointwise_m=round(work.pointwise / 1e6, 2),
                step_aten_ops=work.ops,
                matmul_gflop_s=round(rate / 1e9, 2),
                step_over_matmul_time=round(limit_ratio(ms / 1e3, work.matmul_flop, rate), 3),
            )
        )
        vs = f", x{stock / ms:.2f} vs tp=cg conv=e3nn (stock mace)" if stock else ""
        print(f"  tp={label:>4} conv={conv:>4}: {ms:9.1f} ms (min {ms_min:.1f}){vs}", flush=True)
    for label in MODEL_TPS:
        if (label, "e3nn") in timings and (label, "fast") in timings:
            ratio = timings[label, "e3nn"][0] / timings[label, "fast"][0]
            print(f"  tp={label}: conv e3nn / fast = {ratio:.2f}x")
    print_limit_table(rows, f"{args.device} {args.dtype[0]}, {args.threads} thread(s)")
    torch.set_default_dtype(torch.float32)
    return rows


def print_limit_table(rows: list[dict], where: str) -> None:
    """Per configuration: what one training step computed (`mace_grid.tp.work.count_work`) and
    its time over its matmul flops' time at the measured matmul rate (1 = arithmetic-bound)."""
    rate = rows[0]["matmul_gflop_s"]
    print(
        f"\nwork per training step against the matmul rate timed in the same rounds "
        f"({rate:.1f} GFLOP/s, {where}); pointwise: elements written by pointwise ops, copies "
        "included"
    )
    print(
        f"{'tp':>12} {'conv':>5} {'step ms':>9} {'matmul GFLOP':>13} {'pointwise M':>12} "
        f"{'ATen calls':>11} {'matmul ms':>10} {'step / matmul time':>19}"
    )
    for r in rows:
        matmul_ms = 1e3 * r["step_matmul_gflop"] / rate
        print(
            f"{r['tp']:>12} {r['conv']:>5} {r['step_ms']:>9.1f} {r['step_matmul_gflop']:>13.2f} "
            f"{r['step_pointwise_m']:>12.1f} {r['step_aten_ops']:>11} {matmul_ms:>10.1f} "
            f"{r['step_over_matmul_time']:>19.2f}"
        )


def run_step_size(args) -> list[dict]:
    """One Adam step's relative output change per backend (see the module docstring)."""
    dtype = DTYPES[args.dtype[0]]
    channels, elements, nodes, lr = 32, 4, 128, 0.01
    labels = ["cg", *(b for b in args.backends if b != "cg")]
    print(
        f"\none Adam step (lr {lr}) on a random linear loss: relative change of the block's "
        f"output, C={channels}, {elements} elements, {nodes} nodes, N(0,1) features, "
        f"correlation {args.correlation}, {dtype}; (xN) = backend / cg"
    )
    rows = []
    for l_in in args.step_size_l:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(nodes, channels, (l_in + 1) ** 2, generator=gen, dtype=dtype)
        attrs = torch.nn.functional.one_hot(torch.arange(nodes) % elements, elements).to(dtype)
        for l_out in ("0e+1o", "0e"):
            irreps_out = o3.Irreps("+".join(f"{channels}x{ir}" for ir in l_out.split("+")))
            change = {}
            for label in labels:
                name, options = BACKEND_SPECS[label]
                torch.manual_seed(0)
                module = tp.build(
                    name,
                    natural(channels, l_in),
                    irreps_out,
                    args.correlation,
                    elements,
                    **options,
                ).to(dtype)
                change[label] = adam_step_change(module, x, attrs, lr=lr)
                rows.append(
                    dict(
                        backend=label,
                        dtype=args.dtype[0],
                        l_in=l_in,
                        irreps_out=l_out,
                        correlation=args.correlation,
                        channels=channels,
                        lr=lr,
                        relative_change=round(change[label], 5),
                        ratio_to_cg=round(change[label] / change["cg"], 3),
                    )
                )
            print(
                f"  L_in={l_in} -> {l_out:>5}: "
                + ", ".join(
                    f"{b} {change[b]:.4f}"
                    + (f" (x{change[b] / change['cg']:.2f})" if b != "cg" else "")
                    for b in labels
                ),
                flush=True,
            )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["float32"])
    p.add_argument("--backends", nargs="+", choices=list(BACKEND_SPECS), default=list(tp.BACKENDS))
    p.add_argument("--min-l", type=int, default=1)
    p.add_argument("--max-l", type=int, default=6)
    p.add_argument(
        "--max-cg-l",
        type=int,
        default=3,
        help="skip cg above this L_in (default 3: at correlation 3 mace cannot build L_in=4, "
        "e3nn's wigner_3j stops at l=11)",
    )
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--nodes", type=int, default=270)
    p.add_argument("--elements", type=int, default=4)
    p.add_argument(
        "--correlation",
        type=int,
        default=3,
        help="default 3; cg is skipped above its limit of 4, gaunt and grid go to 6",
    )
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--op", action=argparse.BooleanOptionalAction, default=True, help="op section")
    p.add_argument(
        "--model", action="store_true", help="also time whole-model steps, (tp, conv) pairs"
    )
    p.add_argument("--convs", nargs="+", choices=["e3nn", "fast"], default=["e3nn", "fast"])
    p.add_argument("--model-hidden-irreps", default="64x0e+64x1o")
    p.add_argument("--model-molecules", type=int, default=10)
    p.add_argument(
        "--step-size", action="store_true", help="also measure one Adam step's output change"
    )
    p.add_argument("--step-size-l", nargs="+", type=int, default=[2, 3], help="L_in values")
    p.add_argument(
        "--pytorch-kernels",
        action="store_true",
        help="run the PyTorch kernels where compiled C++ ones exist (as without a compiler)",
    )
    p.add_argument("--out", type=Path, default=Path("results/benchmark_tp"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        args.device = timing_device(args.device)
    except ConfigError as err:
        exit_with_error(err)
    warnings.filterwarnings("ignore", category=UserWarning)  # e3nn/mace TorchScript chatter
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as training runs (mace_grid.train)
    if args.pytorch_kernels:
        conv_kernel.native = rank_kernel.native = lambda: None
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = f", {torch.cuda.get_device_name(args.device)}" if args.device.type == "cuda" else ""
    kernels = "PyTorch kernels only" if args.pytorch_kernels else "compiled CPU kernels where built"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {sys.platform}{gpu}, "
        f"{kernels}"
    )
    if args.op:
        rows = run_op(args)
        print_op_table(rows, args.backends)
        print_work_table(rows, args.backends)
        write_csv(rows, args.out / "op.csv")
        plot_op(rows, args.out / "op.png")
        print(f"\nwrote {args.out / 'op.csv'} and {args.out / 'op.png'}")
    if args.model:
        rows = run_model(args)
        write_csv(rows, args.out / "model.csv")
        print(f"wrote {args.out / 'model.csv'}")
    if args.step_size:
        rows = run_step_size(args)
        write_csv(rows, args.out / "step_size.csv")
        print(f"wrote {args.out / 'step_size.csv'}")


if __name__ == "__main__":
    main()
