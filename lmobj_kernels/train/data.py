"""Text in, token windows out: a byte-level tokenizer, the default corpus, a held-out split, seeded batches.

Token ids: 0 pad, 1 BOS, 2 EOS, 3 mask, 4..259 the bytes 0..255, then 100 sentinels counted down from the top of
the vocabulary (sentinel i = vocab_size - 1 - i, as T5's <extra_id_i>), so vocab_size = 360.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor


class ByteTokenizer:
    pad_id, bos_id, eos_id, mask_id = 0, 1, 2, 3
    offset = 4
    n_sentinels = 100
    vocab_size = offset + 256 + n_sentinels

    def sentinel(self, i: int) -> int:
        return self.vocab_size - 1 - i

    def is_sentinel(self, t: int) -> bool:
        return t >= self.offset + 256

    def encode(self, text: str) -> Tensor:
        data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
        return data.to(torch.int64) + self.offset

    def decode(self, ids, show_special: bool = True) -> str:
        out, buf = [], bytearray()

        def flush():
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()

        for t in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if self.offset <= t < self.offset + 256:
                buf.append(t - self.offset)
                continue
            flush()
            if show_special:
                if self.is_sentinel(t):
                    out.append(f"<{self.vocab_size - 1 - t}>")
                else:
                    out.append({0: "", 1: "<s>", 2: "</s>", 3: "_"}.get(t, f"<{t}>"))
        flush()
        return "".join(out)


def default_docs() -> tuple[list[str], str]:
    """The documentation that ships with every Python: pydoc_data.topics (79 topics, ~465 k characters)."""
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)], "pydoc_data.topics (Python's own docs)"


def text_files(path: str) -> list[str]:
    """`path` if it is a file, else the regular files under the folder (sorted, symlinks to regular files followed),
    leaving out hidden files and folders (.git ...), broken symlinks, FIFOs, sockets and devices."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"--data {path}: not a regular file or a folder")
    files = []
    for d, dirs, fs in os.walk(path):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        files += [os.path.join(d, f) for f in fs if not f.startswith(".") and os.path.isfile(os.path.join(d, f))]
    return sorted(files)


def read_docs(path: str) -> tuple[list[str], str]:
    """A text file, or every text file under a folder (see text_files; files with NUL bytes are skipped as
    binary): one document per file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    parts = []
    for f in text_files(path):
        try:
            with open(f, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise ValueError(f"--data {path}: cannot read {f} ({e.strerror or e})") from None
        if b"\0" not in raw:
            parts.append(raw.decode("utf-8", errors="replace"))
    return parts, f"{path} ({len(parts)} text file{'s' if len(parts) != 1 else ''})"


@dataclass
class Corpus:
    train: Tensor  # int64 token ids
    val: Tensor
    source: str

    @classmethod
    def load(cls, path: str | None, tok: ByteTokenizer, val_fraction: float = 0.1, eos_between: bool = False
             ) -> Corpus:
        """The documents (pydoc topics, or files) as one stream of ids, joined by a blank line; with
        `eos_between`, each document ends with an EOS instead (packed documents: the trainer's --doc-mask)."""
        docs, source = default_docs() if path is None else read_docs(path)
        if not any(docs):
            raise ValueError(f"--data {path}: no text in it (empty, or only binary files)")
        if eos_between:
            eos = torch.tensor([tok.eos_id])
            ids = torch.cat([t for d in docs if d for t in (tok.encode(d), eos)])
        else:
            ids = tok.encode("\n\n".join(docs))
        n_val = int(len(ids) * val_fraction)
        return cls(ids[: len(ids) - n_val], ids[len(ids) - n_val:], source)

    def windows(self, split: str, batch_size: int, seq_len: int, seed: int) -> Tensor:
        """batch_size random windows of seq_len tokens; the same seed gives the same windows (resume, DDP)."""
        data = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(data) - seq_len + 1, (batch_size,), generator=g)
        return torch.stack([data[s: s + seq_len] for s in starts.tolist()])

    def crossing_fraction(self, seq_len: int, eos_id: int) -> float:
        """The share of the training windows of seq_len tokens (as `windows` draws them) that hold a document
        boundary: an EOS before their last token. What --doc-mask has to mask."""
        n = len(self.train) - seq_len + 1
        if n <= 0 or seq_len < 2:
            return 0.0
        ends = torch.cat([torch.zeros(1, dtype=torch.int64), (self.train == eos_id).cumsum(0)])
        return float((ends[seq_len - 1: seq_len - 1 + n] - ends[:n] > 0).double().mean())

    def sentence(self, min_len: int = 40, max_len: int = 100) -> str:
        """A held-out sentence (from the validation split) for the end-of-run demos."""
        raw = self.val - ByteTokenizer.offset
        raw = torch.where((raw < 0) | (raw > 255), ord("\n"), raw)  # EOS between documents (--doc-mask): a break
        text = bytes(raw.tolist()).decode("utf-8", errors="replace")
        for line in text.replace(". ", ".\n").split("\n"):
            line = " ".join(line.split())
            if min_len <= len(line) <= max_len and line.isascii() and line[0].isupper():
                return line
        return " ".join(text.split())[:max_len]
