"""The trainer: a tiny run of each objective, bit-exact resume, DDP equals single-process, bad arguments."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lmobj_kernels import cli
from lmobj_kernels.train import kernels
from lmobj_kernels.train.data import ByteTokenizer

TINY = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--d-model", "32", "--n-layer", "1", "--n-head", "2",
        "--eval-every", "2", "--eval-batches", "1", "--quiet"]


def train(*argv: str) -> int:
    return cli.main(["train", *TINY, *argv])


def params(run_dir, name: str) -> dict:
    return torch.load(os.path.join(run_dir, f"ckpt_{name}.pt"), weights_only=True)


@pytest.mark.parametrize("objective", ["clm", "mlm", "t5"])
def test_tiny_run(objective, tmp_path, capsys):
    assert train("--objective", objective, "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    val = [r for r in recs if r["kind"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert val[-1]["loss"] < val[0]["loss"]
    assert len([r for r in recs if r["kind"] == "train"]) == 4
    assert "comparison" in out and "validation loss drop" in out and str(tmp_path) in out
    for f in ("samples.txt", "summary.json", "args.json", f"ckpt_{objective}.pt"):
        assert (tmp_path / f).is_file(), f
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000


def test_baseline_learns_the_same(tmp_path):
    """--baseline (SDPA, F.cross_entropy over logits, corruption on the CPU) trains the same models to the same
    losses."""
    for mode in ("lib", "base"):
        assert train("--objective", "all", "--out", str(tmp_path / mode), "--no-demo",
                     *(["--baseline"] if mode == "base" else [])) == 0
    val = {m: [(r["objective"], r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / m / "metrics.jsonl"))
               if r["kind"] == "val"] for m in ("lib", "base")}
    assert [v[:2] for v in val["lib"]] == [v[:2] for v in val["base"]]
    torch.testing.assert_close([v[2] for v in val["lib"]], [v[2] for v in val["base"]], rtol=1e-4, atol=1e-5)
    kernels.use_baseline(False)
    assert kernels.SOURCE["losses"].startswith("lmobj_kernels")


@pytest.mark.parametrize("objective", ["clm", "mlm", "t5"])
def test_resume_is_bit_exact(objective, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train("--objective", objective, "--out", str(whole), "--steps", "5", "--no-demo") == 0
    assert train("--objective", objective, "--out", str(parts), "--steps", "5", "--stop-after", "3") == 0
    assert params(parts, objective)["state"]["step"] == 3
    with pytest.raises(SystemExit):  # the same --out again without --resume
        train("--objective", objective, "--out", str(parts))
    assert cli.main(["train", "--resume", str(parts), "--quiet", "--no-demo"]) == 0
    a, b = params(whole, objective), params(parts, objective)
    assert b["state"]["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["opt"]["state"].items():
        for k in s:
            assert torch.equal(s[k], b["opt"]["state"][i][k]), (i, k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    args = [*TINY, "--objective", "all", "--batch-size", "6", "--steps", "3", "--eval-every", "3", "--no-demo"]
    assert cli.main(["train", *args, "--out", str(tmp_path / "single")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "lmobj_kernels.train", *args, "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "x2" in r.stdout  # "... on cpu x2"
    for name in ("clm", "mlm", "t5"):
        a, b = params(tmp_path / "single", name), params(tmp_path / "ddp", name)
        assert b["state"]["step"] == 3
        for k in a["model"]:
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


@pytest.mark.parametrize("argv, message", [
    (["--objective", "gpt5"], "invalid choice: 'gpt5'"),
    (["--data", "/no/such/corpus.txt"], "--data /no/such/corpus.txt: no such file or folder"),
    (["--batch-size", "64", "--seq-len", "64"], "is larger than the data"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--d-model", "30", "--n-head", "4"], "not a multiple of --n-head"),
    (["--d-model", "12", "--n-head", "4"], "must be even"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--warmup", "-5"], "--warmup must be >= 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["--stop-after", "-2"], "--stop-after must be at least 1"),
    (["--data", "EMPTY"], "no text in it"),
])
def test_cli_rejects_bad_arguments(argv, message, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("A tiny corpus. " * 200)  # 3000 bytes
    (tmp_path / "empty.txt").write_text("")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in argv]
    if "--data" not in argv:
        argv = [*argv, "--data", str(small)]
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_options_that_differ(tmp_path, capsys):
    """--resume takes what to train from the run: an option given with another value is an error, not dropped."""
    run = tmp_path / "run"
    assert train("--objective", "clm", "--out", str(run), "--steps", "3", "--stop-after", "2", "--no-demo") == 0
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--resume", str(run), "--steps", "10", "--quiet"])
    assert e.value.code == 2 and "--steps 10 (the run has 3)" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        train("--out", str(tmp_path / "file"))
    assert "is a file" in capsys.readouterr().err


def test_t5_demo_at_the_shortest_window(tmp_path):
    """The greedy decoding of the end-of-run demo stays within the model's positions at --seq-len 8."""
    assert train("--objective", "t5", "--seq-len", "8", "--steps", "2", "--out", str(tmp_path)) == 0
    assert (tmp_path / "summary.json").is_file()


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "lmobj_kernels.train", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--objective" in r.stdout and "torchrun" in r.stdout


def test_t5_corruption_invariants():
    """Whichever span_corrupt is in use: ALGORITHMS.md's lengths, and inputs + targets rebuild the row."""
    tok = ByteTokenizer()
    ids = tok.encode("The quick brown fox jumps over the lazy dog, again and again and again!" * 2)[:128]
    rows = torch.stack([ids, ids.roll(5)])
    b = kernels.t5_corrupt(rows, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           decoder_start_id=tok.bos_id, seed=3)
    n, k = 19, 6  # round(128 * 0.15), round(19 / 3)
    assert b.input_lens.tolist() == [128 - n + k + 1] * 2
    assert ((b.labels != -100).sum(1) == n + k + 1).all()
    assert (b.decoder_input_ids[:, 0] == tok.bos_id).all()
    assert torch.equal(b.decoder_input_ids[:, 1:], b.labels[:, :-1])
    for r in range(2):
        spans, cur = {}, None
        for t in b.labels[r].tolist():
            if tok.is_sentinel(t):
                cur = spans.setdefault(t, [])
            elif t != tok.eos_id:
                cur.append(t)
        assert list(spans) == [tok.sentinel(i) for i in range(k)]
        rebuilt = []
        for t in b.input_ids[r, : int(b.input_lens[r]) - 1].tolist():
            rebuilt += spans[t] if tok.is_sentinel(t) else [t]
        assert rebuilt == rows[r].tolist()


def test_mlm_corruption_split():
    tok = ByteTokenizer()
    ids = torch.randint(tok.offset, tok.offset + 256, (64, 256), generator=torch.Generator().manual_seed(0))
    inputs, labels = kernels.mlm_corrupt(ids, mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=(),
                                         seed=1)
    sel = labels != -100
    assert torch.equal(labels[sel], ids[sel]) and torch.equal(inputs[~sel], ids[~sel])
    assert abs(sel.float().mean().item() - 0.15) < 0.01
    masked = (inputs[sel] == tok.mask_id).float().mean().item()
    kept = (inputs[sel] == ids[sel]).float().mean().item()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.03  # random ids may equal the original (~0.3%)


@pytest.mark.gpu
def test_gpu_library_and_baseline_learn_the_same(tmp_path):
    """On the GPU in bf16 (autocast): every objective trains with the library's kernels (Triton attention, CUDA
    losses, on-device corruption) and with the PyTorch baseline, to losses that fall and agree within bf16 noise."""
    gpu = ["--device", "cuda", "--dtype", "bf16", "--steps", "20", "--eval-every", "10"]
    for mode in ("lib", "base"):
        assert train("--objective", "all", "--out", str(tmp_path / mode), "--no-demo", *gpu,
                     *(["--baseline"] if mode == "base" else [])) == 0
    val = {m: [(r["objective"], r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / m / "metrics.jsonl"))
               if r["kind"] == "val"] for m in ("lib", "base")}
    assert [v[:2] for v in val["lib"]] == [v[:2] for v in val["base"]]
    for objective in ("clm", "mlm", "t5"):
        lib = [v[2] for v in val["lib"] if v[0] == objective]
        base = [v[2] for v in val["base"] if v[0] == objective]
        assert all(torch.isfinite(torch.tensor(lib))) and lib[-1] < lib[0], (objective, lib)
        assert abs(lib[-1] - base[-1]) <= 0.05 * base[-1], (objective, lib, base)
    kernels.use_baseline(False)
