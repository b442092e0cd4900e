"""Evaluate a train.py checkpoint on labelled structures (logic of ``scripts/evaluate.py``).

Writes into the output dir, per evaluated set: ``<set>_predictions.xyz`` (extxyz: reference
``REF_energy``/``REF_forces`` and predicted ``MACE_energy``/``MACE_forces``, FixAtoms kept) and
``<set>_parity.png``; and ``metrics.json`` for all sets. Energies in meV/atom, forces in meV/Å
(force components of free atoms only, as in training); force MAE per OC20 tag; and the OC20
S2EF metrics in OC20's units (`oc20_metrics`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ase.io
import hydra
import numpy as np
import torch
from ase import Atoms
from ase.constraints import FixAtoms
from mace.tools import AtomicNumberTable
from mace.tools.torch_tools import default_dtype
from omegaconf import DictConfig, OmegaConf, open_dict

from mace_grid.calculator import model_from_checkpoint, read_checkpoint, trained_conv
from mace_grid.config import CONF_DIR
from mace_grid.data.checks import MIN_DISTANCE
from mace_grid.data.datamodule import check_elements, load_source, make_loader, to_atomic_data
from mace_grid.data.io import free_mask, symbol
from mace_grid.data.readers import ReferenceEnergies, file_stem
from mace_grid.errors import ConfigError
from mace_grid.lit_module import METRIC_NAMES
from mace_grid.utils import atomic_write_text, format_metrics_table

log = logging.getLogger("mace_grid.evaluate")


@dataclass
class EvalSet:
    """A named loader; ``config_types[i]`` names the batches' ``config_type_id`` i."""

    name: str
    loader: Any
    config_types: Sequence[str]


def file_set(
    path: str,
    atomic_numbers: Sequence[int],
    r_max: float,
    batch_size: int,
    energy_key: str = "energy",
    forces_key: str = "forces",
    cache_dir: str | None = None,
    min_distance: float = MIN_DISTANCE,
    reference_energies: str | None = None,
) -> EvalSet:
    """All frames of an ASE-readable file (named by `file_stem`), with their config types; a
    file without forces is an energy-only set; energies referenced per frame with
    `reference_energies` (see `ReferenceEnergies`)."""
    z_table = AtomicNumberTable(sorted(int(z) for z in atomic_numbers))
    references = None if reference_energies is None else ReferenceEnergies(reference_energies)
    source = load_source(
        path,
        "file",
        r_max,
        energy_key,
        forces_key,
        cache_dir,
        min_distance,
        require_forces=False,
        references=references,
    )
    check_elements(source.configs, z_table, f"{path} (file)")
    types = list(dict.fromkeys(c.config_type for c in source.configs))
    dataset = [
        to_atomic_data(c, g, z_table, types.index(c.config_type))
        for c, g in zip(source.configs, source.graphs, strict=True)
    ]
    return EvalSet(file_stem(path), make_loader(dataset, batch_size), types)


def data_sets(data: dict[str, Any]) -> list[EvalSet]:
    """The test sets of a data config (``AtomsDataModule`` arguments with ``_target_``)."""
    datamodule = hydra.utils.instantiate(data)
    datamodule.setup("test")
    if not datamodule.test_names:
        raise ConfigError(
            f"data {datamodule.name} has no test set: give file=<structures> or a data config "
            "with test_files or test_fraction"
        )
    loaders = datamodule.test_dataloader()
    return [
        EvalSet(name, loader, list(datamodule.config_types))
        for name, loader in zip(datamodule.test_names, loaders, strict=True)
    ]


def predict(
    model: torch.nn.Module, eval_set: EvalSet, atomic_numbers: Sequence[int]
) -> tuple[list[Atoms], float]:
    """One ``Atoms`` per structure with reference and predicted energy/forces, and the seconds
    spent in the model (forward + forces, after one untimed warm-up batch)."""
    zs = np.asarray(sorted(int(z) for z in atomic_numbers))
    device = next(model.parameters()).device
    frames: list[Atoms] = []
    seconds = 0.0
    for i, batch in enumerate(eval_set.loader):
        batch = batch.to(device)
        if i == 0:
            model(batch.to_dict(), training=False, compute_force=True)
        start = time.perf_counter()
        out = model(batch.to_dict(), training=False, compute_force=True)
        energy, forces = out["energy"].detach().cpu().numpy(), out["forces"].detach().cpu().numpy()
        seconds += time.perf_counter() - start
        frames += _batch_atoms(batch, zs, energy, forces, eval_set.config_types)
    return frames, seconds


def _batch_atoms(batch, zs, energy, forces, config_types) -> list[Atoms]:
    ptr = batch.ptr.cpu().numpy()
    numbers = zs[batch.node_attrs.argmax(-1).cpu().numpy()]
    positions, ref_forces = batch.positions.detach().cpu().numpy(), batch.forces.cpu().numpy()
    cells = batch.cell.detach().cpu().numpy().reshape(-1, 3, 3)
    pbc = batch.pbc.cpu().numpy().reshape(-1, 3)
    free = batch.free_mask.cpu().numpy().astype(bool)
    labelled = batch.forces_weight.cpu().numpy() > 0  # False: frame of an energy-only set
    tags = batch.tags.cpu().numpy()
    frames = []
    for g in range(len(ptr) - 1):
        s = slice(ptr[g], ptr[g + 1])
        atoms = Atoms(numbers=numbers[s], positions=positions[s], cell=cells[g], pbc=pbc[g])
        atoms.set_tags(tags[s])
        if not free[s].all():
            atoms.set_constraint(FixAtoms(mask=~free[s]))
        atoms.info["config_type"] = config_types[int(batch.config_type_id[g])]
        atoms.info["REF_energy"] = float(batch.energy[g])
        atoms.info["MACE_energy"] = float(energy[g])
        if labelled[g]:
            atoms.arrays["REF_forces"] = ref_forces[s]
        atoms.arrays["MACE_forces"] = forces[s]
        frames.append(atoms)
    return frames


def _errors(frames: Sequence[Atoms]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Energy errors per atom [meV/atom], force component errors [meV/Å] and the atomic
    numbers of free atoms (of the frames with reference forces)."""
    de = np.array([(a.info["MACE_energy"] - a.info["REF_energy"]) / len(a) for a in frames])
    forces = _with_forces(frames)
    free = [free_mask(a).astype(bool) for a in forces]
    df = np.concatenate(
        [np.zeros((0, 3))]
        + [
            (a.arrays["MACE_forces"] - a.arrays["REF_forces"])[m]
            for a, m in zip(forces, free, strict=True)
        ]
    )
    z = np.concatenate(
        [np.zeros(0, int)] + [a.numbers[m] for a, m in zip(forces, free, strict=True)]
    )
    return de * 1000.0, df * 1000.0, z


def _with_forces(frames: Sequence[Atoms]) -> list[Atoms]:
    return [a for a in frames if "REF_forces" in a.arrays]


def error_metrics(frames: Sequence[Atoms]) -> dict[str, Any]:
    """e_mae, e_rmse (meV/atom), f_mae, f_rmse (meV/Å, free atoms; None for an energy-only
    set), per-element force MAE and, when the frames carry config types, the same four per
    config type."""
    de, df, z = _errors(frames)
    metrics: dict[str, Any] = {
        "n_structures": len(frames),
        "n_atoms": int(sum(len(a) for a in frames)),
        **_four(de, df),
        "f_mae_per_element": {symbol(e): float(np.abs(df[z == e]).mean()) for e in np.unique(z)},
        "f_mae_per_tag": per_tag_force_mae(frames),
        "oc20": oc20_metrics(frames),
    }
    by_type: dict[str, list[Atoms]] = {}
    for atoms in frames:
        by_type.setdefault(atoms.info["config_type"], []).append(atoms)
    if set(by_type) != {"Default"}:
        metrics["per_config_type"] = {
            t: {"n_structures": len(group), **_four(*_errors(group)[:2])}
            for t, group in by_type.items()
        }
    return metrics


def per_tag_force_mae(frames: Sequence[Atoms]) -> dict[str, float]:
    """Force-component MAE (meV/Å) per OC20 tag over all atoms with that tag, fixed ones
    included (tag 0 = fixed subsurface atoms, whose forces are not trained on); frames with
    reference forces only."""
    frames = _with_forces(frames)
    if not frames:
        return {}
    tags = np.concatenate([a.get_tags() for a in frames])
    err = np.concatenate([np.abs(a.arrays["MACE_forces"] - a.arrays["REF_forces"]) for a in frames])
    return {str(t): 1000.0 * float(err[tags == t].mean()) for t in np.unique(tags)}


def oc20_metrics(
    frames: Sequence[Atoms], e_thresh: float = 0.02, f_thresh: float = 0.03
) -> dict[str, float | None]:
    """OC20 S2EF metrics, in OC20's units: energy MAE per structure (eV); over the frames with
    reference forces, force-component MAE (eV/Å) and cosine similarity of force vectors (mean
    over atoms) on free atoms, and EFwT: the fraction of structures with |ΔE| < `e_thresh` eV
    and max |ΔF component| < `f_thresh` eV/Å over their free atoms (None without forces)."""
    de = np.array([a.info["MACE_energy"] - a.info["REF_energy"] for a in frames])
    metrics: dict[str, float | None] = {"energy_mae_eV": float(np.abs(de).mean())}
    labelled = _with_forces(frames)
    free = [free_mask(a).astype(bool) for a in labelled]
    pred = [a.arrays["MACE_forces"][m] for a, m in zip(labelled, free, strict=True)]
    ref = [a.arrays["REF_forces"][m] for a, m in zip(labelled, free, strict=True)]
    if not sum(len(p) for p in pred):
        return metrics | dict.fromkeys(("forces_mae_eV_per_A", "forces_cosine", "efwt"))
    p, r = np.concatenate(pred), np.concatenate(ref)
    norms = np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1)
    cosine = np.sum(p * r, axis=1) / np.maximum(norms, 1e-12)
    max_df = np.array([np.abs(a - b).max(initial=0.0) for a, b in zip(pred, ref, strict=True)])
    de = np.array([a.info["MACE_energy"] - a.info["REF_energy"] for a in labelled])
    return metrics | {
        "forces_mae_eV_per_A": float(np.abs(p - r).mean()),
        "forces_cosine": float(cosine.mean()),
        "efwt": float(np.mean((np.abs(de) < e_thresh) & (max_df < f_thresh))),
    }


def _four(de: np.ndarray, df: np.ndarray) -> dict[str, float | None]:
    return {
        "e_mae": float(np.abs(de).mean()),
        "e_rmse": float(np.sqrt((de**2).mean())),
        "f_mae": float(np.abs(df).mean()) if df.size else None,
        "f_rmse": float(np.sqrt((df**2).mean())) if df.size else None,
    }


def parity_plot(frames: Sequence[Atoms], path: Path, title: str) -> None:
    """Energy-per-atom (by config type) parity plot beside the force-component (by element)
    parity plot or, for an energy-only set (a scan, a reaction path: a parity plot of nearly
    equal energies collapses into one dot), the energy per frame along the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = _with_forces(frames)
    fig, (ax_e, ax_f) = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
    e_ref = np.array([a.info["REF_energy"] / len(a) for a in frames])
    e_pred = np.array([a.info["MACE_energy"] / len(a) for a in frames])
    types = np.array([a.info["config_type"] for a in frames])
    for t in dict.fromkeys(types):
        ax_e.scatter(e_ref[types == t], e_pred[types == t], s=10, label=t)
    panels = [(ax_e, "energy (eV/atom)", (e_ref, e_pred))]
    if labelled:
        free = [free_mask(a).astype(bool) for a in labelled]
        pairs = list(zip(labelled, free, strict=True))
        z = np.concatenate([a.numbers[m] for a, m in pairs])
        f_ref = np.concatenate([a.arrays["REF_forces"][m] for a, m in pairs])
        f_pred = np.concatenate([a.arrays["MACE_forces"][m] for a, m in pairs])
        for e in np.unique(z):
            ax_f.scatter(f_ref[z == e].ravel(), f_pred[z == e].ravel(), s=4, label=symbol(e))
        panels.append((ax_f, "force component (eV/Å)", (f_ref, f_pred)))
    else:
        energy_path(frames, ax_f)
    for ax, unit, values in panels:
        lo, hi = min(v.min() for v in values), max(v.max() for v in values)
        pad = 0.05 * (hi - lo) or 0.01
        lims = [lo - pad, hi + pad]
        ax.plot(lims, lims, "k--", lw=0.8)
        ax.set(xlim=lims, ylim=lims, xlabel=f"reference {unit}", ylabel=f"predicted {unit}")
        ax.legend(fontsize=8, markerscale=2)
    m = error_metrics(frames)
    ax_e.set_title(f"{title}: energy MAE {m['e_mae']:.2f} meV/atom")
    if labelled:
        ax_f.set_title(f"force MAE {m['f_mae']:.1f} meV/Å (free atoms)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def energy_path(frames: Sequence[Atoms], ax) -> None:
    """Reference and predicted energy of each frame relative to the first frame (eV), in file
    order: the shape of a scan or reaction path, whatever the constant offset."""
    ref = np.array([a.info["REF_energy"] for a in frames])
    pred = np.array([a.info["MACE_energy"] for a in frames])
    x = np.arange(len(frames))
    ax.plot(x, ref - ref[0], "o-", ms=4, label="reference")
    ax.plot(x, pred - pred[0], "s--", ms=4, label="predicted")
    ax.set(xlabel="frame", ylabel="energy − energy of frame 0 (eV)")
    ax.set_title("energy per frame (no reference forces)")
    ax.legend(fontsize=8)


def eval_sets(cfg: DictConfig, ckpt: dict[str, Any], out_dir: Path) -> list[EvalSet]:
    """``file=`` → that file; ``data=<name>`` → its test sets; neither → the test sets of the
    data the checkpoint was trained on. Graphs use the model's elements and r_max."""
    hp, run_config = ckpt["hyper_parameters"], ckpt["run_config"]
    atomic_numbers = hp["statistics"]["atomic_numbers"]
    r_max = float(hp["model"]["r_max"])
    if cfg.get("data") is not None and cfg.file is not None:
        raise ConfigError("give either file=<structures> or data=<name>, not both")
    if cfg.file is not None:
        return [
            file_set(
                str(cfg.file),
                atomic_numbers,
                r_max,
                cfg.batch_size,
                cfg.energy_key,
                cfg.forces_key,
                cfg.paths.cache_dir,
                cfg.min_distance,
                cfg.reference_energies,
            )
        ]
    if cfg.get("data") is not None:
        with open_dict(cfg):  # what data configs interpolate: the model's r_max, the run seed
            cfg.model = {"r_max": r_max}
            cfg.seed = run_config["seed"]
        data = OmegaConf.to_container(cfg.data, resolve=True)
    else:
        data = dict(run_config["data"])
    data.update(
        r_max=r_max,
        atomic_numbers=atomic_numbers,
        valid_batch_size=cfg.batch_size,
        output_dir=str(out_dir),
    )
    return data_sets(data)


def evaluate_keys() -> list[str]:
    """The top-level keys evaluate reads: ``conf/evaluate.yaml``'s own and its config groups."""
    conf = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "evaluate.yaml"))
    groups = [
        next(iter(d)).removeprefix("optional ") for d in conf["defaults"] if isinstance(d, dict)
    ]
    return [k for k in conf if k not in ("defaults", "hydra")] + groups


def refuse_other_keys(cfg: DictConfig, ckpt: dict[str, Any]) -> None:
    """`ConfigError` for a key evaluate does not read (``+tp=cg``, ``+trainer.…``): the model
    is rebuilt from the checkpoint, so the override would be silently ignored. The message
    names what the checkpoint holds there."""
    known = evaluate_keys()
    run_config = OmegaConf.create(ckpt["run_config"])
    for key in cfg:
        if key in known:
            continue
        given = dict(_leaves(key, cfg[key]))
        differ = {p: v for p, v in given.items() if OmegaConf.select(run_config, p) != v}
        given = differ or given
        held = []
        for path in given:
            value = OmegaConf.select(run_config, path)
            if value is None:  # e.g. +tp.options.rank=3 on tp=grid: name the whole setting
                path, value = key, OmegaConf.select(run_config, key)
            if value is not None:
                held += [f"{p}={v}" for p, v in _leaves(path, value)][:1]
        holds = f"it holds {_first(dict.fromkeys(held))}" if held else f"it has no {key}"
        raise ConfigError(
            f"{_first(f'{p}={v}' for p, v in given.items())} cannot apply to a checkpoint "
            f"({holds}): evaluate rebuilds the model from the checkpoint; drop the override "
            "(scripts/evaluate.py --help lists what it reads)"
        )


def _first(items, n: int = 2) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _leaves(path: str, value: Any):
    """(dotted path, value) of each setting in ``value``; a group entry with a ``name`` (tp,
    conv, data) is one setting, named by it."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, dict) and value and "name" not in value:
        for k, v in value.items():
            yield from _leaves(f"{path}.{k}", v)
    else:
        yield path, value["name"] if isinstance(value, dict) and "name" in value else value


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` (see ``conf/evaluate.yaml``); write and return the metrics."""
    if cfg.ckpt_path is None:
        raise ConfigError("missing ckpt_path=<run>/checkpoints/best-epochNNN.ckpt")
    ckpt = read_checkpoint(cfg.ckpt_path)
    refuse_other_keys(cfg, ckpt)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    model = model_from_checkpoint(ckpt, cfg.device, cfg.dtype, cfg.conv)
    for p in model.parameters():
        p.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_numbers = ckpt["hyper_parameters"]["statistics"]["atomic_numbers"]
    with default_dtype(dtype):
        sets = eval_sets(cfg, ckpt, out_dir)
    tp = ckpt["hyper_parameters"]["tp"]["name"]
    results = {}
    for eval_set in sets:
        log.info("Evaluating %s (tp=%s) on %s", cfg.ckpt_path, tp, eval_set.name)
        frames, seconds = predict(model, eval_set, atomic_numbers)
        metrics = error_metrics(frames)
        metrics["time_per_structure_ms"] = 1000.0 * seconds / len(frames)
        results[eval_set.name] = metrics
        ase.io.write(out_dir / f"{eval_set.name}_predictions.xyz", frames, format="extxyz")
        parity_plot(frames, out_dir / f"{eval_set.name}_parity.png", f"{eval_set.name} ({tp})")
    report = {
        "checkpoint": str(cfg.ckpt_path),
        "tp": tp,
        "conv": cfg.conv or trained_conv(ckpt),
        "dtype": str(dtype).removeprefix("torch."),
        "sets": results,
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(report, indent=2) + "\n")
    print(metrics_tables(results))
    print(f"outputs: {out_dir}")
    return report


def metrics_tables(results: dict[str, dict[str, Any]]) -> str:
    """The four metrics per set (and per config type), force MAE per element, timings."""
    rows: dict[str, dict[str, float]] = {}
    for name, m in results.items():
        rows[name] = m
        for t, mt in m.get("per_config_type", {}).items():
            rows[f"  {name}/{t}"] = mt
    elements = list(dict.fromkeys(e for m in results.values() for e in m["f_mae_per_element"]))
    per_element = {
        f"{name} f_mae": {e: m["f_mae_per_element"].get(e, float("nan")) for e in elements}
        for name, m in results.items()
    }
    timing = "\n".join(
        f"{name}: {m['n_structures']} structures, {m['time_per_structure_ms']:.2f} ms/structure; "
        + "OC20: "
        + ", ".join(f"{k} {'-' if v is None else f'{v:.4g}'}" for k, v in m["oc20"].items())
        for name, m in results.items()
    )
    return "\n\n".join(
        [
            format_metrics_table(rows, METRIC_NAMES),
            format_metrics_table(per_element, elements),
            timing,
        ]
    )
