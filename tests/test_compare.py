"""scripts/compare_backends.py on tiny settings: one row per backend, CSV, table and plot."""

import csv
import json
from pathlib import Path

import pytest
import torch
from _helpers import shared_root, tiny_args

from mace_grid.cli import parse_cli
from mace_grid.compare import COLUMNS, CompareArgs, compare, split_args
from mace_grid.tp import BACKENDS


def test_compare_all_backends(tmp_path_factory, tmp_path: Path) -> None:
    out = tmp_path / "results"
    train_args = [a for a in tiny_args(shared_root(tmp_path_factory)) if "progress_bar" not in a]
    own, overrides = split_args(["epochs=2", f"out_dir={out}", *train_args])
    assert overrides == train_args
    threads = torch.get_num_threads()
    try:
        rows = compare(parse_cli(CompareArgs, own), overrides)
    finally:
        torch.set_num_threads(threads)

    assert [r["tp"] for r in rows] == list(BACKENDS) == ["cg", "gaunt", "grid"]
    for row in rows:
        assert row["epochs"] == 2
        assert row["product_weights"] < row["parameters"]
        assert row["product_independent"] <= min(row["product_weights"], row["product_complete"])
        for key in ("epoch_time_s", "train_time_s", "wall_time_s", "peak_rss_mb", "inference_ms"):
            assert row[key] > 0, (row["tp"], key)
        assert row["wall_time_s"] > row["train_time_s"]
        assert row["peak_rss_mb"] > 100  # torch + mace alone take more
        summary = json.loads((out / "runs" / row["tp"] / "summary.json").read_text())
        assert summary["tp"] == row["tp"]
        assert row["f_mae"] == pytest.approx(summary["test"]["test"]["f_mae"], rel=1e-4)
    assert rows[0]["speedup_vs_cg"] == 1.0
    cg, gaunt, grid = rows
    # cg's U columns are redundant but reach every map; the Gaunt weights are all independent
    assert cg["product_independent"] == cg["product_complete"] < cg["product_weights"]
    for row in (gaunt, grid):
        assert row["product_independent"] == row["product_weights"] < row["product_complete"]
        assert row["product_complete"] == cg["product_complete"]

    with open(out / "compare.csv") as handle:
        assert [r["tp"] for r in csv.DictReader(handle)] == list(BACKENDS)
    table = (out / "compare.md").read_text()
    assert "| " + " | ".join(COLUMNS.values()) + " |" in table
    assert sum(line.startswith(f"| {tp} |") for tp in BACKENDS for line in table.splitlines()) == 3
    assert (out / "f_mae_vs_time.png").read_bytes()[:4] == b"\x89PNG"

    # Same command again: the finished run is reused, not retrained.
    stamp = (out / "runs" / "cg" / "summary.json").stat().st_mtime_ns
    own, overrides = split_args(["backends=[cg]", "epochs=2", f"out_dir={out}", *train_args])
    compare(parse_cli(CompareArgs, own), overrides)
    torch.set_num_threads(threads)
    assert (out / "runs" / "cg" / "summary.json").stat().st_mtime_ns == stamp
