"""What a step computes, counted rather than timed: matmul flops, pointwise outputs, ATen calls;
and the machine's limit a step's time is measured against (the device's measured matmul rate).

Wall-clock ratios between backends move with the CPU (cache sizes, BLAS kernels) by tens of
percent; counts do not. The matmul flop ratio of two backends is the floor of their time ratio
for kernels that run their matmuls at the same rate, so a speed goal below it needs fewer
flops, not better engineering. Counting sits below autograd (a `TorchDispatchMode`), so the
force pass, the double backward and every custom kernel's own calls are all included; a
compiled kernel, which ATen cannot see into, reports its own counts (`register_kernel`).
"Step time / the time its matmul flops take at the device's own matmul rate" then says how far a
step is from arithmetic-bound (`limit_ratio`): 1 when every matmul ran at that rate and nothing
else cost anything.
"""

import functools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mace_grid.errors import ConfigError

_aten = torch.ops.aten
# (overload packet, index of the left operand): flops 2 * prod(left.shape) * right.shape[-1]
_MATMULS = {
    _aten.mm: 0,
    _aten.bmm: 0,
    _aten.addmm: 1,
    _aten.addmm_: 1,
    _aten.baddbmm: 1,
    _aten.baddbmm_: 1,
    _aten.mv: 0,
    _aten.addmv: 1,
    _aten.dot: 0,
}


#: compiled ops' own counts: overload packet -> cost(args, outputs) -> (matmul flop, written)
_KERNELS: dict = {}


def register_kernel(op, cost: Callable[[tuple, object], tuple[int, int]]) -> None:
    """Count the compiled op ``op`` (an overload packet such as ``torch.ops.ns.name``) as
    ``cost(args, out)``: its matrix arithmetic (2 m k n per product, as a matmul) and the
    elements it writes (as pointwise output)."""
    _KERNELS[op] = cost


@dataclass
class Work:
    """Counts of one call: ``matmul_flop`` (2 m k n per product); ``pointwise``, elements
    written by pointwise ops, copies included (the memory passes of elementwise work); ``ops``,
    ATen calls, views included (a proxy for dispatch overhead)."""

    matmul_flop: int = 0
    pointwise: int = 0
    ops: int = 0


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.work = Work()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "profiler":  # record_function ranges (profile_step.py): not work
            return out
        self.work.ops += 1
        left = _MATMULS.get(func.overloadpacket)
        kernel = _KERNELS.get(func.overloadpacket)
        if kernel is not None:
            flop, written = kernel(args, out)
            self.work.matmul_flop += flop
            self.work.pointwise += written
        elif left is not None:
            a, b = args[left], args[left + 1]
            self.work.matmul_flop += 2 * math.prod(a.shape) * (b.shape[-1] if b.dim() > 1 else 1)
        elif torch.Tag.pointwise in func.tags:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.work.pointwise += sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        return out


def count_work(fn: Callable[[], object]) -> Work:
    """Run ``fn()`` once and count what it computed (its return value is discarded)."""
    with _Counter() as counter:
        fn()
    return counter.work


def timing_device(name: str) -> torch.device:
    """The device a benchmark runs on (``cpu`` or ``cuda``); `ConfigError` for a CUDA device
    torch cannot see, before anything is built."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: choose cuda or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {name} but torch sees no CUDA device (a CPU build of torch, or no driver); "
            "install the CUDA build of torch, or run --device cpu"
        )
    return device


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has run the work queued on it: CUDA kernels run asynchronously, so
    a host clock alone would time their launch. Nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_probe(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None
) -> tuple[Callable[[], object], int]:
    """(one n x n x n ``a @ b`` on ``device``, its flops): the reference product of
    `matmul_rate`, for a benchmark to time in its own interleaved rounds (so that a change of
    machine load hits the steps and the reference alike). ``n`` defaults to 1024 on the CPU
    (the sgemm rate a core reaches) and 4096 on a GPU (1024^3 leaves most of its
    multiprocessors idle)."""
    n = n or (1024 if device.type == "cpu" else 4096)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, dtype=dtype).to(device) for _ in range(2))
    out = torch.empty_like(a)
    return functools.partial(torch.mm, a, b, out=out), 2 * n**3


def matmul_rate(
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    samples: int = 5,
    min_sample_s: float = 0.05,
) -> float:
    """FLOP/s of `matmul_probe` at the current thread count: the median of ``samples`` timings,
    each of enough back-to-back products to last ``min_sample_s`` (a GPU product takes
    microseconds to milliseconds), the device synchronised around each."""
    product, flop = matmul_probe(device, dtype, n)

    def seconds(calls: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            product()
        synchronize(device)
        return time.perf_counter() - start

    seconds(1)  # warm-up: allocation, BLAS/cuBLAS initialisation
    calls = max(1, math.ceil(min_sample_s / max(seconds(1), 1e-9)))
    per_call = statistics.median(seconds(calls) for _ in range(samples)) / calls
    return flop / per_call


def limit_ratio(step_s: float, matmul_flop: float, rate: float) -> float:
    """Step time over the time its matmul flops take at ``rate`` FLOP/s: how far a step is from
    arithmetic-bound (1: every matmul at that rate, everything else free; inf: no matmuls)."""
    return step_s * rate / matmul_flop if matmul_flop else math.inf
