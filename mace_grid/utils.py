"""Small shared helpers: atomic file writes, file hashes and metric tables."""

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer (text, ASE db, HDF5), moved onto ``path``
    with ``os.replace`` only if the block succeeds: readers never see a partial file and a crash
    never corrupts an existing one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
