"""What a step computes, counted rather than timed: matmul flops, pointwise outputs, ATen calls.

Wall-clock ratios between backends move with the CPU (cache sizes, BLAS kernels) by tens of
percent; counts do not. The matmul flop ratio of two backends is the floor of their time ratio
for kernels that run their matmuls at the same rate, so a speed goal below it needs fewer
flops, not better engineering. Counting sits below autograd (a `TorchDispatchMode`), so the
force pass, the double backward and every custom kernel's own calls are all included.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
        self.work.ops += 1
        left = _MATMULS.get(func.overloadpacket)
        if left is not None:
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
