"""Shared pieces of the benchmark scripts: timing, memory, tables, and the JSON result file of DESIGN.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    m = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        m["triton"] = triton.__version__
    except ImportError:
        m["triton"] = None
    if torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name()
    else:
        m["cpu"] = platform.processor() or platform.machine()
        m["cores"] = os.cpu_count()
    return m


def commit() -> str:
    """The commit measured: LMOBJ_COMMIT when set (a copy of the tree without its history, as a GPU machine
    gets), else git's HEAD."""
    if os.environ.get("LMOBJ_COMMIT"):
        return os.environ["LMOBJ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--verify", "-q", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_cpu(fn, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time in seconds of fn() on the CPU."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def time_cpu_interleaved(fns: dict, rounds: int = 10, repeat: int = 3) -> dict:
    """Median wall time in seconds of each fn() on the CPU, measured in alternating rounds of `repeat` calls each,
    so that a change of load on a shared machine falls on every contender alike (ratios from back-to-back blocks
    of one contender, then the other, moved by 2x between runs here)."""
    samples: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in samples.items()}


def time_gpu(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time in seconds of fn() on the GPU (triton.testing.do_bench: CUDA events, cache flushed)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table(rows: list[dict], cols: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(x) for x in cells])


def write_on_term(name: str, rows: list[dict], where: str | None = None) -> None:
    """If the run is stopped by SIGTERM (gpu_check's per-stage `timeout`), write the rows measured so far (the list
    the benchmark fills as cases finish) as <name>-partial, then exit 124: a cut run keeps its figures."""
    def handler(signum, frame):
        if rows:
            print("\ncut: wrote", write_results(name + "-partial", rows, where), flush=True)
        sys.exit(124)

    signal.signal(signal.SIGTERM, handler)


def write_results(name: str, rows: list[dict], where: str | None = None) -> str:
    """benchmarks/results/<name>-<machine>-<date>.json with rows {bench, backend, shape, metric, value, unit}."""
    where = where or RESULTS
    os.makedirs(where, exist_ok=True)
    # "NVIDIA H100 80GB HBM3" -> H100 (the model, not the memory's name)
    model = next((w for w in torch.cuda.get_device_name().split() if any(c.isdigit() for c in w)), "gpu") \
        if torch.cuda.is_available() else ""
    kind = "gpu-" + model.replace("/", "_") if torch.cuda.is_available() else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    date = now.date().isoformat()
    path = os.path.join(where, f"{name}-{kind}-{date}.json")
    if os.path.exists(path):  # a later run the same day keeps the earlier ones
        path = path.replace(".json", f"-{now:%H%M%S}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), "commit": commit(), "date": date, "rows": rows}, f, indent=1)
    return path
