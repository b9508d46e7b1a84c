"""Y = X W^T for a CSR matrix W and row-major activations X (n, in) (CPU, Numba).

Activations arrive as torch hands them, row-major (n, features); no transposed copy
is made outside the kernel. One kernel serves the forward product and, on the
cached transposed structure, the input gradient (:mod:`.spmm_t`).

Performance layout (measured on the 2-core benchmark machine, see docs/benchmarks.md):

* **Packed panels.** X is first packed, in parallel, into panels of ``P`` samples:
  ``xp[p, c, :] = X[p*P : p*P+P, c]`` (zero padded), so each stored value of W
  multiplies one contiguous P-vector. ``P`` is the widest of 64/32/16/8 whose panel
  (in x P values) fits in ~2 MiB (L2), so a panel stays cache-resident while every
  row of W gathers from it. Packing is one read of X; it replaces the two
  single-threaded transposes the layer used to make around each product.
* **Register accumulators.** For one output row and one panel the P partial sums
  live in a stack buffer that LLVM keeps in vector registers; two stored values are
  taken per pass into two accumulator sets, so twice as many independent FMA
  chains are in flight (the two sets are added at the end of the row).
* **Direct output.** The P sums of 16 consecutive rows are buffered on the stack and
  stored into ``Y[j, r0:r0+16]`` (row-major (n, out)) as contiguous runs, with the
  bias folded into the accumulators' start value: no output transpose, no separate
  bias pass, and no per-value strided stores (rows of Y are a multiple of 4 KiB
  apart, so those would all land in one L1 set).
* **Tasks.** (panel, row chunk) pairs, panel-major so each thread keeps one panel
  hot; enough row chunks that 2 threads get >= 8 tasks.

Every output value is computed by one task in a fixed order, so results do not
depend on the thread count; they agree with a dense product to rounding.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_PANELS = (64, 32, 16, 8)
_RB = 16                      # output rows buffered before their transposed store
_PANEL_BYTES = 2 << 20        # a packed panel (features x P values) must fit this (~L2)


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


@nb.njit(parallel=True, cache=True, boundscheck=False)
def pack_panels(x, out):
    """out[p, c, j] = x[p*P + j, c] (0 past the last row), P = out.shape[2].
    ``x`` may have any strides (row-major, or a transposed view of feature-major)."""
    n, F = x.shape
    npan, _, P = out.shape
    FB = 4096 // P               # the written block (FB x P values) stays in L1
    nfb = (F + FB - 1) // FB
    for t in nb.prange(npan * nfb):
        p = t // nfb
        f0 = (t % nfb) * FB
        f1 = min(f0 + FB, F)
        j0 = p * P
        m = min(P, n - j0)
        o = out[p]
        for j in range(m):
            xr = x[j0 + j]
            for f in range(f0, f1):
                o[f, j] = xr[f]
        for j in range(m, P):
            for f in range(f0, f1):
                o[f, j] = 0.0


@nb.njit(parallel=True, cache=True, boundscheck=False)
def transpose_into(x, out):
    """out (F, n) = x (n, F)^T. Blocks of 64 samples x 256 features (one task each)
    are moved in 16 x 16 tiles through a stack buffer, so both sides are read and
    written in contiguous runs of >= 64 bytes (a plain strided loop thrashes L1 sets
    when rows are a multiple of 4 KiB apart, and a column-strip order defeats the
    hardware prefetchers)."""
    n, F = x.shape
    JB = 64
    FB = 256
    nj = (n + JB - 1) // JB
    nf = (F + FB - 1) // FB
    for t in nb.prange(nj * nf):
        jb0 = (t // nf) * JB
        fb0 = (t % nf) * FB
        buf = nb.carray(_stack_buffer(256, x.dtype), (16, 16))
        for j0 in range(jb0, min(jb0 + JB, n), 16):
            jm = min(16, n - j0)
            for f0 in range(fb0, min(fb0 + FB, F), 16):
                fm = min(16, F - f0)
                for jj in range(jm):
                    xr = x[j0 + jj, f0:f0 + fm]
                    for ff in range(fm):
                        buf[ff, jj] = xr[ff]
                for ff in range(fm):
                    orow = out[f0 + ff, j0:j0 + jm]
                    b = buf[ff]
                    for jj in range(jm):
                        orow[jj] = b[jj]


def _make_panel_kernel(P):
    """Kernel for packed panels of exactly P samples (P is a compile-time constant,
    so the 2 x P partial sums of a row are kept in registers)."""
    PRB = P * _RB

    @nb.njit(parallel=True, cache=True, fastmath={"contract"}, boundscheck=False)
    def kernel(indptr, indices, data, xp, bias, y, nchunks):
        nrows = indptr.shape[0] - 1
        npan = xp.shape[0]
        n = y.shape[0]
        use_bias = bias.shape[0] > 0
        rc = (nrows + nchunks - 1) // nchunks
        for t in nb.prange(npan * nchunks):
            p = t // nchunks
            r0 = (t % nchunks) * rc
            r1 = min(r0 + rc, nrows)
            j0 = p * P
            m = min(P, n - j0)
            a0 = nb.carray(_stack_buffer(P, y.dtype), P)
            a1 = nb.carray(_stack_buffer(P, y.dtype), P)
            ob = nb.carray(_stack_buffer(PRB, y.dtype), (_RB, P))
            xpp = xp[p]
            for rb0 in range(r0, r1, _RB):
                rbn = min(_RB, r1 - rb0)
                for i in range(rbn):
                    r = rb0 + i
                    for j in range(P):
                        a0[j] = 0.0
                        a1[j] = 0.0
                    if use_bias:
                        b = bias[r]
                        for j in range(P):
                            a0[j] = b
                    k = indptr[r]
                    e = indptr[r + 1]
                    while k + 2 <= e:
                        w0 = data[k]
                        w1 = data[k + 1]
                        x0 = xpp[indices[k]]
                        x1 = xpp[indices[k + 1]]
                        for j in range(P):
                            a0[j] += w0 * x0[j]
                            a1[j] += w1 * x1[j]
                        k += 2
                    if k < e:
                        w0 = data[k]
                        x0 = xpp[indices[k]]
                        for j in range(P):
                            a0[j] += w0 * x0[j]
                    o = ob[i]
                    for j in range(P):
                        o[j] = a0[j] + a1[j]
                # write the block transposed: one contiguous run of y per sample (rows
                # of y are far apart, so per-value strided stores would thrash L1 sets)
                for j in range(m):
                    yr = y[j0 + j, rb0:rb0 + rbn]
                    for i in range(rbn):
                        yr[i] = ob[i, j]

    return kernel


_PANEL_KERNELS = {P: _make_panel_kernel(P) for P in _PANELS}


@nb.njit(parallel=True, cache=True, boundscheck=False)
def gather(data, perm):
    """data[perm] (one parallel pass)."""
    out = np.empty(perm.shape[0], data.dtype)
    for k in nb.prange(perm.shape[0]):
        out[k] = data[perm[k]]
    return out


def panel_width(n_features: int, itemsize: int, n: int) -> int:
    """Widest panel whose packed block fits ~L2, but no wider than n needs."""
    for P in _PANELS:
        if n_features * P * itemsize <= _PANEL_BYTES and P <= max(8, 2 * n):
            return P
    return _PANELS[-1]


def csr_rows_kernel(indptr, indices, data, x, y, bias=None):
    """y[:, r] = sum_k data[k] * x[:, indices[k]] (+ bias[r]) over k in row r, for
    x (n, ncols) and y (n, nrows) with any strides (row-major is fastest).
    ``data`` is in stored order. Shared by :func:`spmm` and, on a transposed
    structure, by :func:`sparsecore.kernels.cpu.spmm_t.spmm_t`."""
    nrows = indptr.shape[0] - 1
    n, ncols = x.shape
    if nrows == 0 or n == 0:
        return
    P = panel_width(ncols, x.itemsize, n)
    npan = -(-n // P)
    xp = np.empty((npan, ncols, P), x.dtype)
    pack_panels(x, xp)
    nthreads = nb.get_num_threads()
    nchunks = max(1, min(-(-8 * nthreads // npan), -(-nrows // 16)))
    b = _EMPTY[np.dtype(x.dtype)] if bias is None else bias
    _PANEL_KERNELS[P](indptr, indices, data, xp, b, y, nchunks)


_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def spmm(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, x: np.ndarray,
         bias: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Return y (n, rows) = x @ W^T (+ bias) for x (n, cols), W as CSR
    (indptr, indices, data). ``out`` may be any (n, rows) array (e.g. a transposed
    view of a feature-major buffer)."""
    rows = indptr.shape[0] - 1
    if out is None:
        out = np.empty((x.shape[0], rows), dtype=x.dtype)
    if rows and x.shape[0] and indices.shape[0] == 0:
        out[:] = 0.0 if bias is None else bias
        return out
    csr_rows_kernel(indptr, indices, data, x, out, bias)
    return out
