"""Trainer throughput: tokens/s of each objective with the library's kernels against the same model built from
PyTorch's own pieces (`lmobj train --baseline`: SDPA, F.cross_entropy over materialised logits, corruption on the
CPU), each in a fresh process, same seed and batches. Tokens/s counts the steps after the first three (those compile
kernels; `--timing-skip`).

  python benchmarks/bench_train.py            # CPU, small model (a few minutes)
  python benchmarks/bench_train.py --quick    # seconds (smoke test)
  python benchmarks/bench_train.py --gpu      # GPU: a larger model in bf16 (run by gpu_check.sh)
  python benchmarks/bench_train.py --gpu --dropout 0.1   # with BERT's and T5's dropout (fused vs SDPA's)
  python benchmarks/bench_train.py --gpu --doc-mask       # packed documents (doc_ids vs SDPA's boolean mask)
  python benchmarks/bench_train.py --gpu --objectives prefix   # the prefix LM (prefix_lens vs SDPA's mask)
Prints a table and writes benchmarks/results/train-<machine>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SIZES = {
    "quick": ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--d-model", "32", "--n-layer", "1"],
    "cpu": ["--steps", "30", "--batch-size", "16", "--seq-len", "128"],
    "gpu": ["--steps", "30", "--batch-size", "64", "--seq-len", "512", "--d-model", "512", "--n-layer", "4",
            "--n-head", "8", "--device", "cuda", "--dtype", "bf16", "--eval-batches", "1"],
}


def run(objective: str, baseline: bool, size: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "lmobj_kernels.train", "--objective", objective, "--no-demo", "--quiet",
               "--eval-every", "1000000", "--out", os.path.join(out, "run"), *size] + (["--baseline"] if baseline
                                                                                     else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        with open(os.path.join(out, "run", "summary.json")) as f:
            return json.load(f)[objective]["tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default=common.RESULTS)
    p.add_argument("--dropout", type=float, default=0.0,
                   help="train with this dropout (0.1: BERT's and T5's recipe; the baseline uses SDPA's own)")
    p.add_argument("--doc-mask", action="store_true",
                   help="packed documents with attention masked per document (the baseline: SDPA with that mask)")
    p.add_argument("--objectives", default="clm,mlm,t5", help="comma-separated objectives (of lmobj train's)")
    a = p.parse_args()
    size = list(SIZES["quick" if a.quick else ("gpu" if a.gpu else "cpu")])
    size += (["--dropout", str(a.dropout)] if a.dropout else []) + (["--doc-mask"] if a.doc_mask else [])
    rows, table = [], []
    common.write_on_term("train-quick" if a.quick else "train", rows, a.out)
    for objective in a.objectives.split(","):
        ours, base = run(objective, False, size), run(objective, True, size)
        shape = " ".join(size)
        for backend, v in (("lmobj kernels", ours), ("baseline (PyTorch pieces)", base)):
            rows.append({"bench": f"train_{objective}", "backend": backend, "shape": shape, "metric": "throughput",
                         "value": v, "unit": "tokens/s"})
        table.append({"objective": objective, "lmobj tokens/s": ours, "baseline tokens/s": base,
                      "ratio": ours / base})
        print(f"  {objective}: lmobj {ours:.0f} tokens/s, baseline {base:.0f} tokens/s", flush=True)
    print(common.table(table, ["objective", "lmobj tokens/s", "baseline tokens/s", "ratio"]))
    print("wrote", common.write_results("train-quick" if a.quick else "train", rows, a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
