"""Small shared helpers: atomic file writes, file hashes, metric tables, the host allocator."""

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import os
import secrets
import socket
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for any writer (text, ASE db, HDF5), moved onto ``path``
    with ``os.replace`` only if the block succeeds: readers never see a partial file and a crash
    never corrupts an existing one. The file gets the umask's permissions (as ``open`` gives),
    and leftovers of killed writers of ``path`` on this host are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode & ~umask
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_HOST = socket.gethostname().replace(".", "_")


def _remove_orphans(path: Path) -> None:
    """Delete ``atomic_path`` temporaries of ``path`` whose writer (a process on this host) is
    gone: SIGKILL or a power cut skip the cleanup, and nothing else would ever remove them."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}-*.tmp"):
        pid = tmp.name[len(f".{path.name}.{_HOST}-") :].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks; computed once per process for a file
    whose size and modification time have not changed (the neighbour cache and ``splits.json``
    both key on it)."""
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def format_metrics_table(
    rows: Mapping[str, Mapping[str, float | None] | None], columns: Iterable[str]
) -> str:
    """Plain-text table, one row per metrics dict (energies meV/atom, forces meV/Å); a missing
    row or value (e.g. force metrics of an energy-only set) prints as '-'."""
    columns = list(columns)
    width = max(len(name) for name in rows) + 2
    lines = [f"{'':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for name, metrics in rows.items():
        values = [None if not metrics else metrics.get(c) for c in columns]
        cells = "".join(f"{'-':>12}" if v is None else f"{v:>12.3f}" for v in values)
        lines.append(f"{name:<{width}}" + cells)
    return "\n".join(lines)


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing it back to the OS.

    A training step frees and reallocates the same large tensors every step. By default glibc
    maps each allocation above its mmap threshold afresh and unmaps it when freed, so every page
    faults (and is zeroed by the kernel) again on first write: at 64 channels about 10^4 faults
    per grid+fast step and 2 x 10^5 per stock step, whose step time fell by 18 % without them
    (``scripts/benchmark_tp.py --model``). With mmap off and trimming at 2 GiB the heap keeps the
    step's peak, and steady-state steps fault next to nothing. Process-wide, so called by the
    entry points (training, benchmarks), never on import. Returns False where malloc is not
    glibc's.
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4  # glibc's malloc.h
    return all(
        mallopt(param, value) == 1
        for param, value in ((m_trim_threshold, 2**31 - 1), (m_top_pad, 64 << 20), (m_mmap_max, 0))
    )
