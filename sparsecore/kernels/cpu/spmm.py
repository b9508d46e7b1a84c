"""Y = X W^T for a CSR matrix W and row-major activations X (n, in) (CPU, Numba).

Activations arrive as torch hands them, row-major (n, features); no transposed copy
is made outside the kernel. One kernel serves the forward product and, on the
cached transposed structure, the input gradient (:mod:`.spmm_t`).

Performance layout (measured on the 2-core benchmark machine, see docs/benchmarks.md):

* **Packed panels.** X is first packed, in parallel, into panels of ``P`` samples:
  ``xp[p, c, :] = X[p*P : p*P+P, c]`` (zero padded, 64-byte aligned), so each stored
  value of W multiplies one contiguous P-vector. ``P`` is 64 float32 / 32 float64
  (256-byte rows: four 512-bit vectors), 32 float32 when n <= 32; narrower panels
  were dropped because LLVM fully unrolls their 16-lane loops into scalar code.
  The packed copy lives in a per-thread workspace reused across calls
  (:func:`workspace`: no activation-sized allocation per call). The backward packs
  dy once, at this width, for spmm_t and sddmm (:func:`share_packing`; sddmm reads
  consecutive panels as one of its wider ones). Reading P-sample sub-panels of
  sddmm's 128-wide panels instead was dropped: it uses half of L2's sets (1.1x-1.3x
  slower spmm_t at 1%-10% density, 4096 features).
* **512-bit vectors.** LLVM's tuning for AVX-512 Intel cores prefers 256-bit
  vectors; :func:`wide_vectors` asks for 512-bit ones in the parallel loop only
  (function attributes, not a process-wide setting). Indices are cast to unsigned
  so no negative-index wraparound code sits in the inner loop.
* **Column tiles.** When a panel exceeds ~1 MiB (it would not stay in L2: 16384
  float32 features), W's columns are walked in tiles of 32 KiB of panel rows (L1) if
  a row then has >= 8 values per tile, else 512 KiB tiles (L2) if >= 4, else not at
  all. Partial sums of 256 rows at a time live in an aligned scratch block and each
  (row, tile) visit adds into them; a per-row cursor skips finished entries, so any
  column order within a row is correct. At 4096 features (1 MiB panels) tiling
  measured no better than the untiled walk, which is what runs there.
* **Register accumulators.** For one output row and one panel the P partial sums
  live in a stack buffer that LLVM keeps in vector registers; two stored values are
  taken per pass into two accumulator sets, so twice as many independent FMA
  chains are in flight (the two sets are added at the end of the row). The main
  loop takes four values per pass, still alternating between the two sets (so the
  summation order, and every result bit, is that of one pair per pass): measured
  1.01x-1.02x at 1% density and 1.03x-1.05x at 10% (float32, n = 64-2048, 1024 and
  4096 features, interleaved A/B; four accumulator sets would change the order).
  Software prefetch of the panel rows of the values D ahead (``llvm.prefetch``,
  locality 3, 4 lines per row) measured slower for every D in 4-64: 0.75x-0.97x
  at 1% and 10% density: the gathered rows come from L2, presumably already in
  flight through the out-of-order window, and the 8 prefetch uops per pair take
  load-port slots. (Beware when timing: the same kernel on a different packed
  buffer (another module's workspace) measured 1.1x-1.4x apart at 1% density,
  so A/B runs must share the workspace and the output.)
* **Direct output.** The P sums of 16 consecutive rows (256 when tiled) are buffered
  in an aligned scratch block and stored into ``Y[j, r0:r0+16]`` (row-major (n, out)) as contiguous runs, with the
  bias folded into the accumulators' start value: no output transpose, no separate
  bias pass, and no per-value strided stores (rows of Y are a multiple of 4 KiB
  apart, so those would all land in one L1 set). Whole 16-row x 16-sample blocks
  are transposed in vector registers (:func:`store_transposed16`: 64 shuffles
  instead of 256 scalar moves); at low density (~10 values per row) the scalar
  transpose cost as much as the FMAs (measured 1.3x-1.8x faster spmm at 1%,
  1024 -> 4096, n = 512). Outputs of >= 4 MiB are stored non-temporally
  (:func:`nontemporal`: no read for ownership of lines that leave L2 anyway).
* **Tasks.** (panel, row chunk) pairs, panel-major so each thread keeps one panel
  hot; enough row chunks that 2 threads get >= 8 tasks.

Every output value is computed by one task in a fixed order, so results do not
depend on the thread count; they agree with a dense product to rounding.
"""
from __future__ import annotations

import contextlib
import math
import threading

import numba as nb
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_PANELS = (64, 32)
U = types.uintp               # unsigned indices: no negative-index wraparound code
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


@intrinsic
def wide_vectors(typingctx):
    """Let LLVM use 512-bit vectors in the calling function (placed inside a prange
    body, that is the outlined parallel loop). LLVM's tuning for AVX-512 Intel cores
    prefers 256-bit vectors unless a function asks otherwise; this sets that
    function's "prefer-vector-width" / "min-legal-vector-width" attributes (a no-op
    where the CPU has no 512-bit vectors)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        attrs = builder.function.attributes
        for a in ('"prefer-vector-width"="512"', '"min-legal-vector-width"="512"'):
            set.add(attrs, a)   # string attributes: llvmlite only validates keywords
        return context.get_dummy_value()
    return sig, codegen


def _transposed16_typer(nontemporal):
    def typer(typingctx, src_ty, so_ty, ss_ty, dst_ty, do_ty, ds_ty):
        if not (isinstance(src_ty, types.Array) and isinstance(dst_ty, types.Array)
                and src_ty.dtype == dst_ty.dtype):
            return None
        dt = src_ty.dtype
        sig = types.none(src_ty, types.intp, types.intp, dst_ty, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            import llvmlite.ir as ir
            src, so, ss, dst, do, ds = args
            sarr = context.make_array(signature.args[0])(context, builder, src)
            darr = context.make_array(signature.args[3])(context, builder, dst)
            lty = context.get_data_type(dt)
            vty = ir.VectorType(lty, 16)
            i32 = ir.IntType(32)
            sp = builder.gep(builder.bitcast(sarr.data, lty.as_pointer()), [so])
            dp = builder.gep(builder.bitcast(darr.data, lty.as_pointer()), [do])
            rows = []
            for i in range(16):
                off = builder.mul(ss, context.get_constant(types.intp, i))
                q = builder.bitcast(builder.gep(sp, [off]), vty.as_pointer())
                rows.append(builder.load(q, align=context.get_abi_sizeof(lty)))
            for k in (1, 2, 4, 8):   # swap bit k of the row index with bit k of the column
                out = list(rows)
                for i in range(16):
                    if i & k:
                        continue
                    lo = [j if not j & k else 16 + (j ^ k) for j in range(16)]
                    hi = [j ^ k if not j & k else 16 + j for j in range(16)]
                    for d, mask in ((i, lo), (i | k, hi)):
                        out[d] = builder.shuffle_vector(
                            rows[i], rows[i | k],
                            ir.Constant(ir.VectorType(i32, 16), [i32(m) for m in mask]))
                rows = out
            md = builder.module.add_metadata([ir.Constant(i32, 1)]) if nontemporal else None
            for j in range(16):
                off = builder.mul(ds, context.get_constant(types.intp, j))
                q = builder.bitcast(builder.gep(dp, [off]), vty.as_pointer())
                st = builder.store(rows[j], q, align=64 if nontemporal else
                                   context.get_abi_sizeof(lty))
                if md is not None:
                    st.set_metadata("nontemporal", md)
            return context.get_dummy_value()
        return sig, codegen
    return typer


store_transposed16 = intrinsic(_transposed16_typer(False))
store_transposed16.__doc__ = """dst.flat[do + j * ds + i] = src.flat[so + i * ss + j] for i, j < 16 (offsets
and strides in elements of the arrays' memory, which must share one float dtype):
a 16 x 16 block transposed in vector registers (16 row loads, 4 x 16 two-input
shuffles, 16 row stores) instead of 256 scalar moves. Any alignment (the loads and
stores are unaligned ones, as fast as aligned ones on aligned rows); no bounds
checks."""
store_transposed16_nt = intrinsic(_transposed16_typer(True))
store_transposed16_nt.__doc__ = """:func:`store_transposed16` with non-temporal stores (no
read-for-ownership of the output lines); rows of ``dst`` must be 64-byte aligned too."""


@intrinsic
def store_fence(typingctx):
    """A full memory fence (orders the non-temporal stores before what follows)."""
    sig = types.none()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()
    return sig, codegen


@nb.njit(parallel=True, cache=True, boundscheck=False)
def pack_panels(x, out):
    """out[p, c, j] = x[p*P + j, c] (0 past the last row), P = out.shape[2] (a
    multiple of 16). ``x`` may have any strides (row-major, or a transposed view of
    feature-major). Each task packs one panel over 256 features, 16 samples at a
    time. Where x's features are contiguous (row-major), each 16 samples x 16
    features block is transposed in vector registers (:func:`store_transposed16`:
    16 row loads, 64 shuffles, 16 stores of one 64-byte panel line each); the rest
    (other strides, the last partial 16 samples, features past a multiple of 16) is
    moved one value at a time, 16 rows read as contiguous runs. (Measured, 2 cores:
    64 x 1024 float32 packed in 14 us instead of 34; at 2 MiB and more the pack runs
    at the speed of a plain copy either way.)"""
    n, F = x.shape
    npan, _, P = out.shape
    FB = 256
    nfb = (F + FB - 1) // FB
    isz = x.itemsize
    vec = (x.strides[1] == isz and x.strides[0] % isz == 0   # (out: offsets as contiguous)
           and out.strides[2] == isz and out.strides[1] == P * isz
           and out.strides[0] == F * P * isz)
    xs0 = x.strides[0] // isz
    for t in nb.prange(npan * nfb):
        wide_vectors()
        p = t // nfb
        f0 = (t % nfb) * FB
        f1 = min(f0 + FB, F)
        j0 = p * P
        m = min(P, n - j0)
        o = out[p]
        for jb in range(0, P, 16):
            if jb + 16 <= m:
                fv = f0
                if vec:
                    fv = f1 - (f1 - f0) % 16
                    for f in range(f0, fv, 16):
                        store_transposed16(x, (j0 + jb) * xs0 + f, xs0, out,
                                           (p * F + f) * P + jb, P)
                for f in range(fv, f1):
                    for jj in range(16):
                        o[f, jb + jj] = x[j0 + jb + jj, f]
            elif jb < m:
                for f in range(f0, f1):
                    for jj in range(16):
                        o[f, jb + jj] = x[j0 + jb + jj, f] if jb + jj < m else 0.0
            else:   # past the last sample: padding
                for f in range(f0, f1):
                    for jj in range(16):
                        o[f, jb + jj] = 0.0


@nb.njit(cache=True)
def aligned_empty(size, dtype):
    """Uninitialised 1-d array of ``size`` values starting on a 64-byte boundary
    (a cache line: a 512-bit load from a P-vector then never splits two lines)."""
    buf = np.empty(size + 16, dtype)
    off = (-buf.ctypes.data % 64) // buf.itemsize
    return buf[off:off + size]


# ---- packing workspace -----------------------------------------------------------
# Packed operands are activation-sized (8 MiB for 512 x 4096 float32). Each thread
# keeps one byte buffer per slot ("x": spmm's / sddmm's X, "g": spmm_t's / sddmm's G,
# "shared": see share_packing; "tile": sddmm's dense row tiles, <= 16 MiB) that grows
# to the largest size needed; a buffer over _WS_KEEP bytes is used for its call only
# and not kept, so at most 3 x 64 MiB + 16 MiB stay alive per thread.
# threading.local: two Python threads never share a buffer.
_WS_KEEP = 64 << 20
_TLS = threading.local()


def workspace(slot: str, shape, dtype) -> np.ndarray:
    """Uninitialised 64-byte aligned array of ``shape`` from this thread's buffer for
    ``slot`` (valid until the next call for the same slot on this thread)."""
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize   # (np.prod: ~17 us per call)
    bufs = getattr(_TLS, "bufs", None)
    if bufs is None:
        bufs = _TLS.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.shape[0] < nbytes:
        bufs.pop(slot, None)           # drop the old buffer before allocating
        buf = aligned_empty(nbytes // 8 + 8, np.float64).view(np.uint8)
        if nbytes <= _WS_KEEP:
            bufs[slot] = buf
    return buf[:nbytes].view(dt).reshape(shape)


def _key(x):
    return (x.ctypes.data, x.shape, x.strides, x.dtype.str)


@contextlib.contextmanager
def share_packing(x, P):
    """Within the block, the calling thread's products pack ``x`` (n, F) once, into
    panels of P samples, and reuse those panels for every product on ``x`` with
    panel width P, or a multiple of P where the product reads consecutive panels as
    one (sddmm's G): the backward packs dy once for spmm_t and sddmm. ``x`` must
    not change inside the block."""
    prev = getattr(_TLS, "share", None)
    _TLS.share = [_key(x), P, None]
    try:
        yield
    finally:
        _TLS.share = prev
        if prev is not None:
            prev[2] = None      # a nested block reused the "shared" buffer: repack


def packed(x, P, slot, narrower=False):
    """Panels of x, (npan, F, PS): PS = P, or (``narrower``: the caller reads
    several consecutive panels as one) a divisor of P when x is the operand shared
    by :func:`share_packing`."""
    n, F = x.shape
    sh = getattr(_TLS, "share", None)
    if (sh is not None and (sh[1] == P or narrower and P % sh[1] == 0)
            and sh[0] == _key(x)):
        if sh[2] is None:
            # zero-padded to a multiple of 512 bytes of samples per feature, so that a
            # reader of wider panels (sddmm, 128 float32) finds all of its last one
            PS, W = sh[1], 512 // x.itemsize
            sh[2] = workspace("shared", (-(-n // W) * (W // PS), F, PS), x.dtype)
            pack_panels(x, sh[2])
        return sh[2][:-(-n // P)] if sh[1] == P else sh[2]
    xp = workspace(slot, (-(-n // P), F, P), x.dtype)
    pack_panels(x, xp)
    return xp


def _make_panel_kernel(P):
    """Kernel for packed panels of exactly P samples (P is a compile-time constant,
    so the 2 x P partial sums of a row are kept in registers)."""

    @nb.njit(parallel=True, cache=True, fastmath={"contract"}, boundscheck=False)
    def kernel(indptr, indices, data, xp, bias, y, nchunks, T, nt):
        nrows = indptr.shape[0] - 1
        npan, ncols, _ = xp.shape
        n = y.shape[0]
        use_bias = bias.shape[0] > 0
        tiled = T < ncols
        rc = -(-((nrows + nchunks - 1) // nchunks) // _RB) * _RB   # whole 16-row blocks
        nb_rows = min(rc, _TILED_ROWS) if tiled else _RB
        ycontig = y.strides[1] == y.itemsize and y.strides[0] % y.itemsize == 0
        ys0 = y.strides[0] // y.itemsize
        for t in nb.prange(npan * nchunks):
            wide_vectors()
            p = U(t // nchunks)
            r0 = (t % nchunks) * rc
            r1 = min(r0 + rc, nrows)
            j0 = p * P
            m = min(P, n - j0)
            a0 = nb.carray(_stack_buffer(P, y.dtype), P)
            a1 = nb.carray(_stack_buffer(P, y.dtype), P)
            # partial sums of this task's rows: the whole chunk when W's columns are
            # walked in tiles (each (row, tile) visit adds into them), else 16 rows
            acc = aligned_empty(nb_rows * P, y.dtype).reshape((nb_rows, P))
            cur = np.empty(nb_rows + 1, np.int64)
            for rb0 in range(r0, r1, nb_rows):
                rbn = U(min(nb_rows, r1 - rb0))
                for i in range(rbn):
                    b = bias[U(rb0 + i)] if use_bias else 0.0
                    for j in range(P):
                        acc[i, j] = b
                    cur[i] = indptr[U(rb0 + i)]
                cur[rbn] = indptr[U(rb0 + rbn)]
                c1 = T
                while True:
                    for i in range(rbn):
                        k = cur[i]
                        e = indptr[U(rb0 + i + 1)]
                        if k >= e or indices[U(k)] >= c1:
                            continue
                        for j in range(P):
                            a0[j] = acc[i, j]
                            a1[j] = 0.0
                        # four values per pass, alternating between the two sets (the
                        # same summation order as one pair per pass)
                        while k + 4 <= e and indices[U(k + 3)] < c1:
                            w0 = data[U(k)]
                            w1 = data[U(k + 1)]
                            w2 = data[U(k + 2)]
                            w3 = data[U(k + 3)]
                            c0 = U(indices[U(k)])
                            c1_ = U(indices[U(k + 1)])
                            c2 = U(indices[U(k + 2)])
                            c3 = U(indices[U(k + 3)])
                            for j in range(P):
                                a0[j] += w0 * xp[p, c0, j]
                                a1[j] += w1 * xp[p, c1_, j]
                            for j in range(P):
                                a0[j] += w2 * xp[p, c2, j]
                                a1[j] += w3 * xp[p, c3, j]
                            k += 4
                        while k + 2 <= e and indices[U(k + 1)] < c1:
                            w0 = data[U(k)]
                            w1 = data[U(k + 1)]
                            c0 = U(indices[U(k)])
                            c1_ = U(indices[U(k + 1)])
                            for j in range(P):
                                a0[j] += w0 * xp[p, c0, j]
                                a1[j] += w1 * xp[p, c1_, j]
                            k += 2
                        if k < e and indices[U(k)] < c1:
                            w0 = data[U(k)]
                            c0 = U(indices[U(k)])
                            for j in range(P):
                                a0[j] += w0 * xp[p, c0, j]
                            k += 1
                        for j in range(P):
                            acc[i, j] = a0[j] + a1[j]
                        cur[i] = k
                    if c1 >= ncols:
                        break
                    c1 += T
                # store the block transposed, 16 rows at a time: one contiguous run of
                # y per sample (rows of y are far apart: per-value strided stores
                # would thrash L1 sets)
                for s0 in range(0, rbn, _RB):
                    sn = min(_RB, rbn - s0)
                    jv = 0
                    if sn == _RB and ycontig:   # whole 16 x 16 blocks: in registers
                        jv = m - m % 16
                        if nt:
                            for jb in range(0, jv, 16):
                                store_transposed16_nt(acc, (s0 * P + jb), P, y,
                                                      (j0 + jb) * ys0 + rb0 + s0, ys0)
                        else:
                            for jb in range(0, jv, 16):
                                store_transposed16(acc, (s0 * P + jb), P, y,
                                                   (j0 + jb) * ys0 + rb0 + s0, ys0)
                    for j in range(jv, m):
                        for i in range(sn):
                            y[j0 + j, rb0 + s0 + i] = acc[s0 + i, j]
            if nt:
                store_fence()

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
    """Samples per packed panel: 256-byte panel rows (four 512-bit vectors per
    gathered row: 64 float32 / 32 float64), or 32 float32 when n <= 32.
    (Narrower panels are not offered: LLVM fully unrolls their 16-lane loops into
    scalar code.)"""
    P = 256 // itemsize
    if n <= 32 and P > 32:
        P = 32
    return P


_L1_TILE = 32 << 10           # bytes of panel rows one column tile keeps in L1
_L2_TILE = 512 << 10          # the same, kept in L2 (low density)
_L2_PANEL = 1 << 20           # a whole panel up to this size stays in L2: no tiling
_NT_BYTES = 4 << 20           # outputs from this size are stored non-temporally
_TILED_ROWS = 256             # rows whose partial sums (256 x P) one tiled pass keeps


def tile_width(ncols: int, P: int, itemsize: int, row_nnz: float) -> int:
    """Columns of W per tile. A panel that fits ~L2 is not tiled. Otherwise tiles of
    32 KiB of panel rows (L1) if a row of W then still has >= 8 values per tile, else
    512 KiB (L2) tiles if >= 4 values, else none."""
    rowb = P * itemsize
    if ncols * rowb <= _L2_PANEL:
        return ncols
    for tile_bytes, per_tile in ((_L1_TILE, 8.0), (_L2_TILE, 4.0)):
        T = tile_bytes // rowb
        if T < ncols and row_nnz * T / ncols >= per_tile:
            return T
    return ncols


def csr_rows_kernel(indptr, indices, data, x, y, bias=None, T=None, P=None, slot="x"):
    """y[:, r] = sum_k data[k] * x[:, indices[k]] (+ bias[r]) over k in row r, for
    x (n, ncols) and y (n, nrows) with any strides (row-major is fastest).
    ``data`` is in stored order. Shared by :func:`spmm` and, on a transposed
    structure, by :func:`sparsecore.kernels.cpu.spmm_t.spmm_t`. x is packed into the
    calling thread's workspace ``slot`` (or taken from :func:`share_packing`)."""
    nrows = indptr.shape[0] - 1
    n, ncols = x.shape
    if nrows == 0 or n == 0:
        return
    if P is None:
        P = panel_width(ncols, x.itemsize, n)
    npan = -(-n // P)
    xp = packed(x, P, slot)
    nthreads = nb.get_num_threads()
    nchunks = max(1, min(-(-8 * nthreads // npan), -(-nrows // 16)))
    b = _EMPTY[np.dtype(x.dtype)] if bias is None else bias
    if T is None:
        T = tile_width(ncols, P, x.itemsize, indices.shape[0] / max(1, nrows))
    _PANEL_KERNELS[P](indptr, indices, data, xp, b, y, nchunks, T, nontemporal(y))


def nontemporal(y) -> bool:
    """Whether the panel kernel stores ``y``'s 16 x 16 blocks non-temporally: outputs
    of >= ``_NT_BYTES`` (they would not stay in L2 anyway; skipping the read for
    ownership of each line measured 1.1x-1.2x faster spmm at 1024 -> 4096, n = 512,
    1% and 10% density), row-major, with 64-byte aligned rows (the kernel's row chunks
    start on 16-row boundaries)."""
    return bool(y.nbytes >= _NT_BYTES and y.strides[1] == y.itemsize
                and y.ctypes.data % 64 == 0 and y.strides[0] % 64 == 0)


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
