"""Input checks shared by the public kernel entry points of every backend.

The kernels themselves trust their inputs; these helpers turn user mistakes
(wrong dtype, shape, out-of-range index) into exceptions that name the bad value.
"""
from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def as_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (made contiguous first if needed)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise ValueError(f"{name} is on {t.device}; the CPU backend needs CPU tensors")
    if t.requires_grad:
        t = t.detach()
    return t.contiguous().numpy()


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected torch.float32 or torch.float64")


def check_csr(indptr: torch.Tensor, indices: torch.Tensor, n_rows: int, n_cols: int,
              name: str = "CSR") -> None:
    """Validate a user-given CSR structure: int64 row pointers, int32 column indices."""
    if indptr.dtype != torch.int64:
        raise TypeError(f"{name} row pointers have dtype {indptr.dtype}; expected torch.int64")
    if indices.dtype != torch.int32:
        raise TypeError(f"{name} column indices have dtype {indices.dtype}; expected torch.int32")
    if indptr.numel() == 0 or n_rows < 0:
        raise ValueError(f"{name} row pointers are empty; they need rows+1 >= 1 entries")
    if indptr.dim() != 1 or indptr.numel() != n_rows + 1:
        raise ValueError(f"{name} row pointers have shape {tuple(indptr.shape)}; "
                         f"expected ({n_rows + 1},) for {n_rows} rows")
    check_csr_content(indptr, indices, n_cols, name)


def check_csr_content(indptr: torch.Tensor, indices: torch.Tensor, n_cols: int,
                      name: str = "CSR") -> None:
    """Value checks of a CSR structure on any device (torch ops; on a GPU each
    costs a sync): row pointers from 0 to nnz, non-decreasing, columns in range."""
    nnz = indices.numel()
    if indptr.numel() == 0:
        raise ValueError(f"{name} row pointers are empty; they need rows+1 >= 1 entries")
    first, last = int(indptr[0]), int(indptr[-1])
    if first != 0 or last != nnz:
        raise ValueError(f"{name} row pointers must start at 0 and end at nnz={nnz}; "
                         f"got {first} and {last}")
    if indptr.numel() > 1 and bool((indptr[1:] < indptr[:-1]).any()):
        raise ValueError(f"{name} row pointers must be non-decreasing")
    if nnz:
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n_cols:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} column index {bad} is out of range [0, {n_cols})")


def check_dense(t: torch.Tensor, name: str, dtype: torch.dtype, rows: int | None = None) -> None:
    check_float(t, name)
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the sparse values are {dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (features, n); got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows; expected {rows}")
