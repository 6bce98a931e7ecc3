"""Corruption benchmarks: T5 span corruption and BERT masking, lmobj kernels against the tools people use.

CPU (default): 256 x 568 `span_corrupt` (C++ kernel) against a NumPy per-row implementation in the style of
Hugging Face's FlaxDataCollatorForT5MLM (written here), and 256 x 512 `mlm_mask` against Hugging Face's
DataCollatorForLanguageModeling.torch_mask_tokens when `transformers` is installed (else a same-algorithm torch
reimplementation, and the table says so).
--gpu: 1024 x 568 and 8192 x 568, cuda and triton backends against the CPU kernel and the same peers.
--quick: tiny sizes, seconds (the smoke test). Prints a table; writes benchmarks/results/corruption-*.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lmobj_kernels.corruption as C  # noqa: E402
from lmobj_kernels._backend import available_backends  # noqa: E402

VOCAB_T5, EOS_T5 = 32100, 1
VOCAB_BERT, MASK_BERT, SPECIAL_BERT = 30522, 103, (0, 100, 101, 102, 103)


# ---- peers ----
def numpy_t5_collator(ids: np.ndarray, noise_density=0.15, mean_span_length=3.0, rng=None) -> tuple:
    """T5 span corruption the way Hugging Face's Flax T5 collator does it: a NumPy noise mask per row (random
    segmentation by shuffling), then batch-wide sentinel ids and filtering. Independent code, same algorithm."""
    rng = rng or np.random.default_rng(0)
    B, L = ids.shape

    def segmentation(total, parts):
        marks = np.zeros(total - 1, dtype=np.int64)
        marks[: parts - 1] = 1
        rng.shuffle(marks)
        seg = np.concatenate([[0], np.cumsum(marks)])
        return np.bincount(seg, minlength=parts)

    n = int(np.round(np.float32(L) * np.float32(noise_density)))
    n = min(max(n, 1), L - 1)
    k = max(int(np.round(np.float32(n) / np.float32(mean_span_length))), 1)
    mask = np.zeros((B, L), dtype=bool)
    for b in range(B):
        noise, keep = segmentation(n, k), segmentation(L - n, k)
        lens = np.stack([keep, noise], axis=1).reshape(-1)
        starts = np.zeros(L, dtype=np.int64)
        starts[np.cumsum(lens)[:-1]] = 1
        mask[b] = np.cumsum(starts) % 2 == 1

    def sentinels(m):
        start = m & ~np.pad(m, ((0, 0), (1, 0)))[:, :-1]
        sid = np.where(start, np.cumsum(start, axis=-1), start)
        sid = np.where(sid != 0, VOCAB_T5 - sid, 0)
        return sid - (m & ~start).astype(np.int64) * 1  # -1 marks tokens to drop

    def filt(x, sid):
        merged = np.where(sid != 0, sid, x)
        rows = [r[r >= 0] for r in merged]
        return np.stack([np.concatenate([r, [EOS_T5]]) for r in rows])

    return filt(ids, sentinels(mask)), filt(ids, sentinels(~mask))


def torch_mask_tokens_same_algorithm(x: torch.Tensor, special: torch.Tensor, p=0.15) -> tuple:
    """DataCollatorForLanguageModeling.torch_mask_tokens's algorithm (used when transformers is missing)."""
    labels = x.clone()
    prob = torch.full(labels.shape, p)
    prob.masked_fill_(torch.isin(labels, special), 0.0)
    sel = torch.bernoulli(prob).bool()
    labels[~sel] = -100
    inputs = x.clone()
    repl = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & sel
    inputs[repl] = MASK_BERT
    rnd = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & sel & ~repl
    inputs[rnd] = torch.randint(VOCAB_BERT, labels.shape, dtype=torch.long)[rnd]
    return inputs, labels


def hf_mlm_peer():
    """(name, fn(x) -> (inputs, labels)) of Hugging Face's own masking when transformers is installed."""
    try:
        from transformers import BertTokenizer, DataCollatorForLanguageModeling
    except ImportError:
        return None
    d = tempfile.mkdtemp()
    words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"tok{i}" for i in range(VOCAB_BERT - len(words))]
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(words))
    tok = BertTokenizer(os.path.join(d, "vocab.txt"))
    col = DataCollatorForLanguageModeling(tok, mlm_probability=0.15, return_tensors="pt")

    def run(x, special_mask):  # the special-tokens mask comes with the batch (return_special_tokens_mask=True)
        return col.torch_mask_tokens(x.clone(), special_tokens_mask=special_mask)

    import transformers

    return f"transformers {transformers.__version__} torch_mask_tokens", run


# ---- runs ----
def bench(rows, name, backend, shape, seconds, tokens):
    extra = {} if torch.cuda.is_available() else {"threads": torch.get_num_threads()}
    rows.append({"bench": name, "backend": backend, "shape": shape, "metric": "time", "value": seconds * 1e3,
                 "unit": "ms", **extra})
    rows.append({"bench": name, "backend": backend, "shape": shape, "metric": "throughput",
                 "value": tokens / seconds / 1e6, "unit": "M tokens/s", **extra})


def run_cpu(rows, B_span, S_span, B_mlm, S_mlm, rounds, repeat):
    """Each size's contenders timed in alternating rounds (common.time_cpu_interleaved)."""
    x = torch.randint(2, 32000, (B_span, S_span))
    shape = f"{B_span}x{S_span}"
    op_args = (x, torch.full((B_span,), S_span), torch.tensor([1]), 0, 0.15, 3.0, torch.arange(VOCAB_T5 - 1,
               VOCAB_T5 - 101, -1), EOS_T5, 0, -100, S_span + 1, S_span + 1)
    xn = x.numpy()
    t = common.time_cpu_interleaved({
        "cpu (C++ kernel)": lambda: C.span_corrupt(x, vocab_size=VOCAB_T5, eos_id=EOS_T5, seed=1, backend="cpu"),
        "cpu (C++ kernel, bare op: no API checks/masks)": lambda: torch.ops.lmobj.span_corrupt(*op_args),
        "numpy per-row (HF Flax T5 style)": lambda: numpy_t5_collator(xn),
    }, rounds, repeat)
    for name, sec in t.items():
        bench(rows, "span_corrupt", name, shape, sec, B_span * S_span)

    y = torch.randint(104, VOCAB_BERT, (B_mlm, S_mlm))
    y[:, 0], y[:, -1] = 101, 102
    shape = f"{B_mlm}x{S_mlm}"
    peer = hf_mlm_peer()
    special = torch.tensor(SPECIAL_BERT)
    if peer is not None:
        label, fn = peer
        smask = torch.isin(y, special)
        peer_fn = lambda: fn(y, smask)  # noqa: E731
    else:
        label = "torch reimplementation of HF torch_mask_tokens (transformers not installed)"
        peer_fn = lambda: torch_mask_tokens_same_algorithm(y, special)  # noqa: E731
    t = common.time_cpu_interleaved({
        "cpu (C++ kernel)": lambda: C.mlm_mask(y, mask_id=MASK_BERT, vocab_size=VOCAB_BERT, special_ids=SPECIAL_BERT,
                                               seed=1, backend="cpu"),
        label: peer_fn,
    }, rounds, repeat)
    for name, sec in t.items():
        bench(rows, "mlm_mask", name, shape, sec, B_mlm * S_mlm)


def run_gpu(rows, sizes):
    dev = torch.device("cuda")
    backends = [b for b in ("cuda", "triton") if b in available_backends(dev)]
    peer = hf_mlm_peer()
    for B, S in sizes:
        _gpu_size(rows, B, S, backends, peer)


def _gpu_size(rows, B, S, backends, peer, dev=None):
    """One size of the GPU run. `dev` (default cuda) lets the tests run this on the CPU kernel with a stand-in
    timer, so that the GPU run's own code (ids, checks, peers) is exercised in CI (a bad id range once cost the
    corruption figures of a whole GPU session)."""
    dev = torch.device("cuda") if dev is None else torch.device(dev)
    shape = f"{B}x{S}"
    x = torch.randint(2, 32000, (B, S), device=dev)
    seed = torch.tensor([1], device=dev)
    xb = x.clamp(max=VOCAB_BERT - 1)  # BERT ids for mlm_mask (x holds T5 ids, past BERT's vocabulary)
    for b in backends:
        out = C.span_corrupt(x, vocab_size=VOCAB_T5, eos_id=EOS_T5, seed=seed, backend=b)
        want = C.span_corrupt(x[:4].cpu(), vocab_size=VOCAB_T5, eos_id=EOS_T5, seed=1, backend="cpu")
        assert torch.equal(out.input_ids[:4].cpu(), want.input_ids), f"{b} differs from the CPU kernel"
        t = common.time_gpu(lambda b=b: C.span_corrupt(x, vocab_size=VOCAB_T5, eos_id=EOS_T5, seed=seed, backend=b))
        bench(rows, "span_corrupt", b, shape, t, B * S)
        t = common.time_gpu(lambda b=b: C.mlm_mask(xb, mask_id=MASK_BERT, vocab_size=VOCAB_BERT,
                                                   special_ids=SPECIAL_BERT, seed=seed, backend=b))
        bench(rows, "mlm_mask", b, shape, t, B * S)
    xc = x.cpu()
    t = common.time_cpu(lambda: C.span_corrupt(xc, vocab_size=VOCAB_T5, eos_id=EOS_T5, seed=1, backend="cpu"),
                        repeat=3)
    bench(rows, "span_corrupt", "cpu (C++ kernel)", shape, t, B * S)
    if B <= 1024:
        xn = xc.numpy()
        t = common.time_cpu(lambda: numpy_t5_collator(xn), repeat=3)
        bench(rows, "span_corrupt", "numpy per-row (HF Flax T5 style)", shape, t, B * S)
    y = xc.clamp(max=VOCAB_BERT - 1)
    t = common.time_cpu(lambda: C.mlm_mask(y, mask_id=MASK_BERT, vocab_size=VOCAB_BERT, seed=1, backend="cpu"),
                        repeat=3)
    bench(rows, "mlm_mask", "cpu (C++ kernel)", shape, t, B * S)
    special = torch.tensor(SPECIAL_BERT, device=dev)
    yg = y.to(dev)
    t = common.time_gpu(lambda: torch_mask_tokens_gpu(yg, special))
    bench(rows, "mlm_mask", "torch ops on GPU (HF torch_mask_tokens algorithm)", shape, t, B * S)
    if peer is not None:
        smask = torch.isin(y, special.cpu())
        t = common.time_cpu(lambda: peer[1](y, smask), repeat=3)
        bench(rows, "mlm_mask", peer[0] + " (CPU)", shape, t, B * S)


def torch_mask_tokens_gpu(x, special, p=0.15):
    labels = x.clone()
    prob = torch.full(labels.shape, p, device=x.device)
    prob.masked_fill_(torch.isin(labels, special), 0.0)
    sel = torch.bernoulli(prob).bool()
    labels[~sel] = -100
    inputs = x.clone()
    repl = torch.bernoulli(torch.full(labels.shape, 0.8, device=x.device)).bool() & sel
    inputs[repl] = MASK_BERT
    rnd = torch.bernoulli(torch.full(labels.shape, 0.5, device=x.device)).bool() & sel & ~repl
    inputs[rnd] = torch.randint(VOCAB_BERT, labels.shape, device=x.device)[rnd]
    return inputs, labels


def sanitize_case() -> None:
    """Small CUDA calls of every corruption kernel variant for compute-sanitizer (odd sizes, empty and 1-token
    rows, long rows that need more than 48 KB of shared memory)."""
    dev = torch.device("cuda")
    for B, S in ((1, 1), (5, 37), (3, 600), (2, 3000)):
        x = torch.randint(2, 30000, (B, S), device=dev)
        lens = [S] + [max(0, S - 1 - i) for i in range(B - 1)]
        for r, m in ((0.15, 3.0), (0.5, 1.0)):
            C.span_corrupt(x, lens, vocab_size=VOCAB_T5, eos_id=EOS_T5, seed=1, backend="cuda", max_sentinels=2000,
                           noise_density=r, mean_span_length=m)
        w = torch.cumsum((torch.rand(B, S, device=dev) < 0.5).long(), 1)
        for exact in (False, True):
            for words in (None, w):
                C.mlm_mask(x, mask_id=MASK_BERT, vocab_size=VOCAB_T5, special_ids=(101,), exact=exact,
                           word_ids=words, seed=1, backend="cuda")
    torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--gpu", action="store_true", help="GPU sizes, cuda and triton backends")
    ap.add_argument("--no-save", action="store_true", help="do not write the JSON result file")
    ap.add_argument("--out", default=common.RESULTS, help="folder for the JSON results")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU threads: {torch.get_num_threads()} of {os.cpu_count()} cores")
    rows: list[dict] = []
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA GPU")
        run_gpu(rows, [(64, 568)] if args.quick else [(1024, 568), (8192, 568)])
    elif args.quick:
        run_cpu(rows, 8, 64, 8, 64, rounds=2, repeat=1)
    else:
        run_cpu(rows, 256, 568, 256, 512, rounds=10, repeat=3)
    tput = [r for r in rows if r["metric"] == "throughput"]
    print(common.table([{"bench": r["bench"], "backend": r["backend"], "shape": r["shape"],
                         "M tokens/s": r["value"],
                         "ms": next(t["value"] for t in rows if t["metric"] == "time" and t["bench"] == r["bench"]
                                    and t["backend"] == r["backend"] and t["shape"] == r["shape"])}
                        for r in tput], ["bench", "backend", "shape", "ms", "M tokens/s"]))
    for bench_name in ("span_corrupt", "mlm_mask"):
        for shape in sorted({r["shape"] for r in tput if r["bench"] == bench_name}):
            rs = [r for r in tput if r["bench"] == bench_name and r["shape"] == shape]
            ours = max((r for r in rs if r["backend"] in ("cpu (C++ kernel)", "cuda", "triton")),
                       key=lambda r: r["value"])
            for peer in rs:
                if "C++" in peer["backend"] or peer["backend"] in ("cuda", "triton"):
                    continue
                print(f"{bench_name} {shape}: {ours['backend']} is {ours['value'] / peer['value']:.1f}x "
                      f"{peer['backend']}")
    if not args.no_save:
        print("wrote", common.write_results("corruption-quick" if args.quick else "corruption", rows, args.out))


if __name__ == "__main__":
    main()
