"""Time conv=fast's fused kernel (`mace_grid.conv_kernel`) against its plain-ops reference.

    python scripts/benchmark_conv.py [--tp grid] [--hidden-irreps 64x0e+64x1o+64x2e]
        [--molecules 5] [--threads 1] [--repeats 11] [--dtype float32]

Side by side in one process, rounds interleaved (`benchmark_tp.interleaved_medians`), median
and minimum ms of:
  model:  one whole training step of the benchmark model (`benchmark_tp.training_step`: forward
          with forces, energy + forces MSE, backward) with conv=e3nn (mace's own), conv=fast on
          plain ops (`FastConvolution.convolve_autograd`, what TorchScript runs), conv=fast with
          the blocked PyTorch kernel (what runs without a compiler, and on CUDA), and conv=fast
          with the C++ kernel (the CPU's default);
  conv:   the second interaction's convolution alone on the same graph: messages, their
          gradients with create_graph=True, backward of their squares (a force-training step).
Each variant's step is also counted (`mace_grid.tp.work.count_work`): matmul flops, pointwise
elements written, ATen calls.
"""

import argparse
import warnings

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import torch
from benchmark_tp import benchmark_model_config, interleaved_medians, molecule_batch, training_step

from mace_grid import conv_kernel
from mace_grid.conv import FastConvolution
from mace_grid.model import DTYPES, build_model
from mace_grid.tp.work import count_work
from mace_grid.utils import retain_freed_memory


def on_plain_ops(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every FastConvolution on its plain-ops reference, in place (as under
    TorchScript: the radial network per edge, not deferred to the convolution)."""
    for block in model.interactions:
        if isinstance(block.conv_tp, FastConvolution):
            block.conv_tp._convolve_fused = block.conv_tp.convolve_autograd
            block.conv_tp_weights.per_bond = False
    return model


def on_pytorch_kernel(step):
    """``step`` with the C++ kernel switched off while it runs."""

    def run():
        native = conv_kernel.native
        conv_kernel.native = lambda: None
        try:
            step()
        finally:
            conv_kernel.native = native

    return run


def conv_step(conv: FastConvolution, call, n_nodes: int, edge_index: torch.Tensor):
    """Closure: ``call`` (``conv`` or one of its paths) giving the messages, their gradients
    (create_graph) and the backward of the gradients' squares, on random inputs."""
    gen = torch.Generator().manual_seed(0)
    n_edges = edge_index.shape[1]
    x = torch.randn(n_nodes, conv.irreps_in1.dim, generator=gen).requires_grad_()
    y = torch.randn(n_edges, conv.irreps_in2.dim, generator=gen).requires_grad_()
    w = torch.randn(n_edges, conv.weight_numel, generator=gen).requires_grad_()
    probe = torch.randn(n_nodes, conv.irreps_out.dim, generator=gen)

    def step():
        out = call(x, y, w, edge_index)  # e3nn's layout, or rows where the conv is fed
        first = torch.autograd.grad((out * probe.view_as(out)).sum(), (x, y, w), create_graph=True)
        sum(g.square().sum() for g in first).backward()

    return step


def report(title: str, steps: dict, repeats: int) -> None:
    print(f"\n{title}")
    for label, step in steps.items():
        work = count_work(step)
        print(
            f"  {label:>12}: matmul {work.matmul_flop / 1e9:.2f} GFLOP, pointwise "
            f"{work.pointwise / 1e6:.1f} M elements, {work.ops} ATen calls"
        )
    timings = interleaved_medians(steps, repeats, warmup=2, device=torch.device("cpu"))
    reference = timings["fast-plain"][0]
    for label, (ms, ms_min) in timings.items():
        print(
            f"  {label:>12}: {ms:8.1f} ms (min {ms_min:.1f}), plain ops / this = "
            f"{reference / ms:.2f}x",
            flush=True,
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", default="grid", help="product backend of the model (default grid)")
    p.add_argument("--hidden-irreps", default="64x0e+64x1o+64x2e")
    p.add_argument("--molecules", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)  # e3nn/mace TorchScript chatter
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as training runs (mace_grid.train)
    torch.set_default_dtype(DTYPES[args.dtype])
    data, statistics_ = molecule_batch(args.molecules)
    n_nodes, edge_index = data["positions"].shape[0], data["edge_index"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.dtype}; "
        f"tp={args.tp}, hidden {args.hidden_irreps}, max_ell 3, {args.molecules} molecules "
        f"({n_nodes} atoms, {edge_index.shape[1]} edges)"
    )
    config = benchmark_model_config(args.hidden_irreps)
    models = {}
    if conv_kernel.native() is None:
        raise SystemExit("the C++ kernel could not be built (see the warning above)")
    variants = (
        ("e3nn", "e3nn"),
        ("fast-plain", "fast"),
        ("fast-pytorch", "fast"),
        ("fast-cpp", "fast"),
    )
    for label, conv in variants:
        torch.manual_seed(0)
        models[label] = build_model(config, {"name": args.tp}, statistics_, {"name": conv})
    on_plain_ops(models["fast-plain"])
    steps = {label: training_step(model, data) for label, model in models.items()}
    steps["fast-pytorch"] = on_pytorch_kernel(steps["fast-pytorch"])
    report("model: one training step", steps, args.repeats)
    conv = models["fast-cpp"].interactions[1].conv_tp
    steps = {
        "fast-plain": conv_step(conv, conv.convolve_autograd, n_nodes, edge_index),
        "fast-pytorch": on_pytorch_kernel(conv_step(conv, conv, n_nodes, edge_index)),
        "fast-cpp": conv_step(conv, conv, n_nodes, edge_index),
    }
    report("conv: the second interaction's convolution alone", steps, args.repeats)


if __name__ == "__main__":
    main()
