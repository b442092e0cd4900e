"""Small shared helpers: atomic file writes and metric tables."""

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``,
    so a reader never sees a partial file and a crash never corrupts an existing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float] | None], columns: Iterable[str]
) -> str:
    """Plain-text table, one row per metrics dict (energies meV/atom, forces meV/Å)."""
    columns = list(columns)
    width = max(len(name) for name in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for name, metrics in rows.items():
        cells = "".join(f"{metrics[c]:>12.3f}" if metrics else f"{'-':>12}" for c in columns)
        lines.append(f"{name:<{width}}" + cells)
    return "\n".join(lines)
