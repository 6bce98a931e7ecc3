"""Every Triton kernel the CPU tests launch also compiles for a GPU (sm_90), checked without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts code that compiled Triton refuses: a plain global read inside @jit
passed here and failed on the first H200 run. So: record the launches of a few public calls under the interpreter,
then, in a process without the interpreter, lower each kernel with the same argument types and constexprs to
Triton IR for sm_90 (the front end, which is where such errors surface). PTX generation still needs a GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lmobj_kernels as L
from lmobj_kernels._backend import triton_interpret

pytestmark = pytest.mark.skipif(not triton_interpret(), reason="records launches through TRITON_INTERPRET=1")

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _describe(name, value):
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if not -(2**31) <= value < 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return None
    raise TypeError(f"{name}: cannot describe {type(value).__name__}")


def _record(monkeypatch):
    import triton.runtime.interpreter as interp

    seen = {}
    orig = interp.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names = self.arg_names
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        const = {n: v for n, v in values.items() if n in self.constexprs_names}
        sig = {n: _describe(n, v) for n, v in values.items() if n not in const}
        key = json.dumps([fn.__module__, fn.__name__, sig, const], sort_keys=True, default=str)
        seen[key] = (fn.__module__, fn.__name__, sig, const)
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interp.InterpretedFunction, "run", run)
    monkeypatch.setattr(interp.InterpretedFunction, "constexprs_names", property(_constexpr_names), raising=False)
    return seen


def _constexpr_names(self) -> set[str]:
    import inspect

    import triton.language as tl

    params = inspect.signature(self.fn).parameters.values()
    return {p.name for p in params if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}


def _launch_everything(gen):
    x = torch.randn(5, 37, generator=gen, requires_grad=True)
    t = torch.randint(0, 37, (5,), generator=gen)
    for cap in (None, 3.0):
        torch.autograd.grad(L.cross_entropy(x, t, backend="triton", softcap=cap, reduction="none").sum(), x)
    h = torch.randn(2, 6, 8, generator=gen, requires_grad=True)
    w = torch.randn(37, 8, generator=gen, requires_grad=True)
    y = torch.randint(0, 37, (2, 6), generator=gen)
    L.causal_lm_loss(h, w, y, backend="triton").backward()
    for cap in (None, 3.0):  # low memory: the column-block gradient kernel, in bf16 as on a GPU
        hb, wb = (t.detach().bfloat16().requires_grad_() for t in (h, w))
        L.causal_lm_loss(hb, wb, y, backend="triton", low_memory=True, softcap=cap).backward()
    ids = torch.randint(5, 300, (3, 40), generator=gen)
    L.span_corrupt(ids, [40, 30, 1], vocab_size=400, eos_id=1, seed=3, backend="triton")
    for exact in (False, True):
        for words in (None, torch.arange(40).div(3, rounding_mode="floor").expand(3, 40)):
            L.mlm_mask(ids, mask_id=4, vocab_size=400, special_ids=(5,), exact=exact, word_ids=words, seed=3,
                       backend="triton")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, 2, 9, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        masks = [dict(causal=True), dict(causal=True, prefix_lens=torch.tensor([3, 9])),
                 dict(doc_ids=torch.tensor([[0] * 4 + [1] * 5, [0] * 9]), kv_lens=torch.tensor([9, 5])),
                 dict(causal=True, window=(3, None), kv_lens=torch.tensor([9, 5])), dict(causal=True, softcap=5.0),
                 dict(causal=True, kv_lens=torch.tensor([9, 5]), dropout_p=0.25, seed=5),
                 dict(causal=True, alibi_slopes=L.alibi_slopes(2))]
        for m in masks:
            out = L.attention(q, k, v, backend="triton", **m)
            torch.autograd.grad(out.float().sum(), (q, k, v))


_LOWER = r"""
import importlib, json, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
import triton._C.libtriton as lt

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
failures = []
for module, name, sig, const in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), name)
    full = {n: ("constexpr" if n in const else (sig.get(n) or "constexpr")) for n in fn.arg_names}
    consts = {(fn.arg_names.index(n),): v for n, v in const.items()}
    consts.update({(fn.arg_names.index(n),): None for n, t in sig.items() if t is None})
    try:
        opts = backend.parse_options({})
        ctx = lt.ir.context()
        lt.ir.load_dialects(ctx)
        backend.load_dialects(ctx)
        ASTSource(fn=fn, signature=full, constexprs=consts).make_ir(
            target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), ctx)
    except Exception as e:
        failures.append(f"{module}.{name} {const}: {type(e).__name__}: {str(e)[:400]}")
print(json.dumps(failures))
"""


def test_triton_kernels_lower_for_sm90(monkeypatch, gen):
    seen = _record(monkeypatch)
    _launch_everything(gen)
    kernels = {(m, n) for m, n, _, _ in seen.values()}
    assert len(kernels) >= 6, f"too few kernels recorded: {sorted(kernels)}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _LOWER], input=json.dumps(list(seen.values()), default=str),
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    failures = json.loads(res.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
