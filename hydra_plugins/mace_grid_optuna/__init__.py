"""mace-grid's Optuna sweeper for Hydra (``hydra/sweeper=mace_grid_optuna``), found by Hydra's
plugin discovery; the implementation is :mod:`mace_grid.sweeper`."""
