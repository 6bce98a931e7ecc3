"""Plain-PyTorch references: the definition of "correct" for every backend (ALGORITHMS.md)."""

from lmobj_kernels.reference.losses import (
    cross_entropy_rows,
    linear_cross_entropy_rows,
    reduce_rows,
    shift_targets,
)

__all__ = ["cross_entropy_rows", "linear_cross_entropy_rows", "reduce_rows", "shift_targets"]
