"""Sampled dense-dense product: dW_k = sum_n G[n, row_k] X[n, col_k] (+ reg * theta_k).

Only the stored positions are computed: the dense G^T X is never formed. With
feature-major activations (gt (out, n), xt (in, n)) each entry is a dot product of
two contiguous rows. One thread owns each CSR row, so results do not depend on
the thread count; sums accumulate in the activations' dtype. The Top-KAST
exploration term is fused: ``out[k] += reg * theta[k]`` with one coefficient
per call (the engine calls once for A and once for B minus A).
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def _sddmm_kernel(indptr, indices, gt, xt, theta, reg, zero, out):
    nrows = indptr.shape[0] - 1
    n = gt.shape[1]
    use_reg = reg != 0.0
    for r in nb.prange(nrows):
        g = gt[r]
        k = indptr[r]
        e = indptr[r + 1]
        while k + 2 <= e:
            x0 = xt[indices[k]]
            x1 = xt[indices[k + 1]]
            s0 = zero
            s1 = zero
            for j in range(n):
                gj = g[j]
                s0 += gj * x0[j]
                s1 += gj * x1[j]
            if use_reg:
                s0 += reg * theta[k]
                s1 += reg * theta[k + 1]
            out[k] = s0
            out[k + 1] = s1
            k += 2
        if k < e:
            x0 = xt[indices[k]]
            s0 = zero
            for j in range(n):
                s0 += g[j] * x0[j]
            if use_reg:
                s0 += reg * theta[k]
            out[k] = s0


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def sddmm(indptr: np.ndarray, indices: np.ndarray, gt: np.ndarray, xt: np.ndarray,
          theta: np.ndarray | None = None, reg: float = 0.0,
          out: np.ndarray | None = None) -> np.ndarray:
    """Vector of length nnz: sum_n gt[row_k, n] * xt[col_k, n] + reg * theta[k]."""
    nnz = indices.shape[0]
    if out is None:
        out = np.empty(nnz, dtype=gt.dtype)
    if theta is None:
        theta, reg = _EMPTY[np.dtype(gt.dtype)], 0.0
    _sddmm_kernel(indptr, indices, gt, xt, theta, float(reg), gt.dtype.type(0), out)
    return out
