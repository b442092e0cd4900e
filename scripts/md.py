"""Short MD with a checkpoint's ASE calculator; reports the NVE energy drift per atom.

``python scripts/md.py ckpt_path=… file=structures.xyz [index=0 steps=200 timestep_fs=0.5
temperature_K=300 langevin_steps=0 dtype=float64 out=md.json trajectory=md.traj]``
"""

import json
from dataclasses import dataclass

from omegaconf import MISSING

from mace_grid.calculator import MaceGridCalculator, check_md_settings, run_md
from mace_grid.cli import exit_on_user_error, parse_cli, refuse_overwriting_inputs
from mace_grid.data.io import read_atoms
from mace_grid.errors import ConfigError
from mace_grid.utils import atomic_write_text


@dataclass
class MDArgs:
    ckpt_path: str = MISSING
    file: str = MISSING  # any ASE-readable structure file; frame `index` is simulated
    index: int = 0
    steps: int = 200  # NVE (velocity Verlet) steps after the thermalisation
    timestep_fs: float = 0.5
    temperature_K: float = 300.0  # initial Maxwell-Boltzmann velocities (and Langevin target)
    langevin_steps: int = 0  # Langevin thermalisation steps before NVE
    friction_per_fs: float = 0.01
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"
    out: str | None = None  # JSON with the NVE energies and drift
    trajectory: str | None = None  # ASE .traj of the NVE run (every 10 steps)


@exit_on_user_error
def main() -> None:
    args = parse_cli(MDArgs, doc=__doc__)
    check_md_settings(
        args.steps, args.timestep_fs, args.temperature_K, args.langevin_steps, args.friction_per_fs
    )
    refuse_overwriting_inputs(
        {"ckpt_path": args.ckpt_path, "file": args.file},
        {"out": args.out, "trajectory": args.trajectory},
    )
    frames = read_atoms(args.file, "file")
    if not -len(frames) <= args.index < len(frames):
        raise ConfigError(
            f"index={args.index}: {args.file} has {len(frames)} frame(s), "
            f"index 0..{len(frames) - 1}"
        )
    atoms = frames[args.index]
    calc = MaceGridCalculator(args.ckpt_path, device=args.device, dtype=args.dtype)
    result = run_md(
        atoms,
        calc,
        steps=args.steps,
        timestep_fs=args.timestep_fs,
        temperature_K=args.temperature_K,
        langevin_steps=args.langevin_steps,
        friction_per_fs=args.friction_per_fs,
        seed=args.seed,
        trajectory=args.trajectory,
    )
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(
        f"{result['n_atoms']} atoms, {result['steps']} NVE steps of {result['timestep_fs']} fs, "
        f"mean T {result['mean_temperature_K']:.0f} K\n"
        f"NVE drift {result['drift_meV_per_atom_per_ps']:+.4f} meV/atom/ps, "
        f"max |E(t) - E(0)| {result['max_deviation_meV_per_atom']:.4f} meV/atom "
        f"(potential energy std {result['potential_energy_std_meV_per_atom']:.3f} meV/atom)"
    )


if __name__ == "__main__":
    main()
