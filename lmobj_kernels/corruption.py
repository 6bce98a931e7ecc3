"""On-device corruption for the MLM and denoising objectives (ALGORITHMS.md, "Randomness", "T5 span corruption",
"MLM masking"): T5 span corruption, BERT masking, and DataLoader collators around them.

Every backend (cuda, triton, cpu, and the NumPy reference `torch`) gives the same bytes for the same seed, and a
row's result depends only on the seed and its global row index `row_offset + r`: splitting a batch (and passing
the offset) gives the same bytes. Kernels never write into the caller's tensors.

Seeds: `seed` (an int in [0, 2^63), or an int64 tensor of one element on the device, which CUDA graphs can replay
with new values; any int64 value there, negative too, is its 64 bits as the Philox key, alike on every backend), or
`generator` (a torch.Generator), or neither: a fresh seed from torch's default generator.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from lmobj_kernels import _corruption_ops
from lmobj_kernels._backend import _C, check_backend_name, resolve, why_unavailable
from lmobj_kernels._checks import FLOAT32_MAX, check_flag, fits_int64, is_int, is_real
from lmobj_kernels.reference import corruption as ref

T5_EXTRA_IDS = 100  # sentinels T5's vocabulary has (<extra_id_0> .. <extra_id_99>)
_ONE = 1 << 32


class SpanCorruptionOutput(NamedTuple):
    """Padded outputs of `span_corrupt` (int64, on the device of the input). Labels are padded with -100 (ignored
    by Hugging Face models and lmobj losses), the others with pad_id; masks are 1 on real tokens."""

    input_ids: Tensor
    attention_mask: Tensor
    input_lengths: Tensor
    labels: Tensor
    label_lengths: Tensor
    decoder_input_ids: Tensor
    decoder_attention_mask: Tensor


# ---- argument checks: ValueError / TypeError naming the argument ----
def _check_int(name: str, v, lo: int | None = None, hi: int | None = None, none_ok: bool = False):
    if v is None and none_ok:
        return
    if not is_int(v):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not fits_int64(v):  # every int reaches an op as int64
        raise ValueError(f"{name} must fit int64, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v >= hi):
        raise ValueError(f"{name} must be in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'})"
                         f", got {v}")


def _check_prob(name: str, v, lo_open: bool = False, hi_open: bool = False):
    if not is_real(v):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if not (math.isfinite(v) and (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)):
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{name} must be in {lb}0, 1{rb}, got {v}")


def _check_ids(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq), got shape {tuple(t.shape)}")


def _check_id_values(name: str, t: Tensor, vocab_size: int | None, valid: Tensor | None = None) -> None:
    """Ids must be in [0, vocab_size) (>= 0 without a vocab_size). On the CPU this reads the values; on a GPU or
    while compiling it is a device-side assert (no host synchronisation). The kernels never index with ids."""
    if t.numel() == 0:
        return
    if valid is None and not (t.is_cuda or torch.compiler.is_compiling()):
        lo, hi = torch.aminmax(t)  # one pass; the error path below names the first bad id
        if int(lo) >= 0 and (vocab_size is None or int(hi) < vocab_size):
            return
    ok = t >= 0
    if vocab_size is not None:
        ok = ok & (t < vocab_size)
    if valid is not None:
        ok = ok | ~valid
    bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
    if t.is_cuda or torch.compiler.is_compiling():
        torch._assert_async(ok.all(), f"{name} holds an id outside {bound}")
    elif not bool(ok.all()):
        raise ValueError(f"{name} holds id {int(t[~ok][0])}, outside {bound}")


def _id_list(name: str, ids, vocab_size: int | None, ordered: bool = False) -> list[int]:
    """`ids` (a sequence, array or 1-D tensor; a set too unless `ordered`: sentinels are used in order) as a
    checked list of ints."""
    if isinstance(ids, Tensor):
        if ids.is_floating_point() or ids.dim() > 1:
            raise TypeError(f"{name} must be a sequence of int ids")
        ids = ids.tolist()
    kinds = (Sequence, np.ndarray) if ordered else (Sequence, set, frozenset, np.ndarray)
    if isinstance(ids, (str, bytes)) or not isinstance(ids, kinds):
        what = "an ordered sequence (a list or tuple, not a set)" if ordered else "a sequence"
        raise TypeError(f"{name} must be {what} of int ids, got {type(ids).__name__}")
    out = []
    for v in ids:
        if not is_int(v):
            raise TypeError(f"{name} must hold ints, got {type(v).__name__}")
        if v < 0 or (vocab_size is not None and v >= vocab_size):
            raise ValueError(f"{name} holds id {v}, outside [0, {vocab_size if vocab_size is not None else 'inf'})")
        out.append(int(v))
    return out


# ---- seeds and small constant tensors ----
def check_seed(seed=None, generator: torch.Generator | None = None) -> None:
    """seed (an int in [0, 2^63), an int64 tensor of one element, or None) and generator (a torch.Generator or
    None, not both), checked without building anything."""
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed as a tensor must be int64 with one element, got {seed.dtype} {tuple(seed.shape)}")
    elif seed is not None:
        _check_int("seed", seed, 0, 2**63)


def seed_tensor(seed=None, generator: torch.Generator | None = None, device=None) -> Tensor:
    """The int64 [1] seed tensor the ops take, on `device`, without a device synchronisation."""
    device = torch.device(device if device is not None else "cpu")
    check_seed(seed, generator)
    if isinstance(seed, Tensor):
        seed = seed.reshape(1)
        return _to_device(seed, device) if seed.device.type == "cpu" else seed.to(device)
    if seed is None:
        if generator is not None:
            s = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)
            return _to_device(s, device) if s.device.type == "cpu" else s.to(device)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # the default CPU generator: no device sync
    return torch.full((1,), int(seed), dtype=torch.int64, device=device)


_CONST_CACHE: dict = {}


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without a stream sync: a copy from pageable memory would wait for the stream,
    one from pinned memory does not (the caching host allocator keeps the buffer until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _const_ids(values: tuple, device: torch.device) -> Tensor:
    """A small int64 tensor of constant ids on `device` (cached, so that a GPU copy happens once)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.int64, device=device)
    key = (values, str(device))
    t = _CONST_CACHE.get(key)
    if t is None:
        if len(_CONST_CACHE) > 256:
            _CONST_CACHE.clear()
        t = _to_device(torch.tensor(values, dtype=torch.int64), device)
        _CONST_CACHE[key] = t
    return t


# ---- backend choice ----
def _resolve(backend: str, dev: torch.device, S: int, kernel: str | None) -> str:
    """The corruption backend; `auto` passes rows too long for the CUDA kernel `kernel` ("span", "mlm" with word
    ids or exact counts, None: no row in shared memory) on to Triton, which keeps its row in registers and global
    scratch: one CUDA block holds a whole row in shared memory (span_smem / mlm_smem in csrc/cuda/corruption.cu,
    read through _C.cuda_row_smem)."""
    name = resolve(backend, dev, "corruption")
    explicit = backend != "auto" or os.environ.get("LMOBJ_BACKEND", "auto") not in ("", "auto")
    if name == "cuda" and not explicit and kernel and not torch.compiler.is_compiling():
        need = _C().cuda_row_smem(kernel, S)
        limit = torch.cuda.get_device_properties(dev).shared_memory_per_block_optin
        if need is not None and need > limit and not why_unavailable("triton", dev):
            return "triton"
    return name


# ---- T5 span corruption ----
def t5_input_length(inputs_length: int, noise_density: float = 0.15, mean_span_length: float = 3.0
                    ) -> tuple[int, int]:
    """(raw_length, targets_length) for fixed-size T5 training: the largest raw length t whose corrupted inputs
    (eos included) fit in `inputs_length`, and the length of its targets. 512 -> (568, 114) for (0.15, 3)."""
    _check_int("inputs_length", inputs_length, 2)
    return _t5_input_length(int(inputs_length), *_span_params(noise_density, mean_span_length))


@functools.lru_cache(maxsize=256)  # after the checks: the cache would take True for 1.0
def _t5_input_length(inputs_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    hi = int(inputs_length / (1.0 - noise_density)) + 8
    if hi > 1 << 24:  # the search below scans every raw length up to hi
        raise ValueError(f"noise_density {noise_density} needs raw rows of more than 2^24 tokens for inputs_length "
                         f"{inputs_length}")
    t = np.arange(1, hi + 1)
    ins, tgs = ref.span_output_lengths(t, noise_density, mean_span_length)
    fits = np.flatnonzero(ins <= inputs_length)
    if fits.size == 0:
        raise ValueError(f"inputs_length {inputs_length} is too short for noise_density {noise_density}")
    i = int(fits[-1])
    return int(t[i]), int(tgs[i])


def _check_mean_span(m) -> None:
    if not is_real(m):
        raise TypeError(f"mean_span_length must be a float, got {type(m).__name__}")
    if not (math.isfinite(m) and m >= 1.0):
        raise ValueError(f"mean_span_length must be a finite float >= 1, got {m}")


def _as_float32(v) -> float:
    """The float32 value the kernels compute with (T5 rounds in float32): every backend, and the host arithmetic
    that sizes the outputs, must see the same number (a density of 1e-46 is 0 in float32, noise-free)."""
    return float(np.float32(v))


def _span_params(noise_density, mean_span_length) -> tuple[float, float]:
    """The checked float32 (noise_density, mean_span_length). Valid float64 values can leave the range in float32
    (0.99999999 rounds to 1, 1e39 to inf), where the kernels would refuse them and the reference not: a ValueError
    for every backend instead."""
    _check_prob("noise_density", noise_density, hi_open=True)
    _check_mean_span(mean_span_length)
    if mean_span_length > FLOAT32_MAX:
        raise ValueError(f"mean_span_length must be finite in float32 (T5's arithmetic), got {mean_span_length!r}")
    nd, m = _as_float32(noise_density), _as_float32(mean_span_length)
    if nd >= 1.0:
        raise ValueError(f"noise_density must be below 1 in float32 (T5's arithmetic), got {noise_density!r}")
    return nd, m


@torch._dynamo.assume_constant_result
def _fixed_plan(S: int, noise_density: float, mean_span_length: float) -> tuple[int, int, int]:
    """(inputs width, targets width, spans) of rows of S tokens: host arithmetic that torch.compile treats as a
    constant of the graph (it would otherwise trace the NumPy calls into tensors)."""
    return _fixed_plan_cached(S, noise_density, mean_span_length)


@functools.lru_cache(maxsize=1024)
def _fixed_plan_cached(S: int, noise_density: float, mean_span_length: float) -> tuple[int, int, int]:
    ins, tgs = ref.span_output_lengths([S], noise_density, mean_span_length)
    k = ref.span_counts([S], noise_density, mean_span_length)[1]
    return int(ins[0]), int(tgs[0]), int(k[0])


def _host_lengths(lengths, B: int, S: int) -> np.ndarray:
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must hold integers, got {lengths.dtype}")
        lengths = lengths.detach().cpu().numpy()  # a device tensor is read once here (a sync): pass host lengths
    try:
        arr = np.asarray(lengths)
    except (TypeError, ValueError) as e:
        raise TypeError(f"lengths must be a sequence of ints ({e})") from None
    if arr.size == 0 and arr.dtype.kind == "f":  # [] is float64 to NumPy
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers, got {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths must have one entry per row ({B}), got shape {arr.shape}")
    bad = np.flatnonzero((arr < 0) | (arr > S))
    if bad.size:
        raise ValueError(f"lengths[{int(bad[0])}] = {int(arr[bad[0]])} is outside [0, {S}] (the row length)")
    return arr.astype(np.int64)


def span_corrupt(
    input_ids: Tensor,
    lengths=None,
    *,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    vocab_size: int | None = None,
    sentinel_ids=None,
    max_sentinels: int | None = None,
    eos_id: int,
    pad_id: int = 0,
    decoder_start_id: int | None = None,
    seed=None,
    generator: torch.Generator | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> SpanCorruptionOutput:
    """T5 span corruption of each row's first `lengths[r]` tokens (all of them when `lengths` is None).

    inputs = X1 s0 X2 s1 ... Xk s(k-1) eos and labels = s0 N1 s1 N2 ... s(k-1) Nk eos, where Xi are the kept
    runs, Ni the noise runs (a uniform composition of n = round(L r) noise tokens into k = round(n / m) spans,
    T5's float32 rounding), and sj the sentinels: `sentinel_ids`, else vocab_size - 1, vocab_size - 2, ...
    decoder_input_ids = labels shifted right, starting with `decoder_start_id` (default pad_id, as T5).
    Rows of fewer than 2 tokens (and noise_density == 0) are not corrupted: inputs = tokens + eos, labels = eos.

    More spans than sentinels is an error: at most `max_sentinels` (default 100, T5's extra ids, or the number of
    `sentinel_ids`) are used; pass a larger max_sentinels to let default sentinels run further down the vocabulary.
    Decided on the host from the lengths, without a device sync.

    `lengths=None` (fixed-length rows, as T5 trains with `t5_input_length`) needs no host synchronisation and
    gives fixed output shapes (CUDA graphs, torch.compile). The output widths are host arithmetic of the row
    length S in T5's float32 rounding, so torch.compile needs S static: `torch.compile(..., dynamic=False)` (one
    graph per length) or `torch._dynamo.mark_static(input_ids, 1)`; a symbolic S (what automatic dynamic shapes
    make of a second length) fails to trace. Given lengths (a list, array or tensor; a GPU tensor
    is read once) size the outputs. `row_offset`: the global index of row 0 in the seed's stream.
    """
    _check_ids("input_ids", input_ids)
    noise_density, mean_span_length = _span_params(noise_density, mean_span_length)
    _check_int("vocab_size", vocab_size, 1, none_ok=True)
    _check_int("eos_id", eos_id, 0, vocab_size)
    _check_int("pad_id", pad_id, 0, vocab_size)
    _check_int("decoder_start_id", decoder_start_id, 0, vocab_size, none_ok=True)
    _check_int("max_sentinels", max_sentinels, 1, none_ok=True)
    _check_int("row_offset", row_offset, 0, 2**62)
    B, S = input_ids.shape
    dev = input_ids.device

    if lengths is None:
        host_len = None
        in_w, tg_w, k_max = _fixed_plan(S, float(noise_density), float(mean_span_length))
        k_max = k_max if B else 0
    else:
        host_len = _host_lengths(lengths, B, S)
        ins, tgs = ref.span_output_lengths(host_len, noise_density, mean_span_length)
        ks = ref.span_counts(host_len, noise_density, mean_span_length)[1]
        in_w, tg_w = (int(ins.max()), int(tgs.max())) if B else (1, 1)
        k_max = int(ks.max()) if B else 0

    if sentinel_ids is not None:
        sent = _id_list("sentinel_ids", sentinel_ids, vocab_size, ordered=True)
        if not sent:
            raise ValueError("sentinel_ids must not be empty")
        if len(set(sent)) != len(sent) or eos_id in sent:
            raise ValueError("sentinel_ids must be distinct and differ from eos_id (targets could not be told "
                             "apart)")
        if pad_id in sent:
            raise ValueError(f"sentinel_ids must differ from pad_id={pad_id} (a padding embedding would never learn "
                             f"that sentinel)")
        limit = len(sent) if max_sentinels is None else min(max_sentinels, len(sent))
        what = f"{len(sent)} sentinel_ids" + (f" (max_sentinels={max_sentinels})" if max_sentinels else "")
        sent_t = _const_ids(tuple(sent[:limit]), dev)
    else:
        if vocab_size is None:
            raise ValueError("vocab_size is required when sentinel_ids is not given (sentinels count down from "
                             "vocab_size - 1)")
        # a small vocabulary (tests, byte-level models) caps the default instead of refusing every call
        limit = min(T5_EXTRA_IDS, vocab_size) if max_sentinels is None else max_sentinels
        if limit > vocab_size:
            raise ValueError(f"max_sentinels={limit} exceeds vocab_size={vocab_size}")
        what = f"max_sentinels={limit}" + (" (T5's 100 extra ids)" if max_sentinels is None else "")
        sent_t = torch.arange(vocab_size - 1, vocab_size - 1 - limit, -1, dtype=torch.int64, device=dev)
        low = vocab_size - min(k_max, limit)  # the lowest default sentinel this batch uses
        for arg, v in (("eos_id", eos_id), ("pad_id", pad_id)):
            if k_max and v >= low:
                raise ValueError(f"the default sentinels of this batch, {vocab_size - 1} down to {low}, include "
                                 f"{arg}={v}: pass sentinel_ids, or the vocab_size whose top ids are the sentinels")
    if k_max > limit:
        raise ValueError(f"a row of this batch needs {k_max} noise spans but only {what} are available; pass a "
                         f"larger max_sentinels (or more sentinel_ids) to allow it")

    name = _resolve(backend, dev, S, "span")
    x = input_ids if input_ids.dtype == torch.int64 else input_ids.to(torch.int64)
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    if host_len is None:
        len_t = torch.full((B,), S, dtype=torch.int64, device=dev)
        _check_id_values("input_ids", x, vocab_size)
    else:
        len_t = _to_device(torch.from_numpy(host_len), dev)
        valid = torch.arange(S, device=dev)[None, :] < len_t[:, None]
        _check_id_values("input_ids", x, vocab_size, valid)
    seed_t = seed_tensor(seed, generator, dev)
    args = (float(noise_density), float(mean_span_length))
    if name == "torch":
        inputs, labels = ref.span_corrupt(x, len_t.cpu().numpy(), int(seed_t.cpu()[0]), row_offset, *args,
                                          sent_t.tolist(), eos_id, pad_id, -100, in_w, tg_w)
    else:
        op = _corruption_ops.ops(name)[0]
        inputs, labels = op(x, len_t, seed_t, row_offset, *args, sent_t, eos_id, pad_id, -100, in_w, tg_w)

    if host_len is None:
        in_len = torch.full((B,), in_w, dtype=torch.int64, device=dev)
        tg_len = torch.full((B,), tg_w, dtype=torch.int64, device=dev)
    else:
        in_len = _to_device(torch.from_numpy(ins.astype(np.int64)), dev)
        tg_len = _to_device(torch.from_numpy(tgs.astype(np.int64)), dev)
    start = pad_id if decoder_start_id is None else decoder_start_id
    dec = labels.new_empty(labels.shape)
    dec[:, :1] = start
    dec[:, 1:] = labels[:, :-1]
    if host_len is not None:  # label padding (-100) becomes pad_id; fixed-length rows have none
        dec.masked_fill_(dec < 0, pad_id)
    if host_len is None:  # fixed-length rows: every position is real
        attn = torch.ones((B, in_w), dtype=torch.int64, device=dev)
        dattn = torch.ones((B, tg_w), dtype=torch.int64, device=dev)
    else:
        attn = (torch.arange(in_w, device=dev)[None, :] < in_len[:, None]).to(torch.int64)
        dattn = (torch.arange(tg_w, device=dev)[None, :] < tg_len[:, None]).to(torch.int64)
    return SpanCorruptionOutput(inputs, attn, in_len, labels, tg_len, dec, dattn)


# ---- BERT masking ----
def _threshold(p: float) -> int:
    return min(_ONE, int(round(p * _ONE)))


def mlm_mask(
    input_ids: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    special_ids=(),
    pad_id: int | None = None,
    exact: bool = False,
    word_ids: Tensor | None = None,
    ignore_index: int = -100,
    seed=None,
    generator: torch.Generator | None = None,
    random_range: tuple[int, int] | None = None,
    row_offset: int = 0,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """BERT masking: returns (inputs, labels), int64, shaped like `input_ids` (B, S).

    Eligible tokens exclude `pad_id` and `special_ids` (and, with `word_ids`, tokens whose word id is < 0). Each
    eligible token (with `word_ids`: each word, a run of eligible tokens sharing an id, as a unit) is selected with
    probability `mask_prob`, or with `exact=True` exactly max(1, round(mask_prob * eligible units)) per row
    (the float64 product rounded half to even, as BERT rounds, so 10 units at 0.15 give 2; BERT itself counts
    the row's [CLS]/[SEP] too, and with whole words counts word pieces). A selected token becomes `mask_id` with
    probability `mask_replace_prob`, a random id in `random_range` (default [0, vocab_size)) with
    `random_replace_prob`, and stays itself otherwise. labels = the original id at selected
    positions, `ignore_index` elsewhere.
    """
    _check_ids("input_ids", input_ids)
    _check_int("vocab_size", vocab_size, 1)
    _check_int("mask_id", mask_id, 0, vocab_size)
    _check_prob("mask_prob", mask_prob)
    _check_prob("mask_replace_prob", mask_replace_prob)
    _check_prob("random_replace_prob", random_replace_prob)
    if mask_replace_prob + random_replace_prob > 1.0 + 1e-12:
        raise ValueError(f"mask_replace_prob + random_replace_prob must be <= 1, got "
                         f"{mask_replace_prob} + {random_replace_prob}")
    _check_int("pad_id", pad_id, 0, vocab_size, none_ok=True)
    _check_int("ignore_index", ignore_index)
    _check_int("row_offset", row_offset, 0, 2**62)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    specials = _id_list("special_ids", special_ids, vocab_size) + ([pad_id] if pad_id is not None else [])
    if random_range is None:
        lo, hi = 0, vocab_size
    else:
        if not isinstance(random_range, (tuple, list)) or len(random_range) != 2:
            raise TypeError("random_range must be a (low, high) pair of ints")
        lo, hi = random_range
        _check_int("random_range[0]", lo, 0, vocab_size)
        _check_int("random_range[1]", hi, lo + 1, vocab_size + 1)
    if hi - lo >= 2**31:
        name = "vocab_size" if random_range is None else "random_range"
        raise ValueError(f"{name}: random ids must come from fewer than 2^31 ids, got {hi - lo} (pass a smaller "
                         f"random_range)")
    dev = input_ids.device
    if word_ids is not None:
        _check_ids("word_ids", word_ids)
        if word_ids.shape != input_ids.shape:
            raise ValueError(f"word_ids must have the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(word_ids.shape)}")
        if word_ids.device != dev:
            raise ValueError(f"word_ids is on {word_ids.device} but input_ids is on {dev}")
        word_ids = word_ids if word_ids.dtype == torch.int64 else word_ids.to(torch.int64)
        if word_ids.numel() and word_ids.stride(-1) != 1:
            word_ids = word_ids.contiguous()
    x = input_ids if input_ids.dtype == torch.int64 else input_ids.to(torch.int64)
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    _check_id_values("input_ids", x, vocab_size)
    name = _resolve(backend, dev, x.shape[1], "mlm" if (exact or word_ids is not None) else None)
    seed_t = seed_tensor(seed, generator, dev)
    select = ref.rate_bits(mask_prob) if exact else _threshold(mask_prob)  # exact: the float64 count
    thr = (select, _threshold(mask_replace_prob), _threshold(mask_replace_prob + random_replace_prob))
    if name == "torch":
        return ref.mlm_mask(x, word_ids, int(seed_t.cpu()[0]), row_offset, specials, exact, *thr, lo, hi - lo,
                            mask_id, ignore_index)
    spec_t = _const_ids(tuple(specials), dev)
    return _corruption_ops.ops(name)[1](x, word_ids, seed_t, row_offset, spec_t, exact, *thr, lo, hi - lo, mask_id,
                                        ignore_index)


# ---- collators ----
def _mix_seed(seed: int, worker: int) -> int:
    """A different 63-bit seed per DataLoader worker (splitmix64 of seed and the worker's seed)."""
    z = (seed + (worker + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & (2**63 - 1)


class _Collator:
    """Per-instance Philox stream whose row_offset advances by the batch size, so consecutive batches never repeat.
    In a DataLoader worker the seed is mixed with the worker's own seed (`get_worker_info().seed`: the loader's
    base seed, drawn anew for every epoch, plus the worker id), so workers differ from each other and epochs from
    each other (a fixed seed alone would give every epoch's fresh workers the same masks), and a run is still
    reproducible from `seed` and torch's seed (torch.manual_seed or the DataLoader's `generator`)."""

    def __init__(self, seed, device, backend, pad_to_multiple_of):
        _check_int("seed", seed, 0, 2**63, none_ok=True)
        _check_int("pad_to_multiple_of", pad_to_multiple_of, 1, none_ok=True)
        self.seed, self.device, self.backend = seed, device, backend
        self.multiple = pad_to_multiple_of
        self._stream_seed: int | None = None
        self._worker: tuple | None = None
        self.rows = 0

    def _check_options(self, op) -> None:
        """Every option checked at construction (not in the first batch, inside a worker): `op` (span_corrupt or
        mlm_mask) run with them on a one-row batch by the reference, which runs anywhere."""
        check_backend_name(self.backend)
        op(torch.zeros((1, 2), dtype=torch.int64), seed=0, **{**self.kw, "backend": "torch"})

    def _padded(self, x: Tensor, value: int) -> Tensor:
        """x (B, S) padded with `value` to a width that is a multiple of pad_to_multiple_of (tensor cores like
        multiples of 8, as in Hugging Face's collators)."""
        extra = -x.shape[1] % self.multiple if self.multiple else 0
        return torch.nn.functional.pad(x, (0, extra), value=value) if extra else x

    def __repr__(self) -> str:
        opts = {**self.kw, "seed": self.seed, "device": self.device, "pad_to_multiple_of": self.multiple}
        shown = ", ".join(f"{k}={v!r}" for k, v in opts.items() if v is not None and (k, v) != ("backend", "auto"))
        return f"{type(self).__name__}({shown})"

    def _next(self, batch: int) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker = None if info is None else (info.id, info.seed)
        if self._stream_seed is None or worker != self._worker:
            if info is None:
                base = self.seed if self.seed is not None else torch.initial_seed() % 2**63
            else:  # info.seed = the epoch's base seed + worker id (torch.initial_seed() in that worker)
                base = info.seed % 2**63 if self.seed is None else _mix_seed(self.seed, info.seed % 2**63)
            self._stream_seed, self._worker, self.rows = base, worker, 0
        off = self.rows
        self.rows += batch
        return self._stream_seed, off


def _example_rows(examples, keys: tuple[str, ...]) -> list[dict]:
    """One dict per example with `keys` (those an example lacks are absent) from what a tokenizer, dataset or
    DataLoader yields: a list of id lists, arrays or 1-D (or (1, S)) tensors; a list of dicts (a tokenizer's
    per-example output, a BatchEncoding); a dict of columns; or a (B, S) tensor. Positions whose
    `attention_mask` is 0 (a tokenizer's padding="max_length") are dropped, in every key alike."""
    if isinstance(examples, Tensor):
        if examples.dim() not in (1, 2):
            raise ValueError(f"a tensor batch must be (B, S), got shape {tuple(examples.shape)}")
        examples = list(examples) if examples.dim() == 2 else [examples]
    elif isinstance(examples, Mapping):  # a dict of columns
        if "input_ids" not in examples:
            raise ValueError(f"a dict batch must have an 'input_ids' key, got keys {sorted(examples)}")
        cols = {k: examples[k] for k in ("input_ids", "attention_mask") + keys if k in examples}
        n = len(cols["input_ids"])
        examples = [{k: c[i] for k, c in cols.items()} for i in range(n)]
    rows = []
    for e in examples:
        if not isinstance(e, Mapping):
            e = {"input_ids": e}
        elif "input_ids" not in e:
            raise ValueError(f"each example must have an 'input_ids' key, got keys {sorted(e)}")
        row = {}
        for k in ("input_ids", "attention_mask") + keys:
            if k in e and e[k] is not None:
                v = e[k]
                if isinstance(v, (Tensor, np.ndarray)):
                    if v.ndim > 1 and math.prod(v.shape[:-1]) != 1:  # (1, S) is one row (return_tensors="pt")
                        raise ValueError(f"each example's {k!r} must be one row, got shape {tuple(v.shape)}")
                    v = v.reshape(-1).tolist()
                row[k] = list(v)
        n = len(row["input_ids"])
        for k, v in row.items():  # padded together, a short key would silently misalign in a wider batch
            if len(v) != n:
                raise ValueError(f"an example's {k} has {len(v)} entries for {n} input_ids")
        mask = row.pop("attention_mask", None)
        if mask is not None:
            row = {k: [x for x, m in zip(v, mask) if m] for k, v in row.items()}
        rows.append(row)
    return rows


def _pad(name: str, rows, pad_value: int, limit: int | None = None, none_ok: bool = False
         ) -> tuple[Tensor, list[int]]:
    """(B, longest) int64 tensor of the rows (lists of ids; with `none_ok` None, as word_ids have at special
    tokens, becomes pad_value) cut to `limit`, and the rows' lengths. Ids must be integers: floats are refused, not
    truncated. The batch is converted at once by NumPy (256 rows of ~450 ids: 3.9 ms, 10.2 with a tensor per
    row)."""
    if limit is not None:
        rows = [r[:limit] for r in rows]
    lens = [len(r) for r in rows]
    width = max(lens) if lens else 0
    out = torch.full((len(rows), width), pad_value, dtype=torch.int64)
    flat = list(itertools.chain.from_iterable(rows))
    if not flat:
        return out, lens
    arr = np.asarray(flat)
    if arr.dtype == object:  # None at special tokens (word_ids), or ids NumPy cannot hold in one integer type
        if not none_ok and any(v is None for v in flat):
            raise TypeError(f"{name} holds None (only word_ids may, at special tokens)")
        arr = np.asarray([pad_value if v is None else v for v in flat])
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise TypeError(f"{name} must hold integer ids, got {arr.dtype} values (e.g. {flat[0]!r})")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds an id past int64: {int(arr.max())}")
    valid = torch.arange(width)[None, :] < torch.tensor(lens, dtype=torch.int64)[:, None]
    out[valid] = torch.from_numpy(arr.astype(np.int64, copy=False))
    return out, lens


class SpanCorruptionCollator(_Collator):
    """DataLoader collate_fn (or a step on the GPU) for T5: takes lists of token ids or dicts with `input_ids`
    (a Hugging Face tokenizer's output), returns the dict a Hugging Face T5 model takes: `input_ids`,
    `attention_mask`, `labels` (padded with -100), `decoder_input_ids`, `decoder_attention_mask`.

    With `input_length` (T5's fixed-size training) rows are cut to the raw length `t5_input_length` gives, the
    longest whose inputs fit: full rows come out `input_length` long (568 -> 512 at T5's settings; where the span
    count is capped, e.g. density 0.5 with spans of 1, one shorter). `pad_to_multiple_of` pads the encoder's and
    the decoder's widths each to a multiple of it (Hugging Face's option). Every option is checked at construction
    (not in the first batch, in a worker). `device`: where to corrupt (e.g. "cuda" inside the training step;
    default the CPU kernel, right for DataLoader workers).
    """

    def __init__(self, *, eos_id: int, vocab_size: int | None = None, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, sentinel_ids=None, max_sentinels: int | None = None,
                 pad_id: int = 0, decoder_start_id: int | None = None, input_length: int | None = None,
                 pad_to_multiple_of: int | None = None, seed: int | None = None, device=None, backend: str = "auto"):
        super().__init__(seed, device, backend, pad_to_multiple_of)
        self.kw = dict(noise_density=noise_density, mean_span_length=mean_span_length, vocab_size=vocab_size,
                       sentinel_ids=sentinel_ids, max_sentinels=max_sentinels, eos_id=eos_id, pad_id=pad_id,
                       decoder_start_id=decoder_start_id, backend=backend)
        self.pad_id = pad_id
        self.raw_length = None
        _check_int("pad_id", pad_id, 0)  # it pads the batch before span_corrupt sees it
        if input_length is not None:
            _check_int("input_length", input_length, 2)
            self.raw_length, self.target_length = t5_input_length(input_length, noise_density, mean_span_length)
        self._check_options(span_corrupt)

    def __call__(self, examples) -> dict:
        ids, lens = _pad("input_ids", [r["input_ids"] for r in _example_rows(examples, ())], self.pad_id,
                         self.raw_length)
        if self.device is not None:
            ids = ids.to(self.device)
        seed, off = self._next(ids.shape[0])
        fixed = all(n == ids.shape[1] for n in lens)
        out = span_corrupt(ids, None if fixed else lens, seed=seed, row_offset=off, **self.kw)
        p = self._padded
        return {"input_ids": p(out.input_ids, self.pad_id), "attention_mask": p(out.attention_mask, 0),
                "labels": p(out.labels, -100), "decoder_input_ids": p(out.decoder_input_ids, self.pad_id),
                "decoder_attention_mask": p(out.decoder_attention_mask, 0)}


class MLMCollator(_Collator):
    """DataLoader collate_fn (or a step on the GPU) for BERT: takes lists of token ids or dicts with `input_ids`
    (and `word_ids` for `whole_word=True`, as `BatchEncoding.word_ids()` gives, None for special tokens), pads with
    pad_id and returns `input_ids`, `attention_mask`, `labels` (ignore_index where not predicted), and
    `token_type_ids` (padded with 0) when the examples have them. A `special_tokens_mask` (a tokenizer's
    `return_special_tokens_mask=True`) keeps its tokens from being selected, as in Hugging Face's collator, and
    is not returned. `pad_to_multiple_of` pads the width to a multiple of it (Hugging Face's option). Every option
    is checked at construction (not in the first batch, in a worker)."""

    def __init__(self, *, mask_id: int, vocab_size: int, mask_prob: float = 0.15, mask_replace_prob: float = 0.8,
                 random_replace_prob: float = 0.1, special_ids=(), pad_id: int = 0, exact: bool = False,
                 whole_word: bool = False, ignore_index: int = -100, pad_to_multiple_of: int | None = None,
                 seed: int | None = None, device=None, backend: str = "auto"):
        super().__init__(seed, device, backend, pad_to_multiple_of)
        _check_int("vocab_size", vocab_size, 1)
        self.kw = dict(mask_id=mask_id, vocab_size=vocab_size, mask_prob=mask_prob,
                       mask_replace_prob=mask_replace_prob, random_replace_prob=random_replace_prob,
                       special_ids=tuple(_id_list("special_ids", special_ids, vocab_size)), pad_id=pad_id,
                       exact=exact, ignore_index=ignore_index, backend=backend)
        _check_int("pad_id", pad_id, 0)  # it pads the batch (mlm_mask's pad_id=None has no meaning here)
        check_flag("whole_word", whole_word)
        self._check_options(mlm_mask)
        self.pad_id, self.whole_word = pad_id, whole_word

    def __call__(self, examples) -> dict:
        keys = ("token_type_ids", "special_tokens_mask") + (("word_ids",) if self.whole_word else ())
        rows = _example_rows(examples, keys)
        ids, lens = _pad("input_ids", [r["input_ids"] for r in rows], self.pad_id)
        ids = self._padded(ids, self.pad_id)  # before the masking: the pad is never selected
        extra = {}
        for k in ("token_type_ids", "special_tokens_mask"):
            have = sum(k in r for r in rows)
            if have and have != len(rows):
                raise ValueError(f"{have} of {len(rows)} examples have {k!r}: give it for all or none")
            if have:
                extra[k] = self._padded(_pad(k, [r[k] for r in rows], 0)[0], 0)
        words = None
        if self.whole_word:
            if not all("word_ids" in r for r in rows):
                raise ValueError("whole_word=True needs 'word_ids' in every example (a tokenizer's "
                                 "BatchEncoding.word_ids(i), None at special tokens)")
            words = self._padded(_pad("word_ids", [r["word_ids"] for r in rows], -1, none_ok=True)[0], -1)
        attn = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lens, dtype=torch.int64)[:, None]).to(torch.int64)
        special = extra.pop("special_tokens_mask", None)
        x = ids if special is None else ids.masked_fill(special.bool(), self.pad_id)  # pad is never selected
        if self.device is not None:
            ids, x, attn = ids.to(self.device), x.to(self.device), attn.to(self.device)
            words = words.to(self.device) if words is not None else None
            extra = {k: t.to(self.device) for k, t in extra.items()}
        seed, off = self._next(ids.shape[0])
        inputs, labels = mlm_mask(x, word_ids=words, seed=seed, row_offset=off, **self.kw)
        if special is not None:  # the special tokens themselves, unselected, back in place of the pad
            inputs = torch.where(special.to(inputs.device).bool(), ids, inputs)
        return {"input_ids": inputs, "attention_mask": attn, "labels": labels, **extra}
