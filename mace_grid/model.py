"""Build mace-torch's ``ScaleShiftMACE`` from a model config, a tp backend and data statistics.

The model is mace's own; only each product block's ``symmetric_contractions`` comes from the
chosen backend (``cg`` keeps mace's module untouched, so the stock model is reproduced exactly).
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from e3nn import o3
from mace.modules import ScaleShiftMACE, interaction_classes
from mace.modules import blocks as mace_blocks
from mace.modules.blocks import EquivariantProductBasisBlock

from mace_grid import tp as tp_backends
from mace_grid.conv import set_conv, validate_conv
from mace_grid.errors import ConfigError
from mace_grid.tp.cg import use_reduced_cg

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GATES = {"silu": torch.nn.functional.silu, "tanh": torch.tanh, "none": None}

MODEL_KEYS = {
    "r_max": float,
    "num_bessel": int,
    "num_polynomial_cutoff": int,
    "max_ell": int,
    "num_interactions": int,
    "hidden_irreps": str,
    "MLP_irreps": str,
    "correlation": int,
    "radial_MLP": list,
    "gate": str,
    "interaction": str,
    "interaction_first": str,
}
STATISTICS_KEYS = ("atomic_numbers", "atomic_energies", "avg_num_neighbors", "mean", "std")


def validate_model_config(model: Mapping[str, Any], tp: Mapping[str, Any] | None = None) -> None:
    """Check keys, types and choices of a model config (and, given the ``tp`` config, that its
    backend builds this correlation); raise ``ConfigError`` saying what to fix."""
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ConfigError(f"model: unknown key(s) {unknown}; valid keys are {sorted(MODEL_KEYS)}")
    missing = sorted(set(MODEL_KEYS) - set(model))
    if missing:
        raise ConfigError(f"model: missing key(s) {missing}")
    for key, kind in MODEL_KEYS.items():
        value = model[key]
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or isinstance(value, bool):
            raise ConfigError(f"model.{key}={value!r} must be of type {kind.__name__}")
    if model["r_max"] <= 0:
        raise ConfigError(f"model.r_max={model['r_max']} must be positive")
    if model["num_interactions"] < 1:
        raise ConfigError(f"model.num_interactions={model['num_interactions']} must be >= 1")
    if tp is not None:
        try:
            tp_backends.validate_correlation(tp["name"], model["correlation"])
        except ConfigError as err:
            raise ConfigError(f"model.{err}") from None
        tp_backends.validate_options(tp["name"], tp.get("options"))
    if model["gate"] not in GATES:
        raise ConfigError(f"model.gate={model['gate']!r}; choose one of {sorted(GATES)}")
    for key in ("interaction", "interaction_first"):
        if model[key] not in interaction_classes:
            raise ConfigError(
                f"model.{key}={model[key]!r}; choose one of {sorted(interaction_classes)}"
            )
    try:
        hidden = o3.Irreps(model["hidden_irreps"])
        o3.Irreps(model["MLP_irreps"])
    except (ValueError, AssertionError) as err:
        raise ConfigError(f"model irreps: {err}") from None
    pseudo = [str(ir) for _, ir in hidden if ir.p != (-1) ** ir.l]
    if pseudo:
        natural = dict.fromkeys(f"{mul}x{ir.l}{'eo'[ir.l % 2]}" for mul, ir in hidden)
        raise ConfigError(
            f"model.hidden_irreps={model['hidden_irreps']}: {', '.join(pseudo)} is a "
            "pseudo-tensor; MACE's product basis has no linear path to it from its "
            "natural-parity features, so no tp backend (cg included) builds it: use "
            "natural-parity irreps (0e, 1o, 2e, 3o, ...), e.g. "
            f"model.hidden_irreps={'+'.join(natural)}"
        )
    if len({mul for mul, _ in hidden}) != 1:
        raise ConfigError(
            f"model.hidden_irreps={model['hidden_irreps']} must use one multiplicity for every "
            "irrep (MACE's channel layout), e.g. 64x0e+64x1o"
        )


def build_model(
    model: Mapping[str, Any],
    tp: Mapping[str, Any],
    statistics: Mapping[str, Any],
    conv: Mapping[str, Any] | None = None,
) -> ScaleShiftMACE:
    """``ScaleShiftMACE`` with the product-basis contraction of backend ``tp["name"]`` and the
    interaction convolution ``conv["name"]`` (default ``e3nn``, mace's own; see ``conv.py``).

    ``model`` holds the architecture (see ``conf/model/mace.yaml``), ``tp`` the backend name and
    its ``options``, ``statistics`` what the training set determines (atomic numbers, E0s,
    average neighbour count, scale and shift).
    """
    validate_model_config(model, tp)
    conv_name = (conv or {}).get("name", "e3nn")
    validate_conv(conv_name, model)
    missing = [key for key in STATISTICS_KEYS if key not in statistics]
    if missing:
        raise ConfigError(f"data statistics lack {missing}")
    atomic_numbers = [int(z) for z in statistics["atomic_numbers"]]
    # passed explicitly: mace's default (True) silently switches cg to cuequivariance's reduced
    # basis wherever cuequivariance is installed
    reduced_cg = False
    if tp["name"] == "cg":
        reduced_cg = use_reduced_cg((tp.get("options") or {}).get("reduced_cg", False))
    with product_backend(tp):
        net = ScaleShiftMACE(
            r_max=float(model["r_max"]),
            num_bessel=model["num_bessel"],
            num_polynomial_cutoff=model["num_polynomial_cutoff"],
            max_ell=model["max_ell"],
            interaction_cls=interaction_classes[model["interaction"]],
            interaction_cls_first=interaction_classes[model["interaction_first"]],
            num_interactions=model["num_interactions"],
            num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps(model["hidden_irreps"]),
            MLP_irreps=o3.Irreps(model["MLP_irreps"]),
            atomic_energies=np.asarray(statistics["atomic_energies"], dtype=float),
            avg_num_neighbors=float(statistics["avg_num_neighbors"]),
            atomic_numbers=atomic_numbers,
            correlation=model["correlation"],
            gate=GATES[model["gate"]],
            radial_MLP=list(model["radial_MLP"]),
            atomic_inter_scale=float(statistics["std"]),
            atomic_inter_shift=float(statistics["mean"]),
            use_reduced_cg=reduced_cg,
        )
    return set_conv(net, conv_name)


def build_compiled_model(
    model: Mapping[str, Any],
    tp: Mapping[str, Any],
    statistics: Mapping[str, Any],
    conv: Mapping[str, Any] | None = None,
) -> ScaleShiftMACE:
    """:func:`build_model` prepared for ``torch.compile`` as mace-torch does it
    (``mace.tools.compile.prepare``: e3nn's code generation off, marked blocks fx-simplified,
    ``autograd.grad`` traced into the graph), with its forward compiled in place, so the
    state_dict keys stay those of the eager model. Inputs need ``positions.requires_grad_()``."""
    from mace.tools import compile as mace_compile

    trace = mace_compile.symbolic_trace
    mace_compile.symbolic_trace = _trace_keeping_buffers
    try:
        net = mace_compile.prepare(build_model)(model, tp, statistics, conv)
    finally:
        mace_compile.symbolic_trace = trace
    net.compile()
    return net


def _trace_keeping_buffers(module: torch.nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(module)`` holding all of ``module``'s persistent buffers.

    A traced module keeps only the tensors its graph reads, so mace's fx-simplified symmetric
    contraction (tp=cg) would lose its ``weights_*_zeroed`` flags: a compiled model's
    state_dict would then miss keys, and its checkpoints would not load into an eager model."""
    traced = torch.fx.symbolic_trace(module)
    kept = dict(traced.named_buffers())
    for name, owner in module.named_modules():
        for key, buffer in owner.named_buffers(recurse=False):
            path = f"{name}.{key}" if name else key
            if path in kept or key in owner._non_persistent_buffers_set:
                continue
            holder = traced
            for part in name.split(".") if name else []:
                if not hasattr(holder, part):
                    holder.add_module(part, torch.nn.Module())
                holder = getattr(holder, part)
            holder.register_buffer(key, buffer)
    return traced


@contextmanager
def product_backend(tp: Mapping[str, Any]) -> Iterator[None]:
    """While mace builds a model, make its product blocks take backend ``tp["name"]``.

    mace-torch has no argument for the product class: ``EquivariantProductBasisBlock`` calls the
    module-level ``SymmetricContractionWrapper``. Swapping that factory for the duration of the
    build (``cg`` keeps mace's own) means the stock contraction is never constructed for the
    Gaunt backends: it is slow to build and mace cannot build it at all beyond L=3, correlation 3.
    """
    if tp["name"] == "cg":
        yield
        return
    options = dict(tp.get("options") or {})

    def build(irreps_in, irreps_out, correlation, num_elements=None, **mace_only_kwargs):
        return tp_backends.build(
            tp["name"], irreps_in, irreps_out, correlation, num_elements, **options
        )

    stock = mace_blocks.SymmetricContractionWrapper
    mace_blocks.SymmetricContractionWrapper = build
    try:
        yield
    finally:
        mace_blocks.SymmetricContractionWrapper = stock


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def product_expressivity(
    net: torch.nn.Module, tp: Mapping[str, Any], correlation: int, num_elements: int = 1
) -> list[tuple[torch.nn.Module, tp_backends.Expressivity]]:
    """Each product block's contraction and its backend's expressivity per channel, for
    ``num_elements`` elements (default: per (element, channel))."""
    options = dict(tp.get("options") or {})
    blocks = [
        m.symmetric_contractions
        for m in net.modules()
        if isinstance(m, EquivariantProductBasisBlock)
    ]
    return [
        (
            sc,
            tp_backends.expressivity(
                tp["name"], sc.irreps_in, sc.irreps_out, correlation, num_elements, **options
            ),
        )
        for sc in blocks
    ]


def describe_products(net: torch.nn.Module, tp: Mapping[str, Any], correlation: int) -> str:
    """Per product block: backend module, trainable weights, and per element and channel the
    "price of freedom": free weights, independent couplings they reach, and all that exist."""
    return "; ".join(
        f"product {i}: {tp['name']} ({type(sc).__name__}), {count_parameters(sc)} weights; per "
        f"element and channel {expr.weights} weights, {expr.independent} independent couplings "
        f"of {expr.complete} equivariant maps"
        for i, (sc, expr) in enumerate(product_expressivity(net, tp, correlation))
    )
