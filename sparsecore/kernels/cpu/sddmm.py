"""Sampled dense-dense product: dW_k = sum_n G[n, row_k] X[n, col_k] (+ reg * theta_k).

Only the stored positions are computed: the dense G^T X is never formed. The
activations arrive as torch hands them (G (n, out), X (n, in), row-major; any strides
work) and are packed, in one parallel pass each, into the panels the products use
(:func:`.spmm.pack_panels`: ``gp[p, r, :]`` holds samples p*P .. p*P+P-1 of feature r,
zero padded; P = 128 float32 / 64 float64, fewer for small n) in the calling thread's
reused workspace; G may instead be the pack of dy shared with spmm_t, in spmm_t's
narrower panels (:func:`.spmm.share_packing`), read as H = P / PG consecutive
panels. No transposed copy of an activation is made.

One thread owns each block of up to 1024 CSR rows, so results do not depend on the
thread count. Within a block the panels are walked one at a time (each value adds
one P-long dot product into ``out[k]``, panels in a fixed order), and within a panel
W's columns in tiles of 512 KiB of packed X, which stay in L2 while every row of the
block reuses them; G's panel rows stream. Four stored values of a row share each
load of ``gp[p, row]``, and two structures over the same rows (the layer's A and B
minus A) are walked in the same pass, sharing that load and X's tiles. Measured
limit: L2 bandwidth (P * itemsize bytes of X per value and panel, about 2 cycles per
64-byte line on the 2-core benchmark machine).
Column indices should ascend within each row (fastest); any order is correct.
At high density (>= DENSE_DENSITY stored values over all structures of the call) the
entries are instead read out of dense GEMM row tiles of G^T X (torch.mm, a reused tile
of at most DENSE_TILE_BYTES); those sums follow torch's GEMM, whose rounding may
depend on its thread count and operand layout.
Sums accumulate in the activations' dtype. The Top-KAST exploration term is fused:
``out[k] += reg * theta[k]`` after the last panel, with one coefficient per call.
"""
from __future__ import annotations

import numba as nb
import numpy as np
import torch

from .spmm import _EMPTY, U, _stack_buffer, packed, wide_vectors, workspace


_L2_TILE_BYTES = 512 * 1024   # target size of the X panel tile kept in L2 per thread
_ROW_BLOCK = 1024              # rows per task (reusing each X tile)
# Dense row tiles (see :func:`sddmm`): at a density of stored values of at least
# DENSE_DENSITY, and for products of at least DENSE_MIN_FLOPS dense flops, the sampled
# product is computed as dense tiles G[:, rows]^T X by torch's GEMM (bounded
# DENSE_TILE_BYTES at a time: never a weight-sized tensor) and the stored entries are
# read out of each tile. Measured crossover (4096^2, n = 512, float32, 2 cores): the
# panel kernel reaches 30-40 GFLOP/s of useful work, the GEMM ~180 GFLOP/s of which
# the density is useful: tiles measured 1.56x faster at 50% density, 1.08x at 30%,
# 0.76x at 20% (4096^2, n = 512, a benchmark beside it); quiet, tiles reused from the
# workspace: 1.94x at 50%, 1.30x at 30%.
DENSE_DENSITY = 0.3
DENSE_MIN_FLOPS = 1 << 26
DENSE_TILE_BYTES = 16 << 20


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


def _make_sddmm_kernel(P, PG):
    """Kernel for X packed in panels of exactly P samples and G in panels of PG (P is
    a multiple of PG; both compile-time constants: the P-vector of G's row stays in
    registers while a row's values use it). With PG < P, G's P-vector for X panel p
    is the H = P / PG consecutive G panels p*H .. p*H+H-1 (the pack of dy shared
    with spmm_t, which holds H x npan panels: see :func:`.spmm.packed`).

    The kernel serves two structures over the same rows in one pass (the layer's A
    and B minus A; the second may be empty): each row's G vector is loaded once per
    column tile for both, and X's tile is walked once. Measured against one call
    per structure: 1.02x-1.18x (1024-4096 features, n = 512, 2% and 10% of B)."""
    H = P // PG

    @nb.njit(inline="always", cache=True, fastmath=True, boundscheck=False)
    def dots(indices, out, k, k1, gr, xp, pu, first):
        """out[k] (=, or += after the first panel) the P-long dot products of G's row
        ``gr`` with X's panel rows of the entries k .. k1 - 1; four entries share each
        load of ``gr``."""
        while k + 4 <= k1:
            ca = U(indices[U(k)])
            cb = U(indices[U(k + 1)])
            cc = U(indices[U(k + 2)])
            cd = U(indices[U(k + 3)])
            s0 = out.dtype.type(0)
            s1 = out.dtype.type(0)
            s2 = out.dtype.type(0)
            s3 = out.dtype.type(0)
            for j in range(P):
                gj = gr[j]
                s0 += gj * xp[pu, ca, j]
                s1 += gj * xp[pu, cb, j]
                s2 += gj * xp[pu, cc, j]
                s3 += gj * xp[pu, cd, j]
            if first:
                out[U(k)] = s0
                out[U(k + 1)] = s1
                out[U(k + 2)] = s2
                out[U(k + 3)] = s3
            else:
                out[U(k)] += s0
                out[U(k + 1)] += s1
                out[U(k + 2)] += s2
                out[U(k + 3)] += s3
            k += 4
        while k < k1:
            ca = U(indices[U(k)])
            s0 = out.dtype.type(0)
            for j in range(P):
                s0 += gr[j] * xp[pu, ca, j]
            if first:
                out[U(k)] = s0
            else:
                out[U(k)] += s0
            k += 1

    @nb.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
    def kernel(indptr, indices, out, indptr2, indices2, out2, gp, xp, theta, reg, T, RB):
        nrows = indptr.shape[0] - 1
        npan = xp.shape[0]
        use_reg = reg != 0.0
        nblk = (nrows + RB - 1) // RB
        for b in nb.prange(nblk):
            wide_vectors()
            r0 = b * RB
            r1 = min(r0 + RB, nrows)
            cur = np.empty(r1 - r0, np.int64)
            cur2 = np.empty(r1 - r0, np.int64)
            gr = nb.carray(_stack_buffer(P, out.dtype), P)
            # one panel of P samples at a time: the block's values each add one
            # P-long dot product into out[k]; X's panel is walked in column tiles
            # of T (L2-sized) that every row of the block reuses
            for p in range(npan):
                pu = U(p)
                first = p == 0
                for r in range(r0, r1):
                    cur[r - r0] = indptr[r]
                    cur2[r - r0] = indptr2[r]
                while True:
                    c1 = next_tile(indices, indptr, cur, r0, r1, T)
                    c2 = next_tile(indices2, indptr2, cur2, r0, r1, T)
                    if c1 < 0 or 0 <= c2 < c1:
                        c1 = c2
                    if c1 < 0:
                        break
                    for r in range(r0, r1):
                        k = cur[r - r0]
                        k1 = tile_end(indices, k, indptr[r + 1], c1)
                        cur[r - r0] = k1
                        q = cur2[r - r0]
                        q1 = tile_end(indices2, q, indptr2[r + 1], c1)
                        cur2[r - r0] = q1
                        if k >= k1 and q >= q1:
                            continue
                        # G's P-vector for this row (from H panels of PG)
                        ru = U(r)
                        for h in range(H):
                            gq = U(p * H + h)
                            for j in range(PG):
                                gr[h * PG + j] = gp[gq, ru, j]
                        dots(indices, out, k, k1, gr, xp, pu, first)
                        dots(indices2, out2, q, q1, gr, xp, pu, first)
            if use_reg:
                for k in range(indptr[r0], indptr[r1]):
                    out[k] += reg * theta[k]

    return kernel


_SDDMM_KERNELS = {(P, PG): _make_sddmm_kernel(P, PG)
                  for P, PG in ((32, 32), (64, 64), (128, 128), (128, 64), (64, 32))}


@nb.njit(parallel=True, cache=True, boundscheck=False)
def _read_tile(tile, r0, indptr, indices, theta, reg, out):
    """out[k] = tile[row_k - r0, col_k] (+ reg * theta[k]) for every stored entry of
    rows r0 .. r0 + tile.shape[0] (one task per row)."""
    use_reg = reg != 0.0
    for i in nb.prange(tile.shape[0]):
        r = r0 + i
        for k in range(indptr[r], indptr[r + 1]):
            v = tile[i, indices[k]]
            out[k] = v + reg * theta[k] if use_reg else v


def _dense_tiles(jobs, g, x):
    """The sampled products of every structure in ``jobs`` from dense row tiles
    G[:, r0:r1]^T X (torch GEMM, G and X read in place, each tile of at most
    DENSE_TILE_BYTES in the thread's packing workspace), shared by all structures."""
    gt, xt = torch.from_numpy(g), torch.from_numpy(x)
    rows, cols = g.shape[1], x.shape[1]
    rt = max(1, min(rows, DENSE_TILE_BYTES // max(1, cols * g.itemsize)))
    buf = torch.from_numpy(workspace("tile", (rt, cols), g.dtype))   # reused per thread
    for r0 in range(0, rows, rt):
        r1 = min(rows, r0 + rt)
        tile = torch.mm(gt[:, r0:r1].t(), xt, out=buf[: r1 - r0]).numpy()
        for ip, ix, th, rg, o in jobs:
            _read_tile(tile, r0, ip, ix, th, rg, o)


def sddmm_panel_width(n: int, itemsize: int) -> int:
    """Samples per packed panel: 512-byte panel rows (128 float32 / 64 float64; eight
    512-bit loads per value and panel, so the horizontal sum of each dot product is
    amortised over eight FMAs), 256-byte rows when n fits them, 32 when n <= 32."""
    for P in (32, 64):
        if n <= P and P * itemsize >= 128:
            return P
    return 512 // itemsize


def sddmm(indptr: np.ndarray, indices: np.ndarray, g: np.ndarray, x: np.ndarray,
          theta: np.ndarray | None = None, reg: float = 0.0,
          out: np.ndarray | None = None, more=()) -> np.ndarray:
    """Vector of length nnz: sum_n g[n, row_k] * x[n, col_k] + reg * theta[k], for
    g (n, rows) and x (n, cols) with any strides. ``more``: further (indptr, indices,
    out) structures over the same activations and rows (no regulariser), computed from
    the same packed operands, two structures per pass (the layer's B minus A)."""
    nnz = indices.shape[0]
    if out is None:
        out = np.empty(nnz, dtype=g.dtype)
    for ip, _, _ in more:
        if ip.shape[0] != indptr.shape[0]:
            raise ValueError(f"a structure in more has {ip.shape[0] - 1} rows; W has "
                             f"{indptr.shape[0] - 1} (they share G's rows)")
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
    nnz_all = sum(j[1].shape[0] for j in jobs)
    dense_flops = 2 * g.shape[1] * x.shape[1] * n
    if dense_flops >= DENSE_MIN_FLOPS and nnz_all >= DENSE_DENSITY * g.shape[1] * x.shape[1]:
        _dense_tiles(jobs, g, x)
        return out
    P = sddmm_panel_width(n, g.itemsize)
    # G may come in narrower panels (the pack of dy shared with spmm_t, padded to whole
    # 512-byte panels: see spmm.packed); X is packed at P (the operand re-read from L2)
    gp = packed(g, P, "g", narrower=True)
    if (P, gp.shape[2]) not in _SDDMM_KERNELS:   # no kernel reads that width: own pack
        gp = packed(g, P, "g")
    xp = packed(x, P, "x")
    tile = max(64, _L2_TILE_BYTES // (P * g.itemsize))
    kern = _SDDMM_KERNELS[(P, gp.shape[2])]
    nrows = indptr.shape[0] - 1
    rb = max(16, min(_ROW_BLOCK, -(-nrows // (2 * nb.get_num_threads()))))
    none = (np.zeros(nrows + 1, indptr.dtype), indices[:0], None, None, out[:0])
    for i in range(0, len(jobs), 2):   # two structures per pass (regulariser: the first's)
        ip, ix, th, rg, o = jobs[i]
        ip2, ix2, _, _, o2 = jobs[i + 1] if i + 1 < len(jobs) else none
        kern(ip, ix, o, ip2, ix2, o2, gp, xp, th, rg, tile, rb)
    return out
