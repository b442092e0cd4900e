"""mace-grid: MACE training with swappable product-basis tensor products."""

from pathlib import Path

import torch.serialization
from omegaconf import OmegaConf

# e3nn 0.4.4 loads its constants with torch.load; torch >= 2.6 needs `slice` allow-listed first.
torch.serialization.add_safe_globals([slice])

__version__ = "0.1.0"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

if not OmegaConf.has_resolver("project_root"):
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
