"""Data: ASE files → mace AtomicData graphs (cached neighbour lists) in a LightningDataModule."""

from mace_grid.data.datamodule import AtomsDataModule, build_loader, to_atomic_data
from mace_grid.data.demo import DemoDataModule, generate_demo

__all__ = ["AtomsDataModule", "DemoDataModule", "build_loader", "generate_demo", "to_atomic_data"]
