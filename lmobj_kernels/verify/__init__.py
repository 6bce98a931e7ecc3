"""`lmobj verify`: every op on every backend that can run here against the reference, on fresh random inputs.

Each family module here exposes `cases(device) -> Iterator[dict]` yielding rows
{"op", "backend", "dtype", "shape", "max_err", "bound", "ok"}; FAMILIES lists the modules.
"""

from __future__ import annotations

import importlib

FAMILIES = ["losses", "corruption", "attention"]


def run(device: str = "cpu", families: list[str] | None = None) -> list[dict]:
    rows: list[dict] = []
    for fam in families or FAMILIES:
        rows.extend(importlib.import_module(f"lmobj_kernels.verify.{fam}").cases(device))
    return rows


def lowp_bound(ref64, plain_lowp, factor: float = 2.0, floor: float = 1e-6) -> float:
    """DESIGN.md's low-precision rule: `factor` times the error of plain PyTorch in the same precision, plus a
    tiny floor. For float32 inputs plain PyTorch in float32 is the yardstick."""
    if plain_lowp.numel() == 0:
        return floor
    return factor * float((plain_lowp.detach().double() - ref64.detach().double()).abs().max()) + floor
