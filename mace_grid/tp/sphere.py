"""Sphere helpers shared by the Gaunt backends: quadrature, real SH on grids, SH <-> 2D Fourier.

Conventions are e3nn 0.4.4's: real SH in e3nn order (l = 0..L, m = -l..l), polar angle beta
measured from the y axis, azimuth alpha, ``Y_lm(alpha, beta) = P_lm(beta) S_m(alpha)``, in
"component" normalisation (Y_00 = 1, the sphere mean of Y_lm^2 is 1). A channel's features A_lm
are the spherical function f = sum_lm A_lm Y_lm, and the projection P_lm(g) = (1/4pi) int g Y_lm
gives back A_lm for g = f. Everything is built in float64 from first principles (no files) and
cached per size (functools.cache); returned tensors are shared, so callers must not modify them.
"""

import math
from functools import cache

import numpy as np
import torch
from e3nn import o3

_F64 = torch.float64


def lm_index(l: int, m: int) -> int:
    """Position of (l, m) in the flat e3nn order."""
    return l * l + l + m


def grid_resolution(l_in: int, correlation: int, l_out: int) -> tuple[int, int]:
    """(n_beta, n_alpha) of the smallest Gauss-Legendre x equispaced grid integrating
    ``f^correlation * Y_{l_out}`` exactly: the integrand's degree is correlation * l_in + l_out.

    Sizing from the output degree alone aliases the powers and breaks equivariance.
    """
    degree = correlation * l_in + l_out
    return degree // 2 + 1, degree + 1


@cache
def gauss_legendre_grid(n_beta: int, n_alpha: int) -> tuple[torch.Tensor, ...]:
    """Gauss-Legendre nodes in cos(beta) times equispaced alpha.

    Returns ``beta [n_beta]``, ``alpha [n_alpha]`` and ``weight [n_beta, n_alpha]``, the
    quadrature weights of the normalised measure dOmega / 4pi (they sum to 1). Exact for
    polynomials of degree <= min(2 n_beta - 1, n_alpha - 1).
    """
    cos_beta, w_beta = np.polynomial.legendre.leggauss(n_beta)
    beta = torch.from_numpy(np.arccos(cos_beta))
    alpha = torch.arange(n_alpha, dtype=_F64) * (2 * math.pi / n_alpha)
    weight = torch.from_numpy(w_beta / 2)[:, None].expand(n_beta, n_alpha) / n_alpha
    return beta, alpha, weight.contiguous()


def legendre_part(lmax: int, beta: torch.Tensor) -> torch.Tensor:
    """``P_lm(beta)``: the beta factor of the component-normalised Y_lm, ``[..., (lmax+1)^2]``.

    Uses e3nn's Legendre polynomials in (cos beta, sin beta) with the *signed* sine, so for
    beta in (pi, 2pi) it is the analytic continuation the 2D Fourier representation needs.
    """
    legendre = o3.Legendre(list(range(lmax + 1)))
    return math.sqrt(4 * math.pi) * legendre(beta.cos(), beta.sin())


def azimuth_part(lmax: int, alpha: torch.Tensor) -> torch.Tensor:
    """``S_m(alpha)`` for m = -lmax..lmax (e3nn's sqrt2 sin / 1 / sqrt2 cos), ``[..., 2lmax+1]``."""
    return o3.spherical_harmonics_alpha(lmax, alpha)


def _m_of_lm(lmax: int) -> torch.Tensor:
    """m of every flat (l, m) index, ``[(lmax+1)^2]``."""
    return torch.tensor([m for l in range(lmax + 1) for m in range(-l, l + 1)])


@cache
def sh_on_grid(lmax: int, n_beta: int, n_alpha: int) -> torch.Tensor:
    """Y_lm at the Gauss-Legendre grid points, ``[n_beta, n_alpha, (lmax+1)^2]``."""
    beta, alpha, _ = gauss_legendre_grid(n_beta, n_alpha)
    p = legendre_part(lmax, beta)  # [b, lm]
    s = azimuth_part(lmax, alpha)[:, lmax + _m_of_lm(lmax)]  # [a, lm]
    return p[:, None, :] * s[None, :, :]


def _fourier_series(samples: torch.Tensor, kmax: int) -> torch.Tensor:
    """Coefficients c_k, k = -kmax..kmax, of a trigonometric polynomial of degree <= kmax
    sampled at ``2 pi j / N`` (N = samples.shape[0] = 2 kmax + 1), along dim 0."""
    coeff = torch.fft.fft(samples.to(torch.complex128), dim=0) / samples.shape[0]
    return torch.roll(coeff, kmax, dims=0)  # index k + kmax


@cache
def sh_to_fourier(lmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable 2D Fourier coefficients of Y_lm on the torus (beta, alpha) in [0, 2pi)^2.

    ``Y_lm(beta, alpha) = sum_uv theta[lm, u] phi[m, v] exp(i (u beta + v alpha))`` with
    ``theta [(lmax+1)^2, 2lmax+1]`` (u = -lmax..lmax) and ``phi [2lmax+1, 2lmax+1]``
    (m = -lmax..lmax, v = -lmax..lmax), complex128. Exact: both factors are trigonometric
    polynomials of degree <= lmax, sampled on 2lmax+1 points and transformed by FFT.
    """
    n = 2 * lmax + 1
    grid = torch.arange(n, dtype=_F64) * (2 * math.pi / n)
    theta = _fourier_series(legendre_part(lmax, grid), lmax).T.contiguous()
    phi = _fourier_series(azimuth_part(lmax, grid), lmax).T.contiguous()
    return theta, phi


def sin_integral(k: torch.Tensor) -> torch.Tensor:
    """Closed form of ``int_0^pi exp(i k beta) sin(beta) d beta`` for integer k (complex128):
    2 / (1 - k^2) for even k, +-i pi/2 for k = +-1, 0 for other odd k."""
    k = k.to(_F64)
    even = torch.remainder(k, 2) == 0
    real = torch.where(even, 2 / (1 - k * k), torch.zeros_like(k))
    imag = torch.where(k.abs() == 1, k * math.pi / 2, torch.zeros_like(k))
    return torch.complex(real, imag)


@cache
def fourier_to_sh(lmax: int, umax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection of a torus Fourier series on the component-normalised Y_lm, l <= lmax.

    For ``g = sum_uv G[u, v] exp(i (u beta + v alpha))`` (|u| <= umax), the projection
    ``P_lm(g) = (1/4pi) int_S2 g Y_lm = sum_uv G[u, v] zeta[lm, u] phi[m, -v] / 2`` with
    ``zeta [(lmax+1)^2, 2umax+1]`` returned together with ``phi`` of `sh_to_fourier`.
    (The alpha integral gives 2pi delta_{v, -v'}, the beta integral is `sin_integral`.)
    """
    theta, phi = sh_to_fourier(lmax)
    u = torch.arange(-umax, umax + 1)
    up = torch.arange(-lmax, lmax + 1)
    kernel = sin_integral(u[:, None] + up[None, :])  # [u, u']
    zeta = theta @ kernel.T  # [lm, u]
    return zeta, phi


def power_second_moment(l_in: int, nu: int, l_out: int) -> float:
    """``E[P_LM(f^nu)^2]`` for f = sum_{l <= l_in} A_lm Y_lm with i.i.d. standard normal A_lm.

    f is a Gaussian field with covariance k(t) = sum_l (2l+1) P_l(t), t = r.r'; by Isserlis
    (Mehler) E[f(r)^nu f(r')^nu] = sum_j a_j^2 j! k(t)^j k(1)^(nu-j) with x^nu = sum_j a_j He_j(x),
    and by Funk-Hecke the second moment is (1/2) int_{-1}^{1} E[f^nu f'^nu] P_L(t) dt.
    Used to normalise each (nu, L) basis function of the Gaunt product basis to unit size.
    """
    he = np.polynomial.hermite_e
    coeff = he.poly2herme([0.0] * nu + [1.0])  # x^nu in probabilists' Hermite polynomials
    t, w = np.polynomial.legendre.leggauss(nu * l_in + l_out + 2)
    legendre = np.polynomial.legendre
    k = legendre.legval(t, [2 * l + 1 for l in range(l_in + 1)])
    var = float((l_in + 1) ** 2)
    kernel = sum(
        coeff[j] ** 2 * math.factorial(j) * k**j * var ** (nu - j) for j in range(len(coeff))
    )
    p_l = legendre.legval(t, [0.0] * l_out + [1.0])
    return float(0.5 * np.sum(w * kernel * p_l))
