"""Build and load the project's compiled CPU kernels (C++ sources beside the math they compute).

Each kernel is one source registering its ops with ``TORCH_LIBRARY``; `load` builds it with
torch's ``cpp_extension`` (``-O3 -march=native``) under a name keyed by this CPU's flags and the
source, so a cache shared between machines never loads code built for another CPU, and returns
its ``torch.ops`` namespace, or None with one warning where it cannot be built (no compiler,
headers or ninja): the caller then runs its PyTorch ops.
"""

import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def load(source: Path, namespace: str, what: str):
    """``torch.ops.<namespace>`` from the C++ ``source`` (built on first use, then cached by
    torch), or None with a warning naming ``what`` falls back to PyTorch ops."""
    try:
        cpp_extension = _quiet_import_cpp_extension()
        # the source's path too: torch's build directory is named by this key, and a checkout
        # whose build file names other paths rebuilds (two clones would rebuild each other's)
        text = _cpu_flags() + str(source.resolve()) + source.read_text()
        key = hashlib.sha1(text.encode()).hexdigest()[:10]
        cpp_extension.load(
            name=f"{namespace}_{key}",
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native"],
            is_python_module=False,
        )
    except Exception as err:  # no compiler, headers or ninja: the PyTorch kernel still works
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        log.warning(
            "%s: the C++ CPU kernel could not be built (%s); using PyTorch ops", what, reason
        )
        return None
    return getattr(torch.ops, namespace)


def _quiet_import_cpp_extension():
    """``torch.utils.cpp_extension`` without its import-time warning on CPU-only machines (no
    CUDA runtime, a guessed CUDA_HOME: irrelevant to a CPU kernel)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.machine() + platform.processor()
