"""CPU micro-benchmarks (pytest-benchmark): each hot CPU kernel at data-loader / small-batch sizes next to the way
PyTorch or Hugging Face does the same, in one run. Compare means within a group (the machine may be shared).

  .venv/bin/python -m pytest benchmarks/micro_cpu.py --benchmark-only \
      --benchmark-json=benchmarks/results/micro-cpu.json          # the table, and the JSON
  .venv/bin/python -m pytest benchmarks/micro_cpu.py --benchmark-disable   # one call each (the CI smoke test)

The full-size comparisons of the issues (peak memory, fresh processes) are the bench_*.py scripts.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_corruption as BC  # noqa: E402  (the peers of the corruption benchmark)

import lmobj_kernels as L  # noqa: E402


@pytest.fixture(scope="module")
def gen():
    return torch.Generator().manual_seed(0)


# ---- cross-entropy family ----
@pytest.mark.benchmark(group="cross_entropy 2048x32000 fp32, fwd+bwd")
@pytest.mark.parametrize("impl", ["lmobj-cpu", "F.cross_entropy"])
def test_cross_entropy(benchmark, impl, gen):
    x = torch.randn(2048, 32000, generator=gen).requires_grad_()
    t = torch.randint(0, 32000, (2048,), generator=gen)

    def run():
        x.grad = None
        loss = F.cross_entropy(x, t) if impl == "F.cross_entropy" else L.cross_entropy(x, t, backend="cpu")
        loss.backward()

    benchmark(run)


@pytest.mark.benchmark(group="linear CE 1024x512 -> 16384 fp32, fwd+bwd")
@pytest.mark.parametrize("impl", ["lmobj-cpu", "lmobj-cpu-low_memory", "eager", "F.linear_cross_entropy"])
def test_linear_cross_entropy(benchmark, impl, gen):
    h = torch.randn(1024, 512, generator=gen).requires_grad_()
    w = (torch.randn(16384, 512, generator=gen) / 512**0.5).requires_grad_()
    t = torch.randint(0, 16384, (1024,), generator=gen)
    if impl == "F.linear_cross_entropy" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("this torch has no chunked F.linear_cross_entropy")

    def run():
        h.grad = w.grad = None
        if impl == "eager":
            loss = F.cross_entropy(h @ w.t(), t)
        elif impl == "F.linear_cross_entropy":
            loss = F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())
        else:
            loss = L.linear_cross_entropy(h, w, t, backend="cpu", low_memory=impl.endswith("low_memory"))
        loss.backward()

    benchmark(run)


# ---- corruption ----
@pytest.mark.benchmark(group="span_corrupt 64x568")
@pytest.mark.parametrize("impl", ["lmobj-cpu", "numpy per-row (HF Flax T5 style)"])
def test_span_corrupt(benchmark, impl, gen):
    x = torch.randint(200, BC.VOCAB_T5 - 100, (64, 568), generator=gen)
    if impl == "lmobj-cpu":
        benchmark(lambda: L.span_corrupt(x, vocab_size=BC.VOCAB_T5, eos_id=BC.EOS_T5, seed=1, backend="cpu"))
    else:
        xn = x.numpy()
        benchmark(lambda: BC.numpy_t5_collator(xn))


@pytest.mark.benchmark(group="mlm_mask 64x512")
@pytest.mark.parametrize("impl", ["lmobj-cpu", "HF torch_mask_tokens"])
def test_mlm_mask(benchmark, impl, gen):
    y = torch.randint(104, BC.VOCAB_BERT, (64, 512), generator=gen)
    special = torch.tensor(BC.SPECIAL_BERT)
    if impl == "lmobj-cpu":
        benchmark(lambda: L.mlm_mask(y, mask_id=BC.MASK_BERT, vocab_size=BC.VOCAB_BERT, special_ids=BC.SPECIAL_BERT,
                                     seed=1, backend="cpu"))
        return
    peer = BC.hf_mlm_peer()
    if peer is None:  # same algorithm in torch ops when transformers is absent
        benchmark(lambda: BC.torch_mask_tokens_same_algorithm(y, special))
    else:
        smask = torch.isin(y, special)
        benchmark(lambda: peer[1](y, smask))


# ---- attention (the torch backend serves every mask on the CPU) ----
@pytest.mark.benchmark(group="attention 1x8x512x64 prefix-LM fp32, fwd+bwd")
@pytest.mark.parametrize("impl", ["lmobj-torch", "SDPA + explicit mask"])
def test_attention_prefix(benchmark, impl, gen):
    q, k, v = (torch.randn(1, 8, 512, 64, generator=gen).requires_grad_() for _ in range(3))
    prefix = torch.tensor([200])
    i = torch.arange(512)
    allowed = (i[None, :] <= i[:, None]) | (i[None, :] < 200)

    def run():
        for t in (q, k, v):
            t.grad = None
        if impl == "lmobj-torch":
            out = L.attention(q, k, v, causal=True, prefix_lens=prefix, backend="torch")
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        out.sum().backward()

    benchmark(run)
