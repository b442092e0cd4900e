"""Embedded demo data: EMT Cu(111) slabs with H/C/N/O adsorbates, written once as ASE .db files.

`generate_demo(dir)` writes `train.db`, `test.db` (different adsorbate placements, separate MD
runs), `iso_atoms.xyz` (EMT isolated-atom energies, usable as E0s) and `meta.json` (the
generation parameters; written last, so its presence marks a complete set). Each frame is a
periodic 3x3x3 Cu(111) slab (bottom layer fixed with FixAtoms) with 1-3 adsorbates, either
rattled or taken from a short velocity-Verlet run: 28-33 atoms, compositions vary per system.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import ase.db
import ase.io
import numpy as np
from ase import Atoms, units
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE

from mace_grid.data.datamodule import AtomsDataModule
from mace_grid.utils import atomic_path, atomic_write_text

log = logging.getLogger("mace_grid.data")

# Adsorbate geometries (first atom binds to the surface) and hollow-site heights in Å.
_ADSORBATES = {
    "CO": (Atoms("CO", positions=[(0, 0, 0), (0, 0, 1.15)]), 1.3),
    "OH": (Atoms("OH", positions=[(0, 0, 0), (0, 0, 0.97)]), 1.3),
    "N": (Atoms("N"), 1.2),
    "H": (Atoms("H"), 1.0),
    "O": (Atoms("O"), 1.2),
    "C": (Atoms("C"), 1.2),
}
_SITES = {"fcc": 0.0, "hcp": 0.0, "bridge": 0.3, "ontop": 0.7}  # extra height per site
_ELEMENTS = ("H", "C", "N", "O", "Cu")
_FILES = ("train.db", "test.db", "iso_atoms.xyz", "meta.json")


def _system(rng: np.random.Generator, first: str) -> Atoms:
    """A relaxed-ish Cu(111) 3x3x3 slab (bottom layer fixed) with 1-3 adsorbates >= 2.2 Å apart."""
    while True:
        slab = fcc111("Cu", size=(3, 3, 3), vacuum=6.0, periodic=True)
        n_ads = int(rng.integers(1, 4))
        names = [first] + [str(x) for x in rng.choice(list(_ADSORBATES), size=n_ads - 1)]
        anchors = []
        for name, cell in zip(names, rng.permutation(9)[:n_ads], strict=False):
            ads, height = _ADSORBATES[name]
            site = str(rng.choice(list(_SITES)))
            anchors.append(len(slab))
            offset = (int(cell) // 3, int(cell) % 3)
            add_adsorbate(slab, ads.copy(), height + _SITES[site], position=site, offset=offset)
        gaps = [slab.get_distance(i, j, mic=True) for i in anchors for j in anchors if i < j]
        if min(gaps, default=np.inf) >= 2.2:
            break
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
    slab.calc = EMT()
    FIRE(slab, logfile=None).run(fmax=0.3, steps=40)
    return slab


def _snapshot(atoms: Atoms, config_type: str) -> Atoms:
    """Copy with raw (unconstrained) EMT energy and forces on a SinglePointCalculator."""
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(
        frame,
        energy=atoms.get_potential_energy(),
        forces=atoms.get_forces(apply_constraint=False),
    )
    frame.info["config_type"] = config_type
    return frame


def _frames(n_frames: int, per_system: int, rng: np.random.Generator, start: int) -> list:
    names = list(_ADSORBATES)
    frames: list[Atoms] = []
    i = 0
    while len(frames) < n_frames:
        atoms = _system(rng, names[(start + i) % len(names)])
        n_rattle = per_system // 3
        ref = atoms.get_positions()
        for _ in range(n_rattle):
            atoms.set_positions(ref)
            atoms.rattle(stdev=float(rng.uniform(0.02, 0.08)), rng=rng)
            frames.append(_snapshot(atoms, "rattle"))
        atoms.set_positions(ref)
        MaxwellBoltzmannDistribution(atoms, temperature_K=float(rng.uniform(300, 900)), rng=rng)
        md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        for _ in range(per_system - n_rattle):
            md.run(5)
            frames.append(_snapshot(atoms, "md"))
        i += 1
    return frames[:n_frames]


def _write_db(path: Path, frames: list) -> None:
    with atomic_path(path) as tmp, ase.db.connect(str(tmp), type="db", append=False) as db:
        for atoms in frames:
            db.write(atoms, config_type=atoms.info["config_type"])


def _write_iso_atoms(path: Path) -> None:
    frames = []
    for symbol in _ELEMENTS:
        atom = Atoms(symbol, pbc=False)
        atom.calc = EMT()
        frame = _snapshot(atom, "IsolatedAtom")
        frames.append(frame)
    with atomic_path(path) as tmp:
        ase.io.write(tmp, frames, format="extxyz")


def generate_demo(
    path: str | os.PathLike,
    n_frames: int = 300,
    n_test_frames: int = 60,
    frames_per_system: int = 10,
    seed: int = 0,
) -> Path:
    """Write the demo set into directory `path` (deterministic in all arguments); return it."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    _write_db(out / "train.db", _frames(n_frames, frames_per_system, train_rng, start=0))
    _write_db(out / "test.db", _frames(n_test_frames, frames_per_system, test_rng, start=3))
    _write_iso_atoms(out / "iso_atoms.xyz")
    meta = dict(
        n_frames=n_frames,
        n_test_frames=n_test_frames,
        frames_per_system=frames_per_system,
        seed=seed,
    )
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    return out


def ensure_demo(path: str | os.PathLike, **params) -> Path:
    """Generate the demo set into `path` unless a complete one with the same parameters exists."""
    out = Path(path)
    meta = out / "meta.json"
    try:
        if json.loads(meta.read_text()) == params and all((out / f).exists() for f in _FILES):
            return out
    except (OSError, ValueError):
        pass
    log.info("generating EMT demo data in %s (%s)", out, params)
    return generate_demo(out, **params)


class DemoDataModule(AtomsDataModule):
    """`AtomsDataModule` that first generates the EMT demo set into `demo_dir` (once)."""

    def __init__(
        self,
        demo_dir: str,
        n_frames: int = 300,
        n_test_frames: int = 60,
        frames_per_system: int = 10,
        demo_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.demo_dir = demo_dir
        self.demo_params = dict(
            n_frames=n_frames,
            n_test_frames=n_test_frames,
            frames_per_system=frames_per_system,
            seed=demo_seed,
        )

    def prepare_data(self) -> None:
        ensure_demo(self.demo_dir, **self.demo_params)
