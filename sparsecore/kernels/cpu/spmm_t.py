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


@nb.njit(parallel=True, cache=True)
def _transpose_kernel(indptr, indices, n_cols, t_indptr, t_rows, t_perm, nblk):
    """Counting sort by column in ``nblk`` parallel row blocks: each block counts its
    entries per column, then writes them at its own offset inside each column, so
    rows stay ascending within a column."""
    nrows = indptr.shape[0] - 1
    per = (nrows + nblk - 1) // nblk
    cnt = np.zeros((nblk, n_cols), np.int64)
    for b in nb.prange(nblk):
        for k in range(indptr[min(b * per, nrows)], indptr[min(b * per + per, nrows)]):
            cnt[b, indices[k]] += 1
    pos = np.int64(0)
    for c in range(n_cols):     # cnt becomes each block's first position in column c
        t_indptr[c] = pos
        for b in range(nblk):
            m = cnt[b, c]
            cnt[b, c] = pos
            pos += m
    t_indptr[n_cols] = pos
    for b in nb.prange(nblk):
        for r in range(min(b * per, nrows), min(b * per + per, nrows)):
            for k in range(indptr[r], indptr[r + 1]):
                c = indices[k]
                p = cnt[b, c]
                t_rows[p] = r
                t_perm[p] = k
                cnt[b, c] = p + 1


def transpose_csr(indptr: np.ndarray, indices: np.ndarray, n_cols: int,
                  perm_dtype=np.int64):
    """CSR of W^T: (t_indptr int64 (n_cols+1), t_rows int32, t_perm ``perm_dtype``)
    with W^T's k-th stored value equal to ``data[t_perm[k]]``; rows ascending
    within each column (a counting sort, O(nnz + blocks * n_cols), parallel over
    row blocks; the per-block counts take at most 4 bytes per stored entry)."""
    nnz = indices.shape[0]
    t_indptr = np.empty(n_cols + 1, np.int64)
    t_rows = np.empty(nnz, np.int32)
    t_perm = np.empty(nnz, perm_dtype)
    nblk = max(1, min(4 * nb.get_num_threads(), nnz // max(2 * n_cols, 1),
                      indptr.shape[0] - 1))
    _transpose_kernel(indptr, indices, np.int64(n_cols), t_indptr, t_rows, t_perm,
                      np.int64(nblk))
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
