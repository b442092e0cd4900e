"""Out-of-core data: preprocess → sharded HDF5 → HDF5DataModule gives what AtomsDataModule gives."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import OC20, OC20_SUBSET, demo_module, needs_oc20
from test_train_cli import metric_rows, tiny_demo, train_cli

from mace_grid import PROJECT_ROOT
from mace_grid.data import AtomsDataModule, HDF5DataModule, generate_demo, preprocess
from mace_grid.errors import DataError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo"), n_frames=30, n_test_frames=10, seed=0)


def assert_same_data(memory: AtomsDataModule, lazy: HDF5DataModule) -> None:
    """Same sizes, names, config types, statistics, splits.json and, frame by frame, AtomicData."""
    assert lazy.sizes == memory.sizes and lazy.test_names == memory.test_names
    assert lazy.config_types == memory.config_types
    stats, ref = lazy.statistics, memory.statistics  # float64 vs the default dtype (float32)
    assert stats["atomic_numbers"] == ref["atomic_numbers"]
    assert stats["atomic_energies"] == pytest.approx(ref["atomic_energies"], rel=1e-9)
    for key in ("avg_num_neighbors", "mean", "std"):
        assert stats[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key
    splits = [json.loads((Path(m.output_dir) / "splits.json").read_text()) for m in (memory, lazy)]
    assert splits[0] == splits[1]
    pairs = [(memory._train, lazy._train), (memory._valid, lazy._valid)]
    pairs += list(zip(memory._tests, lazy._tests, strict=True))
    for frames, shards in pairs:
        assert len(frames) == len(shards)
        for i, expected in enumerate(frames):
            got = shards[i]
            for key in expected.keys:
                a, b = getattr(expected, key), getattr(got, key)
                assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), key


CASES = {
    "frame split, test file": {},
    "valid file, held-out test, stride": dict(
        valid_file="test.db", test_files={}, test_fraction=0.2, frame_stride=2
    ),
    "valid and test globs": dict(valid_file="te*.db", test_files={"glob": "te*.db"}),
}


@pytest.mark.parametrize("case", CASES)
def test_shards_give_the_in_memory_frames(case: str, demo_dir: Path, tmp_path: Path) -> None:
    kwargs = dict(CASES[case])
    if "valid_file" in kwargs:
        kwargs["valid_file"] = str(demo_dir / kwargs["valid_file"])
    kwargs["test_files"] = {k: str(demo_dir / v) for k, v in kwargs.get("test_files", {}).items()}
    if not kwargs["test_files"] and "test_files" not in CASES[case]:
        del kwargs["test_files"]
    memory = demo_module(demo_dir, tmp_path / "memory", **kwargs)
    memory.setup()
    writer = demo_module(demo_dir, tmp_path / "memory", **kwargs)
    meta = preprocess(writer, tmp_path / "h5", shard_frames=7)  # frames straddle shards
    assert len(meta["shards"]) > 1
    lazy = HDF5DataModule(tmp_path / "h5", r_max=4.0, num_workers=0, output_dir=tmp_path / "run")
    lazy.setup()
    assert_same_data(memory, lazy)


@needs_oc20
def test_oc20_file_split_gives_the_in_memory_frames(tmp_path: Path) -> None:
    args = dict(
        train_file=[str(OC20 / name) for name in OC20_SUBSET],
        split_by="file",
        valid_fraction=0.125,
        test_fraction=0.125,
        e0s="min_norm",
        r_max=5.0,
        frame_stride=5,
        cache_dir=str(tmp_path / "cache"),
    )
    memory = AtomsDataModule(**args, output_dir=str(tmp_path / "memory"))
    memory.setup()
    preprocess(AtomsDataModule(**args), tmp_path / "h5", shard_frames=100)
    lazy = HDF5DataModule(tmp_path / "h5", r_max=5.0, num_workers=0, output_dir=tmp_path / "run")
    lazy.setup()
    assert_same_data(memory, lazy)


def test_loader_workers_read_the_shards(demo_dir: Path, tmp_path: Path) -> None:
    preprocess(demo_module(demo_dir, tmp_path), tmp_path / "h5", shard_frames=10)
    lazy = HDF5DataModule(tmp_path / "h5", r_max=4.0, batch_size=4, num_workers=2)
    lazy.setup()
    batches = list(lazy.train_dataloader())
    assert sum(b.num_graphs for b in batches) == lazy.sizes["train"]
    assert {"energy", "forces", "free_mask", "config_type_id"} <= set(batches[0].keys)


def test_errors_say_what_to_do(demo_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="preprocess.py"):
        HDF5DataModule(tmp_path / "nothing", r_max=4.0).setup()
    preprocess(demo_module(demo_dir, tmp_path), tmp_path / "h5")
    with pytest.raises(DataError, match="already holds"):
        preprocess(demo_module(demo_dir, tmp_path), tmp_path / "h5")
    with pytest.raises(DataError, match="model.r_max=5.0"):
        HDF5DataModule(tmp_path / "h5", r_max=5.0).setup()
    with pytest.raises(DataError, match="Cu"):
        HDF5DataModule(tmp_path / "h5", r_max=4.0, atomic_numbers=[1, 6, 7, 8]).setup()


def test_train_from_shards_matches_training_from_files(tmp_path: Path) -> None:
    """The CLI: preprocess, then one epoch from the shards (2 loader workers) and from the files."""
    data = tiny_demo(tmp_path)
    script = str(PROJECT_ROOT / "scripts" / "preprocess.py")
    cmd = [sys.executable, script, *data, f"out={tmp_path}/h5"]
    subprocess.run(cmd, cwd=PROJECT_ROOT, check=True, capture_output=True)
    common = ["trainer.max_epochs=1", "+trainer.enable_progress_bar=false"]
    train_cli(*data, *common, f"hydra.run.dir={tmp_path}/files")
    model = [a for a in data if a.startswith(("model.", "model="))]
    shards = ["data=hdf5", f"data.path={tmp_path}/h5", "data.batch_size=4", *model]
    train_cli(*shards, *common, f"hydra.run.dir={tmp_path}/shards")

    def first_epoch(run: str) -> dict[str, float]:
        rows = [r for r in metric_rows(tmp_path / run) if r.get("train/loss")]
        return {k: float(v) for k, v in rows[0].items() if k.startswith("train/")}

    assert first_epoch("shards") == pytest.approx(first_epoch("files"), rel=1e-5)
    summaries = [
        json.loads((tmp_path / r / "summary.json").read_text()) for r in ("files", "shards")
    ]
    assert summaries[1]["initial_val"] == pytest.approx(summaries[0]["initial_val"], rel=1e-4)
