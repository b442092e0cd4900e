"""Import mace_grid before test modules import e3nn: it allow-lists what e3nn's torch.load needs.

The suite never writes into the clone's data/ (a user's demo data and neighbour caches): every
process it starts gets a throw-away $MACE_GRID_WORK_DIR.
"""

import atexit
import os
import shutil
import tempfile

import mace_grid  # noqa: F401

_WORK = tempfile.mkdtemp(prefix="mace-grid-tests-")
os.environ["MACE_GRID_WORK_DIR"] = _WORK
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)
