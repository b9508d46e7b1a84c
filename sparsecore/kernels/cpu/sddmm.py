"""Sampled dense-dense product: dW_k = sum_n G[n, row_k] X[n, col_k] (+ reg * theta_k).

Only the stored positions are computed: the dense G^T X is never formed. The
activations arrive row-major as torch hands them (G (n, out), X (n, in)); the
kernel first packs them feature-major (gt (out, n), xt (in, n)) in one parallel,
cache-blocked pass each, so every entry is a dot product of two contiguous rows
(inputs already feature-major are used as they are). One thread owns each CSR row, so results do not depend on
the thread count; W's columns are walked in L2-sized tiles (fastest when column
indices ascend within each row; any order is correct); sums accumulate in the activations' dtype. The Top-KAST
exploration term is fused: ``out[k] += reg * theta[k]`` with one coefficient
per call (the engine calls once for A and once for B minus A).
"""
from __future__ import annotations

import numba as nb
import numpy as np

from .spmm import transpose_into


_L2_TILE_BYTES = 384 * 1024   # target size of the xt tile kept in L2 per thread


@nb.njit(inline="always", cache=True)
def next_tile(indices, indptr, cur, r0, r1, T):
    """End column of the next column tile (of width T) that holds an unvisited
    entry of rows [r0, r1), or -1 when all are visited. Jumping to it keeps the
    per-call work O(nnz + rows): empty tiles are never visited."""
    lo = -1
    for r in range(r0, r1):
        k = cur[r - r0]
        if k < indptr[r + 1]:
            c = indices[k]
            if lo < 0 or c < lo:
                lo = c
    if lo < 0:
        return -1
    return (lo // T + 1) * T


@nb.njit(inline="always", cache=True)
def tile_end(indices, k, e, c1):
    """First position in [k, e) whose column is >= c1 (columns ascend in a row):
    the end of this row's entries in the current column tile."""
    while k < e and indices[k] < c1:
        k += 1
    return k


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


def feature_major(a: np.ndarray) -> np.ndarray:
    """(features, n) C-contiguous form of a (n, features) array: a view when ``a`` is
    already a transposed feature-major buffer, else one parallel blocked pack."""
    t = a.T
    if t.flags.c_contiguous:
        return t
    out = np.empty((a.shape[1], a.shape[0]), a.dtype)
    transpose_into(a, out)
    return out


def sddmm(indptr: np.ndarray, indices: np.ndarray, g: np.ndarray, x: np.ndarray,
          theta: np.ndarray | None = None, reg: float = 0.0,
          out: np.ndarray | None = None, more=()) -> np.ndarray:
    """Vector of length nnz: sum_n g[n, row_k] * x[n, col_k] + reg * theta[k], for
    g (n, rows) and x (n, cols) with any strides. ``more``: further (indptr, indices,
    out) structures over the same activations (no regulariser), computed from the
    same packed operands (the layer's B minus A)."""
    nnz = indices.shape[0]
    if out is None:
        out = np.empty(nnz, dtype=g.dtype)
    if theta is None:
        theta, reg = _EMPTY[np.dtype(g.dtype)], 0.0
    n = g.shape[0]
    jobs = [(indptr, indices, theta, float(reg), out)]
    jobs += [(ip, ix, _EMPTY[np.dtype(g.dtype)], 0.0, o) for ip, ix, o in more]
    jobs = [j for j in jobs if j[0].shape[0] > 1 and j[1].shape[0] > 0]
    if not jobs:
        return out
    if n == 0:
        for _, _, th, rg, o in jobs:
            o[:] = rg * th if rg != 0.0 else 0.0
        return out
    gt = feature_major(g)
    xt = feature_major(x)
    tile = max(64, _L2_TILE_BYTES // max(1, n * g.itemsize))
    for ip, ix, th, rg, o in jobs:
        nrows = ip.shape[0] - 1
        rb = max(16, -(-nrows // (4 * nb.get_num_threads())))
        _sddmm_kernel(ip, ix, gt, xt, th, rg, g.dtype.type(0), o, tile, rb)
    return out
