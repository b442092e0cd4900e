"""ASE files → sharded HDF5 for out-of-core training: ``python scripts/preprocess.py data=oc20``.

Uses the data config's own reading, split, E0s and neighbour lists (see ``conf/preprocess.yaml``);
train from the result with ``python train.py data=hdf5 data.path=<out>``.
"""

import json

import hydra
from omegaconf import DictConfig

from mace_grid.cli import exit_on_user_error
from mace_grid.data import preprocess


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    datamodule = hydra.utils.instantiate(cfg.data)
    meta = preprocess(datamodule, cfg.out, cfg.shard_frames)
    print(f"{cfg.out}: {len(meta['shards'])} shard(s), sizes {json.dumps(meta['sizes'])}")
    print(f"train with: python train.py data=hdf5 data.path={cfg.out}")


if __name__ == "__main__":
    main()
