"""Sampled dense-dense product: dW_k = sum_n G[n, row_k] X[n, col_k] (+ reg * theta_k).

Only the stored positions are computed: the dense G^T X is never formed. With
feature-major activations (gt (out, n), xt (in, n)) each entry is a dot product of
two contiguous rows. One thread owns each CSR row, so results do not depend on
the thread count; W's columns are walked in L2-sized tiles (fastest when column
indices ascend within each row; any order is correct); sums accumulate in the activations' dtype. The Top-KAST
exploration term is fused: ``out[k] += reg * theta[k]`` with one coefficient
per call (the engine calls once for A and once for B minus A).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .spmm import next_tile, tile_end


_L2_TILE_BYTES = 384 * 1024   # target size of the xt tile kept in L2 per thread


@nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def _sddmm_kernel(indptr, indices, gt, xt, theta, reg, zero, out, T, RB):
    """Rows are split into blocks of RB (one thread each); within a block W's
    columns are walked in tiles of T so the touched rows of ``xt`` stay in L2
    while every row of the block reuses them. Four stored values share each
    load of ``gt[row]``."""
    nrows = indptr.shape[0] - 1
    n = gt.shape[1]
    use_reg = reg != 0.0
    nblk = (nrows + RB - 1) // RB
    for b in nb.prange(nblk):
        r0 = b * RB
        r1 = min(r0 + RB, nrows)
        cur = indptr[r0:r1].copy()
        while True:
            c1 = next_tile(indices, indptr, cur, r0, r1, T)
            if c1 < 0:
                break
            for r in range(r0, r1):
                k = cur[r - r0]
                k1 = tile_end(indices, k, indptr[r + 1], c1)
                cur[r - r0] = k1
                g = gt[r]
                while k + 4 <= k1:
                    x0 = xt[indices[k]]
                    x1 = xt[indices[k + 1]]
                    x2 = xt[indices[k + 2]]
                    x3 = xt[indices[k + 3]]
                    s0 = zero
                    s1 = zero
                    s2 = zero
                    s3 = zero
                    for j in range(n):
                        gj = g[j]
                        s0 += gj * x0[j]
                        s1 += gj * x1[j]
                        s2 += gj * x2[j]
                        s3 += gj * x3[j]
                    if use_reg:
                        s0 += reg * theta[k]
                        s1 += reg * theta[k + 1]
                        s2 += reg * theta[k + 2]
                        s3 += reg * theta[k + 3]
                    out[k] = s0
                    out[k + 1] = s1
                    out[k + 2] = s2
                    out[k + 3] = s3
                    k += 4
                while k < k1:
                    x0 = xt[indices[k]]
                    s0 = zero
                    for j in range(n):
                        s0 += g[j] * x0[j]
                    if use_reg:
                        s0 += reg * theta[k]
                    out[k] = s0
                    k += 1


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
    nrows = indptr.shape[0] - 1
    if nrows == 0 or nnz == 0:
        return out
    n = gt.shape[1]
    tile = max(64, _L2_TILE_BYTES // max(1, n * gt.itemsize))
    rb = max(16, -(-nrows // (4 * nb.get_num_threads())))
    _sddmm_kernel(indptr, indices, gt, xt, theta, float(reg), gt.dtype.type(0), out, tile, rb)
    return out
