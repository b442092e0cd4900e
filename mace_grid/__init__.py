"""mace-grid: MACE training with swappable product-basis tensor products."""

import torch.serialization

# e3nn 0.4.4 loads its constants with torch.load; torch >= 2.6 needs `slice` allow-listed first.
torch.serialization.add_safe_globals([slice])

__version__ = "0.1.0"
