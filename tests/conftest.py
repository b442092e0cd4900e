"""Import mace_grid before test modules import e3nn: it allow-lists what e3nn's torch.load needs."""

import mace_grid  # noqa: F401
