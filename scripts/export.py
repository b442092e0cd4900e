"""Export a checkpoint as a plain mace-torch model file (and optionally TorchScript).

``python scripts/export.py ckpt_path=… out=model.model [dtype=float32] [torchscript=model.pt]``
(dtype: float64 by default, as mace's tools expect).
``out`` loads in ``mace.calculators.MACECalculator(model_paths=out)``; ``torchscript`` is the
``e3nn.util.jit.compile``-d model (``torch.jit.load``, as LAMMPS-style tooling expects).
"""

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from mace_grid.calculator import export_model, export_torchscript
from mace_grid.cli import exit_on_user_error, parse_cli, refuse_overwriting_inputs


@dataclass
class ExportArgs:
    ckpt_path: str = MISSING
    out: str = MISSING
    dtype: str = "float64"  # float64 (mace's tools' default) | float32
    torchscript: str | None = None


@exit_on_user_error
def main() -> None:
    args = parse_cli(ExportArgs, doc=__doc__)
    refuse_overwriting_inputs(
        {"ckpt_path": args.ckpt_path}, {"out": args.out, "torchscript": args.torchscript}
    )
    out = export_model(args.ckpt_path, args.out, args.dtype)
    print(f"mace model: {out}")
    if args.torchscript:
        model = torch.load(out, map_location="cpu", weights_only=False)
        print(f"TorchScript model: {export_torchscript(model, args.torchscript)}")


if __name__ == "__main__":
    main()
