"""Sphere helpers of the Gaunt backends against e3nn and closed forms (float64)."""

import mace_grid  # noqa: F401  (first: it lets e3nn load its constants under torch >= 2.6)

# isort: split
import math

import numpy as np
import pytest
import torch
from e3nn import o3

from mace_grid.tp import sphere

F64 = torch.float64


def e3nn_sh(lmax: int, beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    xyz = o3.angles_to_xyz(alpha, beta)
    return o3.spherical_harmonics(list(range(lmax + 1)), xyz, True, normalization="component")


def test_grid_resolution_is_sized_from_the_integrand_degree():
    assert sphere.grid_resolution(3, 3, 2) == (6, 12)  # 72 points, science.md's example
    assert sphere.grid_resolution(2, 2, 1) == (3, 6)


@pytest.mark.parametrize("lmax", [0, 3, 5])
def test_sh_on_grid_is_e3nn_sh(lmax):
    beta, alpha, _ = sphere.gauss_legendre_grid(4, 7)
    expected = e3nn_sh(lmax, beta[:, None], alpha[None, :])
    assert torch.allclose(sphere.sh_on_grid(lmax, 4, 7), expected, atol=1e-13)


def test_quadrature_is_exact_to_its_degree_and_not_beyond():
    lmax = 5  # products Y_l Y_l' have degree <= 10: exact on 6 x 11, not on 5 x 11
    for (n_beta, n_alpha), exact in [((6, 11), True), ((5, 11), False)]:
        _, _, w = sphere.gauss_legendre_grid(n_beta, n_alpha)
        y = sphere.sh_on_grid(lmax, n_beta, n_alpha)
        gram = torch.einsum("ba,bai,baj->ij", w, y, y)
        error = (gram - torch.eye(gram.shape[0], dtype=F64)).abs().max().item()
        assert (error < 1e-13) == exact, error


def test_sh_to_fourier_reproduces_sh_on_the_whole_torus():
    lmax = 4
    theta, phi = sphere.sh_to_fourier(lmax)
    gen = torch.Generator().manual_seed(0)
    beta = torch.rand(50, generator=gen, dtype=F64) * 2 * math.pi  # beyond pi too
    alpha = torch.rand(50, generator=gen, dtype=F64) * 2 * math.pi
    u = torch.arange(-lmax, lmax + 1)
    m = torch.tensor([m for l in range(lmax + 1) for m in range(-l, l + 1)])
    series = torch.einsum(
        "iu,iv,pu,pv->pi",
        theta,
        phi[lmax + m],
        torch.exp(1j * u * beta[:, None]),
        torch.exp(1j * u * alpha[:, None]),
    )
    assert series.imag.abs().max() < 1e-13
    # the torus point (beta, alpha) with beta > pi is the sphere point (2 pi - beta, alpha + pi)
    on_sphere = beta > math.pi
    b = torch.where(on_sphere, 2 * math.pi - beta, beta)
    a = torch.where(on_sphere, alpha + math.pi, alpha)
    assert torch.allclose(series.real, e3nn_sh(lmax, b, a), atol=1e-12)


def test_sin_integral_closed_form():
    k = torch.arange(-6, 7)
    t, w = np.polynomial.legendre.leggauss(40)
    beta = (t + 1) * math.pi / 2
    numeric = [np.sum(w * np.exp(1j * kk * beta) * np.sin(beta)) * math.pi / 2 for kk in k.tolist()]
    assert torch.allclose(sphere.sin_integral(k), torch.tensor(numeric), atol=1e-13)


def test_fourier_to_sh_inverts_sh_to_fourier():
    lmax = 5
    theta, phi = sphere.sh_to_fourier(lmax)
    zeta, _ = sphere.fourier_to_sh(lmax, lmax)
    m = torch.tensor([m for l in range(lmax + 1) for m in range(-l, l + 1)])
    coeff = theta[:, :, None] * phi[lmax + m][:, None, :]  # Y_i's series [i, u, v]
    proj = 0.5 * torch.einsum("iuv,ju,jv->ij", coeff, zeta, phi[lmax + m].flip(-1))
    assert torch.allclose(proj, torch.eye(len(m), dtype=proj.dtype), atol=1e-13)


@pytest.mark.parametrize("nu,l_out", [(1, 1), (2, 0), (2, 2), (3, 1)])
def test_power_second_moment_matches_monte_carlo(nu, l_out):
    l_in, samples = 2, 40000
    gen = torch.Generator().manual_seed(nu * 10 + l_out)
    a = torch.randn(samples, (l_in + 1) ** 2, generator=gen, dtype=F64)
    size = sphere.grid_resolution(l_in, nu, l_out)
    _, _, w = sphere.gauss_legendre_grid(*size)
    y = sphere.sh_on_grid(max(l_in, l_out), *size).reshape(w.numel(), -1)
    f = a @ y[:, : a.shape[1]].T
    proj = (f**nu * w.reshape(-1)) @ y[:, l_out * l_out]  # M = -l_out component
    assert proj.square().mean().item() == pytest.approx(
        sphere.power_second_moment(l_in, nu, l_out), rel=0.08
    )
