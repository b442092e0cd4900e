"""MACE-Gaunt product basis: the shared parameterisation and the 2D-Fourier (Luo et al.) backend.

B[c, LM] = sum_nu w[nu, element, c, L] * P_LM(f_c^nu), nu = 1..correlation, where
f_c = sum_lm A[c, lm] Y_lm is channel c's spherical function and P_LM the projection on Y_LM
(conventions in `mace_grid.tp.sphere`). `GauntProductBasis` owns the weights and the final
contraction; subclasses only compute the projected powers P_LM(f^nu), nu >= 2, so every Gaunt
backend has the same parameters and state_dict.
The constants that define a backend's function (`GauntProductBasis.function_constants`) travel
in the state_dict as extra state; loading refuses a state whose constants differ from the code's.
Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim] (mace's).
"""

import math

import torch
from e3nn import o3
from e3nn.util.jit import compile_mode

from mace_grid.errors import ConfigError
from mace_grid.tp import sphere
from mace_grid.tp.engine import PointSet

#: second moment at init, for i.i.d. standard-normal inputs, of the nu = 1 term and of each
#: power nu >= 2 of an output component. cg's outputs there: ~1 at correlation 1, 0.9-2.7 at 2,
#: 0.9-4.7 at 3 (scalars highest, L_in 1-4); these give 1, 1.5, 2.
INIT_MOMENT_LINEAR, INIT_MOMENT_POWER = 1.0, 0.5
#: weights start N(0, INIT_WEIGHT_STD^2) and the forward multiplies them by
#: basis_scale / INIT_WEIGHT_STD: the output at init is the same as with N(0, 1) weights, but
#: Adam's first step (about lr per weight, whatever its size) changes every weight by
#: lr / INIT_WEIGHT_STD relative, for every (nu, L) and L_in alike. 0.1 puts one Adam step's
#: output change within 2x of cg's (whose weights start at randn / num_params) at L_in 2-3
#: (`scripts/benchmark_tp.py --step-size`); with N(0, 1) weights it was 7-20x smaller.
INIT_WEIGHT_STD = 0.1
#: highest correlation of every Gaunt-type backend (grids and FFT sizes grow only linearly in it)
MAX_CORRELATION = 6
#: version of the extra state below; states without one (written before it existed) are refused
STATE_FORMAT = 1


def _natural(ir: o3.Irrep) -> bool:
    return ir.p == (-1) ** ir.l


def validate_irreps(
    irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int
) -> tuple[int, int, list[int]]:
    """Check the irreps a Gaunt product can compute; return (channels, L_in, output degrees).

    Raises `ConfigError` with a message saying what to change.
    """
    irreps_in, irreps_out = o3.Irreps(irreps_in), o3.Irreps(irreps_out)
    pseudo = [str(ir) for _, ir in (*irreps_in, *irreps_out) if not _natural(ir)]
    if pseudo:
        raise ConfigError(
            f"the Gaunt product backends (gaunt, grid) only produce natural-parity irreps "
            f"(0e, 1o, 2e, 3o, ...), but got {', '.join(sorted(set(pseudo)))} in "
            f"irreps_in={irreps_in} / irreps_out={irreps_out}; use tp=cg for pseudo-tensors"
        )
    if not isinstance(correlation, int) or not 1 <= correlation <= MAX_CORRELATION:
        raise ConfigError(
            f"correlation must be an integer in 1..{MAX_CORRELATION} for the Gaunt product "
            f"backends, got {correlation}"
        )
    muls = {mul for mul, _ in irreps_in}
    ls = [ir.l for _, ir in irreps_in]
    if len(muls) != 1 or ls != list(range(len(ls))):
        raise ConfigError(
            f"irreps_in must hold every degree 0..L_in once, in order, with one common "
            f"multiplicity (e.g. 64x0e+64x1o+64x2e), got {irreps_in}"
        )
    (channels,) = muls
    bad_out = [str(mul) for mul, _ in irreps_out if mul != channels]
    if len(irreps_out) == 0 or bad_out:
        raise ConfigError(
            f"irreps_out must be a non-empty list of irreps with multiplicity {channels} "
            f"(the channel count of irreps_in), got {irreps_out}"
        )
    return channels, len(ls) - 1, [ir.l for _, ir in irreps_out]


def basis_scale(l_in: int, correlation: int, l_out: list[int]) -> torch.Tensor:
    """``[correlation, len(l_out)]`` constants multiplying the weights of P_L(f^nu).

    Each nonzero basis function P_LM(f^nu) is scaled to second moment `INIT_MOMENT_LINEAR`
    (nu = 1) or `INIT_MOMENT_POWER` (nu >= 2) for i.i.d. standard-normal A
    (`sphere.power_second_moment`), so N(0, 1) weights keep outputs O(1) at any L_in.
    Basis functions that vanish identically (L > nu * L_in) get 0.
    """
    moment = torch.tensor(
        [
            [sphere.power_second_moment(l_in, nu, l) for l in l_out]
            for nu in range(1, correlation + 1)
        ],
        dtype=torch.float64,
    )
    target = torch.full_like(moment, INIT_MOMENT_POWER)
    target[0] = INIT_MOMENT_LINEAR
    alive = moment > 1e-9
    return torch.where(alive, torch.sqrt(target / moment.clamp(min=1e-9)), torch.zeros_like(moment))


class GauntProductBasis(torch.nn.Module):
    """Shared weights and contraction of the MACE-Gaunt product basis (see module docstring).

    Parameters: ``weight [correlation, num_elements, len(irreps_out), channels]``,
    N(0, INIT_WEIGHT_STD^2) at init; the forward multiplies them by the fixed
    ``basis_scale / INIT_WEIGHT_STD``, which keeps outputs O(1). Subclasses implement
    ``project_powers`` (P_LM(f^nu) for nu = 2..correlation, rows ordered as the components of
    irreps_out). Constant buffers are not persistent: the state_dict holds ``weight`` and, as
    extra state, the `function_constants` it was trained with, checked when it is loaded.
    """

    def __init__(
        self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, correlation: int, num_elements: int
    ) -> None:
        super().__init__()
        channels, l_in, l_out = validate_irreps(irreps_in, irreps_out, correlation)
        if num_elements < 1:
            raise ConfigError(f"num_elements must be >= 1, got {num_elements}")
        self.irreps_in = o3.Irreps(irreps_in)
        self.irreps_out = o3.Irreps(irreps_out)
        self.correlation = correlation
        self.contraction_degree = correlation  # the name mace's tools read
        self.num_elements = num_elements
        self.num_features = channels
        self.l_in = l_in
        self.l_out: list[int] = l_out
        self.l_out_max = max(l_out)
        self.out_lm: list[int] = [sphere.lm_index(l, m) for l in l_out for m in range(-l, l + 1)]
        self.dim_out = len(self.out_lm)  # per channel

        self.init_weight_std = INIT_WEIGHT_STD
        self.weight = torch.nn.Parameter(
            torch.randn(correlation, num_elements, len(l_out), channels) * self.init_weight_std
        )
        self.register_buffer("basis_scale", basis_scale(l_in, correlation, l_out), persistent=False)
        col_irrep = [i for i, l in enumerate(l_out) for _ in range(2 * l + 1)]
        self.register_buffer("col_irrep", torch.tensor(col_irrep), persistent=False)
        # nu = 1 is A itself; columns with L > L_in have basis_scale 0 and read any entry
        in_dim = (l_in + 1) ** 2
        self.register_buffer(
            "col_in", torch.tensor([i if i < in_dim else 0 for i in self.out_lm]), persistent=False
        )
        # inside, features live in columns r = node * C + c ("transposed" layout: the long
        # node-channel axis last makes every matmul a wide, fast one); out_perm maps mace's
        # column (irrep i, channel c, m) to column (offset_i + m) * C + c of a node's result
        perm, start = [], 0
        for l in l_out:
            perm += [(start + m) * channels + c for c in range(channels) for m in range(2 * l + 1)]
            start += 2 * l + 1
        self.register_buffer("out_perm", torch.tensor(perm), persistent=False)
        self.register_load_state_dict_pre_hook(_require_constants)

    @torch.jit.unused
    def function_constants(self) -> dict:
        """Everything besides the weights that fixes the function this module computes, as
        this code computes it (plain Python values; the scales in float64 from their formula,
        whatever dtype the module was cast to). Subclasses add their own (point set, sizes)."""
        return {
            "irreps_in": str(self.irreps_in),
            "irreps_out": str(self.irreps_out),
            "correlation": self.correlation,
            "basis_scale": basis_scale(self.l_in, self.correlation, self.l_out).tolist(),
            "init_weight_std": INIT_WEIGHT_STD,
        }

    @torch.jit.unused
    def get_extra_state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "class": type(self).__name__,
            "constants": self.function_constants(),
        }

    @torch.jit.unused
    def set_extra_state(self, state: dict) -> None:
        """Refuse a state whose constants differ from this code's; a state of another Gaunt
        backend (grid into gaunt) must agree on the basis, not on the points."""
        saved = state.get("format") if isinstance(state, dict) else None
        if saved != STATE_FORMAT:
            raise ConfigError(
                f"{type(self).__name__}: the saved state has format {saved}, this code reads "
                f"format {STATE_FORMAT}; retrain the model with this version of mace-grid"
            )
        theirs = state["constants"]
        if state["class"] == type(self).__name__:
            mine = self.function_constants()
            keys = sorted(set(mine) | set(theirs))
        else:  # another backend of the same basis: only the basis itself must agree
            mine = GauntProductBasis.function_constants(self)
            keys = sorted(mine)
        for key in keys:
            a, b = theirs.get(key), mine.get(key)
            if not _same(a, b):
                raise ConfigError(
                    f"{type(self).__name__}: the saved state's {key}={_short(a)} differs from "
                    f"this code's {key}={_short(b)}, so the saved weights would compute another "
                    "function; load it with the mace-grid version that wrote it, or retrain"
                )

    def node_weights(self, node_attrs: torch.Tensor) -> torch.Tensor:
        """Per-node weight of every basis row, ``[correlation, D_out, n * C]``."""
        dtype = node_attrs.dtype
        scale = self.basis_scale.to(dtype) / self.init_weight_std
        w = self.weight.to(dtype) * scale[:, None, :, None]
        w = w.index_select(2, self.col_irrep).transpose(1, 2)  # [nu, D_out, E, C]
        w = node_attrs @ w.reshape(-1, self.num_elements, self.num_features)  # [nu D_out, n, C]
        return w.view(self.correlation, self.dim_out, node_attrs.shape[0] * self.num_features)

    def contract(
        self, features: torch.Tensor, node_attrs: torch.Tensor, powers: torch.Tensor
    ) -> torch.Tensor:
        """Weight A (nu = 1) and the projected powers, and lay the result out as mace does.

        ``features [D_in, n * C]``, ``powers [correlation - 1, D_out, n * C]`` -> ``[n, dim]``.
        """
        n = node_attrs.shape[0]
        first = features.index_select(0, self.col_in).unsqueeze(0)
        basis = torch.cat([first, powers], dim=0)  # [nu, D_out, n C]
        out = (basis * self.node_weights(node_attrs.to(features.dtype))).sum(0)  # [D_out, n C]
        channels = self.num_features
        out = (
            out.view(self.dim_out, n, channels).transpose(0, 1).reshape(n, self.dim_out * channels)
        )
        return out.index_select(1, self.out_perm)

    def project_powers(
        self, features: torch.Tensor, node_attrs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """P_LM(f^nu), nu = 2..correlation: ``[D_in, n C] -> [correlation - 1, D_out, n C]``
        (``node_attrs [n, E]`` for a backend with per-element weights inside the products)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, node_attrs: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _refuse_autocast(x.device.type)
        features = x.reshape(x.shape[0] * x.shape[1], x.shape[2]).t().contiguous()  # [D_in, n C]
        return self.contract(features, node_attrs, self.project_powers(features, node_attrs))

    def extra_repr(self) -> str:
        return (
            f"{self.irreps_in} -> {self.irreps_out}, correlation={self.correlation}, "
            f"num_elements={self.num_elements}"
        )


def _require_constants(module, state_dict, prefix, *args) -> None:
    """Load pre-hook: a state with this module's weight but no extra state was written before
    the constants were stored (mace-grid without `STATE_FORMAT`): refuse it by name."""
    if prefix + "weight" in state_dict and prefix + "_extra_state" not in state_dict:
        raise ConfigError(
            f"{type(module).__name__}: the saved state has no function constants (written by a "
            f"mace-grid version before state format {STATE_FORMAT}); its weights cannot be "
            "checked against this code's basis scales and grids: retrain the model"
        )


def _same(a, b) -> bool:
    """Equal, with floats compared to 1e-12 relative (they are recomputed from formulas)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
            return False
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-300)
    return a == b


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_autocast(device_type: str) -> None:
    """The Gaunt kernels run in the input's dtype only: under autocast their matmuls would
    silently drop to half precision (and forces to float32), so refuse it in one line."""
    if torch.is_autocast_enabled(device_type):
        raise ConfigError(
            "the Gaunt product backends (gaunt, grid) do not support autocast / mixed "
            "precision; use trainer.precision=32-true (or 64-true), or tp=cg"
        )


def _smooth(n: int) -> int:
    """Smallest integer >= n without prime factors above 5 (a fast FFT length)."""

    def rest(k: int) -> int:
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        return k

    while rest(n) != 1:
        n += 1
    return n


def _fourier_sizes(l_in: int, correlation: int, l_out: int) -> tuple[int, int]:
    """(n_theta, n_phi) of the torus FFT grid: every u of f^corr (|u| <= corr L_in) must be
    alias-free; in phi only |v| <= l_out is read back. Rounded up to fast FFT lengths."""
    n_phi = max(correlation * l_in + l_out + 1, 2 * max(l_in, l_out) + 1)
    return _smooth(2 * correlation * l_in + 1), _smooth(n_phi)


#: how `FourierGauntProduct` computes the powers; the first is the default (fastest here)
METHODS = ("fused", "fft", "direct")


def check_method(method: str) -> None:
    """`ConfigError` unless ``method`` (``tp.options.method``) is one of `METHODS`."""
    if method not in METHODS:
        raise ConfigError(
            f"tp.options.method must be one of {', '.join(METHODS)} for tp=gaunt, got {method!r}"
        )


def torus_points(
    l_in: int, correlation: int, l_out: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2D-Fourier method as a point set: ``theta [n_theta]``, ``phi [n_phi]`` (equispaced
    on the torus [0, 2pi)^2, sizes `_fourier_sizes`) and ``projector [D_out, n_phi n_theta]``
    (phi-major points; rows = the components of the output degrees ``l_out``), float64.

    Evaluating the torus-extended Y_lm at the points is SH -> 2D Fourier -> inverse DFT in one
    map (exact: Y_lm is a trigonometric polynomial of degree <= l). The projector is the forward
    DFT composed with the exact Fourier -> SH projection (`sphere.fourier_to_sh`), taken real
    (the maps act on real g): P_LM(g) = sum_p projector[LM, p] g_p, exact for g = f^nu.
    """
    l_max = max(l_out)
    out_lm = [sphere.lm_index(l, m) for l in l_out for m in range(-l, l + 1)]
    m_out = torch.tensor([m for l in l_out for m in range(-l, l + 1)])
    n_theta, n_phi = _fourier_sizes(l_in, correlation, l_max)
    theta = torch.arange(n_theta, dtype=torch.float64) * (2 * math.pi / n_theta)
    phi = torch.arange(n_phi, dtype=torch.float64) * (2 * math.pi / n_phi)
    umax = n_theta // 2
    u = torch.arange(n_theta)
    u = torch.where(u > umax, u - n_theta, u)  # the DFT's frequencies
    v = torch.arange(-l_max, l_max + 1)
    zeta, phi_coeff = sphere.fourier_to_sh(l_max, umax)  # [LM, u + umax], [M + l_max, v + l_max]
    dft_theta = torch.exp(-1j * u[:, None] * theta[None, :]) / n_theta  # [u, j]
    dft_phi = torch.exp(-1j * v[:, None] * phi[None, :]) / n_phi  # [v, k]
    along_theta = zeta[out_lm][:, u + umax] @ dft_theta  # [D_out, j]
    along_phi = phi_coeff[l_max + m_out][:, l_max - v] @ dft_phi  # [D_out, k]: phi[M, -v]
    projector = 0.5 * along_phi[:, :, None] * along_theta[:, None, :]  # [D_out, k, j]
    return theta, phi, projector.real.reshape(len(out_lm), -1).contiguous()


@compile_mode("script")
class FourierGauntProduct(GauntProductBasis):
    """Gaunt product by 2D Fourier series on the torus (Luo et al., ICLR 2024).

    ``method``: "fused" (default) runs the method as a point set on the shared engine
    (`torus_points`: evaluate on the equispaced torus, pointwise powers, DFT + exact
    Fourier -> SH projection as one real map); "fft" is the literal route (SH -> 2D Fourier
    coefficients, zero-padded inverse FFT, pointwise powers, FFT, closed-form projection,
    plain autograd); "direct" convolves the coefficient arrays directly (per-row grouped
    conv2d: exact but far slower, a cross-check). All three compute the same function.
    Layout: x [n, C, (L_in+1)^2] (e3nn order), node_attrs [n, E] -> [n, irreps_out.dim].
    """

    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_out: o3.Irreps,
        correlation: int,
        num_elements: int,
        method: str = METHODS[0],
    ) -> None:
        check_method(method)
        super().__init__(irreps_in, irreps_out, correlation, num_elements)
        self.method = method
        l_in, l_max = self.l_in, self.l_out_max
        self.n_theta, self.n_phi = _fourier_sizes(l_in, correlation, l_max)
        self.points = PointSet(l_in, correlation, *torus_points(l_in, correlation, self.l_out))
        theta, phi = sphere.sh_to_fourier(l_in)  # [lm, u], [m, v]
        m_in = torch.tensor([m for l in range(l_in + 1) for m in range(-l, l + 1)])
        coeff = theta[:, :, None] * phi[l_in + m_in][:, None, :]  # [lm, u, v], u, v in -L..L
        if method == "direct":
            to_fourier = coeff  # full spectrum, index u + L_in, v + L_in
            umax = correlation * l_in
            rows = torch.arange(-umax, umax + 1)
        else:  # half spectrum v >= 0, u wrapped modulo n_theta as the FFT expects
            to_fourier = coeff.new_zeros(len(m_in), self.n_theta, l_in + 1)
            u = torch.arange(-l_in, l_in + 1)
            to_fourier[:, u % self.n_theta, :] = coeff[:, :, l_in:]
            umax = self.n_theta // 2
            rows = torch.arange(self.n_theta)
            rows = torch.where(rows > umax, rows - self.n_theta, rows)
        self.register_buffer(
            "to_fourier", torch.view_as_real(to_fourier).reshape(len(m_in), -1), persistent=False
        )
        # P_LM = sum_{u, 0 <= v <= L} c_v Re(G[u, v] z[u, v, LM]), c_0 = 1, c_v = 2 (G is Hermitian)
        zeta, phi_out = sphere.fourier_to_sh(l_max, umax)  # [LM, u], [M, v]
        zeta = zeta[self.out_lm]  # columns of irreps_out
        m_out = torch.tensor([m for l in self.l_out for m in range(-l, l + 1)])
        v = torch.arange(l_max + 1)
        z = 0.5 * zeta.T[rows + umax][:, None, :] * phi_out[l_max + m_out][:, l_max - v].T[None]
        z = z * torch.where(v == 0, 1.0, 2.0).to(torch.float64)[None, :, None]  # [u, v, D_out]
        from_fourier = torch.stack([z.real, -z.imag], dim=2)  # [u, v, re/im, D_out]
        self.register_buffer("from_fourier", from_fourier.contiguous(), persistent=False)

    @torch.jit.unused
    def function_constants(self) -> dict:
        return super().function_constants() | {
            "points": "torus-fourier",
            "n_theta": self.n_theta,
            "n_phi": self.n_phi,
        }

    def _conv(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Full 2D linear convolution of complex coefficient arrays, per row: [R, h, w]."""
        kh, kw = b.shape[1], b.shape[2]
        out = torch.nn.functional.conv2d(
            a.unsqueeze(0),
            b.flip([1, 2]).unsqueeze(1),
            None,
            [1, 1],
            [kh - 1, kw - 1],
            [1, 1],
            a.shape[0],
        )
        return out.squeeze(0)

    def project_powers(
        self, features: torch.Tensor, node_attrs: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.method == "fused" or self.correlation == 1:
            return self.points(features)
        rows = features.shape[1]
        k = self.correlation - 1
        if rows == 0:  # no nodes (an empty FFT is an error)
            return features.new_zeros(k, self.dim_out, 0)
        l_in, v_out = self.l_in, self.l_out_max + 1
        coeff = features.t() @ self.to_fourier.to(features.dtype)  # [rows, Fourier coefficients]
        from_fourier = self.from_fourier.to(features.dtype)
        if self.method == "direct":
            first = torch.view_as_complex(coeff.view(rows, 2 * l_in + 1, 2 * l_in + 1, 2))
            umax = self.correlation * l_in
            power = first
            out = []
            for nu in range(2, self.correlation + 1):
                power = self._conv(power, first)  # |u|, |v| <= nu L_in
                v_take = min(v_out, nu * l_in + 1)  # f^nu has no |v| > nu L_in
                half = torch.view_as_real(power[:, :, nu * l_in : nu * l_in + v_take])
                z = from_fourier[umax - nu * l_in : umax + nu * l_in + 1, :v_take]
                z = z.reshape(-1, self.dim_out)
                out.append(half.reshape(rows, -1) @ z)
            return torch.stack(out, dim=0).transpose(1, 2)
        first = torch.view_as_complex(coeff.view(rows, self.n_theta, l_in + 1, 2))
        values = torch.fft.irfft2(first, s=[self.n_theta, self.n_phi], norm="forward")
        power = values
        powers = []
        for _ in range(k):
            power = power * values
            powers.append(power)
        # rfft2 restricted to the |v| <= L_out columns the projection reads: phi first, then theta
        spectrum = torch.fft.rfft(torch.stack(powers, dim=1), dim=-1, norm="forward")
        spectrum = torch.fft.fft(spectrum[..., :v_out], dim=-2, norm="forward")
        spectrum = torch.view_as_real(spectrum).reshape(rows, k, -1)
        return (spectrum @ from_fourier.reshape(-1, self.dim_out)).permute(1, 2, 0)


def build_gaunt(
    irreps_in: o3.Irreps,
    irreps_out: o3.Irreps,
    correlation: int,
    num_elements: int,
    method: str = METHODS[0],
) -> FourierGauntProduct:
    """The ``gaunt`` backend; ``method`` is one of `METHODS` (same function, other algorithm)."""
    return FourierGauntProduct(irreps_in, irreps_out, correlation, num_elements, method)
