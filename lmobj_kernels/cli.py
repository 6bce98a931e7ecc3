"""The `lmobj` command: `lmobj train` (GPT, BERT and T5 side by side), `lmobj verify` (every op against the
reference), `lmobj bench` (the benchmark scripts), `lmobj info` (build info)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def cmd_verify(args) -> int:
    if args.triton_interpret and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when a kernel module is imported, and importing lmobj_kernels (to get here)
        # may already have imported some: start again with it set
        os.execve(sys.executable, [sys.executable, "-m", "lmobj_kernels.cli", *args.argv],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    from lmobj_kernels import verify

    rows = verify.run(args.device, args.family or None)
    print(_table([{**r, "ok": "PASS" if r["ok"] else "FAIL"} for r in rows],
                 ["op", "backend", "dtype", "shape", "max_err", "bound", "ok"]))
    failed = sum(not r["ok"] for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _bench_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("LMOBJ_BENCH_DIR", os.path.join(here, "benchmarks"))


def cmd_bench(args) -> int:
    scripts = sorted(glob.glob(os.path.join(_bench_dir(), "bench_*.py")))
    if not scripts:
        print(f"no benchmark scripts under {_bench_dir()} (they ship with the source tree)", file=sys.stderr)
        return 1
    names = [os.path.basename(s)[len("bench_"):-3] for s in scripts]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        print(f"lmobj bench: --only {', '.join(unknown)}: no such benchmark (there are {', '.join(names)})",
              file=sys.stderr)
        return 2
    rc = 0
    for s, name in zip(scripts, names):
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, s] + (["--quick"] if args.quick else []) + (["--gpu"] if args.gpu else [])
        print(f"\n== {' '.join(cmd[1:])}", flush=True)
        rc |= subprocess.call(cmd)
    return rc


def cmd_info(args) -> int:
    from lmobj_kernels import build_info

    print(json.dumps(build_info(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="lmobj", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    from lmobj_kernels.train import loop

    t = sub.add_parser("train", help="train GPT, BERT and T5 side by side on a small corpus",
                       description=loop.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loop.add_args(t)
    t.set_defaults(fn=lambda a: loop.run(a, t))
    v = sub.add_parser("verify", help="check every op on every available backend against the reference")
    v.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    from lmobj_kernels.verify import FAMILIES

    v.add_argument("--family", action="append", choices=FAMILIES, help="only this family (repeatable)")
    v.add_argument("--triton-interpret", action="store_true",
                   help="also run the Triton kernels on the CPU through Triton's interpreter (slow; small sizes)")
    v.set_defaults(fn=cmd_verify)
    b = sub.add_parser("bench", help="run the benchmark scripts (benchmarks/bench_*.py)")
    b.add_argument("--quick", action="store_true", help="small sizes, a few seconds each")
    b.add_argument("--gpu", action="store_true", help="GPU sizes and peers")
    b.add_argument("--only", action="append", help="only this benchmark, e.g. losses (repeatable)")
    b.set_defaults(fn=cmd_bench)
    i = sub.add_parser("info", help="build info and backend availability")
    i.set_defaults(fn=cmd_info)
    args = p.parse_args(argv)
    args.argv = argv
    if args.cmd == "verify" and args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA GPU is visible")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
