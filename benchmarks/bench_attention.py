"""Attention benchmark (issue 4): lmobj's masked attention against the tools people use today.

  python benchmarks/bench_attention.py           CPU: the torch backend vs SDPA with an explicit mask (prebuilt, and
                                                 built on each call from the same metadata), S=2048
  python benchmarks/bench_attention.py --quick   tiny CPU run (seconds; the smoke test runs it)
  python benchmarks/bench_attention.py --gpu     GPU, ~3 min: TFLOP/s forward and forward+backward, D=128 at
                                                 S=2k/8k and D=64 at 8k, masks causal / prefix-LM / documents /
                                                 sliding window (1024 keys) / softcap 50 / ALiBi (causal,
                                                 the paper's slopes) / BERT's padding with dropout 0.1 /
                                                 packed cross attention (a packed T5: S/4 decoder queries
                                                 over S encoder keys, 4 documents), vs SDPA
                                                 (flash, efficient, cudnn; no softcap; ALiBi as a float mask),
                                                 FlexAttention (at 8k only: it compiles per mask; no dropout;
                                                 ALiBi as a score_mod), FlashAttention
  python benchmarks/bench_attention.py --gpu --full   D 64/128, S 1k..16k, plus key padding (a longer run)

FLOPs (ALGORITHMS.md): forward 4 * B * Hq * Sq * Sk * D * (fraction of allowed pairs); backward 2.5x forward,
so forward+backward counts 3.5x. Every backend is checked against lmobj's output before it is timed. FlexAttention's
block-mask construction is timed separately. With dropout the draws differ between libraries, so the check runs with
dropout off and the timing with it on. Results: a table and benchmarks/results/attention-<machine>-<date>.json (or
$LMOBJ_RESULTS_DIR).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table, time_cpu, time_gpu, write_results  # noqa: E402

import lmobj_kernels as L  # noqa: E402
from lmobj_kernels.attention import _document_prefixes  # noqa: E402
from lmobj_kernels.reference import attention as ref  # noqa: E402


# ---- masks ----
def make_mask(name: str, B: int, S: int, device, gen: torch.Generator) -> dict:
    """The attention() options of a named mask; documents: ~4 per row with random boundaries."""
    if name == "causal":
        return {"causal": True}
    if name == "prefix":
        return {"causal": True, "prefix_lens": torch.randint(S // 4, 3 * S // 4 + 1, (B,), generator=gen).to(device)}
    if name == "docs":
        cuts = torch.sort(torch.randint(1, S, (B, 3), generator=gen), dim=1).values
        cu = torch.cat([torch.zeros(B, 1, dtype=torch.long), cuts, torch.full((B, 1), S)], dim=1)
        return {"causal": True, "doc_ids": L.doc_ids_from_cu_seqlens(cu, S).to(device)}
    if name == "padding":
        return {"kv_lens": torch.randint(S // 2, S + 1, (B,), generator=gen).to(device)}
    if name == "window":  # Mistral-style sliding window: each query sees itself and the WINDOW - 1 keys before it
        return {"causal": True, "window": (WINDOW - 1, None)}
    if name == "softcap":  # Gemma 2's global layers: causal, scores capped at 50 (SDPA cannot: not timed there)
        return {"causal": True, "softcap": 50.0}
    if name == "dropout":  # BERT pre-training: key padding and attention dropout 0.1
        return {**make_mask("padding", B, S, device, gen), "dropout_p": 0.1}
    if name == "alibi":  # BLOOM / MPT: causal with ALiBi's per-head slopes (run_gpu sizes them to its heads)
        return {"causal": True, "alibi_slopes": None}
    if name == "prefix_docs":  # a packed prefix LM: the documents of "docs", each the first half of it its prefix
        opts = make_mask("docs", B, S, device, gen)
        return {**opts, "prefix_mask": _document_prefixes(opts["doc_ids"], torch.ones(B, dtype=torch.long), 2)}
    if name == "cross_docs":  # a packed T5: S // 4 decoder queries over S encoder keys, 4 documents per row, each
        # document's decoder part a quarter of its encoder part (T5's 114 targets per 568 raw tokens, roughly)
        Sq = S // 4
        cuts = torch.sort(torch.randperm(Sq - 1, generator=gen)[:3] + 1).values.expand(B, 3)
        cu_q = torch.cat([torch.zeros(B, 1, dtype=torch.long), cuts, torch.full((B, 1), Sq)], dim=1)
        return {"doc_ids": L.doc_ids_from_cu_seqlens(cu_q, Sq).to(device),
                "kv_doc_ids": L.doc_ids_from_cu_seqlens(cu_q * (S // Sq), S).to(device)}
    raise ValueError(name)


def query_len(opts: dict, S: int) -> int:
    """Sq of a mask's queries: S, or the decoder's length of a cross-attention mask."""
    return opts["doc_ids"].shape[1] if opts.get("kv_doc_ids") is not None else S


WINDOW = 1024


def bool_mask(opts: dict, B: int, S: int, device) -> torch.Tensor:
    return ref.attention_mask(B, query_len(opts, S), S, causal=opts.get("causal", False),
                              prefix_lens=opts.get("prefix_lens"), doc_ids=opts.get("doc_ids"),
                              kv_lens=opts.get("kv_lens"), window=opts.get("window"),
                              kv_doc_ids=opts.get("kv_doc_ids"), prefix_mask=opts.get("prefix_mask"), device=device)


def allowed_fraction(opts: dict, B: int, S: int, device) -> float:
    if set(opts) == {"causal"}:
        return (S + 1) / (2 * S)
    total = 0
    for b in range(B):  # one row at a time: S*S booleans
        sub = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}
        total += int(bool_mask(sub, 1, S, device).sum())
    return total / (B * query_len(opts, S) * S)


# ---- CPU ----
def _cpu_case(mname: str, quick: bool, count_flops: bool = True):
    gen = torch.Generator().manual_seed(0)
    B, H, S, D = (1, 2, 128, 32) if quick else (1, 8, 2048, 64)
    q, k, v = (torch.randn(B, H, S, D, generator=gen) for _ in range(3))
    opts = make_mask(mname, B, S, "cpu", gen)
    mask = bool_mask(opts, B, S, "cpu").unsqueeze(1)
    cands = {
        "lmobj.torch": lambda: L.attention(q, k, v, backend="torch", **opts),
        "sdpa+bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        # what a caller with only the mask metadata pays: the (B, S, S) mask built on each call, then SDPA
        "sdpa+mask_built_per_call": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=bool_mask(opts, B, S, "cpu").unsqueeze(1)),
        "reference": lambda: ref.attention(q, k, v, **opts)[0],
    }
    flops = 4 * B * H * S * S * D * allowed_fraction(opts, B, S, "cpu") if count_flops else 0.0
    return (B, H, S, D), cands, flops


def _peak_mem_mib(mname: str, name: str, quick: bool) -> float | None:
    """Peak resident memory growth (MiB) of one first call, measured in a fresh process (Linux /proc)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    # VmHWM (peak RSS of this address space) rather than ru_maxrss, which Linux carries over from the parent
    code = (f"import sys; sys.path.insert(0, {here!r}); import bench_attention as b; "
            f"_, c, _ = b._cpu_case({mname!r}, {quick!r}, False); "
            "hwm = lambda: int([x for x in open('/proc/self/status') if x.startswith('VmHWM')][0].split()[1]); "
            f"r0 = hwm(); c[{name!r}](); print((hwm() - r0) / 1024)")
    try:
        # a fixed glibc mmap threshold: freed blocks leave the resident set (as in bench_losses.py)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_cpu(quick: bool) -> list[dict]:
    masks = ["causal", "prefix"] if quick else ["causal", "prefix", "docs", "padding", "window"]
    rows = []
    for mname in masks:
        (B, H, S, D), cands, flops = _cpu_case(mname, quick)
        want = cands["reference"]()
        ok = {}
        for name, fn in cands.items():
            err = float((fn() - want).abs().max())
            if not err <= 1e-3:  # NaN fails too
                print(f"  {name} [{mname}] disagrees with the reference (max err {err:.3g}); not timed")
            else:
                ok[name] = fn
        # interleaved rounds (one call of each contender per round), median per contender: on a shared machine
        # the load drifts between one contender's repeats and the next's
        times = {name: [] for name in ok}
        for _ in range(3 if quick else 7):
            for name, fn in ok.items():
                times[name].append(time_cpu(fn, warmup=0, repeat=1))
        for name in ok:
            t = sorted(times[name])[len(times[name]) // 2]
            shape = f"{B}x{H}x{S}x{D} {mname}"
            rows.append({"bench": "attention_fwd", "backend": name, "shape": shape, "metric": "time",
                         "value": t * 1e3, "unit": "ms"})
            rows.append({"bench": "attention_fwd", "backend": name, "shape": shape, "metric": "gflops",
                         "value": flops / t / 1e9, "unit": "GFLOP/s"})
            mem = None if quick else _peak_mem_mib(mname, name, quick)
            if mem is not None:
                rows.append({"bench": "attention_fwd", "backend": name, "shape": shape, "metric": "peak_mem",
                             "value": mem, "unit": "MiB"})
    return rows


# ---- GPU ----
def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        names["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return names


def _flex(opts, B, H, S, device, slopes=None):
    """(attention fn, block-mask build time in s) of FlexAttention for this mask, or None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    prefix, docs, kvl, pm = opts.get("prefix_lens"), opts.get("doc_ids"), opts.get("kv_lens"), opts.get("prefix_mask")
    causal, window, cap = opts.get("causal", False), opts.get("window"), opts.get("softcap")
    kdocs = docs if opts.get("kv_doc_ids") is None else opts["kv_doc_ids"]

    def mask_mod(b, h, qi, kj):
        ok = kj >= 0
        if causal:
            c = kj <= qi
            if prefix is not None:
                c = c | (kj < prefix[b])
            if pm is not None:
                c = c | (pm[b, qi] & pm[b, kj])
            ok = ok & c
        if docs is not None:
            ok = ok & (docs[b, qi] == kdocs[b, kj])
        if kvl is not None:
            ok = ok & (kj < kvl[b])
        if window is not None and window[0] is not None:
            ok = ok & (kj >= qi - window[0])
        if window is not None and window[1] is not None:
            ok = ok & (kj <= qi + window[1])
        return ok

    build = lambda: create_block_mask(mask_mod, B, None, query_len(opts, S), S, device=device)  # noqa: E731
    block_mask = build()
    t_build = time_gpu(build)
    flex = torch.compile(flex_attention, dynamic=False)
    score_mod = None if cap is None else (lambda s, b, h, qi, kj: cap * torch.tanh(s / cap))
    if slopes is not None:  # ALiBi: -slope * |i - j|
        score_mod = lambda s, b, h, qi, kj: s - slopes[h] * (qi - kj).abs()  # noqa: E731
    return (lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)), t_build


def _varlen_cu(docs: torch.Tensor, keep_empty: bool = False) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32, longest document) of FlashAttention's varlen API for packed (B, S) doc ids: the documents
    of every row in order. keep_empty keeps documents of length 0, so that the queries' and the keys' documents of
    a cross attention pair up one to one."""
    lens = torch.stack([torch.bincount(d, minlength=int(docs.max()) + 1) for d in docs.long()]).flatten()
    if not keep_empty:
        lens = lens[lens > 0]
    return torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)), int(lens.max())


def _flash_attn(opts, B, S, slopes=None):
    """fn(q, k, v, dropout_p) of FlashAttention for this mask, or None (no prefix-LM; padding unwired)."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    if set(opts) == {"causal"}:
        return lambda q, k, v, p: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  dropout_p=p, causal=True, alibi_slopes=slopes).transpose(1, 2)
    if slopes is not None:
        return None
    if set(opts) == {"causal", "softcap"}:
        cap = opts["softcap"]
        return lambda q, k, v, p: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  dropout_p=p, causal=True, softcap=cap).transpose(1, 2)
    if set(opts) == {"causal", "window"}:
        left = opts["window"][0]
        return lambda q, k, v, p: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  dropout_p=p, causal=True, window_size=(left, 0)).transpose(1, 2)
    if set(opts) == {"causal", "doc_ids"}:
        cu, mx = _varlen_cu(opts["doc_ids"])

        def fn(q, k, v, p):
            Bq, Hq, Sq, D = q.shape
            flat = lambda t: t.transpose(1, 2).reshape(Bq * Sq, t.shape[1], D)  # noqa: E731
            o = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, mx, mx, dropout_p=p, causal=True)
            return o.reshape(Bq, Sq, Hq, D).transpose(1, 2)
        return fn
    if set(opts) == {"doc_ids", "kv_doc_ids"}:  # packed cross attention: varlen with cu_seqlens_q / cu_seqlens_k
        (cu_q, mx_q), (cu_k, mx_k) = (_varlen_cu(opts[n], keep_empty=True) for n in ("doc_ids", "kv_doc_ids"))

        def fn_cross(q, k, v, p):
            Bq, Hq, Sq, D = q.shape
            flat = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], D)  # noqa: E731
            o = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_q, cu_k, mx_q, mx_k, dropout_p=p)
            return o.reshape(Bq, Sq, Hq, D).transpose(1, 2)
        return fn_cross
    return None  # FlashAttention has no prefix-LM mask


def _time_fwd_bwd(fn, q, k, v, do) -> tuple[float, float]:
    t_f = time_gpu(lambda: fn(q, k, v))
    t_fb = time_gpu(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return t_f, t_fb


def run_gpu(full: bool) -> list[dict]:
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    if full:
        configs = [(d, s, m) for d in (64, 128) for s in (1024, 2048, 4096, 8192, 16384)
                   for m in ("causal", "prefix", "docs", "padding", "window", "softcap", "dropout", "alibi",
                             "cross_docs", "prefix_docs")]
    else:
        # most important first (gpu_check may cut the tail): the 8k masks at D=128, then D=64 and a short sequence
        configs = [(128, 8192, m) for m in ("causal", "prefix", "docs")] + [(64, 8192, "causal"), (128, 2048, "causal")]
        configs += [(128, 8192, "window"), (128, 8192, "softcap"), (64, 512, "dropout"), (128, 8192, "alibi"),
                    (128, 8192, "cross_docs"), (128, 8192, "prefix_docs")]
    rows = []
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one graph per mask
    sdpa = _sdpa_backends()
    from torch.nn.attention import sdpa_kernel

    for D, S, mname in configs:
        H = 2048 // D  # model width 2048
        B = max(1, 16384 // S)  # 16k tokens per batch: fills an H100
        opts = make_mask(mname, B, S, dev, gen)
        drop = opts.pop("dropout_p", 0.0)
        slopes = L.alibi_slopes(H, device=dev) if "alibi_slopes" in opts else None
        opts.pop("alibi_slopes", None)
        Sq = query_len(opts, S)  # cross attention: fewer queries (a decoder) than keys (its encoder)
        frac = allowed_fraction(opts, B, S, dev)
        fl = 4 * B * H * Sq * S * D * frac
        shape = f"{B}x{H}x{S}x{D} {mname}" + (f" (Sq {Sq})" if Sq != S else "")
        q = torch.randn(B, H, Sq, D, generator=gen).to(dev, dtype).requires_grad_()
        k, v = (torch.randn(B, H, S, D, generator=gen).to(dev, dtype).requires_grad_() for _ in range(2))
        do = torch.randn(B, H, Sq, D, generator=gen).to(dev, dtype)
        mask = None if mname in ("causal", "softcap") else bool_mask(opts, B, S, dev).unsqueeze(1)
        if slopes is not None:  # SDPA takes ALiBi as a materialised float mask (1, H, S, S)
            bias = ref.alibi_bias(slopes, 1, H, S, S, device=dev).to(dtype)  # float32 distances, then cast
            mask = torch.where(bool_mask(opts, 1, S, dev).unsqueeze(1), bias,
                               torch.tensor(-float("inf"), dtype=dtype, device=dev))
            bias = None
        # every contender takes the dropout probability p: 0 for the check, `drop` for the timing
        cands = {"lmobj.triton": lambda q, k, v, p, o=opts, sl=slopes: L.attention(
            q, k, v, backend="triton", dropout_p=p, alibi_slopes=sl, **o)}
        for name, be in (sdpa.items() if "softcap" not in opts else ()):  # SDPA has no softcap
            def f(q, k, v, p, be=be, m=mask):
                with sdpa_kernel(be):
                    if m is None:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p)
            cands[f"sdpa.{name}"] = f
        # each mask compiles (~30 s): in the short run only the masks FlashAttention cannot express
        flex_masks = ("prefix", "docs", "window", "softcap", "alibi", "cross_docs", "prefix_docs")
        flex = _flex(opts, B, H, S, dev, slopes) if not drop and (full or (S >= 8192 and mname in flex_masks)) \
            else None
        if flex is not None:
            cands["flex"] = lambda q, k, v, p, fn=flex[0]: fn(q, k, v)
            rows.append({"bench": "attention_block_mask", "backend": "flex", "shape": shape, "metric": "time",
                         "value": flex[1] * 1e3, "unit": "ms"})
        fa = _flash_attn(opts, B, S, slopes)
        if fa is not None:
            cands["flash_attn"] = fa
        want = None
        for name, fn_p in cands.items():
            fn = lambda q, k, v, fn_p=fn_p, drop=drop: fn_p(q, k, v, drop)  # noqa: E731
            try:
                out = fn_p(q, k, v, 0.0)
            except Exception as e:  # a backend that refuses this mask / dtype / size
                print(f"  {name} [{shape}]: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                continue
            if want is None:
                want = out.detach().float()
            else:
                err = float((out.detach().float() - want).abs().max())
                if not err < 0.05:  # empty rows: NaN in SDPA only when a row has no key (not the case here)
                    print(f"  {name} [{shape}] disagrees with lmobj.triton (max err {err:.3g}); not timed")
                    continue
            try:
                t_f, t_fb = _time_fwd_bwd(fn, q, k, v, do)
            except Exception as e:  # e.g. an SDPA kernel that takes the mask but not dropout
                print(f"  {name} [{shape}] with dropout {drop}: n/a ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:80]})")
                continue
            print(f"  {shape:28s} {name:16s} fwd {fl / t_f / 1e12:7.1f} TFLOP/s ({t_f * 1e3:.3f} ms)  "
                  f"fwd+bwd {fl * 3.5 / t_fb / 1e12:7.1f} TFLOP/s ({t_fb * 1e3:.3f} ms)", flush=True)
            for bench, t, mult in (("attention_fwd", t_f, 1.0), ("attention_fwd_bwd", t_fb, 3.5)):
                rows.append({"bench": bench, "backend": name, "shape": shape, "metric": "tflops",
                             "value": fl * mult / t / 1e12, "unit": "TFLOP/s"})
                rows.append({"bench": bench, "backend": name, "shape": shape, "metric": "time",
                             "value": t * 1e3, "unit": "ms"})
        q = k = v = do = mask = out = want = None
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny CPU run (seconds)")
    ap.add_argument("--gpu", action="store_true", help="GPU run (needs CUDA)")
    ap.add_argument("--full", action="store_true", help="with --gpu: every head dim, length and mask")
    ap.add_argument("--out", default=os.environ.get("LMOBJ_RESULTS_DIR"), help="folder for the JSON results")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        print("--gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = run_gpu(args.full) if args.gpu else run_cpu(args.quick)
    print(f"attention benchmark on {machine()}")
    print(table(rows, ["bench", "backend", "shape", "metric", "value", "unit"]))
    path = write_results("attention-quick" if args.quick else "attention", rows, where=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
