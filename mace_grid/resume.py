"""A resume is the run it resumes: ``train.py ckpt_path=<run>/checkpoints/last.ckpt [overrides]``.

The run's own config (stored unresolved in every checkpoint, so it re-resolves on another
machine: data root, work dir) comes back whole — trainer, callbacks, budget, logger included —
and the resume command's overrides are applied on top of it. An override that would change the
trained function (a ``RUN_DEFINING`` group) is refused; every other change is returned so that
the run's log lists it (e.g. a deliberately longer ``trainer.max_epochs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from mace_grid.errors import ConfigError

# Groups that define the trained function: a resume keeps them as the run had them.
RUN_DEFINING = ("data", "model", "tp", "seed", "dtype", "optim", "loss")
# Groups that rewrite the whole config (global package): they cannot apply to a resumed run.
GLOBAL_GROUPS = ("experiment", "hparams_search")
# Keys of the resume command itself, never taken as a change of the run.
_OWN_KEYS = ("ckpt_path",)


def resume_config(
    cfg: DictConfig, run_config: dict[str, Any], overrides: Sequence[str], groups: Sequence[str]
) -> tuple[DictConfig, list[str]]:
    """The resumed run's config and the changes the resume command makes to it.

    ``cfg``: the config Hydra composed for the resume command (defaults + ``overrides``);
    ``run_config``: the run's unresolved config from its checkpoint; ``groups``: the config
    groups Hydra knows (``hydra.runtime.choices``), so that ``trainer=gpu`` replaces the whole
    ``trainer`` node while ``trainer.max_epochs=8`` changes one value.
    """
    merged = OmegaConf.create(run_config)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        top = key.split("/")[0].split(".")[0]
        if key in _OWN_KEYS or top == "hydra":
            continue
        if top in GLOBAL_GROUPS:
            raise ConfigError(
                f"{key}= rewrites the whole config and cannot apply to a resumed run; drop it "
                "(to train with other settings, start a new run)"
            )
        path = key.replace("/", ".")
        if o.is_delete():
            _delete(merged, path)
        elif key in groups:
            node = OmegaConf.select(cfg, path)
            if node is None:
                _delete(merged, path)
            else:
                OmegaConf.update(merged, path, _plain(node), merge=False, force_add=True)
        else:
            value = OmegaConf.select(cfg, path, throw_on_resolution_failure=False)
            OmegaConf.update(merged, path, _plain(value), merge=False, force_add=True)
    merged.ckpt_path = cfg.ckpt_path

    before = _flatten(OmegaConf.to_container(OmegaConf.create(run_config), resolve=True))
    after = _flatten(OmegaConf.to_container(merged, resolve=True))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    changed = [k for k in changed if k not in _OWN_KEYS]
    defining = [k for k in changed if k.split(".")[0] in RUN_DEFINING]
    if defining:
        shown = ", ".join(f"{k}: {_show(before, k)} -> {_show(after, k)}" for k in defining[:4])
        more = f" (+{len(defining) - 4} more)" if len(defining) > 4 else ""
        raise ConfigError(
            f"ckpt_path resumes a run; these overrides would change its trained function: "
            f"{shown}{more}; drop them (to train other settings, start a new run)"
        )
    changes = [f"{k}: {_show(before, k)} -> {_show(after, k)}" for k in changed]
    return merged, changes


def _plain(value: Any) -> Any:
    """A config node as plain (unresolved) containers, a leaf as it is."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=False)
    return value


def _delete(cfg: DictConfig, path: str) -> None:
    parent, _, leaf = path.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is not None and leaf in node:
        del node[leaf]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of nested dicts (lists and empty dicts are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _show(flat: dict[str, Any], key: str) -> str:
    return "(absent)" if key not in flat else repr(flat[key])
