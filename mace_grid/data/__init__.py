"""Data: ASE files → mace AtomicData graphs (cached neighbour lists) in a LightningDataModule;
sharded HDF5 (`preprocess`) read lazily by `HDF5DataModule` for datasets larger than memory."""

from mace_grid.data.datamodule import AtomsDataModule, build_loader, to_atomic_data
from mace_grid.data.demo import DemoDataModule, generate_demo
from mace_grid.data.hdf5 import HDF5DataModule, preprocess

__all__ = [
    "AtomsDataModule",
    "DemoDataModule",
    "HDF5DataModule",
    "build_loader",
    "generate_demo",
    "preprocess",
    "to_atomic_data",
]
