"""mace-grid: MACE training with swappable product-basis tensor products."""

import functools
import os
import warnings
from datetime import datetime
from pathlib import Path

import torch.serialization
from omegaconf import OmegaConf

# e3nn 0.4.4 loads its constants with torch.load; torch >= 2.6 needs `slice` allow-listed first.
torch.serialization.add_safe_globals([slice])

# e3nn/mace script their modules while a model is built, and e3nn's code-generated modules copy
# themselves (EMA, checkpoints) through torch.jit.save/load; torch >= 2.14 warns at each call
# that TorchScript is deprecated. These are the libraries' internals, not the user's to act on.
warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")

__version__ = "0.1.0"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _resume_dir(ckpt_path: str | None, default: str) -> str:
    """Run dir of a checkpoint written by train.py (<run>/checkpoints/x.ckpt), else ``default``."""
    if ckpt_path:
        run_dir = Path(ckpt_path).resolve().parent.parent
        if (run_dir / ".hydra").is_dir():
            return str(run_dir)
    return default


@functools.cache
def _run_stamp() -> str:
    """``<date>_<time>_<pid>``, fixed per process: runs started in the same second differ."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{os.getpid()}"


def _run_record(ckpt_path: str | None) -> str:
    """Where Hydra records the config (``hydra.output_subdir``): ``.hydra``; a resume of an
    existing run ``.hydra/resume-<stamp>``, so that the run's own record is never rewritten."""
    if ckpt_path and _resume_dir(ckpt_path, "") != "":
        return f".hydra/resume-{_run_stamp()}"
    return ".hydra"


for _name, _fn in (
    ("project_root", lambda: str(PROJECT_ROOT)),
    ("resume_dir", _resume_dir),
    ("run_stamp", _run_stamp),
    ("run_record", _run_record),
):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
