"""Y^T = W X^T for a CSR matrix W and feature-major activations (CPU, Numba).

Activations are passed feature-major, ``xt`` of shape (in, n), so that the inner
loop runs over n contiguously and vectorises. Each output row is computed by one
thread (rows are independent: no atomics, deterministic summation order). Four
stored values are consumed per pass over the output row, and n is split into
panels so the output row and the touched input rows stay in cache.
"""
from __future__ import annotations

import numba as nb
import numpy as np

PANEL = 256


@nb.njit(parallel=True, cache=True, boundscheck=False)
def csr_rows_kernel(indptr, indices, data, perm, xt, yt, panel):
    """yt[r, :] = sum_k data[perm[k]] * xt[indices[k], :] over k in row r.

    ``perm`` maps stored position -> position in ``data``; pass an empty array for
    the identity. Shared by :func:`spmm` and, on a transposed structure, by
    :func:`sparsecore.kernels.spmm_t.spmm_t`.
    """
    nrows = indptr.shape[0] - 1
    n = xt.shape[1]
    use_perm = perm.shape[0] > 0
    for p0 in range(0, n, panel):
        p1 = min(p0 + panel, n)
        for r in nb.prange(nrows):
            y = yt[r]
            for j in range(p0, p1):
                y[j] = 0.0
            k = indptr[r]
            e = indptr[r + 1]
            while k + 4 <= e:
                if use_perm:
                    w0 = data[perm[k]]
                    w1 = data[perm[k + 1]]
                    w2 = data[perm[k + 2]]
                    w3 = data[perm[k + 3]]
                else:
                    w0 = data[k]
                    w1 = data[k + 1]
                    w2 = data[k + 2]
                    w3 = data[k + 3]
                x0 = xt[indices[k]]
                x1 = xt[indices[k + 1]]
                x2 = xt[indices[k + 2]]
                x3 = xt[indices[k + 3]]
                for j in range(p0, p1):
                    y[j] += w0 * x0[j] + w1 * x1[j] + w2 * x2[j] + w3 * x3[j]
                k += 4
            while k < e:
                w0 = data[perm[k]] if use_perm else data[k]
                x0 = xt[indices[k]]
                for j in range(p0, p1):
                    y[j] += w0 * x0[j]
                k += 1


_NO_PERM = np.empty(0, np.int64)


def spmm(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, xt: np.ndarray,
         out: np.ndarray | None = None) -> np.ndarray:
    """Return yt (rows, n) with yt = W @ xt, W given as CSR (indptr, indices, data)."""
    rows = indptr.shape[0] - 1
    if out is None:
        out = np.empty((rows, xt.shape[1]), dtype=xt.dtype)
    csr_rows_kernel(indptr, indices, data, _NO_PERM, xt, out, PANEL)
    return out
