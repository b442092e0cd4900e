"""A train.py checkpoint as a plain mace-torch model, an ASE calculator, MD and export.

The model is rebuilt from the checkpoint alone (``hyper_parameters``: model, tp, conv, statistics)
and carries the EMA weights; ``MaceGridCalculator`` is mace's own ``MACECalculator`` on that model.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms, units
from ase.data import chemical_symbols
from ase.io import Trajectory
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from mace.calculators import MACECalculator
from mace.data.utils import Configuration
from mace.modules import ScaleShiftMACE
from mace.tools.torch_tools import default_dtype

from mace_grid.cli import refuse_overwriting_inputs
from mace_grid.data.checks import MIN_DISTANCE, check_distances
from mace_grid.data.neighbours import compute_neighbours
from mace_grid.errors import ConfigError, DataError, DivergedError
from mace_grid.model import DTYPES, build_model
from mace_grid.utils import atomic_path


def read_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """The checkpoint dict; ``ConfigError`` if missing or not written by train.py."""
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, garbage or another format: torch raises many types
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(
            f"ckpt_path={ckpt_path} is not a readable checkpoint (truncated or not written by "
            f"train.py: {reason})"
        ) from exc
    if not isinstance(ckpt, dict) or "run_config" not in ckpt or "hyper_parameters" not in ckpt:
        raise ConfigError(f"ckpt_path={ckpt_path} is not a checkpoint written by train.py")
    return ckpt


def trained_conv(ckpt: dict[str, Any]) -> str:
    """The convolution a checkpoint was trained with (``e3nn``: written before ``conv`` existed)."""
    return (ckpt["hyper_parameters"].get("conv") or {}).get("name", "e3nn")


def model_from_checkpoint(
    ckpt: dict[str, Any], device: str = "cpu", dtype: str | None = None, conv: str | None = None
) -> ScaleShiftMACE:
    """The checkpoint's ``ScaleShiftMACE`` with its EMA weights, in eval mode.

    Built directly in ``dtype`` (None: the training dtype), so the float64 constants of the
    product backends are not rounded through float32. ``conv`` (``e3nn``/``fast``, same weights)
    defaults to the one it was trained with (``e3nn`` for checkpoints older than the option).
    """
    dtype = dtype or ckpt["run_config"]["dtype"]
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; choose one of {sorted(DTYPES)}")
    hp = ckpt["hyper_parameters"]
    conv = conv or trained_conv(ckpt)
    with default_dtype(DTYPES[dtype]):
        model = build_model(hp["model"], hp["tp"], hp["statistics"], {"name": conv})
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    return model.to(device).eval()


def load_model(
    ckpt_path: str | Path, device: str = "cpu", dtype: str | None = None, conv: str | None = None
) -> ScaleShiftMACE:
    """:func:`model_from_checkpoint` of the file ``ckpt_path``."""
    return model_from_checkpoint(read_checkpoint(ckpt_path), device, dtype, conv)


#: MACECalculator options that convert the model's contraction to mace's own kernels (cg only)
STOCK_CONTRACTION_ONLY = ("compile_mode", "enable_cueq", "enable_oeq")


class MaceGridCalculator(MACECalculator):
    """ASE calculator of a train.py checkpoint (any tp backend): energy, free_energy, node
    energies, forces and stress (periodic cells; zero for non-periodic ones), via mace's
    ``MACECalculator``. ``dtype``: float64 (default, as mace's calculator: a float32 total
    energy of a large molecule is good to only ~1e-3 eV), float32, or None (training dtype);
    ``conv``: e3nn/fast (same weights), default the one it was trained with."""

    def __init__(
        self,
        ckpt_path: str | Path,
        device: str = "cpu",
        dtype: str | None = "float64",
        conv: str | None = None,
        **kwargs,
    ) -> None:
        ckpt = read_checkpoint(ckpt_path)
        tp = ckpt["hyper_parameters"]["tp"]["name"]
        stock = [f"{key}={kwargs[key]!r}" for key in STOCK_CONTRACTION_ONLY if kwargs.get(key)]
        if tp != "cg" and stock:
            raise ConfigError(
                f"{', '.join(stock)}: mace rebuilds its stock symmetric contraction for these, "
                f"which a tp={tp} model does not have; drop them (they apply to tp=cg only)"
            )
        model = model_from_checkpoint(ckpt, device, dtype, conv)
        dtype_name = {v: k for k, v in DTYPES.items()}[next(model.parameters()).dtype]
        super().__init__(models=[model], device=device, default_dtype=dtype_name, **kwargs)

    def calculate(self, atoms=None, properties=None, system_changes=None) -> None:
        """mace's calculation, after a one-line `DataError` for what would give NaN or nonsense:
        an element the model lacks, a non-finite position, or two atoms closer than
        `MIN_DISTANCE` (the check training applies to every frame)."""
        if atoms is not None:
            missing = sorted(set(atoms.numbers.tolist()) - set(self.z_table.zs))
            if missing:
                known = ", ".join(chemical_symbols[z] for z in self.z_table.zs)
                raise DataError(
                    f"element(s) {', '.join(chemical_symbols[z] for z in missing)} not among "
                    f"the model's elements [{known}]"
                )
            if not np.isfinite(atoms.positions).all():
                raise DataError("the structure has non-finite (NaN or inf) atom positions")
            config = Configuration(
                atomic_numbers=atoms.numbers,
                positions=atoms.positions,
                properties={},
                property_weights={},
                cell=np.array(atoms.cell),
                pbc=tuple(bool(p) for p in atoms.pbc),
            )
            graph = compute_neighbours(config, MIN_DISTANCE)
            check_distances([config], [graph], "the structure", "MaceGridCalculator")
        super().calculate(atoms, properties, system_changes)


def export_model(ckpt_path: str | Path, out: str | Path, dtype: str | None = "float64") -> Path:
    """``torch.save`` the checkpoint's ``ScaleShiftMACE`` (float64 by default, the dtype mace's
    tools expect; None: the training dtype) to ``out`` atomically: the file mace's
    ``MACECalculator(model_paths=out)`` and mace's tools load. The convolution is always mace's
    own (``conv=e3nn``, same weights), so a tp=cg model is plain mace-torch; gaunt/grid models
    need ``mace_grid`` importable, as their product modules are ours."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"out={out} is a directory: give a file name, e.g. {out}/model.model")
    refuse_overwriting_inputs({"ckpt_path": ckpt_path}, {"out": out})
    model = load_model(ckpt_path, "cpu", dtype, conv="e3nn")
    with atomic_path(out) as tmp:
        torch.save(model, tmp)
    return out


def export_torchscript(model: torch.nn.Module, out: str | Path) -> Path:
    """Compile ``model`` with ``e3nn.util.jit.compile`` (TorchScript) and save it to ``out``;
    ``torch.jit.load(out)`` then needs neither mace nor mace_grid."""
    from e3nn.util import jit

    out = Path(out)
    scripted = jit.compile(model)
    with atomic_path(out) as tmp:
        torch.jit.save(scripted, str(tmp))
    return out


def check_md_settings(
    steps: int,
    timestep_fs: float,
    temperature_K: float,
    langevin_steps: int = 0,
    friction_per_fs: float = 0.01,
) -> None:
    """`ConfigError` for MD settings that give no trajectory or a meaningless one (checked
    before anything is read): at least one NVE step, a positive timestep, a temperature >= 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps} must be an integer >= 1 (NVE steps to run)")
    if not (isinstance(timestep_fs, (int, float)) and 0 < timestep_fs < math.inf):
        raise ConfigError(f"timestep_fs={timestep_fs} must be a positive number (fs), e.g. 0.5")
    if not (isinstance(temperature_K, (int, float)) and 0 <= temperature_K < math.inf):
        raise ConfigError(f"temperature_K={temperature_K} must be >= 0 (K), e.g. 300")
    if (
        isinstance(langevin_steps, bool)
        or not isinstance(langevin_steps, int)
        or langevin_steps < 0
    ):
        raise ConfigError(f"langevin_steps={langevin_steps} must be an integer >= 0")
    if langevin_steps and not (
        isinstance(friction_per_fs, (int, float)) and 0 < friction_per_fs < math.inf
    ):
        raise ConfigError(f"friction_per_fs={friction_per_fs} must be positive (1/fs), e.g. 0.01")


def run_md(
    atoms: Atoms,
    calc: MACECalculator,
    steps: int = 200,
    timestep_fs: float = 0.5,
    temperature_K: float = 300.0,
    langevin_steps: int = 0,
    friction_per_fs: float = 0.01,
    seed: int = 0,
    trajectory: str | Path | None = None,
) -> dict[str, Any]:
    """Maxwell-Boltzmann velocities at ``temperature_K``, optional Langevin thermalisation, then
    ``steps`` NVE (velocity Verlet) steps; constraints (FixAtoms) are respected.

    Returns the NVE total energy per atom at t = 0 and every step, its drift (slope of a linear fit,
    meV/atom/ps), max |E(t) - E(0)| and the potential energy's standard deviation (meV/atom).
    Bad settings raise `ConfigError` (`check_md_settings`); a non-finite energy stops the run with
    `DivergedError` (no drift is reported, no trajectory file is left).
    """
    check_md_settings(steps, timestep_fs, temperature_K, langevin_steps, friction_per_fs)
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    dt = timestep_fs * units.fs
    energies, potential, temperatures = [], [], []

    def record() -> None:
        total = atoms.get_total_energy() / len(atoms)
        if not math.isfinite(total):
            raise DivergedError(
                f"MD diverged: non-finite total energy after {len(energies)} NVE steps of "
                f"{timestep_fs} fs; no drift to report (try a smaller timestep_fs=)"
            )
        energies.append(total)
        potential.append(atoms.get_potential_energy() / len(atoms))
        temperatures.append(atoms.get_temperature())

    with ExitStack() as stack:
        traj = None
        if trajectory:  # moved into place only once the run has finished
            traj = stack.enter_context(
                Trajectory(str(stack.enter_context(atomic_path(trajectory))), "w", atoms)
            )
        if langevin_steps > 0:
            thermostat = Langevin(
                atoms, dt, temperature_K=temperature_K, friction=friction_per_fs / units.fs, rng=rng
            )
            thermostat.run(langevin_steps)
        nve = VelocityVerlet(atoms, dt)
        nve.attach(record, interval=1)
        if traj is not None:
            nve.attach(traj.write, interval=10)
        nve.run(steps)
    e = np.asarray(energies) * 1000.0  # meV/atom
    time_ps = np.arange(len(e)) * timestep_fs / 1000.0
    slope = float(np.polyfit(time_ps, e, 1)[0])  # t = 0 and steps >= 1 more points
    return {
        "n_atoms": len(atoms),
        "steps": steps,
        "timestep_fs": timestep_fs,
        "mean_temperature_K": float(np.mean(temperatures)),
        "energy_per_atom_meV": e.tolist(),
        "drift_meV_per_atom_per_ps": slope,
        "max_deviation_meV_per_atom": float(np.max(np.abs(e - e[0]))),
        # scale of the potential-energy exchange the drift should be small against
        "potential_energy_std_meV_per_atom": float(np.std(potential) * 1000.0),
    }
