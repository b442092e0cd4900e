"""OC20 as fairchem ships it: .aselmdb databases, S2EF .extxyz.xz shards with reference-energy
tables, OC20 tags and metrics — on tiny shards written here from the shared OC20 sample."""

import json
import logging
import lzma
import os
from pathlib import Path

import ase.io
import numpy as np
import pytest
from _helpers import one_thread  # noqa: F401
from ase import Atoms
from ase.build import add_adsorbate, fcc111, molecule
from ase.constraints import FixAtoms
from test_data import OC20, needs_oc20, one_line_error
from test_train_cli import TINY_MODEL, train_cli

import mace_grid.data.datamodule as datamodule_module
import mace_grid.data.io as io_module
from mace_grid.config import compose_config
from mace_grid.data import AtomsDataModule, HDF5DataModule, preprocess
from mace_grid.data.readers import LMDBFrames, oc20_tags
from mace_grid.evaluate import evaluate, oc20_metrics, per_tag_force_mae

pytestmark = needs_oc20
# Two small systems (33 and 49 atoms) with different elements: Au/Na slab + O, Na/Tl slab + H.
SYSTEMS = ("random1000100", "random1000156")
ADSORBATE = ["O", "H"]  # the adsorbates' elements, in neither slab
KEEP = slice(0, 24, 3)  # 8 frames of each relaxation


def raw_frames(system: str, keep=KEEP) -> list[Atoms]:
    return ase.io.read(OC20 / f"{system}.traj", index=keep)


def targets(n: int, system_index: int) -> np.ndarray:
    """The referenced energies the tests want back: arbitrary, different for every frame."""
    return 0.37 * system_index - 0.5 + 0.013 * np.arange(n)


def write_lmdb(path: Path, frames: list[Atoms], sid: str, fids) -> None:
    from ase_db_backends.aselmdb import LMDBDatabase

    db = LMDBDatabase(path, use_lock_file=False)
    for atoms, fid in zip(frames, fids, strict=True):
        db.write(atoms, data={"sid": sid, "fid": int(fid)})
    db.close()
    Path(f"{path}-lock").unlink()  # LMDB's writer lock file; readers must not make one


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, object]:
    """lmdb/: one .aselmdb per system (rows carry sid/fid); s2ef/: one 0.extxyz.xz + 0.txt
    (fairchem's S2EF layout: move_mask and tags arrays, line i = frame i); refs.txt: the same
    references as one table, shuffled. Energies referenced by the tables are `targets`."""
    root = tmp_path_factory.mktemp("oc20_shards")
    (root / "lmdb").mkdir()
    (root / "s2ef").mkdir()
    s2ef_frames, lines, raw = [], [], {}
    for k, system in enumerate(SYSTEMS):
        frames = raw_frames(system)
        fids = list(range(24))[KEEP]
        raw[system] = frames
        write_lmdb(root / "lmdb" / f"data.{k:04d}.aselmdb", frames, system, fids)
        want = targets(len(frames), k)
        for atoms, fid, target in zip(frames, fids, want, strict=True):
            ref = atoms.get_potential_energy() - target
            lines.append(f"{system},frame{fid},{float(ref)!r}")
            a = atoms.copy()
            a.calc = atoms.calc
            # fairchem's shards carry tags: fixed 0, the known adsorbate (O, H) 2, slab 1
            a.set_tags(np.where(_free(a) == 0, 0, np.where(np.isin(a.symbols, ADSORBATE), 2, 1)))
            s2ef_frames.append(a)
    ase.io.write(root / "s2ef" / "0.extxyz.xz", s2ef_frames, format="extxyz")
    (root / "s2ef" / "0.txt").write_text("\n".join(lines) + "\n")
    shuffled = np.random.default_rng(0).permutation(lines)
    (root / "refs.txt").write_text("\n".join(shuffled) + "\n")
    want = np.concatenate([targets(len(raw[s]), k) for k, s in enumerate(SYSTEMS)])
    return {"root": root, "raw": raw, "targets": want, "s2ef": s2ef_frames}


def _free(atoms: Atoms) -> np.ndarray:
    mask = np.ones(len(atoms))
    mask[atoms.constraints[0].get_indices()] = 0
    return mask


def module(tmp_path: Path, train_file, **kwargs) -> AtomsDataModule:
    args = dict(valid_fraction=0.0, r_max=4.0, batch_size=4, cache_dir=str(tmp_path / "cache"))
    dm = AtomsDataModule(train_file=train_file, **(args | kwargs))
    dm.setup("fit")
    return dm


def energies(dm: AtomsDataModule) -> np.ndarray:
    return np.array([float(d.energy) for d in dm._train])


# -- readers -----------------------------------------------------------------------------------
def test_aselmdb_folder_and_glob_read_only(shards, tmp_path: Path) -> None:
    """A folder and a glob of .aselmdb files give every row: raw energies, forces and FixAtoms
    masks as the .traj files have them; reading creates no file (no lock files)."""
    folder = shards["root"] / "lmdb"
    before = sorted(os.listdir(folder))
    by_folder = module(tmp_path, str(folder), e0s="min_norm")
    by_glob = module(tmp_path, str(folder / "*.aselmdb"), e0s="min_norm")
    assert sorted(os.listdir(folder)) == before
    frames = [a for s in SYSTEMS for a in shards["raw"][s]]
    assert by_folder.sizes["train"] == by_glob.sizes["train"] == len(frames) == 16
    for dm in (by_folder, by_glob):
        np.testing.assert_allclose(energies(dm), [a.get_potential_energy() for a in frames])
        for data, atoms in zip(dm._train, frames, strict=True):
            raw = atoms.get_forces(apply_constraint=False)
            np.testing.assert_allclose(data.forces.numpy(), raw, atol=1e-6)
            np.testing.assert_array_equal(data.free_mask.numpy(), _free(atoms))


def test_aselmdb_reads_lazily_and_preprocess_streams(tmp_path: Path, monkeypatch, caplog) -> None:
    """300 rows: opening decodes none, frame i decodes row i only; preprocess with stride 10
    decodes the 30 kept rows (and 4 of a 40-row valid_file), at most shard_frames (8) at a time,
    never a whole file."""
    from ase_db_backends.aselmdb import LMDBDatabase

    frames = raw_frames("random1000100", slice(0, 30))
    path = tmp_path / "big.aselmdb"
    write_lmdb(path, frames * 10, "random1000100", range(300))
    valid = raw_frames("random1000100", slice(30, 70))
    write_lmdb(tmp_path / "valid.aselmdb", valid, "random1000100", range(30, 70))
    decoded: list[int] = []
    get_row = LMDBDatabase._get_row
    monkeypatch.setattr(
        LMDBDatabase, "_get_row", lambda db, i, **kw: decoded.append(i) or get_row(db, i, **kw)
    )
    with LMDBFrames(str(path)) as db:
        assert len(db) == 300 and decoded == []
        assert db[123].get_potential_energy() == pytest.approx(frames[3].get_potential_energy())
        assert decoded == [124]  # ids start at 1
    decoded.clear()

    def whole_file(*args, **kwargs):
        raise AssertionError("preprocess read the whole database")

    chunk_sizes: list[int] = []
    to_configs = datamodule_module.to_configs
    monkeypatch.setattr(io_module, "read_atoms", whole_file)
    monkeypatch.setattr(
        datamodule_module,
        "to_configs",
        lambda frames, *a: chunk_sizes.append(len(frames)) or to_configs(frames, *a),
    )
    dm = AtomsDataModule(
        train_file=str(path),
        valid_file=str(tmp_path / "valid.aselmdb"),
        frame_stride=10,
        r_max=4.0,
        e0s="min_norm",
        drop_duplicates=False,  # the rows repeat 30 frames
    )
    meta = preprocess(dm, tmp_path / "h5", shard_frames=8)
    assert sorted(decoded) == sorted([1 + 10 * k for k in range(30)] + [1, 11, 21, 31])
    assert chunk_sizes == [8, 8, 8, 6, 4]
    assert meta["sizes"] == {"train": 30, "valid": 4}
    lazy = HDF5DataModule(str(tmp_path / "h5"), r_max=4.0, num_workers=0)
    lazy.setup("fit")
    got = [float(lazy._train[i].energy) for i in range(30)]
    want = [frames[(10 * k) % 30].get_potential_energy() for k in range(30)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    got = [float(lazy._valid[i].energy) for i in range(4)]
    np.testing.assert_allclose(
        got, [valid[10 * k].get_potential_energy() for k in range(4)], rtol=1e-6
    )
    # duplicates dropped piece by piece are reported once per file
    monkeypatch.setattr(datamodule_module, "to_configs", to_configs)
    with caplog.at_level(logging.WARNING, "mace_grid.data"):
        dm = AtomsDataModule(train_file=str(path), frame_stride=10, r_max=4.0, e0s="min_norm")
        preprocess(dm, tmp_path / "h5_unique", shard_frames=8)
    dropped = [r.getMessage() for r in caplog.records if "repeat earlier" in r.getMessage()]
    assert len(dropped) == 1 and "dropped 27 of 30" in dropped[0]
    assert dm.duplicates == {str(path): list(range(3, 30))}  # kept frames 3.. repeat 0, 1, 2


def test_s2ef_extxyz_referenced_frame_by_frame(shards, tmp_path: Path) -> None:
    """0.extxyz.xz with its 0.txt: energies E_total - reference of each frame, whether the
    references come from the folder or from one shuffled table (matched by system and frame);
    move_mask gives the free atoms, the tags array the tags; E0s default to zero."""
    root = shards["root"]
    xyz = str(root / "s2ef" / "0.extxyz.xz")
    with lzma.open(xyz, "rt") as handle:
        assert "move_mask:L:1:tags:I:1" in handle.readlines()[1]
    for refs in (root / "s2ef", root / "refs.txt"):
        dm = module(tmp_path, xyz, reference_energies=str(refs))
        np.testing.assert_allclose(energies(dm), shards["targets"], atol=1e-7)
        assert dm.statistics["atomic_energies"] == [0.0] * len(dm.statistics["atomic_numbers"])
    for data, atoms in zip(dm._train, shards["s2ef"], strict=True):
        np.testing.assert_array_equal(data.free_mask.numpy(), _free(atoms))
        np.testing.assert_array_equal(data.tags.numpy(), atoms.get_tags())
    # .aselmdb rows name their system and frame themselves
    lmdb = module(tmp_path, str(root / "lmdb"), reference_energies=str(root / "refs.txt"))
    np.testing.assert_allclose(energies(lmdb), shards["targets"], atol=1e-7)


def test_traj_referenced_with_stride(tmp_path: Path) -> None:
    """A .traj is one system (its stem) whose frame numbers are positions in the file: with
    frame_stride 3 the kept frames 0, 3, ... get the references of frames 0, 3, ... (the table
    lists them in reverse order)."""
    traj = OC20 / f"{SYSTEMS[0]}.traj"
    frames = raw_frames(SYSTEMS[0], slice(None))
    want = targets(len(frames), 0)
    lines = [
        f"{SYSTEMS[0]},frame{i},{float(a.get_potential_energy() - t)!r}"
        for i, (a, t) in enumerate(zip(frames, want, strict=True))
    ]
    (tmp_path / "refs.txt").write_text("\n".join(reversed(lines)))
    dm = module(tmp_path, str(traj), reference_energies=str(tmp_path / "refs.txt"), frame_stride=3)
    np.testing.assert_allclose(energies(dm), want[::3], atol=1e-7)


def test_missing_and_malformed_references_are_one_line_errors(shards, tmp_path: Path) -> None:
    root = shards["root"]
    lines = (root / "refs.txt").read_text().splitlines()
    dropped = next(line for line in lines if line.startswith(f"{SYSTEMS[1]},frame9,"))
    (tmp_path / "some.txt").write_text("\n".join(x for x in lines if x != dropped) + "\n")
    xyz = str(root / "s2ef" / "0.extxyz.xz")
    msg = one_line_error(
        lambda: module(tmp_path, xyz, reference_energies=str(tmp_path / "some.txt"))
    )
    assert "0.extxyz.xz" in msg and "frame 11" in msg and "system 1000156, frame 9" in msg
    (tmp_path / "bad.txt").write_text("random1,frame0,-1.0\nrandom1;frame1;-2.0\n")
    msg = one_line_error(
        lambda: module(tmp_path, xyz, reference_energies=str(tmp_path / "bad.txt"))
    )
    assert "bad.txt:2" in msg and "system_id,frame,reference_energy" in msg
    msg = one_line_error(lambda: module(tmp_path, xyz, reference_energies=str(tmp_path / "no")))
    assert "data.reference_energies" in msg and "no such file" in msg


# -- tags --------------------------------------------------------------------------------------
def test_derived_tags_on_slab_with_known_adsorbate() -> None:
    """Cu(111) 4 layers, bottom two fixed, CO on top: fixed 0, free Cu 1, C and O 2 (whether
    the frame has no tags or ASE's layer numbers); a frame's own OC20 tags are kept; without
    fixed atoms every atom is 1."""
    slab = fcc111("Cu", size=(2, 2, 4), vacuum=6.0)  # tags: ASE's layer numbers 1-4
    add_adsorbate(slab, molecule("CO"), 1.8, "ontop")
    layer = np.round(slab.positions[:, 2], 2)
    fixed = layer <= np.unique(layer[slab.numbers == 29])[1]
    slab.set_constraint(FixAtoms(mask=fixed))
    expected = np.where(fixed, 0, np.where(slab.numbers == 29, 1, 2))
    assert (expected == 2).sum() == 2 and (expected == 0).sum() == 8
    free = (~fixed).astype(float)
    assert set(slab.get_tags()) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(oc20_tags(slab, free), expected)
    slab.set_tags(0)  # raw DFT output
    np.testing.assert_array_equal(oc20_tags(slab, free), expected)
    own = slab.copy()
    own.set_tags(np.where(fixed, 0, 1 + (np.arange(len(own)) % 2)))
    np.testing.assert_array_equal(oc20_tags(own, free), own.get_tags())
    np.testing.assert_array_equal(oc20_tags(slab, np.ones(len(slab))), np.ones(len(slab)))
    # the sample's first system: its 17 fixed atoms are 0, its O adsorbate 2
    atoms = raw_frames(SYSTEMS[0], 0)
    tags = oc20_tags(atoms, _free(atoms))
    assert (tags == 0).sum() == 17 and list(atoms.symbols[tags == 2]) == ["O"]


# -- metrics -----------------------------------------------------------------------------------
def _prediction(e_ref, e_pred, f_ref, f_pred, fixed=(), tags=None) -> Atoms:
    atoms = Atoms("H" * len(f_ref), positions=np.arange(3 * len(f_ref)).reshape(-1, 3))
    if fixed:
        atoms.set_constraint(FixAtoms(indices=list(fixed)))
    atoms.info.update(REF_energy=e_ref, MACE_energy=e_pred, config_type="Default")
    atoms.arrays["REF_forces"] = np.array(f_ref, dtype=float)
    atoms.arrays["MACE_forces"] = np.array(f_pred, dtype=float)
    if tags is not None:
        atoms.set_tags(tags)
    return atoms


def test_oc20_metrics_on_hand_made_predictions() -> None:
    """Three structures: A within both thresholds (its fixed atom's big error ignored), B off in
    force (0.1 eV/Å), C off in energy (0.03 eV) → EFwT 1/3; cosines 1 (2x the reference),
    0 (perpendicular), -1 (reversed), 1, 1 → mean 0.4 over the five free atoms."""
    a = _prediction(
        -1.0,
        -0.99,
        [[1, 0, 0], [0, 1, 0], [0, 0, 9]],
        [[1.02, 0, 0], [0, 1.01, 0], [5, 5, 5]],
        (2,),
    )
    b = _prediction(2.0, 2.01, [[0.1, 0, 0], [0, 0.2, 0]], [[0, 0.05, 0], [0, -0.2, 0]])
    c = _prediction(0.5, 0.47, [[1, 1, 0]], [[1, 1, 0]])
    m = oc20_metrics([a, b, c])
    assert m["efwt"] == pytest.approx(1 / 3)
    assert m["energy_mae_eV"] == pytest.approx((0.01 + 0.01 + 0.03) / 3)
    assert m["forces_cosine"] == pytest.approx((1 + 1 + 0 - 1 + 1) / 5)
    free_errors = [0.02, 0, 0, 0, 0.01, 0, 0.1, 0.05, 0, 0, 0.4, 0, 0, 0, 0]
    assert m["forces_mae_eV_per_A"] == pytest.approx(np.mean(free_errors))
    assert oc20_metrics([a])["efwt"] == 1.0
    a.set_tags([1, 2, 0])
    per_tag = per_tag_force_mae([a])
    assert per_tag == pytest.approx({"0": 1000 * (5 + 5 + 4) / 3, "1": 20 / 3, "2": 10 / 3})


# -- the CLI -----------------------------------------------------------------------------------
def tiny_oc20(tmp: Path) -> list[str]:
    return [
        f"paths.cache_dir={tmp}/cache",
        "data.batch_size=4",
        "data.valid_fraction=0.25",
        "trainer.max_epochs=1",
        "threads=1",
        *TINY_MODEL,
    ]


def test_cli_epoch_from_aselmdb(shards, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    folder = shards["root"] / "lmdb"
    train_cli(
        "data=oc20_lmdb",
        f"data.train_file={folder}",
        "data.e0s=min_norm",  # two compositions cannot determine five element energies
        *tiny_oc20(tmp_path),
        f"hydra.run.dir={run_dir}",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"] == "oc20_lmdb" and summary["epochs"] == 1
    assert np.isfinite(summary["val"]["f_mae"])


def test_cli_epoch_from_extxyz_xz_and_oc20_evaluation(shards, tmp_path: Path) -> None:
    """data=xyz on the S2EF shard with its reference folder trains one epoch with zero E0s;
    evaluate.py on the shard writes per-tag force MAE and the OC20 metrics."""
    root = shards["root"]
    run_dir = tmp_path / "run"
    xyz = root / "s2ef" / "0.extxyz.xz"
    train_cli(
        "data=xyz",
        f"data.train_file={xyz}",
        f"data.reference_energies={root / 's2ef'}",
        *tiny_oc20(tmp_path),
        f"hydra.run.dir={run_dir}",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = summary["best_checkpoint"]
    out = tmp_path / "eval"
    evaluate(
        compose_config(
            "evaluate",
            [
                f"ckpt_path={ckpt}",
                f"file={xyz}",
                f"reference_energies={root / 'refs.txt'}",
                f"paths.cache_dir={tmp_path}/cache",
                f"paths.output_dir={out}",
            ],
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())["sets"]["0"]
    assert set(metrics["f_mae_per_tag"]) == {"0", "1", "2"}
    oc20 = metrics["oc20"]
    assert set(oc20) == {"energy_mae_eV", "forces_mae_eV_per_A", "forces_cosine", "efwt"}
    assert oc20["forces_mae_eV_per_A"] * 1000 == pytest.approx(metrics["f_mae"], rel=1e-5)
    frames = ase.io.read(out / "0_predictions.xyz", index=":")
    ref = np.array([a.info["REF_energy"] for a in frames])
    np.testing.assert_allclose(ref, shards["targets"], atol=1e-4)  # referenced, float32
    de = np.abs([a.info["MACE_energy"] - a.info["REF_energy"] for a in frames])
    assert oc20["energy_mae_eV"] == pytest.approx(de.mean(), rel=1e-6)
    np.testing.assert_array_equal(frames[0].get_tags(), shards["s2ef"][0].get_tags())
