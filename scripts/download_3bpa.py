"""Download the public 3BPA dataset (BOTNet-datasets, MIT licence) into a directory.

    python scripts/download_3bpa.py --out data/3bpa          # then: export MACE_GRID_DATA=data
    python scripts/download_3bpa.py --archive dataset_3BPA.tar.gz --out data/3bpa  # offline

The archive's files land flat in --out. The files mace-grid uses (train_300K.xyz,
train_mixedT.xyz, iso_atoms.xyz) are checked against pinned sha256 sums; --archive-sha256 also
checks the archive itself. Failures print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from mace_grid.utils import file_sha256

URL = "https://github.com/davkovacs/BOTNet-datasets/raw/refs/heads/main/dataset_3BPA.tar.gz"
SHA256 = {
    "train_300K.xyz": "d109971fab90e2231ad931a83eb704c8d940f5c7d7a8de27fe3b84ea18634c0a",
    "train_mixedT.xyz": "bc108532964b2ed259eaaabf82e5dfaffa5bda9ac384fc2afabcce192a49250b",
    "iso_atoms.xyz": "e12a2465a2612bf38fd5dabdf64d4b57fc58ce9610a858c54ea1142d517c053f",
}


class Failure(Exception):
    """A one-line reason to stop."""


def sha256(path: Path) -> str:
    return file_sha256(str(path))


def download(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as exc:  # URLError, HTTPError, timeouts
        reason = getattr(exc, "reason", exc)
        raise Failure(
            f"cannot download {url} ({reason}); check the network, or download it by hand and "
            "pass --archive PATH"
        ) from exc


def extract(archive: Path, out: Path) -> list[str]:
    """Extract the archive's regular files flat into `out` after checking the pinned sums."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".extract-") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                for m in members:
                    m.name = Path(m.name).name  # flatten; also drops any path traversal
                    tar.extract(m, tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise Failure(f"cannot extract {archive} ({exc})") from exc
        names = sorted(m.name for m in members)
        missing = sorted(set(SHA256) - set(names))
        if missing:
            raise Failure(f"{archive} lacks {', '.join(missing)}")
        for name, expected in SHA256.items():
            if sha256(Path(tmp) / name) != expected:
                raise Failure(f"checksum mismatch for {name} in {archive}; not installed")
        for name in names:
            (Path(tmp) / name).replace(out / name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/3bpa"), help="target directory")
    parser.add_argument("--url", default=URL, help="archive URL (default: BOTNet-datasets)")
    parser.add_argument("--archive", type=Path, help="use this local archive, no download")
    parser.add_argument("--archive-sha256", help="also require this sha256 of the archive")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout (s)")
    args = parser.parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.out, prefix=".download-") as tmp:
            archive = args.archive
            if archive is None:
                archive = Path(tmp) / "dataset_3BPA.tar.gz"
                download(args.url, archive, args.timeout)
            elif not archive.is_file():
                raise Failure(f"archive not found: {archive} (--archive)")
            if args.archive_sha256 and sha256(archive) != args.archive_sha256.lower():
                raise Failure(f"archive checksum mismatch for {archive} (--archive-sha256)")
            names = extract(archive, args.out)
    except (Failure, OSError) as exc:
        print(f"download_3bpa: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"3BPA: {len(names)} files in {args.out} ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
