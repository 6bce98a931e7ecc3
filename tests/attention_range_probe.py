"""A probe kernel for tests/test_attention.py: the block ranges the attention kernels loop over, as they compute
them (`_key_range` for the forward and dQ kernels, `_query_range` for dK/dV), written out so that a test can hold
them against a brute-force scan of the mask. Imported only where Triton runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from lmobj_kernels.triton_kernels.attention import (
    _doc_block_range,
    _key_range,
    _mask_meta,
    _meta,
    _query_range,
    _window,
)


@triton.jit
def _ranges_kernel(OUT, PREFIX, KVLEN, DOC_RANGE, Sq, Sk, n_blocks, win_l, win_r, KEYS: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_DOCS: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[b, blk] = (lo, c_lo, c_hi, hi). KEYS: the key range of query block blk (else the query range of key
    block blk). Grid: (n_blocks, B)."""
    blk = tl.program_id(0)
    b = tl.program_id(1)
    # the kernels' own metadata load (no doc ids: the ranges read DOC_RANGE; OUT stands in for the DOC pointer)
    kv_len, prefix_len, _, _ = _mask_meta(b, blk, True, Sk, PREFIX, KVLEN, OUT, 0, 0, HAS_PREFIX, HAS_KVLEN, False,
                                          False, 0)
    if KEYS:
        lo, c_lo, c_hi, hi = _key_range(b, blk, blk * BLOCK_M, Sq, Sk, kv_len, prefix_len, DOC_RANGE, n_blocks,
                                        win_l, win_r, CAUSAL, HAS_DOCS, HAS_WINDOW, BLOCK_M, BLOCK_N, False)
    else:
        lo, c_lo, c_hi, hi = _query_range(b, blk, blk * BLOCK_N, Sq, Sk, kv_len, prefix_len, DOC_RANGE, n_blocks,
                                          win_l, win_r, CAUSAL, HAS_DOCS, HAS_WINDOW, BLOCK_M, BLOCK_N, False)
    out = OUT + (b * n_blocks + blk) * 4
    tl.store(out, lo)
    tl.store(out + 1, c_lo)
    tl.store(out + 2, c_hi)
    tl.store(out + 3, hi)


def ranges(keys: bool, B: int, Sq: int, Sk: int, bm: int, bn: int, causal: bool, prefix_lens, doc_ids, kv_lens,
           window, kv_doc_ids=None) -> torch.Tensor:
    """int64 (B, n_blocks, 4): per query block (keys=True) or key block, the (lo, c_lo, c_hi, hi) positions the
    kernels loop over; `window` as attention's (left, right)."""
    left, right = (-1 if w is None else w for w in (window or (None, None)))
    has_window, wl, wr = _window(left, right, Sk)
    q = torch.empty(1, 1, 1, 1)
    prefix, kvl, doc, kdoc = _meta(q, prefix_lens, kv_lens, doc_ids, kv_doc_ids)
    n_blocks = triton.cdiv(Sq, bm) if keys else triton.cdiv(Sk, bn)
    kvl_arg = kvl if kv_lens is not None else None
    rng = prefix
    if doc_ids is not None:  # as attention_forward / attention_backward call it
        rng = (_doc_block_range(doc, bm, bn, kvl_arg, inner_doc=kdoc) if keys
               else _doc_block_range(kdoc, bn, bm, kvl_arg, True, inner_doc=doc))
    out = torch.empty((B, n_blocks, 4), dtype=torch.int32)
    _ranges_kernel[(n_blocks, B)](out, prefix, kvl, rng, Sq, Sk, n_blocks, wl, wr, KEYS=keys, CAUSAL=causal,
                                  HAS_PREFIX=prefix_lens is not None, HAS_KVLEN=kv_lens is not None,
                                  HAS_DOCS=doc_ids is not None, HAS_WINDOW=has_window, BLOCK_M=bm, BLOCK_N=bn)
    return out.long()
