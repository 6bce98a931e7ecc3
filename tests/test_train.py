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


@pytest.mark.parametrize("objective", ["clm", "mlm", "t5", "prefix"])
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


def test_prefix_lm_objective(tmp_path):
    """The prefix LM's batch: per-row prefix lengths in [S/4, 3S/4] that vary with the row and the step, labels
    ignored inside the prefix; its model reads the prefix both ways (position 0 sees the prefix's last token, not
    the token after it); `all` leaves it out; and the baseline (SDPA with the prefix-LM mask) learns the same."""
    from lmobj_kernels.train.models import GPT, ModelConfig
    from lmobj_kernels.train.objectives import ALL, OBJECTIVES

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(tok.offset, tok.offset + 256, (6, 40), generator=g)
    b = OBJECTIVES["prefix"].corrupt(ids, tok, 3, {})
    p = b["prefix_lens"]
    assert ((p >= 10) & (p <= 30)).all() and len(set(p.tolist())) > 1
    assert not torch.equal(p, OBJECTIVES["prefix"].corrupt(ids, tok, 4, {})["prefix_lens"])
    for r in range(6):
        n = int(p[r])
        assert (b["labels"][r, :n] == -100).all() and torch.equal(b["labels"][r, n:], ids[r, n:])
    assert OBJECTIVES["prefix"].n_targets(b) == int((40 - p).sum())
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, d_model=16)).eval()
    with torch.no_grad():
        n = int(p[0])
        inside, after = ids.clone(), ids.clone()
        inside[0, n - 1] = tok.offset + (int(ids[0, n - 1]) - tok.offset + 1) % 256
        after[0, n] = tok.offset + (int(ids[0, n]) - tok.offset + 1) % 256
        h = lambda x: model.hidden(x, prefix_lens=p)[0, 0]  # noqa: E731
        assert not torch.allclose(h(ids), h(inside)) and torch.equal(h(ids), h(after))
    assert "prefix" not in ALL
    for mode in ("lib", "base"):
        assert train("--objective", "prefix", "--out", str(tmp_path / mode), "--no-demo",
                     *(["--baseline"] if mode == "base" else [])) == 0
    kernels.use_baseline(False)
    val = {m: [r["loss"] for r in map(json.loads, open(tmp_path / m / "metrics.jsonl")) if r["kind"] == "val"]
           for m in ("lib", "base")}
    torch.testing.assert_close(val["lib"], val["base"], rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("objective", ["clm", "mlm", "t5", "prefix"])
def test_resume_is_bit_exact(objective, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train("--objective", objective, "--out", str(whole), "--steps", "5", "--no-demo") == 0
    assert train("--objective", objective, "--out", str(parts), "--steps", "5", "--stop-after", "3") == 0
    assert params(parts, objective)["state"]["step"] == 3
    with pytest.raises(SystemExit):  # the same --out again without --resume
        train("--objective", objective, "--out", str(parts))
    assert cli.main(["train", "--resume", str(parts), "--quiet", "--no-demo", "--timing-skip", "1"]) == 0
    a, b = params(whole, objective), params(parts, objective)
    assert b["state"]["step"] == 5
    # the steady tokens/s leaves out the first --timing-skip steps of each process: 3 of the first run's 3 (default
    # skip 3), 1 of the resumed one's 2 (they compile and warm up too)
    assert b["state"]["steady_tokens"] == 1 * 4 * 32
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["opt"]["state"].items():
        for k in s:
            assert torch.equal(s[k], b["opt"]["state"][i][k]), (i, k)


def test_dropout_resume_is_bit_exact(tmp_path):
    """With --dropout the draws are a function of (seed, step): a stopped and resumed run equals a whole one, and
    dropout changes what is learned (so it is applied)."""
    whole, parts, none = tmp_path / "whole", tmp_path / "parts", tmp_path / "none"
    common = ["--objective", "all", "--steps", "4", "--no-demo"]
    assert train(*common, "--dropout", "0.2", "--out", str(whole)) == 0
    assert train(*common, "--dropout", "0.2", "--out", str(parts), "--stop-after", "2") == 0
    assert cli.main(["train", "--resume", str(parts), "--quiet", "--no-demo"]) == 0
    assert train(*common, "--out", str(none)) == 0
    for name in ("clm", "mlm", "t5"):
        a, b, c = params(whole, name)["model"], params(parts, name)["model"], params(none, name)["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        assert any(not torch.equal(a[k], c[k]) for k in a), name
    assert train(*common, "--dropout", "0.2", "--baseline", "--out", str(tmp_path / "base")) == 0  # SDPA's dropout
    kernels.use_baseline(False)
    for run in (whole, tmp_path / "base"):
        recs = [json.loads(x) for x in open(run / "metrics.jsonl")]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)


@pytest.mark.parametrize("name", ["gpt", "bert", "t5"])
def test_models_drop_out_in_training_only(name, monkeypatch):
    """Every attention call gets dropout_p in training and 0 in evaluation, where the model equals its dropout-free
    twin; in training two seeds give two losses."""
    from lmobj_kernels.train.models import MODELS, ModelConfig

    seen = []

    def spy(q, k, v, **kw):
        seen.append(kw["dropout_p"])
        return kernels._library_attention(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention", spy)
    torch.manual_seed(0)
    model = MODELS[name](ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=16, dropout=0.3))
    twin = MODELS[name](ModelConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, d_model=16))
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (3, 12), generator=g)
    labels = torch.where(torch.rand(3, 12, generator=g) < 0.5, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "labels": labels, "input_lens": torch.tensor([12, 7, 1]),
             "decoder_input_ids": ids[:, :8], "t5_labels": labels[:, :8]}
    if name == "t5":
        batch["labels"] = batch.pop("t5_labels")
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        losses.append(model(batch))
    assert set(seen) == {0.3} and len(seen) == {"gpt": 1, "bert": 1, "t5": 3}[name] * 2
    assert losses[0] != losses[1]
    seen.clear()
    model.eval()
    torch.testing.assert_close(model(batch), twin(batch), rtol=0, atol=0)
    assert set(seen) == {0.0}


def test_baseline_dropout_masks_padding_keys():
    """The baseline's SDPA dropout path applies the padding mask: what the padding keys hold never reaches the
    output, for the same draws."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    kv_lens = torch.tensor([9, 4])
    v2 = v.clone()
    v2[1, :, 4:] = 1e6
    outs = []
    for vv in (v, v2):
        torch.manual_seed(3)
        outs.append(kernels._sdpa_attention(q, k, vv, kv_lens=kv_lens, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and outs[0].abs().max() < 100
    torch.manual_seed(3)
    other = kernels._sdpa_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.5)
    torch.manual_seed(4)
    assert not torch.equal(other, kernels._sdpa_attention(q, k, v, kv_lens=kv_lens, dropout_p=0.5))


def test_corpus_documents():
    """Without --doc-mask the stream is the documents joined by a blank line, as before; with it each document
    ends with EOS (and the held-out sentence never holds one)."""
    from lmobj_kernels.train.data import Corpus, default_docs

    tok = ByteTokenizer()
    docs, _ = default_docs()
    plain, packed = Corpus.load(None, tok), Corpus.load(None, tok, eos_between=True)
    ids = tok.encode("\n\n".join(docs))
    assert torch.equal(torch.cat([plain.train, plain.val]), ids)
    stream = torch.cat([packed.train, packed.val])
    assert int((stream == tok.eos_id).sum()) == len(docs) and stream[-1] == tok.eos_id
    assert torch.equal(stream[stream != tok.eos_id], torch.cat([tok.encode(d) for d in docs]))
    # an EOS inside the held-out text breaks a line there (it is no character of the sentence)
    val = torch.cat([tok.encode("Too short."), torch.tensor([tok.eos_id]),
                     tok.encode("And the second document starts and goes on for a while.\n")])
    picked = Corpus(val, val, "test").sentence()
    assert picked == "And the second document starts and goes on for a while."


@pytest.mark.parametrize("name", ["gpt", "bert", "t5"])
def test_doc_mask_keeps_documents_apart(name):
    """With doc_ids a document's hidden states do not depend on another document's tokens (GPT: the documents
    before it; BERT and T5's encoder: both sides); without them they do."""
    from lmobj_kernels.train.models import MODELS, ModelConfig

    tok = ByteTokenizer()
    torch.manual_seed(0)
    model = MODELS[name](ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=16))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(tok.offset, tok.offset + 256, (2, 24), generator=g)
    ids[:, 9] = tok.eos_id  # document 0: positions 0..9, document 1: 10..23
    other = ids.clone()
    other[:, :9] = torch.randint(tok.offset, tok.offset + 256, (2, 9), generator=g)  # another document 0
    docs = kernels.doc_ids_from_eos(ids, tok.eos_id)
    assert torch.equal(docs, kernels.doc_ids_from_eos(other, tok.eos_id))

    def hidden(x, doc_ids):
        if name == "t5":
            return model.encode(x, torch.tensor([24, 24]), doc_ids)
        return model.hidden(x, doc_ids=doc_ids)

    with torch.no_grad():
        a, b = hidden(ids, docs), hidden(other, docs)
        torch.testing.assert_close(a[:, 10:], b[:, 10:], rtol=0, atol=1e-6)  # document 1 never sees document 0
        assert not torch.allclose(hidden(ids, None)[:, 10:], hidden(other, None)[:, 10:])
        later = ids.clone()
        later[:, 10:] = torch.randint(tok.offset, tok.offset + 256, (2, 14), generator=g)  # another document 1
        c = hidden(later, docs)
        if name == "gpt":  # causal: document 0 never sees later tokens anyway
            torch.testing.assert_close(a[:, :10], c[:, :10], rtol=0, atol=0)
        else:  # bidirectional: document 0 does not see document 1 either, though it would without the mask
            torch.testing.assert_close(a[:, :10], c[:, :10], rtol=0, atol=1e-6)
            assert not torch.allclose(hidden(ids, None)[:, :10], hidden(later, None)[:, :10])


@pytest.mark.parametrize("objective", ["clm", "mlm", "t5", "prefix"])
def test_doc_mask_reaches_the_attention(objective, monkeypatch):
    """The objectives put doc_ids in the batch and the models' forward and logits pass them to every self-attention
    of the model's input; T5's decoder self-attention gets the batch's decoder_doc_ids, and its cross attention
    those against the encoder's doc_ids (kv_doc_ids)."""
    from lmobj_kernels.train.models import MODELS, ModelConfig
    from lmobj_kernels.train.objectives import OBJECTIVES

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(tok.offset, tok.offset + 256, (2, 40), generator=g)
    rows[:, [12, 30]] = tok.eos_id
    obj = OBJECTIVES[objective]
    batch = obj.corrupt(rows, tok, 7, {"doc_mask": True, "mask_prob": 0.3})
    assert batch["doc_ids"].shape == batch["input_ids"].shape and int(batch["doc_ids"].max()) >= 1
    seen = []

    def spy(q, k, v, **kw):
        seen.append((kw.get("doc_ids"), kw.get("kv_doc_ids")))
        if objective == "prefix":  # each document's own prefix
            assert torch.equal(kw["prefix_mask"], batch["prefix_mask"]) and kw.get("prefix_lens") is None
        return kernels._library_attention(q, k, v, **kw)

    monkeypatch.setattr(kernels, "attention", spy)
    torch.manual_seed(0)
    model = MODELS[obj.model](ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=16))
    for call in (lambda: model(batch), lambda: model.logits(batch)):
        seen.clear()
        call()
        assert all(d is not None for d, _ in seen)
        enc = [(d, kd) for d, kd in seen if d.shape == batch["doc_ids"].shape and torch.equal(d, batch["doc_ids"])]
        assert len(enc) == 2 and all(kd is None for _, kd in enc)
        if objective == "t5":  # 2 encoder, 2 decoder self, 2 cross, in that order per layer
            dec = batch["decoder_doc_ids"]
            assert len(seen) == 6 and all(torch.equal(d, dec) for d, _ in seen[2:])
            assert [kd is None for _, kd in seen[2:]] == [True, False, True, False]
            assert all(torch.equal(kd, batch["doc_ids"]) for _, kd in seen[2:] if kd is not None)
        else:
            assert len(seen) == 2


def test_prefix_lm_packs_a_prefix_per_document(tmp_path):
    """Under --doc-mask the prefix LM gives each packed document its own prefix (prefix_mask): the row's share of
    the document's tokens, its leading ones, unscored; a prefix token reads the later tokens of its own prefix but
    not those after it nor another document's; library and baseline train to the same losses."""
    from lmobj_kernels.train.models import GPT, ModelConfig
    from lmobj_kernels.train.objectives import OBJECTIVES

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(tok.offset, tok.offset + 256, (3, 40), generator=g)
    ids[:, [12, 30]] = tok.eos_id  # documents of 13, 18 and 9 tokens
    plain = OBJECTIVES["prefix"].corrupt(ids, tok, 5, {})
    b = OBJECTIVES["prefix"].corrupt(ids, tok, 5, {"doc_mask": True})
    assert "prefix_lens" not in b and b["prefix_mask"].dtype == torch.bool
    for r in range(3):
        p = int(plain["prefix_lens"][r])  # the same draw: the row's share, p / 40
        for a, e in ((0, 13), (13, 31), (31, 40)):
            n = -(-p * (e - a) // 40)  # ceil
            assert b["prefix_mask"][r, a:e].tolist() == [True] * n + [False] * (e - a - n), (r, a, p)
    assert torch.equal(b["labels"], torch.where(b["prefix_mask"], -100, ids))
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, d_model=16)).eval()

    def flip(x, t):  # row 0's token t, another byte
        y = x.clone()
        y[0, t] = (x[0, t] - tok.offset + 1) % 256 + tok.offset
        return y

    pm, docs = b["prefix_mask"], b["doc_ids"]
    n1 = int(pm[0, 13:31].sum())  # document 1's prefix: positions 13 .. 13 + n1 - 1
    assert 1 < n1 < 18
    with torch.no_grad():
        h = lambda x: model.hidden(x, doc_ids=docs, prefix_mask=pm)[0, 13]  # noqa: E731  document 1's first token
        assert not torch.allclose(h(ids), h(flip(ids, 13 + n1 - 1)))  # a later token of its prefix: seen
        assert torch.equal(h(ids), h(flip(ids, 13 + n1)))  # the first after the prefix: not seen
        assert torch.equal(h(ids), h(flip(ids, 5))) and torch.equal(h(ids), h(flip(ids, 33)))  # other documents
    data = tmp_path / "docs"
    data.mkdir()
    for i in range(200):
        (data / f"d{i:03d}.txt").write_text(" ".join(["alpha", "beta", "gamma"][(i * j) % 3] for j in range(3 + i % 9)))
    for mode in ("lib", "base"):
        assert train("--objective", "prefix", "--data", str(data), "--doc-mask", "--out", str(tmp_path / mode),
                     "--no-demo", *(["--baseline"] if mode == "base" else [])) == 0
    kernels.use_baseline(False)
    val = {m: [r["loss"] for r in map(json.loads, open(tmp_path / m / "metrics.jsonl")) if r["kind"] == "val"]
           for m in ("lib", "base")}
    torch.testing.assert_close(val["lib"], val["base"], rtol=1e-4, atol=1e-5)


def test_t5_decoder_documents():
    """decoder_doc_ids, span by span against the encoder (span k's targets follow sentinel k in the labels and
    take the document of sentinel k in the encoder input); the decoder inputs are the labels shifted right, restarted
    with BOS where a document's targets begin; and the decoder's states for one document do not depend on another
    document's encoder tokens or targets (they would without the mask)."""
    from lmobj_kernels.train.models import T5, ModelConfig
    from lmobj_kernels.train.objectives import t5_batch

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(tok.offset, tok.offset + 256, (3, 90), generator=g)
    ids[:, [25, 60]] = tok.eos_id
    b = t5_batch(ids, tok, 11, {"doc_mask": True, "noise_density": 0.3})
    enc, labels, dec_docs = b["input_ids"], b["labels"], b["decoder_doc_ids"]
    assert dec_docs.shape == labels.shape and int(dec_docs.max()) >= 1
    for r in range(3):
        sent_pos = [i for i, t in enumerate(enc[r].tolist()) if tok.is_sentinel(t)]
        k = -1
        for t, lab in enumerate(labels[r].tolist()):
            if lab != -100 and tok.is_sentinel(lab):
                k += 1
                assert lab == enc[r, sent_pos[k]]  # the same sentinel, in the same order
            assert dec_docs[r, t] == b["doc_ids"][r, sent_pos[max(k, 0)]], (r, t)
        assert k + 1 == len(sent_pos)
        shifted = [tok.bos_id] + [x if x != -100 else tok.pad_id for x in labels[r, :-1].tolist()]
        starts = [t for t in range(1, labels.shape[1]) if dec_docs[r, t] != dec_docs[r, t - 1]]
        for t in starts:
            shifted[t] = tok.bos_id
        assert b["decoder_input_ids"][r].tolist() == shifted, r
    # every decoder query keeps a key in its cross attention (the baseline's SDPA has given NaN for an empty row)
    from lmobj_kernels.reference.attention import attention_mask

    T, S = labels.shape[1], enc.shape[1]
    assert attention_mask(3, T, S, doc_ids=dec_docs, kv_doc_ids=b["doc_ids"], kv_lens=b["input_lens"]).any(-1).all()
    # isolation: the last document's decoder states against other tokens of the earlier documents
    last = b["doc_ids"].amax(1, keepdim=True)
    mine_enc, mine_dec = b["doc_ids"] == last, dec_docs == last
    assert mine_dec.any(1).all()
    other = dict(b)
    noise = torch.randint(tok.offset, tok.offset + 256, enc.shape, generator=g)
    keep_enc = mine_enc | (enc >= tok.offset + 256) | (enc == tok.eos_id)  # sentinels and EOS say where docs are
    other["input_ids"] = torch.where(keep_enc, enc, noise)
    dec_in = b["decoder_input_ids"]
    keep_dec = mine_dec | (dec_in == tok.bos_id) | (dec_in >= tok.offset + 256)
    other["decoder_input_ids"] = torch.where(keep_dec, dec_in, torch.randint(tok.offset, tok.offset + 256,
                                                                              dec_in.shape, generator=g))
    torch.manual_seed(0)
    model = T5(ModelConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, d_model=16)).eval()
    with torch.no_grad():
        a, c = model.hidden(b), model.hidden(other)
        torch.testing.assert_close(a[mine_dec], c[mine_dec], rtol=0, atol=1e-6)
        plain = {n: t for n, t in b.items() if n != "decoder_doc_ids"}
        plain_other = {n: t for n, t in other.items() if n != "decoder_doc_ids"}
        assert not torch.allclose(model.hidden(plain)[mine_dec], model.hidden(plain_other)[mine_dec])


def test_t5_doc_ids_leave_no_row_empty():
    """The encoder's documents are those of its EOS tokens; padding past input_lens (rows of several lengths: the
    trainer's fixed windows have none, a plugged-in objective may) joins the row's last document, so every query row
    keeps a key (SDPA, the baseline's attention with dropout, has given NaN for an empty row in some versions and
    kernels)."""
    from lmobj_kernels.reference.attention import attention_mask
    from lmobj_kernels.train.objectives import _docs, t5_batch

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(tok.offset, tok.offset + 256, (4, 64), generator=g)
    ids[:, [20, 41]] = tok.eos_id
    b = t5_batch(ids, tok, 5, {"doc_mask": True})
    assert torch.equal(b["doc_ids"], kernels.doc_ids_from_eos(b["input_ids"], tok.eos_id))
    padded = torch.full((3, 12), tok.pad_id)
    lens = torch.tensor([12, 7, 4])
    for r, n in enumerate(lens.tolist()):
        padded[r, :n] = torch.randint(tok.offset, tok.offset + 256, (n,), generator=g)
        padded[r, n - 1] = tok.eos_id  # span corruption ends each input with EOS
    padded[:, 2] = tok.eos_id
    docs = _docs({"input_ids": padded, "input_lens": lens}, tok, {"doc_mask": True})["doc_ids"]
    assert docs.tolist() == [[0] * 3 + [1] * 9, [0] * 3 + [1] * 9, [0] * 3 + [1] * 9]
    assert attention_mask(3, 12, 12, doc_ids=docs, kv_lens=lens).any(-1).all()


def test_doc_mask_trains_with_library_and_baseline(tmp_path, monkeypatch):
    """--doc-mask end to end on a folder of short documents (so that windows cross document boundaries): every
    objective trains, the baseline (SDPA with the same document mask) reaches the same losses, and the same EOS
    corpus trained without the doc_ids gives other losses (the mask is what differs)."""
    from lmobj_kernels.train import objectives

    data = tmp_path / "docs"
    data.mkdir()
    g = torch.Generator().manual_seed(4)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    for i in range(300):
        n = int(torch.randint(3, 12, (1,), generator=g))
        (data / f"d{i:03d}.txt").write_text(" ".join(words[int(w)] for w in torch.randint(0, 10, (n,), generator=g)))
    seen = []
    _docs = objectives._docs

    def spy(batch, tok, opts):
        out = _docs(batch, tok, opts)
        seen.append(int(out["doc_ids"].max()) if "doc_ids" in out else -1)
        return out

    monkeypatch.setattr(objectives, "_docs", spy)
    runs = {"lib": ["--doc-mask"], "base": ["--doc-mask", "--baseline"]}
    for mode, extra in runs.items():
        assert train("--objective", "all", "--data", str(data), "--out", str(tmp_path / mode), "--no-demo",
                     *extra) == 0
    kernels.use_baseline(False)
    assert min(seen) >= 1  # every batch, validation included, crosses a boundary
    # the same EOS-separated corpus, doc_ids dropped from every batch
    monkeypatch.setattr(objectives, "_docs", lambda batch, tok, opts: batch)
    assert train("--objective", "all", "--data", str(data), "--out", str(tmp_path / "nomask"), "--no-demo",
                 "--doc-mask") == 0
    val = {m: [(r["objective"], r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / m / "metrics.jsonl"))
               if r["kind"] == "val"] for m in ("lib", "base", "nomask")}
    assert [v[:2] for v in val["lib"]] == [v[:2] for v in val["base"]] == [v[:2] for v in val["nomask"]]
    torch.testing.assert_close([v[2] for v in val["lib"]], [v[2] for v in val["base"]], rtol=1e-4, atol=1e-5)
    for (o, step, a), (_, _, c) in zip(val["lib"], val["nomask"]):
        assert a != c, (o, step)  # the very first validation too: the mask changes what the model sees
    assert json.load(open(tmp_path / "lib" / "args.json"))["doc_mask"] is True


def test_doc_mask_says_when_few_windows_cross(tmp_path, capsys):
    """crossing_fraction counts the windows with an EOS before their last token (checked window by window); a run
    whose data gives the mask little to do says so, one with short documents does not."""
    from lmobj_kernels.train.data import Corpus

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(2)
    stream = torch.randint(3, 9, (300,), generator=g)
    stream[torch.randint(0, 300, (12,), generator=g)] = tok.eos_id
    corpus = Corpus(stream, stream[:10], "test")
    for L in (1, 2, 7, 40, 300, 301):
        starts = range(len(stream) - L + 1)
        want = [bool((stream[s: s + L - 1] == tok.eos_id).any()) for s in starts]
        got = corpus.crossing_fraction(L, tok.eos_id)
        assert got == pytest.approx(sum(want) / len(want) if want else 0.0), L
    one = tmp_path / "one.txt"
    one.write_text("a single long document " * 400)
    assert train("--objective", "clm", "--data", str(one), "--out", str(tmp_path / "a"), "--no-demo",
                 "--doc-mask", "--steps", "1") == 0
    assert "only 0.0% of the training windows" in capsys.readouterr().out
    many = tmp_path / "many"
    many.mkdir()
    for i in range(200):
        (many / f"{i}.txt").write_text(f"document {i} is short")
    assert train("--objective", "clm", "--data", str(many), "--out", str(tmp_path / "b"), "--no-demo",
                 "--doc-mask", "--steps", "1") == 0
    assert "cross a document boundary" not in capsys.readouterr().out


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
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0 (0 = no clipping), got -1"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number >= 0 (0 = no clipping), got inf"),
    (["--threads", "-2"], "--threads must be at least 1 (or 0: torch's choice), got -2"),
    (["--mask-prob", "1.5"], "--mask-prob must be in (0, 1), got 1.5"),
    (["--noise-density", "0"], "--noise-density must be in (0, 1), got 0"),
    (["--mean-span-length", "0.5"], "--mean-span-length must be a finite number >= 1, got 0.5"),
    (["--objective", "t5", "--seq-len", "2048"], "--seq-len 2048 with --noise-density 0.15 and --mean-span-length "
                                                 "3.0 get 102 noise spans, but the tokenizer has 100 sentinels"),
    (["--seq-len", "2048"], "use --seq-len 2009 or less"),  # --objective all trains T5 too
    (["--device", "mps"], "--device mps: not a device the trainer runs on"),
    (["--device", "meta"], "--device meta: not a device the trainer runs on"),
    (["--device", "cpu:3"], "--device cpu:3: the CPU takes no index"),
    (["--device", "cuda:99"], "--device cuda:99: "),  # no GPU visible, or not that many
    (["--data", "FIFO"], "not a regular file or a folder"),
    (["--stop-after", "-2"], "--stop-after must be at least 1"),
    (["--d-model", "528", "--n-head", "2"], "--n-head = 264 channels per head: the attention takes at most 256"),
    (["--data", "EMPTY"], "no text in it"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--dropout", "nan"], "--dropout must be in [0, 1), got nan"),
])
def test_cli_rejects_bad_arguments(argv, message, tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("A tiny corpus. " * 200)  # 3000 bytes
    (tmp_path / "empty.txt").write_text("")
    if "FIFO" in argv:
        os.mkfifo(tmp_path / "fifo")
    argv = [{"EMPTY": str(tmp_path / "empty.txt"), "FIFO": str(tmp_path / "fifo")}.get(a, a) for a in argv]
    if "--data" not in argv:
        argv = [*argv, "--data", str(small)]
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_in_another_environment_says_it_is_not_bit_exact(tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--objective", "clm", "--out", str(run), "--steps", "3", "--stop-after", "2", "--no-demo") == 0
    saved = json.loads((run / "args.json").read_text())["environment"]
    assert saved == {"device": "cpu", "threads": 1, "processes": 1, "compile": False}
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", "--resume", str(run), "--threads", "2", "--no-demo"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "threads 1 -> 2" in out and "not bit-exactly" in out
    assert params(run, "clm")["state"]["step"] == 3
    # args.json says where the run trained now and keeps where it trained before
    saved_now = json.loads((run / "args.json").read_text())
    assert saved_now["environment"]["threads"] == 2 and saved_now["earlier_environments"] == [saved]


def test_resume_refuses_options_that_differ(tmp_path, capsys):
    """--resume takes what to train from the run: an option given with another value is an error, not dropped."""
    run = tmp_path / "run"
    assert train("--objective", "clm", "--out", str(run), "--steps", "3", "--stop-after", "2", "--no-demo") == 0
    for argv, message in [
        (["--steps", "10"], "--steps 10 (the run has 3)"),
        (["--steps", "300"], "--steps 300 (the run has 3)"),  # the default: passed all the same
        (["--objective", "all"], "--objective all (the run has clm)"),
        (["--lr", "0.0015", "--seq-len", "128"], "--seq-len 128 (the run has 32)"),
        (["--baseline"], "--baseline (the run has --no-baseline)"),
        (["--doc-mask"], "--doc-mask (the run has --no-doc-mask)"),
        (["--dropout", "0.1"], "--dropout 0.1 (the run has 0.0)"),
        (["--data", str(tmp_path)], "(the run has the default corpus)"),
        (["--out", str(tmp_path / "elsewhere")], "continues the run in its own folder; drop --out"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--resume", str(run), *argv, "--quiet"])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "elsewhere").exists()
    # a run saved before --dropout and --doc-mask existed trained without them: they too must match
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in ("dropout", "doc_mask")}))
    with pytest.raises(SystemExit):
        cli.main(["train", "--resume", str(run), "--dropout", "0.1", "--quiet"])
    assert "--dropout 0.1 (the run has 0.0)" in capsys.readouterr().err
    # the run's own values, given explicitly, and --out naming the run's folder are fine
    assert cli.main(["train", "--resume", str(run), "--steps", "3", "--seq-len", "32", "--out", str(run),
                     "--quiet", "--no-demo"]) == 0
    assert params(run, "clm")["state"]["step"] == 3
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        train("--out", str(tmp_path / "file"))
    assert "is a file" in capsys.readouterr().err


def test_resume_keeps_baseline(tmp_path, capsys):
    """--baseline is one of the run's settings: a resumed baseline run continues with the baseline, bit-exactly."""
    whole, parts, lib = tmp_path / "whole", tmp_path / "parts", tmp_path / "lib"
    try:
        assert train("--objective", "clm", "--out", str(whole), "--steps", "5", "--no-demo", "--baseline") == 0
        assert train("--objective", "clm", "--out", str(lib), "--steps", "5", "--no-demo") == 0
        assert train("--objective", "clm", "--out", str(parts), "--steps", "5", "--stop-after", "3",
                     "--baseline") == 0
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--resume", str(parts), "--no-baseline", "--quiet"])
        assert e.value.code == 2 and "--no-baseline (the run has --baseline)" in capsys.readouterr().err
        assert cli.main(["train", "--resume", str(parts), "--quiet", "--no-demo"]) == 0
        assert "baseline (F.cross_entropy" in capsys.readouterr().out
    finally:
        kernels.use_baseline(False)
    a, b, c = params(whole, "clm")["model"], params(parts, "clm")["model"], params(lib, "clm")["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # library and baseline differ: a switch would show
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.load(open(parts / "summary.json"))["clm"]["baseline"] is True


def _records(run_dir) -> list:
    return [(r["objective"], r["kind"], r["step"], r["loss"]) for r in map(json.loads, open(run_dir / "metrics.jsonl"))]


def test_resume_drops_records_past_the_checkpoint(tmp_path, capsys):
    """A run killed after its checkpoint at step 4 had logged steps 5-6: the resumed run logs them once."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = ["--objective", "all", "--steps", "6", "--no-demo"]
    assert train(*args, "--out", str(whole)) == 0
    assert train(*args, "--out", str(parts), "--stop-after", "4") == 0
    ckpts = {n: (parts / f"ckpt_{n}.pt").read_bytes() for n in ("clm", "mlm", "t5")}
    assert cli.main(["train", "--resume", str(parts), "--quiet", "--no-demo"]) == 0
    for n, raw in ckpts.items():  # as if killed after logging step 6 but before its checkpoint
        (parts / f"ckpt_{n}.pt").write_bytes(raw)
    with open(parts / "metrics.jsonl", "a") as f:
        f.write('{"objective": "t5", "kind": "tra')  # and mid-line
    assert cli.main(["train", "--resume", str(parts), "--quiet", "--no-demo"]) == 0
    assert sorted(_records(parts)) == sorted(_records(whole))  # each record once (the objectives interleave)
    # a run that died before its first checkpoint: its folder is refused as a new --out, and --resume starts over
    new = tmp_path / "new"
    assert train("--objective", "clm", "--steps", "6", "--out", str(new), "--stop-after", "1") == 0
    (new / "ckpt_clm.pt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train("--objective", "clm", "--steps", "6", "--out", str(new))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "is not empty" in err and f"--resume {new}" in err
    assert cli.main(["train", "--resume", str(new), "--quiet", "--no-demo"]) == 0
    assert _records(new) == [r for r in _records(whole) if r[0] == "clm"]


def test_mlm_without_targets_ends_cleanly(tmp_path, capsys):
    """--mask-prob so small that no byte is masked: the run ends with "n/a" in the summary, no ZeroDivisionError."""
    assert train("--objective", "mlm", "--seq-len", "8", "--mask-prob", "0.001", "--out", str(tmp_path)) == 0
    val = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "val"]
    assert val and all(r["targets"] == 0 for r in val)
    out = capsys.readouterr().out
    assert "no targets in the validation batches" in out and "mlm n/a" in out
    assert json.load(open(tmp_path / "summary.json"))["mlm"]["drop"] is None


def test_data_folder_reads_regular_files_and_resumes_from_elsewhere(tmp_path, monkeypatch):
    """--data reads the regular files of a folder (not hidden ones, nor .git, broken links, FIFOs) and is saved as
    an absolute path, so that --resume works from another working folder."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".git" / "objects").mkdir(parents=True)
    (data / "a.txt").write_text("The first file. " * 150)
    (data / "sub" / "b.txt").write_text("The second file. " * 50)
    (data / ".git" / "objects" / "x").write_text("not text to learn")
    (data / ".hidden").write_text("nor this")
    (data / "broken").symlink_to(tmp_path / "nowhere")
    (data / "link.txt").symlink_to(data / "a.txt")
    os.mkfifo(data / "fifo")
    from lmobj_kernels.train.data import read_docs, text_files

    assert text_files(str(data)) == [str(data / f) for f in ("a.txt", "link.txt", "sub/b.txt")]
    assert read_docs(str(data))[1].endswith("(3 text files)")
    monkeypatch.chdir(tmp_path)
    assert train("--objective", "clm", "--data", "data", "--out", "run", "--stop-after", "2") == 0
    assert json.load(open(tmp_path / "run" / "args.json"))["data"] == str(data)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--quiet", "--no-demo"]) == 0
    assert params(tmp_path / "run", "clm")["state"]["step"] == 4


@pytest.mark.parametrize("interrupt_at, message", [
    (3, "interrupted in clm at step 4/4; its last checkpoint is at step 2"),  # the 3rd evaluation: step 4
    (1, "interrupted in clm at step 0/4; it has no checkpoint yet"),
])
def test_ctrl_c_says_how_to_continue(interrupt_at, message, tmp_path, monkeypatch, capsys):
    from lmobj_kernels.train import loop

    calls, evaluate = [], loop.evaluate

    def interrupted_evaluate(*a, **k):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(loop, "evaluate", interrupted_evaluate)
    try:
        assert train("--objective", "clm", "--out", str(tmp_path)) == 130
    except KeyboardInterrupt:
        pytest.fail("the KeyboardInterrupt went through the CLI")
    out = capsys.readouterr().out
    assert message in out and f"lmobj train --resume {tmp_path}" in out
    monkeypatch.setattr(loop, "evaluate", evaluate)
    assert cli.main(["train", "--resume", str(tmp_path), "--quiet", "--no-demo"]) == 0
    steps = [(r["kind"], r["step"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert sorted(steps) == sorted({*steps}) and len(steps) == 3 + 4  # val at 0, 2, 4; train 1-4: each once


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for text in ("what to train (default: all)", "optimizer steps per objective (default: 300)",
                 "(default: 0.0015)", "--baseline, --no-baseline", "(default: off)", "(default: auto)",
                 "CPU threads per process", "(default: 1)", "(default: runs/<timestamp>)"):
        assert text in out, text


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


def test_resume_says_when_stop_after_is_before_the_checkpoint(tmp_path, capsys):
    """--resume with a --stop-after before the checkpoint's step trains nothing, and says so."""
    run = tmp_path / "run"
    assert train("--objective", "clm", "--out", str(run), "--steps", "4", "--stop-after", "3", "--no-demo") == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run), "--stop-after", "1", "--no-demo"]) == 0
    assert "--stop-after 1 is before this checkpoint's step 3: nothing to train" in capsys.readouterr().out
    assert params(run, "clm")["state"]["step"] == 3


def test_resume_of_a_finished_run_trains_and_writes_nothing(tmp_path, capsys):
    """--resume of a run that finished says so and shows its samples and table, leaving every file as it was."""
    run = tmp_path / "run"
    assert train("--objective", "clm", "--out", str(run), "--steps", "2") == 0
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "has finished (2 steps per objective): nothing to train" in out
    assert (run / "samples.txt").read_text().strip() in out
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
