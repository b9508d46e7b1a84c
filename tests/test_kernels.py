"""Kernel tests: every kernel against an independent oracle (dense torch math or brute force).

Oracles used here never call the kernels under test:
  * spmm / spmm_t / sddmm      -> a dense float64 torch matrix built from the CSR by index_put;
  * transpose_csr              -> a stable lexsort of the entries by (column, row);
  * select_topk                -> np.lexsort((positions, -|values|))[:k];
  * kth_largest_magnitude      -> np.sort(|values|)[::-1][k-1];
  * scan                       -> np.flatnonzero(|init_values(arange(n_total))| >= floor) minus skip;
  * init_values                -> itself under different chunkings / orders / thread counts
                                  (it is the definition of theta0), plus KS tests on its law.

Float tolerances are the worst-case summation error bound, not guesses: for a sum of K products,
in any order, with or without FMA, |got - exact| <= (2K + 2) * eps * sum_k |a_k b_k| (the 2K covers
the float64 oracle's own rounding), with the exact value computed in float64 from the same
(possibly float32) inputs. For K <= 40 that is ~5e-6 relative in float32, ~2e-14 in float64.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from sparsecore import kernels
from sparsecore.kernels.cpu import init as init_mod
from sparsecore.kernels.cpu.select import kth_largest_magnitude

# SPARSECORE_HYP_EXAMPLES=1000 for a deeper search; the default keeps the file around 30 s.
_N_EX = int(os.environ.get("SPARSECORE_HYP_EXAMPLES", "30"))
HYP = settings(max_examples=_N_EX, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float32, torch.float64]
EPS = {torch.float32: float(np.finfo(np.float32).eps), torch.float64: float(np.finfo(np.float64).eps)}


@contextmanager
def num_threads(k: int):
    old = numba.get_num_threads()
    numba.set_num_threads(k)
    try:
        yield
    finally:
        numba.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# CSR construction and the dense oracle
# --------------------------------------------------------------------------------------------

class CSR:
    """A random CSR matrix (int64 row pointers, int32 sorted columns) and its dense twin."""

    def __init__(self, rng, rows, cols, density, dtype, *, empty_rows=0.0, empty_cols=0.0,
                 nnz=None, explicit_zeros=False):
        self.rows, self.cols, self.dtype = rows, cols, dtype
        if nnz is None:
            mask = rng.random((rows, cols)) < density
            if empty_rows:
                mask[rng.random(rows) < empty_rows, :] = False
            if empty_cols:
                mask[:, rng.random(cols) < empty_cols] = False
            r, c = np.nonzero(mask)  # row-major: columns ascending within each row
        else:  # few entries in a huge matrix, without a dense mask
            flat = np.unique(rng.integers(0, rows * cols, nnz))
            r, c = flat // cols, flat % cols
        counts = np.bincount(r, minlength=rows) if rows else np.zeros(0, np.int64)
        self.indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        self.indices = torch.from_numpy(c.astype(np.int32))
        self.row_of = torch.from_numpy(r.astype(np.int64))
        vals = rng.standard_normal(r.shape[0])
        if explicit_zeros and vals.size:
            vals[rng.random(vals.size) < 0.2] = 0.0
        self.values = torch.from_numpy(vals).to(dtype)

    @property
    def nnz(self):
        return self.indices.numel()

    def max_row_nnz(self):
        return int((self.indptr[1:] - self.indptr[:-1]).max()) if self.rows else 0

    def max_col_nnz(self):
        return int(np.bincount(self.indices.numpy(), minlength=1).max()) if self.nnz else 0

    def dense64(self, values=None):
        v = self.values if values is None else values
        w = torch.zeros(self.rows, self.cols, dtype=torch.float64)
        w.index_put_((self.row_of, self.indices.long()), v.double(), accumulate=True)
        return w


def assert_within(got, exact64, bound64, dtype, terms, what=""):
    """|got - exact| <= (2 * terms + 2) * eps * bound, exact and bound computed in float64."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert got.shape == exact64.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(exact64.shape)}"
    err = (got.double() - exact64).abs()
    tol = (2 * max(int(terms), 1) + 2) * EPS[dtype] * bound64 + 1e-300
    bad = err > tol
    assert not bool(bad.any()), (f"{what}: max err {float(err.max()):.3e}; "
                                 f"{int(bad.sum())} entries beyond the bound")


def rand(rng, shape, dtype):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


@st.composite
def csr_cases(draw):
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    density = draw(st.sampled_from([0.0, 0.03, 0.1, 0.3, 0.7, 1.0]))
    empty_rows = draw(st.sampled_from([0.0, 0.3]))
    empty_cols = draw(st.sampled_from([0.0, 0.3]))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = CSR(rng, rows, cols, density, dtype, empty_rows=empty_rows, empty_cols=empty_cols,
            explicit_zeros=draw(st.booleans()))
    return w, n, rng


# --------------------------------------------------------------------------------------------
# spmm, transpose_csr + spmm_t, sddmm vs dense
# --------------------------------------------------------------------------------------------

def check_spmm(w: CSR, xt):
    y = kernels.spmm(w.indptr, w.indices, w.values, xt)
    wd = w.dense64()
    assert_within(y, wd @ xt.double(), wd.abs() @ xt.double().abs(), w.dtype,
                  w.max_row_nnz(), "spmm")
    # row-major activations (what the layer uses): the same kernel, bit for bit
    x = xt.t().contiguous()
    y_row = kernels.spmm(w.indptr, w.indices, w.values, x, layout="row")
    assert y_row.shape == (xt.shape[1], w.rows) and y_row.is_contiguous()
    assert torch.equal(y_row, y.t())
    # fused bias
    bias = torch.linspace(-1.5, 2.0, w.rows, dtype=w.dtype)
    yb = kernels.spmm(w.indptr, w.indices, w.values, x, bias=bias, layout="row")
    assert_within(yb.t(), wd @ xt.double() + bias.double()[:, None],
                  wd.abs() @ xt.double().abs() + bias.double().abs()[:, None], w.dtype,
                  w.max_row_nnz() + 1, "spmm+bias")
    return y


def check_transpose(w: CSR):
    t_indptr, t_rows, t_perm = kernels.transpose_csr(w.indptr, w.indices, w.cols)
    assert t_indptr.dtype == torch.int64 and t_rows.dtype == torch.int32
    assert t_perm.dtype == torch.int64
    order = np.lexsort((w.row_of.numpy(), w.indices.numpy()))  # by column, then row
    counts = np.bincount(w.indices.numpy(), minlength=w.cols)
    np.testing.assert_array_equal(t_indptr.numpy(), np.concatenate([[0], np.cumsum(counts)]))
    np.testing.assert_array_equal(t_perm.numpy(), order)
    np.testing.assert_array_equal(t_rows.numpy(), w.row_of.numpy()[order])
    return t_indptr, t_rows, t_perm


def test_transpose_in_parallel_row_blocks():
    """Enough entries per column for many row blocks (each counts and writes its own
    slice of every column), with empty rows and columns and uneven blocks."""
    rng = np.random.default_rng(11)
    w = CSR(rng, 203, 19, 0.6, torch.float32, empty_rows=0.3, empty_cols=0.1)
    cols = w.cols
    assert w.indices.numel() >= 16 * 2 * cols    # the kernel then uses 8 blocks
    check_transpose(w)


def check_spmm_t(w: CSR, gt):
    t = check_transpose(w)
    dx = kernels.spmm_t(*t, w.values, gt)
    wd = w.dense64()
    assert_within(dx, wd.t() @ gt.double(), wd.abs().t() @ gt.double().abs(), w.dtype,
                  w.max_col_nnz(), "spmm_t")
    dx_row = kernels.spmm_t(*t, w.values, gt.t().contiguous(), layout="row")
    assert dx_row.shape == (gt.shape[1], w.cols) and dx_row.is_contiguous()
    assert torch.equal(dx_row, dx.t())
    return dx


def check_sddmm(w: CSR, gt, xt, theta=None, reg=0.0):
    d = kernels.sddmm(w.indptr, w.indices, gt, xt, theta=theta, reg=reg)
    r, c = w.row_of, w.indices.long()
    g64, x64 = gt.double(), xt.double()
    exact = (g64[r] * x64[c]).sum(1)
    bound = (g64[r] * x64[c]).abs().sum(1)
    if theta is not None and reg != 0.0:
        exact = exact + reg * theta.double()
        bound = bound + abs(reg * theta.double())
    assert_within(d, exact, bound, gt.dtype, gt.shape[1] + 1, "sddmm")
    assert d.shape == (w.nnz,)
    g_row, x_row = gt.t().contiguous(), xt.t().contiguous()
    d_row = kernels.sddmm(w.indptr, w.indices, g_row, x_row, theta=theta, reg=reg, layout="row")
    assert torch.equal(d_row, d)
    # a second structure served by the same call (the layer's B minus A), no regulariser
    o1, o2 = torch.empty_like(d), torch.empty_like(d)
    kernels.sddmm(w.indptr, w.indices, g_row, x_row, theta=theta, reg=reg, out=o1,
                  layout="row", more=((w.indptr, w.indices, o2),))
    assert torch.equal(o1, d)
    if theta is None or reg == 0.0:
        assert torch.equal(o2, d)
    return d


@HYP
@given(csr_cases())
def test_spmm_matches_dense(case):
    w, n, rng = case
    xt = rand(rng, (w.cols, n), w.dtype)
    x_before = xt.clone()
    y = check_spmm(w, xt)
    assert y.shape == (w.rows, n)
    assert torch.equal(xt, x_before)  # inputs untouched


@HYP
@given(csr_cases())
def test_transpose_and_spmm_t_match_dense(case):
    w, n, rng = case
    gt = rand(rng, (w.rows, n), w.dtype)
    dx = check_spmm_t(w, gt)
    assert dx.shape == (w.cols, n)


@HYP
@given(csr_cases(), st.sampled_from([None, 0.0, 1e-4, 0.37, -2.5]))
def test_sddmm_matches_dense(case, reg):
    w, n, rng = case
    gt = rand(rng, (w.rows, n), w.dtype)
    xt = rand(rng, (w.cols, n), w.dtype)
    if reg is None:
        check_sddmm(w, gt, xt)
    else:
        theta = rand(rng, (w.nnz,), w.dtype)
        check_sddmm(w, gt, xt, theta=theta, reg=reg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_by_one_and_empty(dtype):
    rng = np.random.default_rng(0)
    for density in (0.0, 1.0):  # 1x1 with nnz = 0 and nnz = 1
        w = CSR(rng, 1, 1, density, dtype)
        assert w.nnz == int(density)
        check_spmm(w, rand(rng, (1, 1), dtype))
        check_spmm_t(w, rand(rng, (1, 1), dtype))
        check_sddmm(w, rand(rng, (1, 1), dtype), rand(rng, (1, 1), dtype),
                    theta=rand(rng, (w.nnz,), dtype), reg=0.5)
    # nnz = 0 in a larger matrix: all-zero products, empty sddmm
    w = CSR(rng, 7, 5, 0.0, dtype)
    y = check_spmm(w, rand(rng, (5, 3), dtype))
    assert not bool(y.any())
    dx = check_spmm_t(w, rand(rng, (7, 3), dtype))
    assert not bool(dx.any())
    assert check_sddmm(w, rand(rng, (7, 3), dtype), rand(rng, (5, 3), dtype)).numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [15, 16, 17, 63, 127, 128, 129, 208, 255, 256, 257, 600])
def test_n_across_panel_boundaries(dtype, n):
    """n around and beyond the kernels' register/cache panel widths (powers of two up to 256,
    mixed remainders), row lengths not a multiple of 4 or 2."""
    rng = np.random.default_rng(n)
    w = CSR(rng, 13, 11, 0.6, dtype, empty_rows=0.2)
    check_spmm(w, rand(rng, (11, n), dtype))
    check_spmm_t(w, rand(rng, (13, n), dtype))
    check_sddmm(w, rand(rng, (13, n), dtype), rand(rng, (11, n), dtype),
                theta=rand(rng, (w.nnz,), dtype), reg=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [9, 131])
def test_many_columns_and_long_rows(dtype, n):
    """Rows that span thousands of columns (column tiling of xt) with wide n."""
    rng = np.random.default_rng(10 + n)
    w = CSR(rng, 48, 3_001, 0.03, dtype, empty_rows=0.1)
    w2 = CSR(rng, 4, 3_001, 0.6, dtype)            # a few very long rows
    for m in (w, w2):
        check_spmm(m, rand(rng, (m.cols, n), dtype))
        check_spmm_t(m, rand(rng, (m.rows, n), dtype))
        check_sddmm(m, rand(rng, (m.rows, n), dtype), rand(rng, (m.cols, n), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [20, 64, 300])
def test_sddmm_row_blocks_panels_and_tiles(dtype, n):
    """sddmm over several row blocks (one task each, > 1024 rows), several column tiles of
    the packed X panel (5 000 columns), one or more sample panels with a zero-padded last
    one (P = 32, 64, 128 float32 / 32, 64 float64), empty rows, the regulariser and a
    second structure served by the same packed operands."""
    from sparsecore.kernels.cpu import sddmm as cpu_sddmm
    itemsize = 4 if dtype == torch.float32 else 8
    P = cpu_sddmm.sddmm_panel_width(n, itemsize)
    assert P == {20: 32, 64: 64, 300: 512 // itemsize}[n]
    assert cpu_sddmm._L2_TILE_BYTES // (P * itemsize) < 5_000   # tiled columns
    rng = np.random.default_rng(n)
    w = CSR(rng, 2_100, 5_000, 0.002, dtype, empty_rows=0.2)
    check_sddmm(w, rand(rng, (w.rows, n), dtype), rand(rng, (w.cols, n), dtype),
                theta=rand(rng, (w.nnz,), dtype), reg=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_structures_share_passes(dtype):
    """``more`` structures are walked two per pass with the first (the layer's A and B
    minus A): three structures (a pair and one alone), columns of one shuffled within
    its rows (any order is correct), several row blocks and column tiles, the
    regulariser on the first only; each against the dense oracle and against a call
    of its own. A structure with other rows than W is refused."""
    from sparsecore.kernels.cpu import sddmm as cpu_sddmm
    rng = np.random.default_rng(11)
    n, rows, cols = 300, 1_100, 5_000
    ws = [CSR(rng, rows, cols, d, dtype, empty_rows=e) for d, e in ((0.003, 0.2),
                                                                    (0.002, 0.0), (0.004, 0.5))]
    for r in range(rows):   # shuffle the second structure's columns within each row
        a, b = int(ws[1].indptr[r]), int(ws[1].indptr[r + 1])
        ws[1].indices[a:b] = ws[1].indices[a:b][torch.from_numpy(rng.permutation(b - a))]
    ws[1].row_of = torch.repeat_interleave(torch.arange(rows), ws[1].indptr.diff())
    assert cpu_sddmm._L2_TILE_BYTES // 512 < cols   # several column tiles (512-byte rows)
    g, x = rand(rng, (n, rows), dtype), rand(rng, (n, cols), dtype)
    theta = rand(rng, (ws[0].nnz,), dtype)
    outs = [torch.full((w.nnz,), float("nan"), dtype=dtype) for w in ws]
    kernels.sddmm(ws[0].indptr, ws[0].indices, g, x, theta=theta, reg=0.3, out=outs[0],
                  layout="row", more=[(w.indptr, w.indices, o) for w, o in zip(ws[1:], outs[1:])])
    g64, x64 = g.double(), x.double()
    for i, (w, o) in enumerate(zip(ws, outs)):
        r, c = w.row_of, w.indices.long()
        exact = (g64[:, r] * x64[:, c]).sum(0)
        bound = (g64[:, r] * x64[:, c]).abs().sum(0)
        alone = kernels.sddmm(w.indptr, w.indices, g, x, layout="row")
        if i == 0:
            exact, bound = exact + 0.3 * theta.double(), bound + abs(0.3 * theta.double())
            alone += 0.3 * theta
        assert_within(o, exact, bound, dtype, n + 1, f"sddmm structure {i}")
        torch.testing.assert_close(o, alone, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                   atol=0.0)
    short = CSR(rng, rows - 1, cols, 0.01, dtype)
    more = [(short.indptr, short.indices, torch.empty(short.nnz, dtype=dtype))]
    with pytest.raises(ValueError, match="a structure in more"):
        kernels.sddmm(ws[0].indptr, ws[0].indices, g, x, layout="row", more=more)
    with pytest.raises(ValueError, match=f"has {rows - 1} rows; W has {rows}"):   # unchecked call
        kernels.sddmm(ws[0].indptr, ws[0].indices, g, x, layout="row", more=more, check=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_transposed16_matches_numpy(dtype):
    """The in-register 16 x 16 transpose that stores spmm's output blocks, at offsets and
    strides as the kernel passes them (element units), against numpy's transpose; memory
    outside the 16 x 16 destination block stays untouched."""
    from sparsecore.kernels.cpu import spmm as cpu_spmm

    @numba.njit
    def run(a, so, ss, b, do, ds):
        cpu_spmm.store_transposed16(a, so, ss, b, do, ds)

    nd = np.float32 if dtype == torch.float32 else np.float64
    for ss, ds, r0, c0, do in ((64, 40, 3, 16, 7), (32, 16, 0, 0, 0), (128, 4097, 5, 96, 33)):
        a = cpu_spmm.aligned_empty(24 * ss, nd)
        a[:] = np.random.default_rng(ss).standard_normal(a.size)
        b = np.full(do + 16 * ds + 16, -7.0, nd)
        run(a, r0 * ss + c0, ss, b, do, ds)
        want = np.full_like(b, -7.0)
        want[do:do + 16 * ds].reshape(16, ds)[:, :16] = a.reshape(24, ss)[r0:r0 + 16, c0:c0 + 16].T
        np.testing.assert_array_equal(b, want)


@pytest.mark.parametrize("nt", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(16, 16), (37, 40), (70, 64), (129, 100), (48, 300),
                                    (64, 130)])
def test_spmm_row_layout_block_stores(dtype, rows, n, nt, monkeypatch):
    """Row-major spmm / spmm_t outputs of whole 16-row x 16-sample blocks (stored through
    the in-register transpose, non-temporally with ``nt`` where rows are 64-byte aligned)
    next to partial ones (rows or samples left over): dense oracle, equal to the
    feature-major result bit for bit and across thread counts."""
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    if nt:
        monkeypatch.setattr(cpu_spmm, "_NT_BYTES", 0)
        y = torch.empty(n, rows, dtype=dtype).numpy()
        assert cpu_spmm.nontemporal(y) == (rows * y.itemsize % 64 == 0)
    else:
        assert not cpu_spmm.nontemporal(torch.empty(n, rows, dtype=dtype).numpy())
    rng = np.random.default_rng(rows * 1000 + n)
    w = CSR(rng, rows, 53, 0.15, dtype, empty_rows=0.2)
    xt = rand(rng, (w.cols, n), dtype)
    y = check_spmm(w, xt)                       # dense oracle + row layout == feature layout
    gt = rand(rng, (w.rows, n), dtype)
    check_spmm_t(w, gt)
    wt = CSR(rng, 53, rows, 0.15, dtype)        # spmm_t producing `rows` output columns
    check_spmm_t(wt, rand(rng, (53, n), dtype))
    x = xt.t().contiguous()
    bias = rand(rng, (w.rows,), dtype)
    monkeypatch.setattr(kernels, "SERIAL_FLOPS", 0)   # small products: threads too
    outs = []
    for k in (1, 2):
        with num_threads(k):
            outs.append(kernels.spmm(w.indptr, w.indices, w.values, x, bias=bias,
                                     layout="row"))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.1, 0.02, 0.002])
def test_column_tiled_spmm_paths(dtype, density):
    """Panels wider than ~L2 (5000 columns x 256 bytes) take the column-tiled kernel:
    L1 tiles at 10% (>= 8 values per row and tile), L2 tiles at 2%, none at 0.2%;
    with empty rows and n not a multiple of the panel width."""
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    rng = np.random.default_rng(int(density * 1000))
    cols = 5_000
    w = CSR(rng, 40, cols, density, dtype, empty_rows=0.2)
    itemsize = 4 if dtype == torch.float32 else 8
    P = cpu_spmm.panel_width(cols, itemsize, 70)
    T = cpu_spmm.tile_width(cols, P, itemsize, w.nnz / w.rows)
    expect = {0.1: 32768 // (P * itemsize), 0.02: 524288 // (P * itemsize), 0.002: cols}
    assert T == expect[density]
    check_spmm(w, rand(rng, (cols, 70), dtype))
    check_spmm_t(w, rand(rng, (w.rows, 70), dtype))
    wt = CSR(rng, cols, 40, density * 10, dtype, empty_rows=0.2)   # tiled spmm_t
    check_spmm_t(wt, rand(rng, (cols, 33), dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T", [2, 5, 10_000])
def test_csr_rows_kernel_short_rows(dtype, T):
    """Rows of 0-13 values (the four-values-per-pass loop, its pair and single tails,
    tile exits inside a pass), the last rows of the matrix among them, against dense
    math."""
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    rng = np.random.default_rng(T)
    rows, cols = 70, 40
    lens = np.arange(rows) % 14
    lens[-3:] = (13, 0, 5)
    indices = np.concatenate([np.sort(rng.choice(cols, k, replace=False)) for k in lens])
    indices = indices.astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    data = rng.standard_normal(indices.size).astype(dtype)
    wd = np.zeros((rows, cols))
    wd[np.repeat(np.arange(rows), lens), indices] = data
    for P in (32, 64):
        for n in (3, P + 7):
            x = rng.standard_normal((n, cols)).astype(dtype)
            exact = x.astype(np.float64) @ wd.T
            bound = np.abs(x.astype(np.float64)) @ np.abs(wd).T
            y = np.empty((n, rows), dtype)
            cpu_spmm.csr_rows_kernel(indptr, indices, data, x, y, T=T, P=P)
            assert np.all(np.abs(y - exact) <= 20 * np.finfo(dtype).eps * bound + 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P", [32, 64])
@pytest.mark.parametrize("T", [1, 3, 7, 64, 10_000])
def test_csr_rows_kernel_any_tile_and_panel(dtype, P, T):
    """The row kernel itself, for every panel width and tile width (T = 1: one column
    per tile; T > ncols: untiled), against dense math: unsorted columns within rows
    (any order is correct), empty rows, an all-empty row block, bias, n not a
    multiple of P, and a transposed (strided) output."""
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    rng = np.random.default_rng(P + T)
    rows, cols = 300, 57
    mask = rng.random((rows, cols)) < 0.3
    mask[rng.random(rows) < 0.2] = False
    mask[100:140] = False                       # a block of empty rows
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    indices = np.concatenate([rng.permutation(np.nonzero(m)[0]) for m in mask]).astype(np.int32)
    data = rng.standard_normal(indices.size).astype(dtype)
    wd = np.zeros((rows, cols))
    wd[np.repeat(np.arange(rows), mask.sum(1)), indices] = data
    bias = rng.standard_normal(rows).astype(dtype)
    for n in (1, P - 1, P + 5, 2 * P):
        x = rng.standard_normal((n, cols)).astype(dtype)
        exact = x.astype(np.float64) @ wd.T
        bound = np.abs(x.astype(np.float64)) @ np.abs(wd).T
        eps = np.finfo(dtype).eps
        y = np.empty((n, rows), dtype)
        cpu_spmm.csr_rows_kernel(indptr, indices, data, x, y, T=T, P=P)
        assert np.all(np.abs(y - exact) <= 40 * eps * bound + 1e-300)
        yt = np.empty((rows, n), dtype).T        # strided output
        cpu_spmm.csr_rows_kernel(indptr, indices, data, x, yt, bias=bias, T=T, P=P)
        assert np.all(np.abs(yt - exact - bias) <= 40 * eps * (bound + np.abs(bias)) + 1e-300)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("P", [32, 64, 128])
def test_pack_panels_matches_slices(dtype, P):
    """pack_panels (16-sample groups over 256-feature blocks) against numpy slicing:
    n not a multiple of 16 or P (zero padding), F not a multiple of 256, a transposed
    (strided) input, row-major views whose rows start off a 64-byte boundary (the
    16 x 16 register transposes read unaligned rows) or lie further apart than F;
    the padded tail is overwritten even over stale data."""
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    rng = np.random.default_rng(P)
    for n, F in ((1, 3), (P - 7, 300), (P + 19, 513), (3 * P, 256), (2 * P + 16, 48)):
        for x in (rng.standard_normal((n, F)).astype(dtype),
                  rng.standard_normal((F, n)).astype(dtype).T,
                  rng.standard_normal(n * F + 3).astype(dtype)[3:].reshape(n, F),
                  rng.standard_normal((n, F + 21)).astype(dtype)[:, 5:5 + F]):
            npan = -(-n // P)
            want = np.zeros((npan * P, F), dtype)
            want[:n] = x
            want = want.reshape(npan, P, F).transpose(0, 2, 1)
            out = np.full((npan, F, P), np.nan, dtype)
            cpu_spmm.pack_panels(x, out)
            np.testing.assert_array_equal(out, want)
            wide = np.full((npan, F, P + 16), np.nan, dtype)   # a strided ``out`` too
            cpu_spmm.pack_panels(x, wide[:, :, :P])
            np.testing.assert_array_equal(wide[:, :, :P], want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("PG", [32, 64])
def test_sddmm_reads_g_from_narrower_shared_panels(dtype, PG):
    """sddmm with G shared in panels narrower than its own (PG = P / 2, or P / 4 is not
    offered: packed separately) matches dense math and the unshared bits, for n that
    leaves n short of a whole X panel (the shared pack is zero padded to one)."""
    from sparsecore.kernels.cpu import sddmm as cpu_sddmm
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    rng = np.random.default_rng(PG)
    rows, cols = 150, 57
    mask = rng.random((rows, cols)) < 0.3
    indptr = np.concatenate([[0], np.cumsum(mask.sum(1))]).astype(np.int64)
    indices = np.concatenate([np.nonzero(m)[0] for m in mask]).astype(np.int32)
    r = np.repeat(np.arange(rows), mask.sum(1))
    itemsize = np.dtype(dtype).itemsize
    for n in (PG + 1, 2 * PG + 1, 3 * PG + 5, 8 * PG):
        P = cpu_sddmm.sddmm_panel_width(n, itemsize)
        g = rng.standard_normal((n, rows)).astype(dtype)
        x = rng.standard_normal((n, cols)).astype(dtype)
        prod = g[:, r].astype(np.float64) * x[:, indices]
        plain = cpu_sddmm.sddmm(indptr, indices, g, x)
        with cpu_spmm.share_packing(g, PG):
            got = cpu_sddmm.sddmm(indptr, indices, g, x)
            shared = cpu_spmm._TLS.share[2]
        if P % PG == 0 and P // PG <= 2:
            W = 512 // itemsize     # the shared pack is padded to 512 bytes of samples
            assert shared is not None and shared.shape == (-(-n // W) * (W // PG), rows, PG)
        # the same values in the same order, but through another compiled variant (G read
        # as H = 2 panels): the vectorised dot product may associate differently (seen
        # intermittently, 1e-12 relative in float64), so a few roundings, not the bits
        assert np.all(np.abs(got - plain) <= 4 * np.finfo(dtype).eps * np.abs(prod).sum(0))
        for v in (plain, got):
            assert np.all(np.abs(v - prod.sum(0))
                          <= (2 * n + 2) * np.finfo(dtype).eps * np.abs(prod).sum(0) + 1e-300)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [20, 64, 300])
def test_share_packing_backward_matches_dense(dtype, n):
    """spmm_t and sddmm inside share_packing(g) (the layer's backward: g packed once at
    spmm_t's width, read by sddmm as consecutive panels) match dense math and give
    the same bits as without sharing; an operand other than the shared one is packed as usual;
    a nested block does not leave the outer one a stale pack."""
    rng = np.random.default_rng(n)
    w = CSR(rng, 300, 200, 0.05, dtype, empty_rows=0.1)
    t = kernels.transpose_csr(w.indptr, w.indices, w.cols)
    g, x = rand(rng, (n, w.rows), dtype), rand(rng, (n, w.cols), dtype)
    g2 = rand(rng, (n, w.rows), dtype)

    def run(gg):
        dx = kernels.spmm_t(*t, w.values, gg, layout="row")
        dw = kernels.sddmm(w.indptr, w.indices, gg, x, layout="row")
        return dx, dw

    plain = run(g)
    with kernels.share_packing(g):
        shared = run(g)
        other = run(g2)          # not the shared tensor: its own packing
        with kernels.share_packing(g2):       # nested: reuses the shared buffer
            nested = run(g2)
        again = run(g)           # the outer block's pack is rebuilt, not stale

    def same(a, b):
        # spmm_t: the same kernel on the same panels, the same bits; sddmm reads the shared
        # G through another compiled variant (see the test above): a few roundings
        assert torch.equal(a[0], b[0])
        assert (a[1] - b[1]).abs().max() <= 8 * torch.finfo(dtype).eps * b[1].abs().max()

    same(nested, other)
    same(shared, plain)
    same(again, plain)
    wd = w.dense64()
    for gg, (dx, dw) in ((g, shared), (g2, other)):
        g64, x64 = gg.double(), x.double()
        assert_within(dx, g64 @ wd, g64.abs() @ wd.abs(), dtype, w.max_col_nnz(), "spmm_t")
        r, c = w.row_of, w.indices.long()
        assert_within(dw, (g64[:, r] * x64[:, c]).sum(0), (g64[:, r] * x64[:, c]).abs().sum(0),
                      dtype, n + 1, "sddmm")


def test_workspace_is_reused_bounded_and_per_thread(monkeypatch):
    """The packing workspace: one buffer per (thread, slot), grown to the largest size
    asked for and reused by later (smaller) calls; a buffer over the cap is not kept;
    Python threads calling the kernels at once each get their own buffers and correct
    results."""
    import threading
    from sparsecore.kernels.cpu import spmm as cpu_spmm
    a = cpu_spmm.workspace("test", (4, 100), np.float32)
    assert a.ctypes.data % 64 == 0 and a.shape == (4, 100) and a.dtype == np.float32
    b = cpu_spmm.workspace("test", (3, 10), np.float64)
    assert b.ctypes.data == a.ctypes.data          # reused
    c = cpu_spmm.workspace("test", (1000, 100), np.float32)
    assert cpu_spmm._TLS.bufs["test"].nbytes >= c.nbytes   # grown and kept
    monkeypatch.setattr(cpu_spmm, "_WS_KEEP", 1000)
    d = cpu_spmm.workspace("test", (200_000,), np.float32)     # grows past the cap
    assert "test" not in cpu_spmm._TLS.bufs and d.shape == (200_000,)   # not kept
    monkeypatch.undo()

    rng = np.random.default_rng(3)
    w = CSR(rng, 200, 150, 0.1, torch.float32)
    t = kernels.transpose_csr(w.indptr, w.indices, w.cols)
    wd = w.dense64()
    inputs = [(rand(rng, (70 + 9 * i, w.cols), torch.float32),
               rand(rng, (70 + 9 * i, w.rows), torch.float32)) for i in range(4)]
    errors, ids = [], set()

    def worker(x, g):
        try:
            for _ in range(5):
                y = kernels.spmm(w.indptr, w.indices, w.values, x, layout="row")
                with kernels.share_packing(g):
                    dx = kernels.spmm_t(*t, w.values, g, layout="row")
                    dw = kernels.sddmm(w.indptr, w.indices, g, x, layout="row")
                assert_within(y, x.double() @ wd.t(), x.double().abs() @ wd.abs().t(),
                              torch.float32, w.max_row_nnz(), "spmm")
                assert_within(dx, g.double() @ wd, g.double().abs() @ wd.abs(),
                              torch.float32, w.max_col_nnz(), "spmm_t")
                r, c = w.row_of, w.indices.long()
                prod = g.double()[:, r] * x.double()[:, c]
                assert_within(dw, prod.sum(0), prod.abs().sum(0), torch.float32,
                              x.shape[0] + 1, "sddmm")
            ids.add(id(cpu_spmm._TLS.bufs["x"]))
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=xg) for xg in inputs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert len(ids) == len(inputs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_very_wide(dtype):
    """in >= 70000 columns (beyond int16), few rows, few entries."""
    rng = np.random.default_rng(1)
    rows, cols, n = 3, 70_003, 5
    w = CSR(rng, rows, cols, None, dtype, nnz=60)
    # make sure the last columns are used (int16 / off-by-one traps)
    assert int(w.indices.max()) > 40_000
    w.indices[-1] = cols - 1
    xt = rand(rng, (cols, n), dtype)
    gt = rand(rng, (rows, n), dtype)
    check_spmm(w, xt)
    check_spmm_t(w, gt)
    check_sddmm(w, gt, xt, theta=rand(rng, (w.nnz,), dtype), reg=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_very_tall(dtype):
    """out >= 70000 rows, few columns, few entries (most rows empty)."""
    rng = np.random.default_rng(2)
    rows, cols, n = 70_001, 4, 3
    w = CSR(rng, rows, cols, None, dtype, nnz=80)
    assert int(w.row_of.max()) > 40_000
    xt = rand(rng, (cols, n), dtype)
    gt = rand(rng, (rows, n), dtype)
    y = check_spmm(w, xt)
    assert y.shape == (rows, n)
    check_spmm_t(w, gt)
    check_sddmm(w, gt, xt, theta=rand(rng, (w.nnz,), dtype), reg=-0.2)


# --------------------------------------------------------------------------------------------
# layouts: non-contiguous inputs, out=, thread count
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_give_same_result(dtype):
    rng = np.random.default_rng(3)
    w = CSR(rng, 9, 12, 0.4, dtype)
    n = 7
    x = rand(rng, (n, w.cols), dtype)   # batch-major, as a layer receives it
    g = rand(rng, (n, w.rows), dtype)
    xt, gt = x.t(), g.t()               # feature-major views: not contiguous
    assert not xt.is_contiguous() and not gt.is_contiguous()
    t = kernels.transpose_csr(w.indptr, w.indices, w.cols)

    y = kernels.spmm(w.indptr, w.indices, w.values, xt)
    assert torch.equal(y, kernels.spmm(w.indptr, w.indices, w.values, xt.contiguous()))
    check_spmm(w, xt)

    dx = kernels.spmm_t(*t, w.values, gt)
    assert torch.equal(dx, kernels.spmm_t(*t, w.values, gt.contiguous()))
    check_spmm_t(w, gt)

    theta = rand(rng, (2 * w.nnz,), dtype)[::2]  # strided theta too
    d = kernels.sddmm(w.indptr, w.indices, gt, xt, theta=theta, reg=0.25)
    assert torch.equal(d, kernels.sddmm(w.indptr, w.indices, gt.contiguous(), xt.contiguous(),
                                        theta=theta.contiguous(), reg=0.25))
    check_sddmm(w, gt, xt, theta=theta, reg=0.25)

    # strided values and values that require grad (an nn.Parameter)
    vals2 = torch.zeros(2 * w.nnz, dtype=dtype)
    vals2[::2] = w.values
    assert torch.equal(kernels.spmm(w.indptr, w.indices, vals2[::2], xt), y)
    assert torch.equal(kernels.spmm_t(*t, vals2[::2], gt), dx)
    p = torch.nn.Parameter(w.values.clone())
    assert torch.equal(kernels.spmm(w.indptr, w.indices, p, xt), y)
    assert torch.equal(kernels.spmm_t(*t, p, gt), dx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_writes_into_contiguous_out(dtype):
    rng = np.random.default_rng(4)
    w = CSR(rng, 6, 8, 0.5, dtype)
    gt, xt = rand(rng, (6, 5), dtype), rand(rng, (8, 5), dtype)
    theta = rand(rng, (w.nnz,), dtype)
    ref = check_sddmm(w, gt, xt, theta=theta, reg=0.7)
    # a slice of a larger gradient buffer, the way the engine uses it
    buf = torch.full((w.nnz + 10,), 123.0, dtype=dtype)
    out = buf[3:3 + w.nnz]
    r = kernels.sddmm(w.indptr, w.indices, gt, xt, theta=theta, reg=0.7, out=out)
    assert r is out
    assert torch.equal(buf[3:3 + w.nnz], ref)
    assert bool((buf[:3] == 123.0).all()) and bool((buf[3 + w.nnz:] == 123.0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_sddmm_non_contiguous_out_is_written(dtype):
    """out= must receive the result even when it is a strided view (or be rejected).

    Today the wrapper converts ``out`` with ``.contiguous().numpy()``, which silently
    copies a strided view: the kernel writes the copy and ``out`` stays unchanged."""
    rng = np.random.default_rng(5)
    w = CSR(rng, 5, 6, 0.6, dtype)
    gt, xt = rand(rng, (5, 4), dtype), rand(rng, (6, 4), dtype)
    ref = kernels.sddmm(w.indptr, w.indices, gt, xt)
    buf = torch.zeros(2 * w.nnz, dtype=dtype)
    out = buf[::2]
    try:
        r = kernels.sddmm(w.indptr, w.indices, gt, xt, out=out)
    except (ValueError, TypeError):
        return  # rejecting a strided out is an acceptable contract too
    assert r is out
    assert torch.equal(out, ref), "sddmm(out=strided view) did not write into out"


def test_sddmm_rejects_short_out():
    """A too-short out= must raise, not write past its end (kernel runs boundscheck=False).
    Run in a subprocess: today this corrupts the heap and the interpreter may segfault."""
    code = textwrap.dedent("""
        import torch
        from sparsecore import kernels
        rows, cols, n = 200, 50, 8
        indptr = torch.arange(0, rows * cols + 1, cols, dtype=torch.int64)
        indices = torch.arange(cols, dtype=torch.int32).repeat(rows)
        gt = torch.randn(rows, n, dtype=torch.float64)
        xt = torch.randn(cols, n, dtype=torch.float64)
        try:
            kernels.sddmm(indptr, indices, gt, xt, out=torch.zeros(1, dtype=torch.float64))
        except (ValueError, IndexError) as e:
            print("RAISED:", e, flush=True)
        else:
            print("NO ERROR", flush=True)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert "RAISED" in res.stdout, (
        f"sddmm accepted out of length 1 for nnz=10000 (rc={res.returncode}, "
        f"stdout={res.stdout.strip()!r})")
    assert res.returncode == 0


def test_results_independent_of_thread_count():
    rng = np.random.default_rng(6)
    for dtype in DTYPES:
        w = CSR(rng, 37, 29, 0.3, dtype, empty_rows=0.1)
        xt, gt = rand(rng, (29, 300), dtype), rand(rng, (37, 300), dtype)
        theta = rand(rng, (w.nnz,), dtype)
        t = kernels.transpose_csr(w.indptr, w.indices, w.cols)

        def run():
            return (kernels.spmm(w.indptr, w.indices, w.values, xt),
                    kernels.spmm_t(*t, w.values, gt),
                    kernels.sddmm(w.indptr, w.indices, gt, xt, theta=theta, reg=0.1))

        many = run()
        with num_threads(1):
            one = run()
        for a, b in zip(many, one):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

def _small(dtype=torch.float32):
    indptr = torch.tensor([0, 2, 2, 4], dtype=torch.int64)       # 3 rows, row 1 empty
    indices = torch.tensor([0, 3, 1, 4], dtype=torch.int32)      # 5 columns
    values = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=dtype)
    xt = torch.ones(5, 2, dtype=dtype)
    gt = torch.ones(3, 2, dtype=dtype)
    return indptr, indices, values, xt, gt


def _spmm(indptr, indices, values, xt, gt, **kw):
    return kernels.spmm(indptr, indices, values, xt, **kw)


def _spmm_t(indptr, indices, values, xt, gt):
    # structural errors of W show up when building (and validating) its transpose
    t = kernels.transpose_csr(indptr, indices, 5)
    return kernels.spmm_t(*t, values, gt)


def _sddmm(indptr, indices, values, xt, gt):
    return kernels.sddmm(indptr, indices, gt, xt, theta=values, reg=0.1)


ENTRY = {"spmm": _spmm, "spmm_t": _spmm_t, "sddmm": _sddmm}


@pytest.mark.parametrize("fn", list(ENTRY))
def test_valid_small_inputs_pass(fn):
    ENTRY[fn](*_small())  # the baseline of every validation test below is valid


@pytest.mark.parametrize("fn", list(ENTRY))
def test_indptr_int32_rejected(fn):
    ip, ix, v, xt, gt = _small()
    with pytest.raises(TypeError, match=r"row pointers have dtype torch\.int32; expected torch\.int64"):
        ENTRY[fn](ip.int(), ix, v, xt, gt)


@pytest.mark.parametrize("fn", list(ENTRY))
def test_indices_int64_rejected(fn):
    ip, ix, v, xt, gt = _small()
    with pytest.raises(TypeError, match=r"column indices have dtype torch\.int64; expected torch\.int32"):
        ENTRY[fn](ip, ix.long(), v, xt, gt)


@pytest.mark.parametrize("fn", ["spmm", "spmm_t"])
def test_indptr_wrong_length_rejected(fn):
    ip, ix, v, xt, gt = _small()
    with pytest.raises(ValueError, match=r"end at nnz=4"):
        ENTRY[fn](ip[:-1], ix, v, xt, gt)      # one row pointer short


def test_indptr_wrong_length_rejected_sddmm():
    ip, ix, v, xt, gt = _small()
    with pytest.raises(ValueError, match=r"gt has 3 rows; expected 4"):
        _sddmm(torch.tensor([0, 2, 2, 4, 4]), ix, v, xt, gt)   # one row pointer too many
    with pytest.raises(ValueError, match=r"end at nnz=4"):
        _sddmm(ip[:-1], ix, v, xt, gt[:2])                      # one short (gt matches it)


def test_empty_indptr_rejected_clearly():
    """An empty row-pointer array is malformed (a CSR needs rows + 1 >= 1 pointers); the check
    should say so instead of leaking torch's 'index 0 is out of bounds'."""
    _, _, _, xt, _ = _small()
    with pytest.raises(ValueError, match=r"row pointers"):
        kernels.spmm(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int32),
                     torch.empty(0), xt)


@pytest.mark.parametrize("fn", list(ENTRY))
def test_column_index_out_of_range_rejected(fn):
    ip, ix, v, xt, gt = _small()
    ix = ix.clone()
    ix[2] = 5
    with pytest.raises(IndexError, match=r"column index 5 is out of range \[0, 5\)"):
        ENTRY[fn](ip, ix, v, xt, gt)


@pytest.mark.parametrize("fn", list(ENTRY))
def test_negative_column_index_rejected(fn):
    ip, ix, v, xt, gt = _small()
    ix = ix.clone()
    ix[0] = -1
    with pytest.raises(IndexError, match=r"column index -1 is out of range"):
        ENTRY[fn](ip, ix, v, xt, gt)


@pytest.mark.parametrize("fn", list(ENTRY))
def test_non_monotone_indptr_rejected(fn):
    ip, ix, v, xt, gt = _small()
    with pytest.raises(ValueError, match=r"non-decreasing"):
        ENTRY[fn](torch.tensor([0, 3, 1, 4]), ix, v, xt, gt)


def test_dtype_mismatch_rejected():
    ip, ix, v, xt, gt = _small(torch.float32)
    with pytest.raises(TypeError, match=r"xt has dtype torch\.float64 but the sparse values are torch\.float32"):
        kernels.spmm(ip, ix, v, xt.double())
    t = kernels.transpose_csr(ip, ix, 5)
    with pytest.raises(TypeError, match=r"gt has dtype torch\.float64 but the sparse values are torch\.float32"):
        kernels.spmm_t(*t, v, gt.double())
    with pytest.raises(TypeError, match=r"xt has dtype torch\.float64"):
        kernels.sddmm(ip, ix, gt, xt.double())
    with pytest.raises(ValueError, match=r"theta must have 4 entries of torch\.float32"):
        kernels.sddmm(ip, ix, gt, xt, theta=v.double(), reg=0.1)


def test_wrong_activation_rows_rejected():
    ip, ix, v, xt, gt = _small()
    with pytest.raises(ValueError, match=r"xt has 4 rows; expected 5"):
        kernels.spmm(ip, ix, v, xt[:4], n_cols=5)
    with pytest.raises(IndexError, match=r"column index 4 is out of range \[0, 4\)"):
        kernels.spmm(ip, ix, v, xt[:4])          # inferred width too small for the columns
    with pytest.raises(ValueError, match=r"gt has 2 rows; expected 3"):
        kernels.sddmm(ip, ix, gt[:2], xt)
    with pytest.raises(IndexError, match=r"out of range \[0, 4\)"):
        kernels.sddmm(ip, ix, gt, xt[:4])
    t = kernels.transpose_csr(ip, ix, 5)
    with pytest.raises(IndexError, match=r"out of range \[0, 2\)"):
        kernels.spmm_t(*t, v, gt[:2])            # W has 3 rows, gt gives 2
    with pytest.raises(ValueError, match=r"gt has n=2 columns but xt has n=3"):
        kernels.sddmm(ip, ix, gt, torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"must be 2-D"):
        kernels.spmm(ip, ix, v, torch.ones(5), n_cols=5)


@pytest.mark.parametrize("bad", [torch.int64, torch.float16, torch.bfloat16, torch.bool])
def test_non_float_values_rejected(bad):
    ip, ix, v, xt, gt = _small()
    with pytest.raises(TypeError, match=rf"values has dtype {bad}; expected torch\.float32 or torch\.float64"):
        kernels.spmm(ip, ix, v.to(bad), xt)
    t = kernels.transpose_csr(ip, ix, 5)
    with pytest.raises(TypeError, match=r"values has dtype"):
        kernels.spmm_t(*t, v.to(bad), gt)
    with pytest.raises(TypeError, match=r"gt has dtype"):
        kernels.sddmm(ip, ix, gt.to(bad), xt.to(bad))


def test_value_count_and_perm_rejected():
    ip, ix, v, xt, gt = _small()
    with pytest.raises(ValueError, match=r"values has 3 entries; W stores 4"):
        kernels.spmm(ip, ix, v[:3], xt)
    t_ip, t_rows, t_perm = kernels.transpose_csr(ip, ix, 5)
    with pytest.raises(ValueError, match=r"t_perm must be int32 or int64"):
        kernels.spmm_t(t_ip, t_rows, t_perm.short(), v, gt)
    torch.testing.assert_close(kernels.spmm_t(t_ip, t_rows, t_perm.int(), v, gt),
                               kernels.spmm_t(t_ip, t_rows, t_perm, v, gt), rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"t_perm points outside values \(length 3\)"):
        kernels.spmm_t(t_ip, t_rows, t_perm, v[:3], gt)
    with pytest.raises(ValueError, match=r"theta must have 4 entries"):
        kernels.sddmm(ip, ix, gt, xt, theta=v[:3], reg=0.1)


# --------------------------------------------------------------------------------------------
# select_topk and kth_largest_magnitude
# --------------------------------------------------------------------------------------------

def brute_topk(v: np.ndarray, k: int) -> np.ndarray:
    return np.sort(np.lexsort((np.arange(v.shape[0]), -np.abs(v)))[:k])


def _near_bits(rng, n, dtype):
    """Magnitudes that share their high bits and differ in lower 16-bit digits, so the
    radix select must descend through every level; random signs, many exact ties."""
    if dtype == np.float64:
        base = np.array([1.5], np.float64).view(np.uint64)[0]
        offs = np.array([0, 1, 2, 1 << 16, (1 << 16) + 1, 1 << 32, (1 << 32) + 1, 1 << 48],
                        np.uint64)
        bits = (base + rng.choice(offs, n)).astype(np.uint64)
    else:
        base = np.array([1.5], np.float32).view(np.uint32)[0]
        offs = np.array([0, 1, 2, 1 << 16, (1 << 16) + 1, 1 << 20], np.uint32)
        bits = (base + rng.choice(offs, n)).astype(np.uint32)
    v = bits.view(dtype).copy()
    return v * rng.choice(np.array([-1, 1], dtype), n)


_TIE_POOL = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 3.0, 1e-30, -1e-30, 5e-324])


@st.composite
def magnitude_vectors(draw):
    n = draw(st.integers(0, 400))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    style = draw(st.sampled_from(["ties", "near_bits", "mixed", "distinct", "zeros"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if style == "ties":
        v = rng.choice(_TIE_POOL, n).astype(dtype)
    elif style == "near_bits":
        v = _near_bits(rng, n, dtype)
    elif style == "mixed":
        v = rng.standard_normal(n).astype(dtype)
        m = rng.random(n) < 0.5
        v[m] = rng.choice(_TIE_POOL, int(m.sum())).astype(dtype)
    elif style == "zeros":
        v = rng.choice(np.array([0.0, -0.0]), n).astype(dtype)
    else:
        v = rng.standard_normal(n).astype(dtype)
    which = draw(st.sampled_from(["0", "1", "some", "n-1", "n"]))
    k = {"0": 0, "1": min(1, n), "some": draw(st.integers(0, n)), "n-1": max(n - 1, 0),
         "n": n}[which]
    return v, k


@HYP
@given(magnitude_vectors())
def test_select_topk_matches_brute_force(case):
    v, k = case
    got = kernels.select_topk(torch.from_numpy(v), k)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), brute_topk(v, k))


@settings(HYP, max_examples=max(1, 3 * _N_EX // 4))
@given(magnitude_vectors())
def test_kth_largest_magnitude_matches_sort(case):
    v, k_drawn = case
    if v.shape[0] == 0:
        return
    mags = np.sort(np.abs(v).astype(np.float64))[::-1]
    for k in sorted({1, k_drawn, v.shape[0]} - {0}):
        got = kth_largest_magnitude(v, k)
        assert got == mags[k - 1], (k, got, mags[k - 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_topk_large_with_ties_and_threads(dtype):
    """Ties straddling the parallel parts: the earliest positions must win across parts."""
    rng = np.random.default_rng(7)
    n = 50_003
    v = rng.choice(_TIE_POOL, n).astype(dtype)
    v[::97] = _near_bits(rng, v[::97].shape[0], dtype)
    t = torch.from_numpy(v)
    for k in [1, 17, 4_999, n // 3, n // 2, n - 2, n - 1]:
        ref = brute_topk(v, k)
        np.testing.assert_array_equal(kernels.select_topk(t, k).numpy(), ref)
        with num_threads(1):
            np.testing.assert_array_equal(kernels.select_topk(t, k).numpy(), ref)
        mags = np.sort(np.abs(v).astype(np.float64))[::-1]
        assert kth_largest_magnitude(v, k) == mags[k - 1]


def test_select_topk_input_checks():
    t = torch.tensor([1.0, -2.0, 0.5])
    np.testing.assert_array_equal(kernels.select_topk(t, 3).numpy(), [0, 1, 2])
    for k in (-1, 4):
        with pytest.raises(ValueError, match=rf"k={k} is out of range \[0, 3\]"):
            kernels.select_topk(t, k)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in DTYPES:
            with pytest.raises(ValueError, match=r"NaN or Inf"):
                kernels.select_topk(torch.tensor([1.0, bad, 0.5], dtype=dtype), 1)
    with pytest.raises(ValueError, match=r"must be 1-D"):
        kernels.select_topk(torch.ones(2, 3), 1)
    with pytest.raises(TypeError, match=r"values has dtype torch\.int64"):
        kernels.select_topk(torch.tensor([3, 1, 2]), 1)
    # non-contiguous input is read correctly
    base = torch.tensor([5.0, 0.0, -1.0, 0.0, 4.0, 0.0, -4.0, 0.0])
    np.testing.assert_array_equal(kernels.select_topk(base[::2], 2).numpy(), [0, 2])
    # empty input, k = 0
    assert kernels.select_topk(torch.empty(0), 0).numel() == 0


# --------------------------------------------------------------------------------------------
# init_values
# --------------------------------------------------------------------------------------------

KINDS = [("uniform", 0.25), ("normal", 0.05)]


def iv(key, idx, kind, param, dtype=torch.float64):
    if not isinstance(idx, torch.Tensor):
        idx = torch.as_tensor(np.asarray(idx, np.int64))
    return kernels.init_values(key, idx, kind=kind, param=param, dtype=dtype)


@pytest.mark.parametrize("kind,param", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_init_values_independent_of_chunking_order_and_threads(kind, param, dtype):
    rng = np.random.default_rng(8)
    key, n = 0x1234_5678_9ABC, 60_000
    whole = iv(key, np.arange(n), kind, param, dtype)
    assert whole.dtype == dtype and whole.shape == (n,)
    assert torch.equal(whole, iv(key, np.arange(n), kind, param, dtype))  # deterministic
    # piecewise, pieces evaluated in shuffled order
    cuts = np.sort(rng.choice(np.arange(1, n), 25, replace=False))
    pieces = np.split(np.arange(n), cuts)
    got = torch.empty_like(whole)
    for j in rng.permutation(len(pieces)):
        got[torch.from_numpy(pieces[j])] = iv(key, pieces[j], kind, param, dtype)
    assert torch.equal(got, whole)
    # one call over a permutation (with repeats) and over a strided index tensor
    perm = np.concatenate([rng.permutation(n), rng.integers(0, n, 100)])
    assert torch.equal(iv(key, perm, kind, param, dtype), whole[torch.from_numpy(perm)])
    strided = torch.arange(2 * n, dtype=torch.int64)[::2] // 2
    assert torch.equal(iv(key, strided, kind, param, dtype), whole)
    with num_threads(1):
        assert torch.equal(iv(key, np.arange(n), kind, param, dtype), whole)


@pytest.mark.parametrize("kind,param", KINDS)
def test_init_values_float32_is_rounded_float64(kind, param):
    idx = np.arange(100_000)
    v64 = iv(99, idx, kind, param, torch.float64)
    v32 = iv(99, idx, kind, param, torch.float32)
    assert torch.equal(v32, v64.to(torch.float32))


def test_init_uniform_bounds_and_distribution():
    b = 1.0 / math.sqrt(300.0)
    idx = np.arange(200_000)
    v = iv(2024, idx, "uniform", b).numpy()
    assert np.all(v > -b) and np.all(v < b)
    v32 = iv(2024, idx, "uniform", b, torch.float32).numpy()
    assert np.all(np.abs(v32) <= np.float32(b))
    assert stats.kstest(v, "uniform", args=(-b, 2 * b)).pvalue > 1e-3
    # far away in index space the law is the same
    far = iv(2024, 2**40 + idx, "uniform", b).numpy()
    assert stats.kstest(far, "uniform", args=(-b, 2 * b)).pvalue > 1e-3
    # consecutive indices are uncorrelated (counter-based hash, not a weak LCG)
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 5 / math.sqrt(v.size)


def test_init_normal_distribution():
    std = 0.02
    idx = np.arange(200_000)
    v = iv(77, idx, "normal", std).numpy()
    assert np.all(np.isfinite(v))
    assert stats.kstest(v, "norm", args=(0.0, std)).pvalue > 1e-3
    far = iv(77, 2**40 + idx, "normal", std).numpy()
    assert stats.kstest(far, "norm", args=(0.0, std)).pvalue > 1e-3
    assert abs(np.corrcoef(v[:-1], v[1:])[0, 1]) < 5 / math.sqrt(v.size)


@pytest.mark.parametrize("kind,param", KINDS)
def test_init_different_keys_give_different_streams(kind, param):
    idx = np.arange(20_000)
    keys = [0, 1, 2, 12345, 2**32, 2**63, 2**64 - 1]
    streams = [iv(k, idx, kind, param).numpy() for k in keys]
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            sa, sb = streams[a], streams[b]
            assert np.mean(sa == sb) < 1e-3, (keys[a], keys[b])
            assert abs(np.corrcoef(sa, sb)[0, 1]) < 5 / math.sqrt(idx.size), (keys[a], keys[b])


@pytest.mark.parametrize("kind,param", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_init_values_at_huge_indices(kind, param, dtype):
    for base in (2**31 - 3, 2**32 - 3, 2**40, 2**62, 2**63 - 1000):
        idx = base + np.arange(1000)
        a = iv(5, idx, kind, param, dtype)
        assert bool(torch.isfinite(a).all())
        assert torch.equal(a, iv(5, idx, kind, param, dtype))
        assert torch.equal(a[500:], iv(5, idx[500:], kind, param, dtype))
        assert torch.equal(a.flip(0), iv(5, idx[::-1].copy(), kind, param, dtype))
        assert torch.unique(a).numel() > 990      # a real stream, not a constant
        if kind == "uniform":
            assert bool((a.abs() <= param).all())


def test_init_values_unsupported_dtype_not_silently_float64():
    """dtype is float32 or float64; anything else must raise, not quietly give float64."""
    for bad in (torch.float16, torch.bfloat16, torch.int64):
        try:
            v = kernels.init_values(1, torch.arange(10), param=1.0, dtype=bad)
        except (TypeError, ValueError):
            continue
        assert v.dtype == bad, f"asked for {bad}, got {v.dtype}"


# --------------------------------------------------------------------------------------------
# scan
# --------------------------------------------------------------------------------------------

def brute_scan(key, n_total, floor, kind, param, dtype, skip=None):
    vals = iv(key, np.arange(n_total), kind, param, dtype).numpy().astype(np.float64)
    hits = np.flatnonzero(np.abs(vals) >= floor)
    if skip is not None:
        hits = np.setdiff1d(hits, np.asarray(skip), assume_unique=False)
    return hits.astype(np.int64), vals


def _floors(kind, param, vals):
    """Floors in units of the distribution, plus exact boundaries taken from the data."""
    rel = [0.0, 1e-3, 0.5, 0.97] if kind == "uniform" else [0.0, 0.01, 1.0, 3.0, 4.3]
    fl = [r * param for r in rel]
    if kind == "uniform":
        fl.append(1.01 * param)  # nothing can reach it
    mags = np.sort(np.abs(vals))[::-1]
    fl += [float(mags[7]), float(mags[len(mags) // 3])]  # floor == some |theta0| exactly
    return fl


@pytest.mark.parametrize("kind,param", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_matches_brute_force(kind, param, dtype):
    key, n_total = 31337, 100_003
    rng = np.random.default_rng(9)
    _, vals = brute_scan(key, n_total, 0.0, kind, param, dtype)
    for floor in _floors(kind, param, vals):
        ref, _ = brute_scan(key, n_total, floor, kind, param, dtype)
        # skip: half of the hits, some non-hits, duplicates, and indices outside the range
        skip = np.concatenate([rng.choice(ref, ref.size // 2, replace=False) if ref.size else [],
                               rng.integers(0, n_total, 500), [n_total, n_total + 7, 2**40],
                               ref[:3]]).astype(np.int64)
        skip = np.sort(skip)
        ref_skip = np.setdiff1d(ref, skip)
        for chunk in (997, 8_192 + 5, 1 << 26):
            got = kernels.scan(key, n_total, floor, kind=kind, param=param, dtype=dtype,
                               chunk=chunk)
            assert got.dtype == torch.int64
            np.testing.assert_array_equal(got.numpy(), ref, err_msg=f"floor={floor} chunk={chunk}")
            got = kernels.scan(key, n_total, floor, kind=kind, param=param, dtype=dtype,
                               chunk=chunk, skip=torch.from_numpy(skip))
            np.testing.assert_array_equal(got.numpy(), ref_skip,
                                          err_msg=f"skip, floor={floor} chunk={chunk}")


def test_scan_boundary_floor_is_inclusive():
    key, n_total = 4, 50_000
    for kind, param in KINDS:
        for dtype in DTYPES:
            _, vals = brute_scan(key, n_total, 0.0, kind, param, dtype)
            j = int(np.argsort(np.abs(vals))[-10])
            floor = abs(float(vals[j]))
            got = kernels.scan(key, n_total, floor, kind=kind, param=param, dtype=dtype).numpy()
            assert j in got
            assert got.size == int(np.sum(np.abs(vals) >= floor)) == 10


def test_scan_overflow_path(monkeypatch):
    """Force the per-part capacity estimate far too low (P(hit) estimated as 0, so cap=256)
    while most entries hit: every part must take the exact re-scan path."""
    key, n_total, param = 8, 100_000, 1.0
    calls = {"redo": 0}
    real_kernel = init_mod._scan_kernel

    def counting_kernel(*args):
        if args[3] == 1:   # nparts == 1: the overflow re-scan of one part
            calls["redo"] += 1
        return real_kernel(*args)

    monkeypatch.setattr(init_mod, "magnitude_cdf", lambda t, kind, p: 1.0)
    monkeypatch.setattr(init_mod, "_scan_kernel", counting_kernel)
    for kind, dtype in [("uniform", torch.float32), ("normal", torch.float64)]:
        floor = 0.05 * param
        ref, _ = brute_scan(key, n_total, floor, kind, param, dtype)
        assert ref.size > 0.9 * n_total
        skip = np.sort(np.random.default_rng(1).choice(n_total, 3000, replace=False))
        for chunk, sk in [(1 << 26, None), (9_973, skip)]:
            before = calls["redo"]
            got = kernels.scan(key, n_total, floor, kind=kind, param=param, dtype=dtype,
                               chunk=chunk, skip=None if sk is None else torch.from_numpy(sk))
            want = ref if sk is None else np.setdiff1d(ref, sk)
            np.testing.assert_array_equal(got.numpy(), want)
            assert calls["redo"] > before, "overflow path was not exercised"


def test_scan_low_floor_most_entries_hit():
    key, n_total = 3, 100_000
    for kind, param in KINDS:
        floor = 1e-4 * param
        ref, _ = brute_scan(key, n_total, floor, kind, param, torch.float32)
        assert ref.size > 0.99 * n_total
        got = kernels.scan(key, n_total, floor, kind=kind, param=param, chunk=997)
        np.testing.assert_array_equal(got.numpy(), ref)


def test_scan_unsorted_skip():
    """``skip`` is documented as 'not in skip' (no ordering requirement in the public API), so an
    unsorted skip must either be honoured or rejected. Today it silently yields wrong results:
    the kernel walks skip with a merge pointer that assumes ascending order."""
    key, n_total, param = 1, 5_000, 1.0
    ref, _ = brute_scan(key, n_total, 0.5, "uniform", param, torch.float64)
    skip = torch.from_numpy(ref[:40][::-1].copy())   # descending
    try:
        got = kernels.scan(key, n_total, 0.5, param=param, dtype=torch.float64, skip=skip)
    except ValueError:
        return
    np.testing.assert_array_equal(got.numpy(), np.setdiff1d(ref, ref[:40]))


def test_scan_edge_cases_and_threads():
    assert kernels.scan(1, 0, 0.0, param=1.0).numel() == 0
    np.testing.assert_array_equal(kernels.scan(1, 5, 0.0, param=1.0).numpy(), np.arange(5))
    np.testing.assert_array_equal(
        kernels.scan(1, 5, 0.0, param=1.0, skip=torch.tensor([0, 3])).numpy(), [1, 2, 4])
    with pytest.raises(ValueError, match=r"n_total must be >= 0"):
        kernels.scan(1, -1, 0.0, param=1.0)
    for kind, param in KINDS:
        a = kernels.scan(17, 200_000, 0.8 * param, kind=kind, param=param, chunk=30_011)
        with num_threads(1):
            b = kernels.scan(17, 200_000, 0.8 * param, kind=kind, param=param, chunk=30_011)
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad_chunk", [0, -1])
def test_scan_rejects_non_positive_chunk(bad_chunk):
    """chunk=-1 today makes range(0, n_total, -1) empty: scan silently returns no indices."""
    with pytest.raises(ValueError):
        kernels.scan(1, 100, 0.0, param=1.0, chunk=bad_chunk)


def _band_ref(key, n_total, floor, ceil, kind, param, dtype, skip=None):
    """brute_scan with an upper end: |theta0| in [floor, ceil), minus skip."""
    ref, vals = brute_scan(key, n_total, floor, kind, param, dtype, skip)
    return ref[np.abs(vals[ref]) < ceil], vals


def _scan_np(key, n_total, floor, kind, param, dtype, **kw):
    nd = np.float32 if dtype == torch.float32 else np.float64
    return init_mod.scan(key, n_total, floor, init_mod.KINDS[kind], param, dtype=nd, **kw)


@pytest.mark.parametrize("kind,param", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_band_with_ceil(kind, param, dtype):
    """floor <= |theta0| < ceil (the replenishing scan's band), with both ends exactly at
    values the data takes and one float step either side of them: the kernel's integer tests
    (UNIFORM: an exact interval of the hash; NORMAL: conservative bins plus exact checks)
    must reproduce the float comparisons at the boundary. The ceil is exclusive also when it
    is exactly some |theta0| (an empty band when floor >= ceil), over parts and chunks that
    start and end inside the scan's blocks of init_mod._BLOCK coordinates."""
    key, n_total = 77, 60_013
    _, vals = brute_scan(key, n_total, 0.0, kind, param, dtype)
    mags = np.sort(np.abs(vals))
    lo_v, hi_v = float(mags[n_total // 5]), float(mags[n_total // 2])
    bands = [(0.0, hi_v), (lo_v, hi_v), (hi_v, hi_v), (0.0, float(mags[3])),
             (float(mags[-40]), math.inf), (0.0, math.inf), (float(mags[0]), float(mags[-1])),
             (float(mags[-5000]), float(mags[-100])), (hi_v, lo_v)]   # last: inverted, empty
    for f in (lo_v, float(mags[-7])):
        for c in (hi_v, float(mags[-2])):
            if c > f:
                bands += [(np.nextafter(f, -math.inf), c), (np.nextafter(f, math.inf), c),
                          (f, np.nextafter(c, -math.inf)), (f, np.nextafter(c, math.inf))]
    skip = np.sort(np.random.default_rng(3).choice(n_total, 700, replace=False))
    for floor, ceil in bands:
        floor, ceil = float(floor), float(ceil)
        ref, _ = _band_ref(key, n_total, floor, ceil, kind, param, dtype)
        for nparts, chunk in [(None, 1 << 26), (3, 10_007), (1, 4_097), (None, 2_047),
                              (2, 5_000)]:
            got = _scan_np(key, n_total, floor, kind, param, dtype, ceil=ceil, nparts=nparts,
                           chunk=chunk)
            np.testing.assert_array_equal(got, ref, err_msg=f"[{floor}, {ceil}) {nparts} {chunk}")
        got = _scan_np(key, n_total, floor, kind, param, dtype, ceil=ceil, skip=skip)
        np.testing.assert_array_equal(got, np.setdiff1d(ref, skip), err_msg=f"[{floor}, {ceil})")


@pytest.mark.parametrize("kind,param", KINDS)
def test_scan_block_boundaries(kind, param):
    """Parts that start mid-block and blocks cut short (lengths not multiples of the block or
    of 64), at low, medium, high and full hit density, with a sparse skip (some blocks hold
    skip entries, most not) and a dense one."""
    blk = init_mod._BLOCK
    key = 5
    for n_total in (blk * 3 + 1, blk * 2 - 1, 64 * 7 + 63, 1):
        _, vals = brute_scan(key, n_total, 0.0, kind, param, torch.float32)
        mags = np.sort(np.abs(vals))[::-1]
        floors = {0.0, float(mags[min(n_total - 1, n_total // 100)]),
                  float(mags[n_total // 5]), float(mags[(n_total * 7) // 10])}
        rng = np.random.default_rng(n_total)
        for floor in sorted(floors):
            ref, _ = brute_scan(key, n_total, floor, kind, param, torch.float32)
            sparse = np.sort(rng.choice(n_total, min(n_total, 5), replace=False))
            dense = np.sort(rng.choice(n_total, n_total // 3, replace=False))
            for nparts, chunk in [(1, blk), (3, 1 << 26), (7, blk + 65), (5, 2 * blk - 3),
                                  (2, 64)]:
                for sk in (None, sparse, dense):
                    got = _scan_np(key, n_total, floor, kind, param, torch.float32,
                                   nparts=nparts, chunk=chunk, skip=sk)
                    want = ref if sk is None else np.setdiff1d(ref, sk)
                    np.testing.assert_array_equal(
                        got, want, err_msg=f"n={n_total} floor={floor} {nparts} {chunk}")


@pytest.mark.parametrize("param", [0.05, 3.0, 2e-30, 5e-31, 1e36, 2e37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scan_normal_bins_sound(param, dtype):
    """NORMAL: every coordinate the bins call a sure hit is a hit, every coordinate they rule
    out is not (checked against theta0 itself on 400k indices), and the scan equals the brute
    force, at ordinary scales and at the ends of the range where the bins' error margins
    hold (outside it, 5e-31 and 2e37, everything is checked exactly)."""
    key, n_total = 424242, 400_000
    _, vals = brute_scan(key, n_total, 0.0, "normal", param, dtype)
    u = (_hashes(np.uint64(key), 1000) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    np.testing.assert_array_equal(2.0 * u - 1.0, iv(key, np.arange(1000), "uniform", 1.0))
    mags = np.sort(np.abs(vals))[::-1]
    for floor, ceil in [(float(mags[80_000]), math.inf), (float(mags[90_000]), float(mags[9])),
                        (0.0, float(mags[300_000])), (float(mags[-5]), float(mags[-100])),
                        (1.2816 * param, 1.5 * param)]:
        bins = init_mod._normal_bins(floor, ceil, param)
        z = _hashes(np.uint64(key), n_total)
        m = z >> np.uint64(11)
        row = bins[(_mix_np(z ^ init_mod._STREAM2) >> np.uint64(64 - init_mod._NBITS))
                   .astype(np.int64)]
        poss = (m >= row[:, 0]) & (m <= row[:, 1])
        sure = (m >= row[:, 2]) & (m <= row[:, 3])
        v = np.abs(vals)
        hit = (v >= floor) & (v < ceil)
        assert not np.any(sure & ~hit), (floor, ceil)
        assert not np.any(hit & ~poss), (floor, ceil)
        ref, _ = _band_ref(key, n_total, floor, ceil, "normal", param, dtype)
        got = _scan_np(key, n_total, floor, "normal", param, dtype, ceil=ceil, chunk=65_537)
        np.testing.assert_array_equal(got, ref, err_msg=f"[{floor}, {ceil})")
        if 1e-30 <= param <= 1e37:
            assert np.mean(poss & ~sure) < 0.02   # the bins decide almost everything


def _mix_np(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hashes(key, n):
    with np.errstate(over="ignore"):
        return _mix_np(key + (np.arange(n, dtype=np.uint64) + np.uint64(1))
                       * np.uint64(0x9E3779B97F4A7C15))


def test_scan_three_billion():
    """n_total = 3e9 (past 2**31) with a high floor: everything returned is a real hit, sorted,
    unique and in range; complete on windows at the start, across the int32 limit and at the
    end; and the count matches the Binomial expectation."""
    key, n_total, param = 0xC0FFEE, 3 * 10**9, 1.0
    p = 1e-5
    floor = (1.0 - p) * param
    got = kernels.scan(key, n_total, floor, kind="uniform", param=param,
                       dtype=torch.float32).numpy()
    assert got.dtype == np.int64
    assert np.all(np.diff(got) > 0)
    assert got[0] >= 0 and got[-1] < n_total
    vals = iv(key, got, "uniform", param, torch.float32).numpy().astype(np.float64)
    assert np.all(np.abs(vals) >= floor)
    # P(|U(-1,1)| >= 1-p) = p (the float32 rounding of values this close to 1 moves it <1e-7)
    mean, sd = n_total * p, math.sqrt(n_total * p)
    assert abs(got.size - mean) < 6 * sd, (got.size, mean)
    for lo in (0, 2**31 - 500_000, n_total - 1_000_000):
        win = np.arange(lo, lo + 1_000_000)
        v = iv(key, win, "uniform", param, torch.float32).numpy().astype(np.float64)
        want = win[np.abs(v) >= floor]
        have = got[(got >= lo) & (got < lo + 1_000_000)]
        np.testing.assert_array_equal(have, want)


# --------------------------------------------------------------------------------------------
# backend dispatch
# --------------------------------------------------------------------------------------------

def test_backend_name():
    assert isinstance(kernels.backend_name("cpu"), str) and kernels.backend_name("cpu")
    assert kernels.backend_name(torch.device("cpu")) == kernels.backend_name("cpu")
    assert kernels.backend_name() == kernels.backend_name("cpu")
    with pytest.raises(NotImplementedError, match=r"no kernel backend"):
        kernels.backend_name("meta")
    for dev in ("cuda", "cuda:0"):
        if torch.cuda.is_available():
            assert kernels.backend_name(dev) == "triton"
        else:
            with pytest.raises(RuntimeError, match=r"is_available"):
                kernels.backend_name(dev)


def test_non_cpu_tensors_are_routed_to_the_dispatch_point():
    with pytest.raises(NotImplementedError, match=r"no kernel backend for device meta"):
        kernels.select_topk(torch.empty(5, device="meta"), 2)
    with pytest.raises(NotImplementedError, match=r"no kernel backend for device meta"):
        kernels.init_values(1, torch.arange(4, device="meta"), param=1.0)


# --------------------------------------------------------------------------------------------
# topk_thresholds: the sampled one-read route (pools of >= 4 * 32768 keys) against sorting
# and the histogram route
# --------------------------------------------------------------------------------------------

def _threshold_by_sort(pieces, k):
    """(key, n_ties, n_equal) of the k-th largest magnitude, by sorting."""
    from sparsecore.kernels.cpu import select as sel
    keys = np.concatenate([sel._as_keys(p)[0] & sel._as_keys(p)[1] for p in pieces])
    srt = np.sort(keys)[::-1]
    t = srt[k - 1]
    n_gt = int(np.count_nonzero(keys > t))
    return int(t), k - n_gt, int(np.count_nonzero(keys == t))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("style", ["normal", "mixed", "ties", "skewed"])
def test_topk_thresholds_sampled_route_matches_sort(dtype, style):
    from sparsecore.kernels.cpu import select as sel
    rng = np.random.default_rng(11)
    n = 200_003
    if style == "normal":
        pieces = [rng.standard_normal(n).astype(dtype), rng.standard_normal(n // 3).astype(dtype),
                  np.empty(0, dtype)]
    elif style == "mixed":
        v = rng.standard_normal(n).astype(dtype)
        m = rng.random(n) < 0.3
        v[m] = rng.choice(_TIE_POOL, int(m.sum())).astype(dtype)
        pieces = [v[:1000], np.empty(0, dtype), v[1000:]]
    elif style == "ties":          # brackets overflow: the histogram route answers
        pieces = [rng.choice(_TIE_POOL, n).astype(dtype), _near_bits(rng, n // 2, dtype)]
    else:   # pieces sorted by magnitude, as A / X / reserve are: candidates in few blocks
        big = np.sort(np.abs(rng.standard_normal(n)))[::-1].astype(dtype)
        pieces = [big, np.full(40_000, big[n // 2], dtype), big[n // 2: n // 2 + 5].copy()]
    total = sum(p.shape[0] for p in pieces)
    ks_all = [1, 2, 17, total // 3, total // 2, total - 5, total - 1, total]
    for ks in (ks_all[:1], ks_all[3:5], ks_all[5:8], ks_all):
        got = sel.topk_thresholds(pieces, ks)
        for k, g in zip(ks, got):
            t, n_ties, mask, n_eq = g
            assert (int(t), n_ties, n_eq) == _threshold_by_sort(pieces, k), (style, k)
            assert type(t) is type(mask)
        with num_threads(1):
            assert [tuple(map(int, (g[0], g[1], g[3]))) for g in
                    sel.topk_thresholds(pieces, ks, nparts=3)] == [
                        tuple(map(int, (g[0], g[1], g[3]))) for g in got]
    keyed = [sel._as_keys(p)[0] for p in pieces]
    for k in (1, total // 2, total):
        h = sel._topk_threshold_hist(keyed, sel._as_keys(pieces[0])[1], k, 8)
        assert (int(h[0]), h[1], h[3]) == _threshold_by_sort(pieces, k)
        assert kth_largest_magnitude(pieces, k) == np.sort(np.abs(np.concatenate(
            pieces)).astype(np.float64))[::-1][k - 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["row", "feature"])
def test_sddmm_dense_row_tiles(monkeypatch, dtype, layout):
    """At high density sddmm reads the stored entries out of dense GEMM row tiles
    G[:, rows]^T X (bounded size): several tiles with a short last one, empty rows,
    the regulariser, a second structure in the same call; against the dense oracle.
    The switch itself: below the density threshold the panel kernel runs."""
    from sparsecore.kernels.cpu import sddmm as cpu_sddmm
    rng = np.random.default_rng(7)
    w = CSR(rng, 70, 33, 0.5, dtype, empty_rows=0.2)
    w2 = CSR(rng, 70, 33, 0.3, dtype)
    n = 45
    g, x = rand(rng, (n, w.rows), dtype), rand(rng, (n, w.cols), dtype)
    theta = rand(rng, (w.nnz,), dtype)
    calls = []
    real = cpu_sddmm._dense_tiles
    monkeypatch.setattr(cpu_sddmm, "_dense_tiles", lambda *a: (calls.append(1), real(*a)))
    monkeypatch.setattr(cpu_sddmm, "DENSE_MIN_FLOPS", 0)
    # 16 rows of 33 columns per tile: 5 tiles, the last of 6 rows
    monkeypatch.setattr(cpu_sddmm, "DENSE_TILE_BYTES", 16 * 33 * g.element_size())
    gi, xi = (g, x) if layout == "row" else (g.t().contiguous(), x.t().contiguous())
    o1, o2 = torch.full((w.nnz,), float("nan"), dtype=dtype), torch.empty(w2.nnz, dtype=dtype)
    kernels.sddmm(w.indptr, w.indices, gi, xi, theta=theta, reg=0.3, out=o1, layout=layout,
                  more=((w2.indptr, w2.indices, o2),))
    assert calls, "the dense-tile path must have run"
    g64, x64 = g.double(), x.double()
    for m, o, reg in ((w, o1, 0.3), (w2, o2, 0.0)):
        r, c = m.row_of, m.indices.long()
        exact = (g64[:, r] * x64[:, c]).sum(0)
        bound = (g64[:, r] * x64[:, c]).abs().sum(0)
        if m is w:
            exact, bound = exact + reg * theta.double(), bound + abs(reg * theta.double())
        assert_within(o, exact, bound, dtype, n + 1, "sddmm dense tiles")
    # density 0.5 + 0.3 of one matrix: under a threshold of 0.9 the panel kernel serves it
    calls.clear()
    monkeypatch.setattr(cpu_sddmm, "DENSE_DENSITY", 0.9)
    kernels.sddmm(w.indptr, w.indices, gi, xi, out=o1, layout=layout,
                  more=((w2.indptr, w2.indices, o2),))
    assert not calls
