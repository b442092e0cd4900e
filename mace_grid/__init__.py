"""mace-grid: MACE training with swappable product-basis tensor products."""

import warnings
from pathlib import Path

import torch.serialization
from omegaconf import OmegaConf

# e3nn 0.4.4 loads its constants with torch.load; torch >= 2.6 needs `slice` allow-listed first.
torch.serialization.add_safe_globals([slice])

# e3nn/mace script their modules while a model is built; torch then warns about every module.
warnings.filterwarnings("ignore", message="The TorchScript type system doesn't support")
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")

__version__ = "0.1.0"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _resume_dir(ckpt_path: str | None, default: str) -> str:
    """Run dir of a checkpoint written by train.py (<run>/checkpoints/x.ckpt), else ``default``."""
    if ckpt_path:
        run_dir = Path(ckpt_path).resolve().parent.parent
        if (run_dir / ".hydra").is_dir():
            return str(run_dir)
    return default


for _name, _fn in (("project_root", lambda: str(PROJECT_ROOT)), ("resume_dir", _resume_dir)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)
