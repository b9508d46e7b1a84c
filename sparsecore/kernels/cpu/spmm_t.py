"""dX = G W for a CSR matrix W and row-major G (n, out), via a transposed structure built once.

The transpose (CSC of W, i.e. CSR of W^T) is a pure index structure plus a
permutation into W's value array. It depends only on the sparsity pattern, so
the engine rebuilds it at refresh time and reuses it every step; each call gathers
W's values into the transposed order in one parallel pass (K_A values, far less than
the product's work) and runs the forward kernel (:func:`.spmm.csr_rows_kernel`) on
W^T, reading G row-major as torch hands it.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .spmm import csr_rows_kernel, gather


@nb.njit(cache=True)
def _transpose_kernel(indptr, indices, n_cols, t_indptr, t_rows, t_perm):
    nrows = indptr.shape[0] - 1
    for k in range(indices.shape[0]):
        t_indptr[indices[k] + 1] += 1
    for c in range(n_cols):
        t_indptr[c + 1] += t_indptr[c]
    fill = t_indptr[:-1].copy()
    for r in range(nrows):
        for k in range(indptr[r], indptr[r + 1]):
            c = indices[k]
            pos = fill[c]
            t_rows[pos] = r
            t_perm[pos] = k
            fill[c] = pos + 1


def transpose_csr(indptr: np.ndarray, indices: np.ndarray, n_cols: int,
                  perm_dtype=np.int64):
    """CSR of W^T: (t_indptr int64 (n_cols+1), t_rows int32, t_perm ``perm_dtype``)
    with W^T's k-th stored value equal to ``data[t_perm[k]]``; rows ascending
    within each column (a counting sort, O(nnz + n_cols))."""
    nnz = indices.shape[0]
    t_indptr = np.zeros(n_cols + 1, np.int64)
    t_rows = np.empty(nnz, np.int32)
    t_perm = np.empty(nnz, perm_dtype)
    _transpose_kernel(indptr, indices, n_cols, t_indptr, t_rows, t_perm)
    return t_indptr, t_rows, t_perm


def spmm_t(t_indptr: np.ndarray, t_rows: np.ndarray, t_perm: np.ndarray,
           data: np.ndarray, g: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Return dx (n, in) = g @ W for g (n, out), W's transpose given by
    :func:`transpose_csr` and W's values ``data``. ``out`` may be any (n, in) array."""
    cols = t_indptr.shape[0] - 1
    if out is None:
        out = np.empty((g.shape[0], cols), dtype=g.dtype)
    csr_rows_kernel(t_indptr, t_rows, gather(data, t_perm), g, out, slot="g")
    return out
