"""The byte corpus: the embedded default (the standard library's own ``.py``
sources) or the user's text, split into training and validation bytes, and batches
that are a pure function of (seed, step).

Bytes are tokens (vocabulary 256), so no tokenizer is needed and the
cross-entropy in bits is the bits-per-byte of the text.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

#: Default cap on the bytes read from the corpus (enough for a first run).
DEFAULT_MAX_BYTES = 2 * 1024 * 1024
#: Fraction of the corpus (its tail) held out for validation.
VAL_FRACTION = 0.05


class CorpusError(ValueError):
    """The corpus is missing, empty or too small for the requested context."""


def stdlib_dir() -> str:
    """Directory of the running interpreter's standard library."""
    return os.path.dirname(os.__file__)


def _stdlib_files() -> list[str]:
    """The standard library's top-level ``.py`` files, sorted by name."""
    d = stdlib_dir()
    return [os.path.join(d, f) for f in sorted(os.listdir(d))
            if f.endswith(".py") and os.path.isfile(os.path.join(d, f))]


def _text_files(path: str) -> list[str]:
    """A file, or every non-hidden regular file under a folder (sorted relative
    paths, recursively); files whose first 8 KiB contain a NUL byte are skipped as
    binary."""
    if not os.path.exists(path):
        raise CorpusError(f"data path {path!r} does not exist")
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CorpusError(f"data path {path!r} is neither a file nor a folder")
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            p = os.path.join(root, f)
            if f.startswith(".") or not os.path.isfile(p):
                continue
            try:
                with open(p, "rb") as fh:
                    if b"\0" in fh.read(8192):
                        continue
            except OSError as e:
                raise CorpusError(f"cannot read {p!r}: {e.strerror}") from None
            found.append(p)
    return sorted(found, key=lambda p: os.path.relpath(p, path))


def _read_capped(files: list[str], max_bytes: int) -> tuple[bytes, int]:
    """The first ``max_bytes`` bytes of the files concatenated in order, and how
    many files contributed."""
    parts, total = [], 0
    for p in files:
        if total >= max_bytes:
            break
        try:
            with open(p, "rb") as fh:
                chunk = fh.read(max_bytes - total)
        except OSError as e:
            raise CorpusError(f"cannot read {p!r}: {e.strerror}") from None
        if chunk:
            parts.append(chunk)
            total += len(chunk)
    return b"".join(parts), len(parts)


@dataclass
class Corpus:
    """Training and validation bytes (uint8 tensors) and where they came from."""
    train: torch.Tensor
    val: torch.Tensor
    source: str
    files: int
    digest: str

    @property
    def n_bytes(self) -> int:
        return self.train.numel() + self.val.numel()

    def describe(self) -> str:
        return (f"{self.source}: {self.files} files, {self.n_bytes:,} bytes "
                f"({self.train.numel():,} train / {self.val.numel():,} validation)")


def load_corpus(path: str | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                context: int = 128, val_fraction: float = VAL_FRACTION) -> Corpus:
    """Read the corpus and split it.

    ``path=None``: the standard library's top-level ``.py`` files in sorted order.
    Otherwise a text file or a folder of text files. At most ``max_bytes`` bytes
    are read (files in order, the last one truncated), so the result is a pure
    function of the files and the cap. The last ``val_fraction`` of the bytes is
    the validation split; both splits must hold more than ``context`` bytes.
    """
    if max_bytes <= 0:
        raise CorpusError(f"max_bytes must be positive, got {max_bytes}")
    if path is None:
        files, source = _stdlib_files(), f"Python standard library ({stdlib_dir()})"
    else:
        files, source = _text_files(path), path
    data, n_files = _read_capped(files, max_bytes)
    if not data:
        raise CorpusError(f"corpus {source!r} is empty (no text bytes found)")
    n_val = max(context + 1, int(len(data) * val_fraction))
    n_train = len(data) - n_val
    if n_train < context + 1:
        raise CorpusError(f"corpus {source!r} has {len(data):,} bytes; with context {context} "
                          f"it needs at least {2 * (context + 1):,} (context+1 bytes each for "
                          "training and validation): lower --context or give more text")
    arr = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return Corpus(train=arr[:n_train], val=arr[n_train:], source=source, files=n_files,
                  digest=hashlib.blake2b(data, digest_size=12).hexdigest())


def train_batch(data: torch.Tensor, *, batch: int, context: int, seed: int, step: int,
                micro: int = 0, rank: int = 0,
                world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (int64, shape (batch / world_size, context)) for optimizer
    step ``step`` and micro-batch ``micro``: random windows whose offsets are a pure
    function of (seed, step, micro), so a resumed run sees exactly the data of an
    uninterrupted one.

    ``batch`` is the global batch. Under data parallelism every rank draws the same
    ``batch`` offsets and keeps its own contiguous block of ``batch / world_size``
    of them (rank r: rows r*b .. (r+1)*b - 1), so the ranks together see exactly the
    batch one process would, whatever the number of ranks."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch % world_size:
        raise ValueError(f"the global batch {batch} is not divisible by the world size "
                         f"{world_size}")
    rng = np.random.default_rng([seed, step, micro])
    starts = torch.from_numpy(rng.integers(0, data.numel() - context, size=batch))
    per = batch // world_size
    return _windows(data, starts[rank * per:(rank + 1) * per], context)


def val_batches(data: torch.Tensor, *, batch: int, context: int, max_tokens: int):
    """Fixed validation batches: evenly spaced windows covering up to ``max_tokens``
    target bytes of the validation split (the same windows at every evaluation)."""
    n_windows = max(1, min(max_tokens // context, (data.numel() - 1) // context))
    starts = torch.linspace(0, data.numel() - context - 1, n_windows).long()
    for i in range(0, n_windows, batch):
        yield _windows(data, starts[i:i + batch], context)


def _windows(data: torch.Tensor, starts: torch.Tensor, context: int):
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
