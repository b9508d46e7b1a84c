"""Y^T = W X^T for a CSR matrix W and feature-major activations (CPU, Numba).

Activations are passed feature-major, ``xt`` of shape (in, n), so each stored
value multiplies a contiguous row of ``xt``. One thread owns each output row (no
atomics; the summation order does not depend on the thread count).

Performance layout (measured on a 2-core Zen 4, see docs/benchmarks.md):

* **Register panel.** n is cut into panels of ``P`` columns (128, then 64, 32, 16,
  then a scalar tail). For one output row and one panel the P partial sums live in
  a stack buffer that LLVM keeps in vector registers, so each stored value costs P
  fused multiply-adds with one load each and no load/store of the output.
* **Column tiles.** Within a panel, W's columns are walked in tiles of ``T`` so
  that the touched ``xt[tile, panel]`` block (T x P values) stays in L2 while a
  block of rows reuses it; the partial sums of a row are carried in ``yt``
  between tiles. Only tiles holding entries of the block are visited, so the
  work stays O(nnz * n + rows) however wide the layer. Every stored value is visited exactly once whatever the column
  order inside a row; the tiling only pays off when columns ascend (the engine's
  structures do).
* **Transposed values.** With a permutation (``spmm_t``) and more than one panel,
  the values are first gathered into stored order in one streaming pass rather
  than read through ``perm`` at random once per panel.

Results agree with a dense product to rounding; the summation order (and hence
the last bits) is fixed by the structure and n, not by the thread count.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

PANEL = 128          # widest register panel (values); see _PANELS
_PANELS = (128, 64, 32, 16)
_L2_TILE_BYTES = 384 * 1024   # target size of the xt tile kept in L2 per thread


@intrinsic
def _stack_buffer(typingctx, n_ty, dtype_ty):
    """Pointer to an uninitialised stack buffer of ``n`` (a literal) values."""
    if not isinstance(n_ty, types.IntegerLiteral):
        return None
    n = n_ty.literal_value
    dt = dtype_ty.dtype
    sig = types.CPointer(dt)(n_ty, dtype_ty)

    def codegen(context, builder, signature, args):
        import llvmlite.ir as ir
        lty = context.get_data_type(dt)
        ptr = cgutils.alloca_once(builder, ir.ArrayType(lty, n))
        return builder.bitcast(ptr, lty.as_pointer())
    return sig, codegen


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


def _make_panel_kernel(P, use_perm):
    """Kernel for register panels of exactly P columns; P and use_perm are
    compile-time constants (closure variables), so the P partial sums are kept in
    registers."""

    @nb.njit(parallel=True, cache=True, fastmath={"contract"}, boundscheck=False)
    def kernel(indptr, indices, data, perm, xt, yt, j_start, j_stop, T, RB):
        """yt[:, j_start:j_stop] = (W @ xt)[:, j_start:j_stop], panels of exactly P
        columns ((j_stop - j_start) % P == 0); P and use_perm are compile-time."""
        nrows = indptr.shape[0] - 1
        nblk = (nrows + RB - 1) // RB
        for b in nb.prange(nblk):
            r0 = b * RB
            r1 = min(r0 + RB, nrows)
            acc = nb.carray(_stack_buffer(P, yt.dtype), P)
            cur = np.empty(r1 - r0, np.int64)
            for r in range(r0, r1):
                yr = yt[r, j_start:j_stop]
                for j in range(j_stop - j_start):
                    yr[j] = 0.0
            for j0 in range(j_start, j_stop, P):
                for r in range(r0, r1):
                    cur[r - r0] = indptr[r]
                while True:
                    c1 = next_tile(indices, indptr, cur, r0, r1, T)
                    if c1 < 0:
                        break
                    for r in range(r0, r1):
                        k = cur[r - r0]
                        k1 = tile_end(indices, k, indptr[r + 1], c1)
                        cur[r - r0] = k1
                        if k1 == k:
                            continue
                        y = yt[r, j0:j0 + P]
                        for j in range(P):
                            acc[j] = y[j]
                        for kk in range(k, k1):
                            if use_perm:
                                w = data[perm[kk]]
                            else:
                                w = data[kk]
                            x = xt[indices[kk], j0:j0 + P]
                            for j in range(P):
                                acc[j] += w * x[j]
                        for j in range(P):
                            y[j] = acc[j]

    return kernel


_PANEL_KERNELS = {(P, up): _make_panel_kernel(P, up) for P in _PANELS for up in (False, True)}


@nb.njit(parallel=True, cache=True, fastmath={"contract"}, boundscheck=False)
def _rows_tail_kernel(indptr, indices, data, perm, xt, yt, j_start):
    """Columns j_start..n (fewer than the smallest panel), one row per thread."""
    nrows = indptr.shape[0] - 1
    n = xt.shape[1]
    use_perm = perm.shape[0] > 0
    for r in nb.prange(nrows):
        y = yt[r, j_start:n]
        for j in range(n - j_start):
            y[j] = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            w = data[perm[k]] if use_perm else data[k]
            x = xt[indices[k], j_start:n]
            for j in range(n - j_start):
                y[j] += w * x[j]


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _gather(data, perm):
    out = np.empty(perm.shape[0], data.dtype)
    for k in nb.prange(perm.shape[0]):
        out[k] = data[perm[k]]
    return out


def csr_rows_kernel(indptr, indices, data, perm, xt, yt, panel=PANEL):
    """yt[r, :] = sum_k data[perm[k]] * xt[indices[k], :] over k in row r.

    ``perm`` maps stored position -> position in ``data``; pass an empty array for
    the identity (column indices ascending within a row is fastest). ``panel`` is
    the widest register panel to use (one of 128, 64, 32, 16). Shared by
    :func:`spmm` and, on a transposed structure, by
    :func:`sparsecore.kernels.spmm_t.spmm_t`.
    """
    nrows = indptr.shape[0] - 1
    ncols, n = xt.shape
    if nrows == 0 or n == 0:
        return
    use_perm = perm.shape[0] > 0
    if use_perm and n >= 2 * _PANELS[-1]:
        # several panels re-read every value: gather them into stored order once
        # (one streaming pass) instead of a random access per value and panel
        data = _gather(data, perm)
        use_perm = False
        perm = _NO_PERM
    nthreads = nb.get_num_threads()
    rb = max(16, -(-nrows // (4 * nthreads)))
    j = 0
    for P in _PANELS:
        if P > panel:
            continue
        stop = j + ((n - j) // P) * P
        if stop > j:
            t = max(64, _L2_TILE_BYTES // (P * xt.itemsize))
            _PANEL_KERNELS[P, use_perm](indptr, indices, data, perm, xt, yt, j, stop, t, rb)
            j = stop
    if j < n:
        _rows_tail_kernel(indptr, indices, data, perm, xt, yt, j)


_NO_PERM = np.empty(0, np.int64)


def spmm(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, xt: np.ndarray,
         out: np.ndarray | None = None) -> np.ndarray:
    """Return yt (rows, n) with yt = W @ xt, W given as CSR (indptr, indices, data)."""
    rows = indptr.shape[0] - 1
    if out is None:
        out = np.empty((rows, xt.shape[1]), dtype=xt.dtype)
    csr_rows_kernel(indptr, indices, data, _NO_PERM, xt, out, PANEL)
    return out
