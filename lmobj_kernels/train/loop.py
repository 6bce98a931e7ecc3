"""Train GPT (causal LM), BERT (masked LM) and T5 (span corruption) side by side, then show what each learned.

    lmobj train --objective all                      # CPU, a few minutes, the default corpus
    python -m lmobj_kernels.train --objective t5 --data my_texts/
    torchrun --nproc-per-node 2 -m lmobj_kernels.train --objective clm

Reads top to bottom: arguments, distributed set-up, one objective's training loop (evaluate, checkpoint, resume),
the end-of-run demos, the comparison table and the plot. Every step's windows and corruption are a function of
(seed, step) only, so a resumed run continues bit-exactly and every rank can build the same global batch; dropout's
draws are a function of (seed, step, rank), so resume stays exact with dropout too.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lmobj_kernels.attention import MAX_HEAD_DIM
from lmobj_kernels.train import kernels
from lmobj_kernels.train.data import ByteTokenizer, Corpus
from lmobj_kernels.train.models import MODELS, ModelConfig
from lmobj_kernels.train.objectives import ALL, OBJECTIVES

# Saved with the run and restored by --resume, with their defaults; the other options are how to run, not what to
# train. Their argparse defaults are None, so that check_args can tell what was passed (and refuse, on --resume, a
# value that differs from the run's, even one that equals the default); check_args fills in the rest.
DEFAULTS = {"objective": "all", "data": None, "steps": 300, "batch_size": 16, "seq_len": 128, "d_model": 128,
            "n_layer": 2, "n_head": 4, "dropout": 0.0, "lr": 1.5e-3, "warmup": 20, "weight_decay": 0.01,
            "grad_clip": 1.0, "eval_every": 50, "eval_batches": 4, "seed": 0, "dtype": "fp32", "mask_prob": 0.15,
            "noise_density": 0.15, "mean_span_length": 3.0, "doc_mask": False, "baseline": False}
RUN_KEYS = tuple(DEFAULTS)


# ---- arguments ----
def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_args(p: argparse.ArgumentParser) -> None:
    def run_arg(key: str, help: str = "", shown=None, **kw):  # noqa: A002 (argparse's name)
        d = DEFAULTS[key] if shown is None else shown
        p.add_argument(_flag(key), default=None, help=f"{help} (default: {d})".lstrip().replace("%", "%%"), **kw)

    run_arg("objective", "what to train", choices=[*OBJECTIVES, "all"])
    run_arg("data", "a text file or a folder of them (regular files; hidden files and folders are skipped)",
            shown="Python's own pydoc_data docs, ~465k chars", metavar="PATH")
    run_arg("steps", "optimizer steps per objective", type=int)
    run_arg("batch_size", "global batch (windows per step, all ranks)", type=int)
    run_arg("seq_len", "tokens (bytes) per window", type=int)
    run_arg("d_model", type=int)
    run_arg("n_layer", "layers (T5: per encoder and per decoder)", type=int)
    run_arg("n_head", type=int)
    run_arg("dropout", "dropout of the attention weights, residual branches and embeddings, in [0, 1) (GPT-2, BERT "
            "and T5 trained with 0.1)", type=float)
    run_arg("lr", "peak learning rate (linear warm-up, cosine decay to a tenth)", type=float)
    run_arg("warmup", "warm-up steps", type=int)
    run_arg("weight_decay", type=float)
    run_arg("grad_clip", "gradient-norm clipping, a finite number >= 0; 0 = no clipping", type=float)
    run_arg("eval_every", "validate (and checkpoint) every this many steps", type=int)
    run_arg("eval_batches", "validation batches", type=int)
    p.add_argument("--timing-skip", type=int, default=3,
                   help="steps left out of the steady tokens/s (the first ones compile kernels) (default: %(default)s)")
    run_arg("mask_prob", "MLM: share of tokens to predict, in (0, 1)", type=float)
    run_arg("noise_density", "T5: share of tokens corrupted, in (0, 1)", type=float)
    run_arg("mean_span_length", "T5: mean corrupted span length, at least 1", type=float)
    run_arg("doc_mask", "packed documents: each document (a pydoc topic, a --data file) ends with EOS, and "
            "attention stays inside a document (the attention's doc_ids; T5: encoder, decoder and cross "
            "attention; the prefix LM: a prefix per document)", shown="off",
            action=argparse.BooleanOptionalAction)
    run_arg("seed", type=int)
    p.add_argument("--device", default="auto",
                   help="auto (cuda if there is a GPU, else cpu), cpu, cuda, cuda:N (default: %(default)s)")
    run_arg("dtype", "bf16: autocast", choices=["fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    run_arg("baseline", "the same models with PyTorch's own SDPA, F.cross_entropy and corruption on the CPU "
            "(to compare tokens/s)", shown="off", action=argparse.BooleanOptionalAction)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads per process (1: these models are small, and one thread is the fastest "
                        "on a shared machine; 0 = torch's choice) (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder, new or empty (default: runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR, in its folder, with its settings: every option but "
                        "--timing-skip, --device, --compile, --threads, --stop-after, --no-demo and --quiet comes "
                        "from the run "
                        "(one given here must equal the run's)")
    p.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                   help="stop each objective after this step, leaving a checkpoint (to resume later)")
    p.add_argument("--no-demo", action="store_true", help="skip the end-of-run samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _shown(key: str, v) -> str:
    if key in ("baseline", "doc_mask"):
        return _flag(key) if v else f"--no-{_flag(key)[2:]}"
    if key == "data" and v is None:
        return "--data (the default corpus)"
    return f"{_flag(key)} {v}"


def _run_value(key: str, v) -> str:
    if key in ("baseline", "doc_mask"):
        return _shown(key, v)
    return "the default corpus" if key == "data" and v is None else str(v)


def _check_device(spec: str, p: argparse.ArgumentParser) -> None:
    if spec in ("auto", "cpu"):
        return
    if spec.startswith("cpu:"):
        p.error(f"--device {spec}: the CPU takes no index; use --device cpu (and --threads for its threads)")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        p.error(f"--device {spec}: not a device the trainer runs on (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        p.error(f"--device {spec}: no CUDA GPU is visible")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        p.error(f"--device {spec}: there {'is 1 GPU' if n == 1 else f'are {n} GPUs'} (cuda:0 to cuda:{n - 1})")


def check_args(args, p: argparse.ArgumentParser) -> None:
    """Errors a user can fix, with a message that says how (argparse exits with status 2). Fills in the run
    settings (RUN_KEYS) that were not passed: from the run with --resume, else the defaults."""
    given = {k for k in RUN_KEYS if getattr(args, k, None) is not None}
    if args.data is not None:
        if not os.path.exists(args.data):
            p.error(f"--data {args.data}: no such file or folder")
        if not (os.path.isfile(args.data) or os.path.isdir(args.data)):
            p.error(f"--data {args.data}: not a regular file or a folder")
        args.data = os.path.abspath(args.data)  # saved with the run: --resume works from any folder
    if args.resume is not None:
        saved = os.path.join(args.resume, "args.json")
        if not os.path.isfile(saved):
            p.error(f"--resume {args.resume}: no args.json there (not a run folder written by `lmobj train`)")
        try:
            with open(saved) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as e:
            p.error(f"--resume {args.resume}: cannot read its args.json ({e})")
        # a key the run lacks was added later: the run trained with its default (e.g. --dropout 0, no --doc-mask)
        run = {k: loaded.get(k, DEFAULTS[k]) for k in RUN_KEYS}
        args.saved_environment = loaded.get("environment")
        args.earlier_environments = loaded.get("earlier_environments", [])
        # what to train comes from the run; an option given here that disagrees would be silently dropped
        def same(k, v):  # a run saved by an earlier version may hold --data as typed, relative
            if k == "data" and v is not None and getattr(args, k) is not None:
                return os.path.realpath(v) == os.path.realpath(getattr(args, k))
            return getattr(args, k) == v

        changed = [f"{_shown(k, getattr(args, k))} (the run has {_run_value(k, run[k])})"
                   for k in RUN_KEYS if k in given and k in run and not same(k, run[k])]
        if changed:
            p.error(f"--resume continues {args.resume} with its own settings, but these differ: {', '.join(changed)}"
                    "; drop them, or start a new run")
        vars(args).update(run)
        if args.out is not None and os.path.realpath(args.out) != os.path.realpath(args.resume):
            p.error(f"--resume {args.resume} continues the run in its own folder; drop --out {args.out} (or copy "
                    f"the run folder there and --resume {args.out})")
        args.out = args.resume
    elif args.out is not None and os.path.isdir(args.out) and os.listdir(args.out):
        p.error(f"--out {args.out} is not empty (it holds an earlier run's files?); continue that run with "
                f"--resume {args.out}, or pick another --out")
    for k in RUN_KEYS:
        if getattr(args, k, None) is None:
            setattr(args, k, DEFAULTS[k])
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file, not a folder")
    _check_device(args.device, p)
    if args.data is not None and not os.path.exists(args.data):  # the run's --data, on --resume
        p.error(f"--data {args.data}: no such file or folder")
    for name in ("steps", "batch_size", "seq_len", "d_model", "n_layer", "n_head", "eval_every", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"{_flag(name)} must be at least 1, got {getattr(args, name)}")
    if args.seq_len < 8:
        p.error(f"--seq-len must be at least 8, got {args.seq_len}")
    if args.d_model % args.n_head:
        p.error(f"--d-model {args.d_model} is not a multiple of --n-head {args.n_head}")
    if args.d_model // args.n_head > MAX_HEAD_DIM:
        p.error(f"--d-model / --n-head = {args.d_model // args.n_head} channels per head: the attention takes at "
                f"most {MAX_HEAD_DIM}; use more heads")
    if (args.d_model // args.n_head) % 2:  # rotary embeddings turn pairs of channels
        p.error(f"--d-model / --n-head = {args.d_model // args.n_head} channels per head must be even")
    if not 0 <= args.dropout < 1:  # also refuses nan
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a positive number, got {args.lr}")
    for name in ("warmup", "timing_skip"):
        if getattr(args, name) < 0:
            p.error(f"{_flag(name)} must be >= 0, got {getattr(args, name)}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        p.error(f"--grad-clip must be a finite number >= 0 (0 = no clipping), got {args.grad_clip}")
    if args.threads < 0:
        p.error(f"--threads must be at least 1 (or 0: torch's choice), got {args.threads}")
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be at least 1, got {args.stop_after}")
    for name in ("mask_prob", "noise_density"):
        v = getattr(args, name)
        if not 0 < v < 1:
            p.error(f"{_flag(name)} must be in (0, 1), got {v}")
    if float(np.float32(args.noise_density)) >= 1:  # the corruption computes in float32
        p.error(f"--noise-density {args.noise_density} is 1 in float32 (the corruption's arithmetic); use less")
    if not (math.isfinite(args.mean_span_length) and args.mean_span_length >= 1):
        p.error(f"--mean-span-length must be a finite number >= 1, got {args.mean_span_length}")
    if args.objective in ("t5", "all"):
        n_sentinels = ByteTokenizer.n_sentinels
        k = kernels.t5_span_count(args.seq_len, args.noise_density, args.mean_span_length)
        if k > n_sentinels:
            lengths = np.arange(1, min(args.seq_len, 1 << 20) + 1)
            fits = lengths[kernels.t5_span_count(lengths, args.noise_density, args.mean_span_length) <= n_sentinels]
            p.error(f"T5 windows of --seq-len {args.seq_len} with --noise-density {args.noise_density} and "
                    f"--mean-span-length {args.mean_span_length} get {k} noise spans, but the tokenizer has "
                    f"{n_sentinels} sentinels; use --seq-len {int(fits[-1])} or less, a lower --noise-density or a "
                    "longer --mean-span-length")
    world, local = _launch()
    if world > 1 and args.device.startswith("cuda") and ":" in args.device:
        p.error(f"--device {args.device}: under torchrun each process takes the GPU of its LOCAL_RANK; use "
                "--device cuda (or auto)")
    if world > 1 and args.device in ("auto", "cuda") and torch.cuda.is_available() and \
            local >= torch.cuda.device_count():
        p.error(f"this process (LOCAL_RANK {local}) has no GPU of its own: {torch.cuda.device_count()} are visible; "
                "start at most that many processes per machine")
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} must be a multiple of the number of processes ({world})")


def check_data(args, corpus: Corpus, p: argparse.ArgumentParser) -> None:
    need = args.batch_size * args.seq_len
    if len(corpus.train) < need:
        p.error(f"--batch-size {args.batch_size} x --seq-len {args.seq_len} = {need} tokens is larger than the "
                f"data: the training split of {corpus.source} has {len(corpus.train)} tokens (bytes). Use a smaller "
                "--batch-size or --seq-len, or more data")
    if len(corpus.val) < args.seq_len + 1:
        p.error(f"--seq-len {args.seq_len} is longer than the validation split ({len(corpus.val)} tokens, 10% of "
                f"{corpus.source}); use a smaller --seq-len or more data")


# ---- distributed set-up (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) ----
def _launch() -> tuple[int, int]:
    """(processes, this process's local rank) as torchrun's environment says; (1, 0) without it."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def setup(args) -> tuple[torch.device, int, int]:
    world, local = _launch()
    if args.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, (dist.get_rank() if world > 1 else 0), world


def out_dir(args, rank: int, world: int) -> str:
    path = [args.out]
    if path[0] is None and rank == 0:  # a new folder: two runs started in the same second get -2, -3, ...
        base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs("runs", exist_ok=True)
        for i in range(1, 1000):
            path[0] = base if i == 1 else f"{base}-{i}"
            try:  # claimed by creating it (an exists-then-create check could hand one folder to two runs)
                os.mkdir(path[0])
                break
            except FileExistsError:
                continue
    if world > 1:  # every rank writes to rank 0's folder
        dist.broadcast_object_list(path, src=0)
    if rank == 0:
        os.makedirs(path[0], exist_ok=True)
        with open(os.path.join(path[0], "args.json"), "w") as f:
            earlier = getattr(args, "earlier_environments", [])
            json.dump({k: getattr(args, k) for k in RUN_KEYS} | {"environment": args.environment}
                      | ({"earlier_environments": earlier} if earlier else {}), f, indent=1)
    return path[0]


def environment(args, device: torch.device, world: int) -> dict:
    """How this process trains, beyond the run's settings: floating-point results (so bit-exact resume) depend on
    it. Saved in args.json; --resume under another one continues, but says it is not bit-exact, and args.json then
    lists the earlier ones under "earlier_environments"."""
    return {"device": device.type, "threads": torch.get_num_threads(), "processes": world,
            "compile": bool(args.compile)}


# ---- logging ----
class Log:
    """Metrics as JSON lines (rank 0), and a one-line progress bar."""

    def __init__(self, path: str, rank: int, quiet: bool):
        self.path, self.on, self.quiet = path, rank == 0, quiet
        self.tty = sys.stdout.isatty()
        # the objective and step in progress and its last checkpoint, or {"demos": True} after training (Ctrl-C)
        self.where: dict = {}

    def drop_after(self, objective: str, step: int) -> None:
        """Forget `objective`'s records after `step` (those of a killed run past its checkpoint, which the resumed
        run writes again), and any line a kill cut short."""
        if not self.on or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("objective") != objective or rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def write(self, **rec) -> None:
        if self.on:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def say(self, msg: str = "") -> None:
        if self.on:
            print(("\r\033[K" if self.tty else "") + msg, flush=True)

    def bar(self, name, step, steps, loss, tps, eta) -> None:
        if not self.on or self.quiet or not self.tty:
            return
        done = int(24 * step / steps)
        print(f"\r\033[K[{name}] {step:>5}/{steps} |{'#' * done}{'.' * (24 - done)}| loss {loss:6.3f} | "
              f"{tps / 1e3:6.1f}k tok/s | ETA {_hms(eta)}", end="", flush=True)


def _hms(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---- one objective ----
def step_seed(seed: int, step: int, salt: int) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def build(obj_name: str, args, tok: ByteTokenizer, device: torch.device):
    torch.manual_seed(args.seed)
    cfg = ModelConfig(tok.vocab_size, args.seq_len + 2, args.n_layer, args.n_head, args.d_model, args.dropout)
    model = MODELS[OBJECTIVES[obj_name].model](cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    return model, opt


def autocast(args, device):
    if args.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, obj, val_batches, args, device) -> dict:
    model.eval()
    loss = n = correct = 0.0
    for batch in val_batches:
        with autocast(args, device):
            loss += float(model(batch, reduction="sum"))
            logits, target = model.logits(batch)
        keep = target != -100
        correct += float((logits.argmax(-1) == target)[keep].sum())
        n += float(keep.sum())
    model.train()
    out = {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "targets": int(n)}
    if obj.shift:  # next-token objectives (the prefix LM's: of the continuations)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def train_objective(name: str, args, corpus: Corpus, tok: ByteTokenizer, device, rank: int, world: int,
                    run_dir: str, log: Log):
    """Train one objective to args.steps (or --stop-after); returns the model and its summary."""
    obj = OBJECTIVES[name]
    log.where = {"objective": name, "step": 0, "steps": args.steps, "saved": None}  # refined once loaded
    opts = {"mask_prob": args.mask_prob, "noise_density": args.noise_density,
            "mean_span_length": args.mean_span_length, "doc_mask": args.doc_mask}
    model, opt = build(name, args, tok, device)
    state = {"step": 0, "start_val": None, "val": None, "train_time": 0.0, "tokens": 0, "steady_time": 0.0,
             "steady_tokens": 0}
    ckpt = os.path.join(run_dir, f"ckpt_{name}.pt")
    if args.resume is not None and os.path.exists(ckpt):
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log.say(f"[{name}] resumed from {ckpt} at step {state['step']}")
        if args.stop_after is not None and args.stop_after < state["step"]:
            log.say(f"[{name}] note: --stop-after {args.stop_after} is before this checkpoint's step "
                    f"{state['step']}: nothing to train")
    if args.resume is not None:  # records past the checkpoint (all of them without one) are written again
        log.drop_after(name, state["step"] if os.path.exists(ckpt) else -1)
    log.where = {"objective": name, "step": state["step"], "steps": args.steps,
                 "saved": state["step"] if os.path.exists(ckpt) else None}
    net = model
    if world > 1:
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)

    def make(split, step, batch_size, salt):
        rows = corpus.windows(split, batch_size, args.seq_len, step_seed(args.seed, step, salt))
        if args.baseline:  # a CPU collator, then the copy
            return {k: v.to(device) for k, v in obj.corrupt(rows, tok, step_seed(args.seed, step, salt + 1),
                                                            opts).items()}
        return obj.corrupt(rows.to(device), tok, step_seed(args.seed, step, salt + 1), opts)

    val_batches = [make("val", i, args.batch_size, 101) for i in range(args.eval_batches)]

    def save():
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt + ".tmp")
            os.replace(ckpt + ".tmp", ckpt)
        log.where["saved"] = state["step"]
        if world > 1:
            dist.barrier()

    def eval_and_log():
        ev = evaluate(model, obj, val_batches, args, device)
        state["val"] = ev
        if state["start_val"] is None:
            state["start_val"] = ev["loss"]
        log.write(objective=name, kind="val", step=state["step"], **ev)
        extra = f"ppl {ev['perplexity']:.2f}" if "perplexity" in ev else f"accuracy {ev['accuracy']:.1%}"
        if not ev["targets"]:
            extra = "(no targets in the validation batches: raise --mask-prob, --batch-size or --seq-len)"
        pace = f"  | {speed[0] / 1e3:.1f}k tok/s, ETA {_hms(speed[1])}" if speed else ""
        log.say(f"[{name}] step {state['step']:>5}  val loss {ev['loss']:.3f}  {extra}{pace}")

    speed = []  # (tokens/s, ETA seconds) of the latest step
    n_params = sum(p.numel() for p in model.parameters())
    if state["step"] == 0:
        log.say(f"== {obj.title}: {type(model).__name__}, {n_params / 1e6:.2f}M parameters, {args.steps} steps of "
                f"{args.batch_size} x {args.seq_len} tokens")
        eval_and_log()
    lo, hi = rank * args.batch_size // world, (rank + 1) * args.batch_size // world
    stop = min(args.steps, args.stop_after) if args.stop_after is not None else args.steps
    t_start, tok_start = time.perf_counter(), state["tokens"]
    first = state["step"]  # the first --timing-skip steps of this process compile and warm up, resumed or not
    while state["step"] < stop:
        step = state["step"]
        t_step = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = make("train", step, args.batch_size, 0)  # the global batch, the same on every rank
        # dropout draws from the default generators: a function of (seed, step, rank) too, so resume stays exact
        torch.manual_seed(step_seed(args.seed, step, 1000 + rank))
        n_global = obj.n_targets(batch)
        mine = {k: v[lo:hi] for k, v in batch.items()}
        with autocast(args, device):
            loss_sum = net(mine, reduction="sum")
        # Each rank's sum over the global count (times world: DDP averages gradients), so the update equals
        # single-process training on the global batch.
        (loss_sum * (world / max(n_global, 1))).backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total = loss_sum.detach().float()
        if world > 1:
            dist.all_reduce(total)
        state["step"] = log.where["step"] = step + 1
        state["tokens"] += args.batch_size * args.seq_len
        train_loss = float(total) / max(n_global, 1)  # reads the loss: the step has finished on the device
        if step - first >= args.timing_skip:
            state["steady_time"] += time.perf_counter() - t_step
            state["steady_tokens"] += args.batch_size * args.seq_len
        elapsed = time.perf_counter() - t_start
        tps = (state["tokens"] - tok_start) / max(elapsed, 1e-9)
        log.write(objective=name, kind="train", step=state["step"], loss=train_loss, lr=lr_at(step, args),
                  tokens_per_s=tps)
        steps_in_window = (state["tokens"] - tok_start) // (args.batch_size * args.seq_len)
        speed[:] = [tps, elapsed / max(steps_in_window, 1) * (args.steps - state["step"])]
        log.bar(name, state["step"], args.steps, train_loss, *speed)
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            state["train_time"] += time.perf_counter() - t_start
            eval_and_log()
            save()
            t_start, tok_start = time.perf_counter(), state["tokens"]
    if state["step"] != args.steps or not os.path.exists(ckpt):
        state["train_time"] += time.perf_counter() - t_start
        save()
    state["params"] = n_params
    return model, state


# ---- what each student learned ----
@torch.no_grad()
def demo_clm(model, tok, prompt="I love", n=80, seed=0, prefix: bool = False) -> str:
    """The prompt continued by sampling; with `prefix` (the prefix LM) the prompt is the bidirectional prefix."""
    model.eval()
    ids = tok.encode(prompt)[None].to(model.emb.weight.device)
    g = torch.Generator(ids.device).manual_seed(seed)
    limit, n_prompt = model.emb.block_size, ids.shape[1]
    for _ in range(n):
        window = ids[:, -limit:]
        lens = None
        if prefix:  # the prompt's tokens still in the window
            lens = torch.tensor([max(0, n_prompt - (ids.shape[1] - window.shape[1]))], device=ids.device)
        logits = model.hidden(window, prefix_lens=lens)[:, -1] @ model.emb.weight.T
        logits[:, : tok.offset] = -float("inf")  # bytes only
        logits[:, tok.offset + 256:] = -float("inf")
        probs = torch.softmax(logits / 0.7, -1)
        ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    text = tok.decode(ids[0], show_special=False)
    return f"  prompt:    {prompt!r}\n  continues: {text!r}"


@torch.no_grad()
def demo_mlm(model, tok, sentence, seed=0) -> str:
    model.eval()
    ids = tok.encode(sentence)[None, : model.emb.block_size - 2].to(model.emb.weight.device)
    sentence = tok.decode(ids[0])
    for s in range(seed, seed + 100):  # some masks, not too many
        inputs, labels = kernels.mlm_corrupt(ids, mask_id=tok.mask_id, vocab_size=tok.vocab_size, special_ids=(),
                                             seed=s, mask_prob=0.15, mask_replace_prob=1.0, random_replace_prob=0.0)
        if (labels != -100).sum() >= 3:
            break
    logits = model.hidden(inputs) @ model.emb.weight.T
    logits[..., : tok.offset] = -float("inf")
    logits[..., tok.offset + 256:] = -float("inf")
    masked = labels != -100
    filled = torch.where(masked, logits.argmax(-1), inputs)
    right = int((filled == ids)[masked].sum())
    return (f"  sentence: {sentence}\n  masked:   {tok.decode(inputs[0])}\n  filled:   {tok.decode(filled[0])}\n"
            f"  ({right}/{int(masked.sum())} masked bytes right)")


@torch.no_grad()
def demo_t5(model, tok, sentence, seed=0, noise_density=0.15, mean_span_length=3.0) -> str:
    model.eval()
    dev = model.emb.weight.device
    ids = tok.encode(sentence)[None, : model.emb.block_size - 2].to(dev)
    sentence = tok.decode(ids[0])
    b = kernels.t5_corrupt(ids, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id,
                           decoder_start_id=tok.bos_id, seed=seed, noise_density=noise_density,
                           mean_span_length=mean_span_length, max_sentinels=tok.n_sentinels)
    memory = model.encode(b.input_ids, b.input_lens)
    out = torch.full((1, 1), tok.bos_id, device=dev)
    for _ in range(min(b.labels.shape[1] + 8, model.emb.block_size - 1)):  # greedy decoding, within the model
        nxt = (model.decode(out, memory, b.input_lens)[:, -1] @ model.emb.weight.T).argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
        if int(nxt) == tok.eos_id:
            break
    pred = out[0, 1:].tolist()
    spans, cur = {}, None  # sentinel -> predicted span
    for t in pred:
        if tok.is_sentinel(t):
            cur = t
            spans[cur] = []
        elif t == tok.eos_id:
            break
        elif cur is not None:
            spans[cur].append(t)
    repaired = []
    for t in b.input_ids[0, : int(b.input_lens[0]) - 1].tolist():
        repaired += spans.get(t, [tok.mask_id]) if tok.is_sentinel(t) else [t]
    truth = [t for t in b.labels[0].tolist() if t != -100]
    true_spans, cur = {}, None
    for t in truth:
        if tok.is_sentinel(t):
            cur = t
            true_spans[cur] = []
        elif t != tok.eos_id:
            true_spans[cur].append(t)
    right = sum(spans.get(s) == v for s, v in true_spans.items())
    # partial credit: bytes of each span predicted at their place (a small model gets single bytes before spans)
    total = sum(len(v) for v in true_spans.values())
    hits = sum(sum(p == t for p, t in zip(spans.get(s, []), v)) for s, v in true_spans.items())
    return (f"  sentence:  {sentence}\n  corrupted: {tok.decode(b.input_ids[0, : int(b.input_lens[0]) - 1])}\n"
            f"  answer:    {tok.decode(truth)}\n  predicted: {tok.decode(pred)}\n  repaired:  {tok.decode(repaired)}\n"
            f"  ({right}/{len(true_spans)} spans exactly right, {hits}/{total} corrupted bytes right)")


# ---- the comparison table and the plot ----
def _steady_tps(st: dict) -> float:
    """Tokens/s of the training steps after the first --timing-skip (those compile kernels and warm allocators);
    over all steps when the run was too short to have any."""
    if st.get("steady_tokens"):
        return st["steady_tokens"] / max(st["steady_time"], 1e-9)
    return st["tokens"] / max(st["train_time"], 1e-9)


def _drop(st: dict) -> float | None:
    """The share by which the validation loss fell; None when there was nothing to measure (no targets)."""
    s0, v = st["start_val"], st["val"]
    if not s0 or not v.get("targets", 1):
        return None
    return 1 - v["loss"] / s0


def table(results: dict) -> str:
    rows = []
    for name, (_, st) in results.items():
        v, s0, drop = st["val"], st["start_val"], _drop(st)
        metric = f"ppl {v['perplexity']:.2f}" if "perplexity" in v else f"acc {v['accuracy']:.1%}"
        if not v.get("targets", 1):
            metric = "no targets"
        end = f"{v['loss']:.3f}" if v.get("targets", 1) else "n/a"
        rows.append([OBJECTIVES[name].title, f"{st['params'] / 1e6:.2f}M", str(st["step"]),
                     f"{s0:.3f}" if s0 else "n/a", end, "n/a" if drop is None else f"{100 * drop:.0f}%", metric,
                     f"{_steady_tps(st) / 1e3:.1f}k", f"{st['train_time']:.0f}s"])
    head = ["objective", "params", "steps", "val loss start", "val loss end", "drop", "metric", "tok/s", "time"]
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda xs: "  ".join(x.ljust(n) for x, n in zip(xs, w))  # noqa: E731
    return "\n".join([line(head), line(["-" * n for n in w])] + [line(r) for r in rows])


def plot(metrics_path: str, png: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = [json.loads(x) for x in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(dict.fromkeys(r["objective"] for r in recs)):
        color = f"C{i}"
        tr = {r["step"]: r["loss"] for r in recs if r["objective"] == name and r["kind"] == "train"}
        va = {r["step"]: r["loss"] for r in recs if r["objective"] == name and r["kind"] == "val"}
        ax.plot(list(tr), list(tr.values()), color=color, alpha=0.3, lw=1)
        ax.plot(list(va), list(va.values()), "o-", color=color, label=f"{OBJECTIVES[name].title} (val)")
    ax.set(xlabel="step", ylabel="loss (nats per target token)", title="lmobj train: three objectives side by side")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


# ---- the whole run ----
def run(args, p: argparse.ArgumentParser) -> int:
    """The CLI's entry: 0 when done, 130 after Ctrl-C (saying where the run is and how to continue it)."""
    check_args(args, p)
    ctx = {"rank": int(os.environ.get("RANK", "0"))}  # before setup(): torchrun says which rank this is
    try:
        return _run(args, p, ctx)
    except KeyboardInterrupt:
        if ctx["rank"] == 0:
            if "log" in ctx:
                interrupted(ctx["run_dir"], ctx["log"])
            else:
                print("\ninterrupted before training started", flush=True)
        return 130


def _objectives(args) -> list[str]:
    return list(ALL) if args.objective == "all" else [args.objective]


def _finished(args) -> bool:
    """The run in args.resume ended: finish() wrote its summary and every checkpoint is at --steps (which a resume
    cannot raise: a run setting)."""
    ckpts = [os.path.join(args.resume, f"ckpt_{n}.pt") for n in _objectives(args)]
    if not os.path.exists(os.path.join(args.resume, "summary.json")) or not all(map(os.path.exists, ckpts)):
        return False
    return all(torch.load(c, map_location="cpu", weights_only=True)["state"]["step"] == args.steps for c in ckpts)


def _run(args, p: argparse.ArgumentParser, ctx: dict) -> int:
    if args.resume is not None and _finished(args):
        if ctx["rank"] == 0:
            samples = os.path.join(args.resume, "samples.txt")
            shown = open(samples).read().strip() if os.path.exists(samples) else ""
            print(f"{args.resume} has finished ({args.steps} steps per objective): nothing to train. Its results "
                  f"(samples.txt, summary.json, metrics.jsonl) are as it left them" +
                  (f":\n\n{shown}" if shown else "."), flush=True)
        return 0
    tok = ByteTokenizer()
    try:
        corpus = Corpus.load(args.data, tok, eos_between=args.doc_mask)
    except ValueError as e:
        p.error(str(e))
    check_data(args, corpus, p)
    device, rank, world = setup(args)
    ctx["rank"] = rank
    kernels.use_baseline(args.baseline)
    args.environment = environment(args, device, world)
    saved = getattr(args, "saved_environment", None)
    moved = bool(saved) and saved != args.environment  # resumed under another environment
    if moved:  # args.json keeps each environment the run trained in, oldest first
        args.earlier_environments = [*getattr(args, "earlier_environments", []), saved]
    run_dir = ctx["run_dir"] = out_dir(args, rank, world)
    log = ctx["log"] = Log(os.path.join(run_dir, "metrics.jsonl"), rank, args.quiet)
    if moved:
        diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in args.environment.items() if saved.get(k) != v)
        log.say(f"note: resumed with another environment ({diff}): the run continues, but not bit-exactly (the "
                "arithmetic's order depends on it)")
    if args.doc_mask and (share := corpus.crossing_fraction(args.seq_len, tok.eos_id)) < 0.1:
        log.say(f"note: --doc-mask: only {share:.1%} of the training windows of {args.seq_len} tokens cross a "
                f"document boundary in {corpus.source}, so the mask changes little; it is for many documents short "
                "next to --seq-len (a --data folder of many files)")
    names = _objectives(args)
    log.say(f"lmobj train: {', '.join(names)} on {device} x{world} | data {corpus.source}: {len(corpus.train)} "
            f"train / {len(corpus.val)} val tokens\n  attention: {kernels.SOURCE['attention']}"
            f"{' (packed documents: masked per document)' if args.doc_mask else ''}\n  corruption: "
            f"{kernels.SOURCE['corruption']}\n  losses: {kernels.SOURCE['losses']}")
    t0 = time.perf_counter()
    results = {n: train_objective(n, args, corpus, tok, device, rank, world, run_dir, log) for n in names}
    log.where = {"demos": True}  # training is over: an interrupt now is in the demos
    if rank == 0:
        if args.stop_after is not None and any(st["step"] < args.steps for _, st in results.values()):
            log.say(f"\nstopped after step {args.stop_after}; continue with: lmobj train --resume {run_dir}")
        else:
            finish(results, args, corpus, tok, run_dir, log, time.perf_counter() - t0)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def interrupted(run_dir: str, log: Log) -> None:
    """Ctrl-C: where the run is, and how to continue it."""
    w = log.where
    if "objective" in w:
        at = f" in {w['objective']} at step {w['step']}/{w['steps']}"
        last = f"; its last checkpoint is at step {w['saved']}" if w["saved"] is not None else \
            "; it has no checkpoint yet"
    else:
        at, last = (" after training, in the demos", "") if w.get("demos") else (" before training started", "")
    if glob.glob(os.path.join(run_dir, "ckpt_*.pt")):
        how = f"continue it (from the checkpoints) with: lmobj train --resume {run_dir}"
    else:
        how = f"no checkpoint yet: `lmobj train --resume {run_dir}` starts it again with its settings"
    log.say(f"\ninterrupted{at}{last}. {run_dir}: {how}")


def finish(results, args, corpus, tok, run_dir, log, wall) -> None:
    samples = []
    if not args.no_demo:
        sentence = corpus.sentence()
        show = {"clm": lambda m: demo_clm(m, tok, seed=args.seed),
                "prefix": lambda m: demo_clm(m, tok, sentence[: len(sentence) // 2], seed=args.seed, prefix=True),
                "mlm": lambda m: demo_mlm(m, tok, sentence, seed=args.seed),
                "t5": lambda m: demo_t5(m, tok, sentence, seed=args.seed, noise_density=args.noise_density,
                                        mean_span_length=args.mean_span_length)}
        for name, (model, _) in results.items():
            if name in show:  # an objective plugged in later may bring its own demo
                samples.append(f"{OBJECTIVES[name].title}:\n{show[name](model)}")
        log.say("\n== what each student learned\n" + "\n\n".join(samples))
    summary = table(results)
    log.say("\n== comparison\n" + summary)
    drops = {n: _drop(st) for n, (_, st) in results.items()}
    met = all(d is not None and d >= 0.4 for d in drops.values())
    log.say("validation loss drop: " + ", ".join(f"{n} {'n/a' if d is None else f'{100 * d:.0f}%'}"
                                                 for n, d in drops.items()) +
            f"  (goal: at least 40% each; {'met' if met else 'NOT met'})")
    with open(os.path.join(run_dir, "samples.txt"), "w") as f:
        f.write("\n\n".join(samples) + "\n\n" + summary + "\n")
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({n: st | {"drop": drops[n], "tokens_per_s": _steady_tps(st),
                            "device": str(next(m.parameters()).device), "baseline": args.baseline}
                   for n, (m, st) in results.items()}, f, indent=1)
    png = os.path.join(run_dir, "loss_curves.png")
    log.say(f"\nwall time {wall:.0f}s. Wrote {run_dir}/: metrics.jsonl (metrics), "
            f"{'loss_curves.png (plot), ' if plot(log.path, png) else '(no plot: matplotlib missing), '}"
            "samples.txt (samples and table), summary.json, ckpt_*.pt (checkpoints)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmobj train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    return run(p.parse_args(argv), p)
