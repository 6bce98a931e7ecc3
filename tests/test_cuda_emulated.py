"""The CUDA kernels (csrc/cuda/*.cu, the real sources) run on the CPU through tests/cuda_emu (one OS thread per
CUDA thread, barriers and shuffles emulated, launch limits checked): cross-entropy against the float64 reference
under DESIGN.md's rule, corruption byte for byte against the C++ CPU kernel, and every kernel once more under
ThreadSanitizer (races: a missing __syncthreads) and AddressSanitizer / UBSan (out-of-bounds and misaligned
accesses). Without a GPU this is the only run their arithmetic, indexing, reductions and scans get; warp-synchronous
code, the device-only code paths and speed still need a GPU (benchmarks/gpu_check.sh). Sizes are small: a block of
128 threads is 128 OS threads."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess

import pytest
import torch

import lmobj_kernels  # noqa: F401  (loads the CPU ops)
from lmobj_kernels._loss_ops import _row_targets
from lmobj_kernels.reference import corruption as ref_corruption
from lmobj_kernels.reference import losses as ref_losses
from lmobj_kernels.verify import rule_floor
from tests.conftest import assert_lowp_close
from tests.cuda_emu import build as emu_build
from tests.test_corruption import TIE_ROWS

pytestmark = pytest.mark.skipif(emu_build.why_unavailable() is not None,
                                reason=f"CUDA emulator: {emu_build.why_unavailable()}")

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
OPTS = [(0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.0, 1e-3, 0.0), (0.05, 1e-4, 4.0)]  # smoothing, z_loss, softcap
_I, _F = ctypes.c_int64, ctypes.c_float


def _p(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = emu_build.build(tmp_path_factory.mktemp("cuda_emu"))
    lib.emu_take_error.restype = ctypes.c_char_p
    return lib


_GUARD = 64  # elements of canary before and after every buffer a kernel may write


def _guarded(shape, dtype, fill) -> torch.Tensor:
    """A tensor of `shape` inside a larger buffer whose margins hold a canary (`_intact` checks them): a write
    past either end shows, where a kernel on a GPU would corrupt a neighbour or fault."""
    n = math.prod(shape)
    base = torch.full((n + 2 * _GUARD,), -9, dtype=dtype)
    t = base[_GUARD : _GUARD + n].view(shape)
    t.fill_(fill)
    return t


def _intact(*ts: torch.Tensor) -> None:
    for t in ts:
        base = t._base
        ok = base is not None and bool((base[:_GUARD] == -9).all() and (base[-_GUARD:] == -9).all())
        assert ok, "a kernel wrote outside its buffer"


def _ok(lib, rc: int) -> None:
    err = lib.emu_take_error().decode()
    assert rc == 0 and not err, f"emulated launch: cudaError {rc}, {err or 'no message'}"


# ---- cross-entropy ----
def _row_buffer(x: torch.Tensor, ld: int) -> torch.Tensor:
    """x (n, v) in a buffer whose rows are ld apart (ld > v: the kernels' scalar path unless ld keeps 16-byte
    alignment)."""
    buf = _guarded((x.shape[0], ld), x.dtype, 7.0)
    buf[:, : x.shape[1]] = x
    return buf


def _ce_case(gen, n, v, dtype, row_offset, shift_len):
    """Logits (n, v), the op's target tensor (whole sequences of shift_len when shifting) and each row's
    effective target: a share ignored, an ignored row of -inf logits, a row with half its vocabulary at -inf."""
    x = (torch.randn(n, v, generator=gen) * 3).to(dtype)
    total = row_offset + n
    total += -total % shift_len if shift_len else 0
    t = torch.randint(0, v, (total,), generator=gen)
    t[torch.rand(total, generator=gen) < 0.2] = -100
    if n >= 2:  # row 0 ignored, so that every case has an ignored row of -inf logits
        t[row_offset + 1 if shift_len and row_offset % shift_len != shift_len - 1 else row_offset] = -100
    y = _row_targets(t, row_offset + n, shift_len, -100)[row_offset:]  # the target each row is scored against
    ignored = (y == -100).nonzero().flatten().tolist()
    if ignored:
        x[ignored[0]] = float("-inf")  # zero gradient, lse -inf
    valid = (y != -100).nonzero().flatten().tolist()
    if len(valid) > 1:
        r = valid[-1]
        keep = x[r, y[r]].clone()
        x[r, : v // 2] = float("-inf")
        x[r, y[r]] = keep
    return x, t, y


def _check_rows(loss, lse, rloss, rlse, ploss, plse):
    assert torch.equal(loss.isnan(), rloss.isnan()) and torch.equal(loss.isinf(), rloss.isinf()), (loss, rloss)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), (lse, rlse)
    ok, fin = rloss.isfinite(), rlse.isfinite()
    assert_lowp_close(loss[ok], rloss[ok], ploss[ok], floor=1e-5, what="loss")
    assert_lowp_close(lse[fin], rlse[fin], plse[fin], floor=1e-5, what="lse")


@pytest.mark.parametrize("n,v,pad", [(1, 7, 0), (7, 41, 0), (7, 41, 7), (6, 100, 3), (3, 4097, 0), (5, 2500, 8),
                                      (2, 40000, 0)])  # 40000: blocks of 512 (16-bit) and 1024 threads (f32)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("opts", OPTS, ids=["plain", "smooth", "zloss", "cap"])
def test_emulated_cross_entropy(emu, gen, n, v, pad, dtype, opts):
    """ce_forward (loss, lse; and the fused in-place gradient), ce_backward and ce_grad_cols of the CUDA
    kernels against the float64 reference: vector loads (aligned rows: pad 0, or a padding that keeps 16 bytes)
    and scalar loads (pad 3, 7), tails, shifted targets with a row offset, ignored and -inf rows."""
    ls, zl, cap = opts
    row_offset, shift_len = (1, 4) if n > 4 else (0, 0)
    x, t, y = _ce_case(gen, n, v, dtype, row_offset, shift_len)
    x64 = x.double().requires_grad_()
    rloss, rlse = ref_losses.cross_entropy_rows(x64, y, -100, ls, zl, cap or None)
    xp = x.float().requires_grad_()
    ploss, plse = ref_losses.cross_entropy_rows(xp, y, -100, ls, zl, cap or None)
    args = (_I(row_offset), _I(shift_len), _I(-100), _F(ls), _F(zl), _F(cap))
    ld = v + pad
    buf = _row_buffer(x, ld)
    before = buf.clone()
    loss, lse = _guarded((n,), torch.float32, 5.0), _guarded((n,), torch.float32, 5.0)
    _ok(emu, emu.emu_ce_forward(DTYPES[dtype], _p(buf), _I(ld), _p(t), _I(n), _I(v), *args, _p(loss), _p(lse),
                                _p(None)))
    assert torch.equal(buf, before), "the forward wrote into its input"
    _check_rows(loss, lse, rloss.detach(), rlse.detach(), ploss.detach(), plse.detach())
    tol = lambda ref: dict(factor=3.0, floor=rule_floor(ref, dtype), what="grad")  # noqa: E731

    # fused: the row becomes the gradient of the sum of row losses, the padding columns untouched
    (rg,) = torch.autograd.grad(rloss.sum(), x64, retain_graph=True)
    (pg,) = torch.autograd.grad(ploss.sum(), xp, retain_graph=True)
    loss2, lse2 = _guarded((n,), torch.float32, 0.0), _guarded((n,), torch.float32, 0.0)
    _ok(emu, emu.emu_ce_forward(DTYPES[dtype], _p(buf), _I(ld), _p(t), _I(n), _I(v), *args, _p(loss2), _p(lse2),
                                _p(buf)))
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(buf[:, v:], before[:, v:])
    assert_lowp_close(buf[:, :v], rg, pg.to(dtype), **tol(rg))

    # backward with per-row weights into a new contiguous (n, v)
    w = torch.rand(n, generator=gen)
    (rgw,) = torch.autograd.grad((rloss * w.double()).sum(), x64, retain_graph=True)
    (pgw,) = torch.autograd.grad((ploss * w).sum(), xp, retain_graph=True)
    src = _row_buffer(x, ld)
    out = _guarded((n, v), dtype, 9.0)
    _ok(emu, emu.emu_ce_backward(DTYPES[dtype], _p(w), _p(src), _I(ld), _p(t), _p(lse), _I(n), _I(v), *args,
                                 _p(out)))
    assert_lowp_close(out, rgw, pgw.to(dtype), **tol(rgw))

    # low-memory dW: columns [col0, col0 + C) of each row, in place, weights w (0 for ignored rows)
    col0 = v // 3
    c = max(1, v - col0 - v // 4)
    wv = torch.where(y != -100, w, 0.0)
    block = _row_buffer(x[:, col0 : col0 + c].contiguous(), c + pad)
    y32 = y.clone()
    lse_ref = rlse.detach().float().clone()
    _ok(emu, emu.emu_ce_grad_cols(DTYPES[dtype], _p(block), _I(c + pad), _I(n), _I(c), _p(y32), _p(lse_ref), _p(wv),
                                  _I(col0), _I(v), _F(ls), _F(zl), _F(cap)))
    (rgc,) = torch.autograd.grad((rloss * wv.double()).sum(), x64)
    (pgc,) = torch.autograd.grad((ploss * wv).sum(), xp)
    assert_lowp_close(block[:, :c], rgc[:, col0 : col0 + c], pgc[:, col0 : col0 + c].to(dtype),
                      **tol(rgc[:, col0 : col0 + c]))
    assert torch.equal(block[:, c:], torch.full_like(block[:, c:], 7.0))
    _intact(buf, loss, lse, loss2, lse2, src, out, block)


def test_emulated_cross_entropy_nan_logits(emu):
    """A NaN logit makes its row's loss and lse NaN wherever it sits: V = 41 spreads a row over 64 threads, a
    NaN in the second warp (columns 32-40) met an empty partner in the block merge, whose reset dropped it."""
    x = torch.linspace(-2, 2, 41).repeat(6, 1)
    x[0, 33] = x[2, 40] = x[3, 5] = float("nan")
    x[4], x[5] = float("-inf"), float("-inf")
    x[4, 20], x[4, 0], x[5, 37] = float("nan"), 1.0, float("nan")
    t = torch.tensor([0, 3, 40, 7, 0, 37])
    loss, lse = torch.empty(6), torch.empty(6)
    _ok(emu, emu.emu_ce_forward(0, _p(x), _I(41), _p(t), _I(6), _I(41), _I(0), _I(0), _I(-100), _F(0), _F(0),
                                _F(0), _p(loss), _p(lse), _p(None)))
    want = torch.tensor([True, False, True, True, True, True])
    assert torch.equal(loss.isnan(), want) and torch.equal(lse.isnan(), want), (loss, lse)


# ---- corruption ----
SPAN_CASES = [  # B, S, noise density, mean span length, row offset
    (6, 568, 0.15, 3.0, 0),
    (5, 190, 0.15, 3.0, 12345),
    (3, 1500, 0.5, 8.0, 7),
    (5, 7, 0.3, 1.0, 3),
    (4, 70, 0.2, 2.0, 2**40 + 5),
    (6, 33, 0.0, 3.0, 0),
    (4, 300, 0.9, 1.0, 9),
    (2, 3000, 0.15, 3.0, 1),  # 54 KB of shared memory: the launch needs the opt-in attribute
]


def _emu_span(lib, x, lengths, seed, row_offset, r, m, sentinels, eos, pad, label_pad, in_w, tg_w):
    B, S = x.shape
    inputs = _guarded((B, in_w), torch.int64, -7)
    targets = _guarded((B, tg_w), torch.int64, -7)
    rc = lib.emu_span_corrupt(_p(x), _I(x.stride(0)), _I(B), _I(S), _p(lengths), _p(seed), _p(sentinels),
                              _I(sentinels.numel()), _I(row_offset), _F(r), _F(m), _I(eos), _I(pad), _I(label_pad),
                              _p(inputs), _I(in_w), _p(targets), _I(tg_w))
    return rc, inputs, targets


@pytest.mark.parametrize("B,S,r,m,row_offset", SPAN_CASES)
def test_emulated_span_corrupt_matches_the_cpu_kernel(emu, gen, B, S, r, m, row_offset):
    """The CUDA span kernel gives the C++ kernel's bytes (inputs, targets, padding) for the same seed, with
    per-row lengths from 0 to S and rows ld apart."""
    x = torch.randint(0, 32000, (B, S + 5), generator=gen)[:, :S]
    lengths = torch.randint(0, S + 1, (B,), generator=gen)
    lengths[0] = S
    lengths[-1] = min(1, S)
    seed = torch.randint(0, 2**62, (1,), generator=gen)
    sentinels = torch.arange(32099, 32099 - 2000, -1)
    want_in, want_tg = torch.ops.lmobj.span_corrupt(x, lengths, seed, row_offset, r, m, sentinels, 1, 0, -100,
                                                    S + 2, S + 2)
    rc, inputs, targets = _emu_span(emu, x, lengths, seed, row_offset, r, m, sentinels, 1, 0, -100, S + 2, S + 2)
    _ok(emu, rc)
    _intact(inputs, targets)
    assert torch.equal(inputs, want_in)
    assert torch.equal(targets, want_tg)


def test_emulated_span_row_too_long_for_shared_memory(emu):
    """A row whose working set passes the card's opt-in shared memory is a launch error the launcher returns
    (the op turns it into a message), not a launch with too little memory."""
    S = 13000  # 18 bytes a token: 234 KB > 227 KB
    x = torch.zeros((1, S), dtype=torch.int64)
    rc, _, _ = _emu_span(emu, x, torch.tensor([S]), torch.tensor([1]), 0, 0.15, 3.0, torch.arange(5000), 9999, 0,
                         -100, S + 2, S + 2)
    emu.emu_take_error()
    assert rc != 0


def _mlm_thresholds(exact: bool) -> tuple:
    """The ops' rate arguments for p = 0.15 (exact: its float64 bits), 80% [MASK], 10% random ids in [999, 30000)."""
    one = 1 << 32
    select = ref_corruption.rate_bits(0.15) if exact else round(0.15 * one)
    return select, round(0.8 * one), round(0.9 * one), 999, 29000


def _emu_mlm(lib, x, wid, seed, special, row_offset, exact):
    """The emulated mlm_mask (with _mlm_thresholds) into guarded outputs, and the C++ kernel's answer."""
    B, S = x.shape
    thr = _mlm_thresholds(exact)
    want = torch.ops.lmobj.mlm_mask(x, wid, seed, row_offset, special, exact, *thr, 103, -100)
    out, lab = _guarded((B, S), torch.int64, -7), _guarded((B, S), torch.int64, -7)
    rc = lib.emu_mlm_mask(_p(x), _I(x.stride(0)), _I(B), _I(S), _p(wid), _I(wid.stride(0) if wid is not None else 0),
                          _p(seed), _p(special), _I(special.numel()), _I(row_offset), ctypes.c_int(int(exact)),
                          *(_I(v) for v in thr), _I(103), _I(-100), _p(out), _p(lab))
    _ok(lib, rc)
    _intact(out, lab)
    return (out, lab), want


@pytest.mark.parametrize("S", [1, 5, 37, 300, 1100])  # 64, 128 and 256 threads a block
@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_emulated_mlm_mask_matches_the_cpu_kernel(emu, gen, S, words, exact):
    """The CUDA masking kernels (token and word units, thresholds and exact counts) give the C++ kernel's bytes."""
    B = 4
    x = torch.randint(0, 30522, (B, S + 3), generator=gen)[:, :S]
    x[:, 0] = 101
    x[x % 17 == 0] = 0  # special ids scattered through the rows
    wid = None
    if words:  # words of 1-3 tokens, some positions without a word (-1); rows S + 2 apart
        wid = torch.cumsum(torch.rand(B, S + 2, generator=gen) < 0.5, 1)
        wid[torch.rand(B, S + 2, generator=gen) < 0.1] = -1
        wid = wid[:, :S]
    seed = torch.randint(0, 2**62, (1,), generator=gen)
    (out, lab), (want_out, want_lab) = _emu_mlm(emu, x, wid, seed, torch.tensor([0, 101, 102]), 77, exact)
    assert torch.equal(out, want_out)
    assert torch.equal(lab, want_lab)


@pytest.mark.parametrize("row", TIE_ROWS)
def test_emulated_mlm_exact_tie_at_the_cut(emu, row):
    """Rows whose selection keys tie at the cut of the exact count run the CUDA kernel's tie branch (one thread
    gives the tied slots out in order), which random rows practically never reach: the C++ kernel's bytes."""
    S = 1100
    x = torch.randint(5, 30522, (1, S), generator=torch.Generator().manual_seed(3))
    (out, lab), (want_out, want_lab) = _emu_mlm(emu, x, None, torch.tensor([1]), torch.tensor([0]), row, True)
    assert int((want_lab != -100).sum()) == 165
    assert torch.equal(out, want_out) and torch.equal(lab, want_lab)


@pytest.mark.parametrize("sanitize", ["thread", "address,undefined,alignment"])
def test_emulated_kernels_under_sanitizers(tmp_path, sanitize):
    """tests/cuda_emu/race_driver.cpp (every kernel on fixed inputs) built with ThreadSanitizer, which sees a
    missing __syncthreads as a race between the emulated threads (found a trailing scan barrier taken out), and
    with AddressSanitizer / UBSan, which see accesses past a buffer or the dynamic shared memory and misaligned
    ones (found a shared-memory size 24 bytes short). A process of its own: a fault fails this test, not the run."""
    exe = emu_build.build_driver(tmp_path, sanitize)
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=0")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (res.stdout[-2000:], res.stderr[-6000:])
