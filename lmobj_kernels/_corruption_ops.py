"""Op registration of the corruption family.

- C++ ops `lmobj::span_corrupt / mlm_mask` (schemas in csrc/lmobj.cpp, CPU and CUDA kernels): fakes here.
- Triton ops `lmobj::span_corrupt_triton / mlm_mask_triton`: torch.library custom ops over
  triton_kernels/corruption.py, with the same arguments.
Output shapes depend only on integer arguments, so every op has a fake and torch.compile(fullgraph=True) traces it.
No autograd: the outputs are integer ids.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lmobj_kernels._backend import _C, triton_module

_C()  # loads the C++ schemas (TORCH_LIBRARY(lmobj)) before the fakes below refer to them


def _span_fake(input_ids, lengths, seed, row_offset, noise_density, mean_span_length, sentinel_ids, eos_id, pad_id,
               label_pad_id, inputs_width, targets_width):
    b = input_ids.shape[0]
    return input_ids.new_empty((b, inputs_width)), input_ids.new_empty((b, targets_width))


def _mlm_fake(input_ids, *args):
    return input_ids.new_empty(input_ids.shape), input_ids.new_empty(input_ids.shape)


if _C() is not None:
    torch.library.register_fake("lmobj::span_corrupt")(_span_fake)
    torch.library.register_fake("lmobj::mlm_mask")(_mlm_fake)


@torch.library.custom_op("lmobj::span_corrupt_triton", mutates_args=())
def span_corrupt_triton(input_ids: Tensor, lengths: Tensor, seed: Tensor, row_offset: int, noise_density: float,
                        mean_span_length: float, sentinel_ids: Tensor, eos_id: int, pad_id: int, label_pad_id: int,
                        inputs_width: int, targets_width: int) -> tuple[Tensor, Tensor]:
    # as the C++ ops check (csrc/corruption_checks.h), in float32: m < 1 would read scratch slots never written
    r, m = float(np.float32(noise_density)), float(np.float32(mean_span_length))
    if not (0.0 <= r < 1.0 and 1.0 <= m < math.inf):
        raise RuntimeError(f"lmobj::span_corrupt_triton: noise_density must be in [0, 1) and mean_span_length a "
                           f"finite float >= 1 (in float32), got {noise_density}, {mean_span_length}")
    return triton_module("corruption").span_corrupt(input_ids, lengths, seed, row_offset, noise_density,
                                                    mean_span_length, sentinel_ids, eos_id, pad_id, label_pad_id,
                                                    inputs_width, targets_width)


@torch.library.custom_op("lmobj::mlm_mask_triton", mutates_args=())
def mlm_mask_triton(input_ids: Tensor, word_ids: Tensor | None, seed: Tensor, row_offset: int,
                    special_ids: Tensor, exact: bool, select_threshold: int, mask_threshold: int,
                    random_threshold: int, random_low: int, random_range: int, mask_id: int,
                    ignore_index: int) -> tuple[Tensor, Tensor]:
    return triton_module("corruption").mlm_mask(input_ids, word_ids, seed, row_offset, special_ids, exact,
                                                select_threshold, mask_threshold, random_threshold, random_low,
                                                random_range, mask_id, ignore_index)


span_corrupt_triton.register_fake(_span_fake)
mlm_mask_triton.register_fake(_mlm_fake)


def ops(backend: str):
    """(span_corrupt, mlm_mask) ops of a kernel backend (cpu and cuda share the dispatcher ops)."""
    if backend == "triton":
        return torch.ops.lmobj.span_corrupt_triton, torch.ops.lmobj.mlm_mask_triton
    return torch.ops.lmobj.span_corrupt, torch.ops.lmobj.mlm_mask
