"""`mace_grid.tp.work.count_work`: matmul flops and pointwise outputs against hand counts."""

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import torch
from test_tp import natural

from mace_grid.tp import build
from mace_grid.tp.work import count_work


def test_matmul_flops_are_2mkn_whatever_the_entry_point():
    m, k, n, batch = 5, 7, 11, 3
    a, b = torch.randn(m, k), torch.randn(k, n)
    stacked_a, stacked_b = torch.randn(batch, m, k), torch.randn(batch, k, n)
    acc = torch.zeros(m, n)

    def ops():
        a @ b  # mm
        torch.bmm(stacked_a, stacked_b)
        a @ stacked_b  # broadcast matmul
        torch.addmm(acc, a, b)
        acc.clone().addmm_(a, b)
        torch.einsum("bmk,bkn->bmn", stacked_a, stacked_b)
        a @ b[:, 0]  # mv

    work = count_work(ops)
    assert work.matmul_flop == 2 * m * k * n * (1 + batch + batch + 1 + 1 + batch) + 2 * m * k
    assert work.pointwise == m * n  # the clone: copies are memory passes too


def test_pointwise_outputs_count_elements_written_not_views():
    x = torch.randn(4, 6)
    work = count_work(lambda: (x * x).t().sin().reshape(-1)[:5].add_(1.0))
    # mul, sin, the copy that flattening a transposed tensor needs, add_ on the 5-element slice
    assert work.pointwise == 24 + 24 + 24 + 5
    assert work.matmul_flop == 0
    assert work.ops >= 6


def test_profiler_ranges_are_not_counted():
    x = torch.randn(4, 6)

    def ranged():
        with torch.profiler.record_function("range"):
            x.sin()

    assert count_work(ranged) == count_work(lambda: x.sin())


def test_backward_passes_are_counted():
    m, k, n = 4, 6, 3
    a = torch.randn(m, k, requires_grad=True)
    b = torch.randn(k, n, requires_grad=True)
    forward = count_work(lambda: (a @ b).sum())
    both = count_work(lambda: (a @ b).sum().backward())
    assert forward.matmul_flop == 2 * m * k * n
    assert both.matmul_flop == 3 * 2 * m * k * n  # + grad_a = G b^T, grad_b = a^T G


def test_grid_point_set_does_the_flops_of_its_math():
    """Dense evaluate at P points, then corr - 1 projections to D_out: per column
    2 P D_in + (corr - 1) 2 D_out P flops, nothing else."""
    l_in, correlation, channels = 2, 3, 8
    irreps_in, irreps_out = natural(channels, range(l_in + 1)), natural(channels, range(2))
    module = build("grid", irreps_in, irreps_out, correlation, 2)
    points = module.points
    assert not points.separable
    columns = 2 * points.block + 5  # two full column blocks and a partial one
    features = torch.randn((l_in + 1) ** 2, columns)
    with torch.no_grad():
        work = count_work(lambda: points(features))
    per_column = 2 * points.n_points * (l_in + 1) ** 2
    per_column += (correlation - 1) * 2 * points.dim_out * points.n_points
    assert work.matmul_flop == per_column * columns
