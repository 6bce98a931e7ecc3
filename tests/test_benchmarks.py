"""Smoke tests: the loss, trainer and attention-tuning benchmark scripts run at tiny sizes and write their result
files (the attention and corruption benchmarks have theirs beside their tests); the pytest-benchmark CPU
micro-benchmarks run once each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.mark.parametrize("name", ["losses", "train", "attention_tune"])
def test_bench_quick(name, tmp_path):
    res = subprocess.run([sys.executable, os.path.join(BENCH, f"bench_{name}.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    files = list(tmp_path.glob(f"{name}-quick-*.json"))
    assert len(files) == 1, res.stdout[-2000:]
    rows = json.load(open(files[0]))["rows"]
    assert rows and all(r["value"] > 0 for r in rows if r["metric"] != "peak_mem")  # times, throughputs
    assert all(r["value"] >= 0 for r in rows if r["metric"] == "peak_mem")  # growth of max RSS: 0 at tiny sizes


def test_micro_cpu_benchmarks_run():
    """benchmarks/micro_cpu.py (pytest-benchmark) runs: every benchmark once, timing disabled."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          os.path.join(BENCH, "micro_cpu.py")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "passed" in res.stdout


def test_a_benchmark_cut_by_its_time_cap_keeps_its_figures(tmp_path):
    """gpu_check.sh stops each stage with `timeout` (SIGTERM): the rows measured so far are written as
    <name>-partial (the GPU loss and train benchmarks wrote their results only at the end, so a cut lost them)."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import common\n"
            "rows = []\n"
            "common.write_on_term('bench', rows, sys.argv[2])\n"
            "rows.append({'bench': 'b', 'backend': 'x', 'shape': 's', 'metric': 'time', 'value': 1.5, 'unit': 'ms'})\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, BENCH, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.terminate()
    assert p.wait(timeout=30) == 124
    files = list(tmp_path.glob("bench-partial-*.json"))
    assert len(files) == 1 and json.load(open(files[0]))["rows"][0]["value"] == 1.5
