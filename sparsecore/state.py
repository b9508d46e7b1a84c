"""One layer's sparse structure as a single immutable object, :class:`SparseState`.

A Top-KAST layer's trainable values (theta on B) are an ``nn.Parameter``; every
other piece of its sparse structure lives here:

* the forward set A and the rest of the backward set, X = B minus A, as CSR
  (int64 row pointers, int32 columns), row-major, in the order of ``values``
  (A first, then X);
* the cached transpose of A (CSR of A^T: int64 row pointers over the input
  features, int32 rows, and the position of each entry in ``values[:K_A]``,
  int32 while K_A < 2^31) used by the input-gradient product;
* the reserve: further candidates with their exact current values (sorted int64
  flat indices + values in the layer's dtype);
* the cold store (:mod:`sparsecore.spill`): trained coordinates that left the
  RAM pool, with their exact values, on disk;
* the floor (every coordinate outside the pool and the cold store still holds
  theta0 and has |theta0| < floor; every cold value is below it too) and the
  64-bit layer key of theta0.

A refresh never mutates a state: :mod:`sparsecore.topkast` builds a new one and
the layer installs it with one assignment. Index tensors and the floor are never
cast by ``.float()`` / ``.half()`` / ``.to(dtype)``; ``.to(device)`` moves all of it
(:meth:`SparseState.to`). The state is not made of registered buffers, so
DistributedDataParallel never broadcasts it; it enters ``state_dict()`` through
:meth:`tensors` / :meth:`from_tensors`, which validates everything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .kernels.cpu import spmm_t as _spmm_t
from .kernels._validate import check_csr
from .kernels.cpu.pool import check_cold, check_disjoint
from .memory import INT32_MAX
from . import spill as _spill

# names of the persistent tensors in a state_dict, under the layer's prefix
TENSOR_NAMES = ("a_indptr", "a_cols", "x_indptr", "x_cols", "reserve_idx", "reserve_val",
                "floor", "key", "cold_idx", "cold_val")
OPTIONAL_NAMES = ("cold_idx", "cold_val")   # absent in checkpoints written before the cold tier


def check_index_range(in_features: int, out_features: int, where: str) -> None:
    """Raise if a dimension would overflow the int32 indices of the layout."""
    for nm, v in (("in_features", in_features), ("out_features", out_features)):
        if v > INT32_MAX:
            raise ValueError(f"{where}: {nm}={v} exceeds the int32 index range "
                             f"(<= {INT32_MAX}); split the layer")
    if in_features * out_features >= 1 << 62:
        raise ValueError(f"{where}: {out_features}x{in_features} coordinates exceed the "
                         "int64 flat-index range (< 2^62)")


def flat_to_csr(flat: np.ndarray, n_rows: int, n_cols: int):
    """CSR (indptr int64, cols int32) of sorted flat indices."""
    rows = flat // n_cols
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, (flat - rows * n_cols).astype(np.int32)


def csr_to_flat(indptr: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    """Sorted int64 flat indices of a CSR structure with ascending columns."""
    rows = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))
    return rows * n_cols + cols.astype(np.int64)


def _transpose(a_indptr: torch.Tensor, a_cols: torch.Tensor, n_cols: int):
    perm_dtype = np.int32 if a_cols.numel() <= INT32_MAX else np.int64
    out = _spmm_t.transpose_csr(a_indptr.numpy(), a_cols.numpy(), int(n_cols), perm_dtype)
    return tuple(torch.from_numpy(a) for a in out)


@dataclass(frozen=True, eq=False)
class SparseState:
    """The immutable sparse structure of one layer (see the module docstring)."""

    in_features: int
    out_features: int
    a_indptr: torch.Tensor
    a_cols: torch.Tensor
    x_indptr: torch.Tensor
    x_cols: torch.Tensor
    reserve_idx: torch.Tensor
    reserve_val: torch.Tensor
    floor: float
    key: int                      # unsigned 64-bit
    cold: _spill.ColdStore = field(default=None, repr=False)   # None: empty
    at_indptr: torch.Tensor = field(default=None, repr=False)
    at_rows: torch.Tensor = field(default=None, repr=False)
    at_perm: torch.Tensor = field(default=None, repr=False)

    def __post_init__(self):
        if self.cold is None:
            object.__setattr__(self, "cold", _spill.ColdStore.empty(
                torch.empty(0, dtype=self.reserve_val.dtype).numpy().dtype))
        if self.at_indptr is None:  # derive the transpose (CPU; moved with the rest)
            at = _transpose(self.a_indptr.cpu(), self.a_cols.cpu(), self.in_features)
            dev = self.a_indptr.device
            for nm, t in zip(("at_indptr", "at_rows", "at_perm"), at):
                object.__setattr__(self, nm, t.to(dev))

    # ------------------------------------------------------------------ sizes
    @property
    def k_a(self) -> int:
        return int(self.a_cols.numel())

    @property
    def k_b(self) -> int:
        return int(self.a_cols.numel() + self.x_cols.numel())

    @property
    def n_reserve(self) -> int:
        return int(self.reserve_idx.numel())

    @property
    def device(self) -> torch.device:
        return self.a_indptr.device

    def index_tensors(self) -> tuple:
        return (self.a_indptr, self.a_cols, self.x_indptr, self.x_cols,
                self.at_indptr, self.at_rows, self.at_perm)

    def nbytes(self) -> dict:
        """Bytes held, by kind: ``indices`` (CSR of A, X and A^T) and ``reserve`` in
        memory, ``spilled`` (the cold store) on disk."""
        def b(t):
            return t.numel() * t.element_size()
        return {"indices": sum(b(t) for t in self.index_tensors()),
                "reserve": b(self.reserve_idx) + b(self.reserve_val),
                "spilled": self.cold.nbytes}

    # ----------------------------------------------------------- flat indices
    def a_flat(self) -> np.ndarray:
        """Sorted int64 flat indices of A (computed; not stored)."""
        return csr_to_flat(self.a_indptr.cpu().numpy(), self.a_cols.cpu().numpy(),
                           self.in_features)

    def x_flat(self) -> np.ndarray:
        """Sorted int64 flat indices of B minus A (computed; not stored)."""
        return csr_to_flat(self.x_indptr.cpu().numpy(), self.x_cols.cpu().numpy(),
                           self.in_features)

    # ------------------------------------------------------------------ moves
    def to(self, device=None, value_dtype: torch.dtype | None = None) -> "SparseState":
        """A copy on ``device`` with reserve values in ``value_dtype``; indices and
        the floor keep their dtypes. Returns ``self`` when nothing changes."""
        dev = self.device if device is None else torch.device(device)
        vdt = self.reserve_val.dtype if value_dtype is None else value_dtype
        if dev == self.device and vdt == self.reserve_val.dtype:
            return self
        moved = {nm: getattr(self, nm).to(dev) for nm in
                 ("a_indptr", "a_cols", "x_indptr", "x_cols", "reserve_idx",
                  "at_indptr", "at_rows", "at_perm")}
        moved["reserve_val"] = self.reserve_val.to(device=dev, dtype=vdt)
        if vdt != self.reserve_val.dtype:
            moved["cold"] = _spill.cast(self.cold, moved["reserve_val"].cpu().numpy().dtype)
        return replace(self, **moved)

    # ------------------------------------------------------------ state_dict
    def tensors(self) -> dict:
        """The persistent tensors (what a checkpoint stores), by name."""
        signed = self.key - (1 << 64) if self.key >= 1 << 63 else self.key
        return {"a_indptr": self.a_indptr, "a_cols": self.a_cols,
                "x_indptr": self.x_indptr, "x_cols": self.x_cols,
                "reserve_idx": self.reserve_idx, "reserve_val": self.reserve_val,
                "floor": torch.tensor(self.floor, dtype=torch.float64),
                "key": torch.tensor(signed, dtype=torch.int64),
                # memory-mapped (copy-on-write): exported without reading the disk tier
                **{n: torch.from_numpy(a) if a.size else torch.empty(0, dtype=dt)
                   for n, a, dt in zip(("cold_idx", "cold_val"), self.cold.mapped(),
                                       (torch.int64, self.reserve_val.dtype))}}

    @classmethod
    def from_tensors(cls, t: dict, *, in_features: int, out_features: int, k_a: int,
                     k_b: int, value_dtype: torch.dtype, where: str,
                     spill_dir: str | None = None, cold_chunks=None) -> "SparseState":
        """Validate ``t`` (as produced by :meth:`tensors`) against the layer's shape
        and sizes and build a state from it; raises ValueError naming the bad entry.
        The state may share memory with ``t`` (no copy: a load stays within its
        memory bound); states never modify their tensors in place. Cold entries
        (optional: ``cold_idx``/``cold_val`` in ``t``, or ``cold_chunks``, an iterable
        of (flat, values) NumPy chunks in order, so that a checkpoint never holds
        them in RAM) are checked and written to a new cold store in ``spill_dir``."""
        missing = [n for n in TENSOR_NAMES if n not in t and n not in OPTIONAL_NAMES]
        if missing:
            raise ValueError(f"{where}: sparse state is missing {missing}")
        t = dict(t)
        if cold_chunks is not None and any(n in t for n in OPTIONAL_NAMES):
            raise ValueError(f"{where}: cold entries given both as tensors and as chunks")
        for n, dt in zip(OPTIONAL_NAMES, (torch.int64, value_dtype)):
            t.setdefault(n, torch.empty(0, dtype=dt))
        for n in TENSOR_NAMES:
            if not torch.is_tensor(t[n]):
                raise ValueError(f"{where}: {n} is not a tensor")
        expect = {"a_indptr": ((out_features + 1,), torch.int64),
                  "x_indptr": ((out_features + 1,), torch.int64),
                  "a_cols": ((k_a,), torch.int32), "x_cols": ((k_b - k_a,), torch.int32),
                  "floor": ((), torch.float64), "key": ((), torch.int64),
                  "reserve_idx": (None, torch.int64), "reserve_val": (None, value_dtype),
                  "cold_idx": (None, torch.int64), "cold_val": (None, value_dtype)}
        for n, (shape, dtype) in expect.items():
            v = t[n]
            if v.dtype != dtype or (shape is not None and tuple(v.shape) != shape) \
                    or (shape is None and v.dim() != 1):
                raise ValueError(f"{where}: {n} has shape {tuple(v.shape)} and dtype {v.dtype}; "
                                 f"expected {shape if shape is not None else '(any,)'} {dtype}")
        if t["reserve_idx"].shape != t["reserve_val"].shape:
            raise ValueError(f"{where}: reserve_idx and reserve_val differ in shape")
        if not torch.isfinite(t["reserve_val"]).all():
            raise ValueError(f"{where}: reserve_val contains NaN or Inf")
        floor = float(t["floor"])
        if not floor >= 0:
            raise ValueError(f"{where}: floor {floor} is not >= 0")
        cpu = {n: t[n].detach().cpu().contiguous() for n in TENSOR_NAMES}
        for ip, cols, nm in (("a_indptr", "a_cols", "A"), ("x_indptr", "x_cols", "B minus A")):
            try:
                check_csr(cpu[ip], cpu[cols], out_features, in_features, nm)
            except (TypeError, ValueError, IndexError) as e:
                raise ValueError(f"{where}: {e}") from None
        bad = check_disjoint(in_features, cpu["a_indptr"].numpy(), cpu["a_cols"].numpy(),
                             cpu["x_indptr"].numpy(), cpu["x_cols"].numpy(),
                             cpu["reserve_idx"].numpy(), in_features * out_features)
        if bad:
            raise ValueError(f"{where}: {bad}")
        if cold_chunks is None:
            cold_chunks = [(cpu["cold_idx"].numpy(), cpu["cold_val"].numpy())]
        pool = tuple(cpu[n].numpy() for n in ("a_indptr", "a_cols", "x_indptr", "x_cols",
                                              "reserve_idx"))
        cold = _checked_cold(cold_chunks, in_features, pool, floor,
                             cpu["reserve_val"].numpy().dtype, spill_dir, where)
        key = int(cpu["key"]) & 0xFFFFFFFFFFFFFFFF
        return cls(in_features, out_features, cpu["a_indptr"], cpu["a_cols"], cpu["x_indptr"],
                   cpu["x_cols"], cpu["reserve_idx"], cpu["reserve_val"], floor, key, cold=cold)


def _checked_cold(chunks, n_cols: int, pool: tuple, floor: float, dtype, spill_dir,
                  where: str) -> _spill.ColdStore:
    """Check cold entries chunk by chunk (dtypes, lengths, finite values, strictly
    ascending flat indices across chunks, |value| < floor, none in the pool) while
    writing them to a new store; raises ValueError (the partial store is deleted)."""
    writer, last, seen = None, -1, 0
    n_rows = pool[0].shape[0] - 1
    for idx, val in chunks:
        if idx.shape != val.shape:
            raise ValueError(f"{where}: cold_idx and cold_val differ in shape "
                             f"({idx.shape} and {val.shape})")
        if idx.dtype != np.int64 or val.dtype != dtype or idx.ndim != 1:
            raise ValueError(f"{where}: cold entries must be 1-D int64 indices and {dtype} "
                             f"values, got {idx.dtype} {idx.shape} and {val.dtype}")
        if not idx.shape[0]:
            continue
        if not np.isfinite(val).all():
            raise ValueError(f"{where}: cold_val contains NaN or Inf")
        if idx[0] <= last:
            raise ValueError(f"{where}: cold indices are not sorted, unique and in "
                             f"[0, {n_rows * n_cols}) (entry {seen})")
        bad = check_cold(n_cols, *pool, idx, val, floor, n_rows * n_cols)
        if bad:
            raise ValueError(f"{where}: {bad} (from entry {seen})")
        writer = writer or _spill.Writer(spill_dir or _spill.default_dir(), dtype)
        writer.write(idx, val)
        last, seen = int(idx[-1]), seen + idx.shape[0]
    return writer.close() if writer is not None else _spill.ColdStore.empty(dtype)


def empty_state(in_features: int, out_features: int, key: int, value_dtype) -> SparseState:
    """The state before construction: an empty pool with floor = inf."""
    z = torch.zeros(out_features + 1, dtype=torch.int64)
    e32 = torch.empty(0, dtype=torch.int32)
    return SparseState(in_features, out_features, z, e32, z.clone(), e32.clone(),
                       torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=value_dtype),
                       math.inf, key)
