"""Triton backend tests: every kernel against dense float64 torch math.

By default the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 is
set below, before the backend is imported, because Triton reads it when the kernels are
defined). On a machine with CUDA, ``test_compiled_on_cuda`` re-runs this file in a
subprocess with ``SPARSECORE_TRITON_COMPILED=1``: the kernels are then compiled for the
GPU and every test runs on CUDA tensors.

Oracle (never calls the kernels): W is built dense from the CSR; with the inputs the
kernels see (values float32, activations rounded to their dtype) upcast to float64,
  spmm:   Y = W X,  spmm_t: dX = W^T G,  sddmm: dW_k = (G X^T)[row_k, col_k] + reg theta_k.
Tolerance is the worst-case bound, not a guess: a float32 sum of K products in any order,
with or without FMA, is within (2K + 2) eps32 sum|a b| of the exact sum (as in
tests/test_kernels.py); a bf16/fp16 output adds one rounding, u |exact| with u = 2^-8 /
2^-11 (plus the fp16 subnormal spacing).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

COMPILED = os.environ.get("SPARSECORE_TRITON_COMPILED") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
from sparsecore.kernels import triton_backend as tb  # noqa: E402

if tb.INTERPRET == COMPILED:
    pytest.skip("sparsecore.kernels.triton_backend was imported before this file set "
                "TRITON_INTERPRET; run this file on its own", allow_module_level=True)

if COMPILED:
    DEVICE = "cuda"
    pytestmark = [pytest.mark.cuda,
                  pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
else:
    DEVICE = "cpu"

EPS32 = float(np.finfo(np.float32).eps)
# unit roundoff of the output rounding. Triton's interpreter casts float32 -> bfloat16 by
# truncation (triton/runtime/interpreter.py, cast_impl), so there the bf16 error is up to one
# full ulp (2^-7 relative); compiled kernels round to nearest (2^-8).
OUT_U = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -8 if COMPILED else 2.0 ** -7,
         torch.float16: 2.0 ** -11}
OUT_TINY = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 2.0 ** -24}
ACT = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------------------------
# Random CSR, its transpose, and the dense oracle
# --------------------------------------------------------------------------------------------

class CSR:
    """Random CSR (columns ascending in each row) with its dense float64 twin."""

    def __init__(self, seed, rows, cols, density, *, empty_rows=0.0, shuffle_cols=False):
        rng = np.random.default_rng(seed)
        mask = rng.random((rows, cols)) < density
        if empty_rows and rows:
            mask[rng.random(rows) < empty_rows, :] = False
        r, c = np.nonzero(mask)
        if shuffle_cols:  # any column order inside a row is allowed
            key = rng.random(r.size)
            o = np.lexsort((key, r))
            r, c = r[o], c[o]
        counts = np.bincount(r, minlength=rows)
        self.rows, self.cols, self.nnz = rows, cols, r.size
        self.r, self.c = r, c
        self.indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        self.indices = torch.from_numpy(c.astype(np.int32))
        self.values = torch.from_numpy(rng.standard_normal(r.size).astype(np.float32))
        self.dense = torch.zeros(rows, cols, dtype=torch.float64)
        self.dense[torch.from_numpy(r), torch.from_numpy(c)] = self.values.double()
        self.max_row = int(counts.max()) if rows else 0
        # W^T as CSR: stable sort of the entries by (column, row) -- independent of
        # sparsecore.kernels.transpose_csr
        o = np.lexsort((r, c))
        self.t_indptr = torch.from_numpy(
            np.concatenate([[0], np.cumsum(np.bincount(c, minlength=cols))]).astype(np.int64))
        self.t_rows = torch.from_numpy(r[o].astype(np.int32))
        self.t_perm = torch.from_numpy(o.astype(np.int64))
        self.max_col = int(np.bincount(c, minlength=cols).max()) if cols and r.size else 0


def act(seed, shape, dtype):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def dev(*ts):
    return [t.to(DEVICE) for t in ts]


def assert_bound(got, exact, mag, k, dtype):
    """|got - exact| <= (2k + 2) eps32 mag + u_out |exact| + tiny, elementwise."""
    got = got.detach().cpu().double()
    assert got.shape == exact.shape
    assert torch.isfinite(got).all()
    tol = (2 * k + 2) * EPS32 * mag + OUT_U[dtype] * exact.abs() + OUT_TINY[dtype]
    err = (got - exact).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} entries off; worst excess "
                           f"{float((err - tol).max()):.3e}, max err {float(err.max()):.3e}")


# (rows, cols, n, density, empty_rows): single entry; tiny; n not a multiple of any tile and
# rows > tile sizes; long rows (> block_k, several k-chunks); nnz = 0; no rows; n = 0
SHAPES = [(1, 1, 1, 1.0, 0.0), (5, 7, 3, 0.5, 0.0), (37, 19, 70, 0.3, 0.3),
          (9, 80, 40, 0.6, 0.0), (4, 6, 5, 0.0, 0.0), (0, 5, 4, 0.5, 0.0), (6, 5, 0, 0.5, 0.0)]
# tuning knobs: defaults; small tiles with a row order and two rows per program
SMALL = dict(rows_per_program=2, block_k=4, block_n=16)


def _cfg(small, csr_indptr, kind):
    if not small:
        return {}
    cfg = dict(SMALL)
    if kind == "sddmm":
        cfg = dict(rows_per_program=2, block_e=4, block_n=16, e_split=2)
    cfg["row_order"] = tb.row_order(csr_indptr)
    return cfg


@pytest.mark.parametrize("small", [False, True], ids=["default", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_spmm(shape, small):
    rows, cols, n, d, er = shape
    w = CSR(1, rows, cols, d, empty_rows=er)
    for dtype in ACT if shape[2] == 70 or rows <= 5 else [torch.float32]:
        xt = act(2, (cols, n), dtype)
        indptr, indices, values, xtd = dev(w.indptr, w.indices, w.values, xt)
        y = tb.spmm(indptr, indices, values, xtd, **_cfg(small, indptr, "spmm"))
        assert y.dtype == dtype and y.device.type == DEVICE
        x64 = xt.double()
        assert_bound(y, w.dense @ x64, w.dense.abs() @ x64.abs(), w.max_row, dtype)


@pytest.mark.parametrize("small", [False, True], ids=["default", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_spmm_t(shape, small):
    rows, cols, n, d, er = shape
    w = CSR(3, rows, cols, d, empty_rows=er)
    for dtype in ACT if shape[2] == 70 or rows <= 5 else [torch.float32]:
        gt = act(4, (rows, n), dtype)
        ti, tr, tp, values, gtd = dev(w.t_indptr, w.t_rows, w.t_perm, w.values, gt)
        dx = tb.spmm_t(ti, tr, tp, values, gtd, **_cfg(small, ti, "spmm_t"))
        assert dx.dtype == dtype and dx.shape == (cols, n)
        g64 = gt.double()
        assert_bound(dx, w.dense.t() @ g64, w.dense.abs().t() @ g64.abs(), w.max_col, dtype)


@pytest.mark.parametrize("small", [False, True], ids=["default", "small"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_sddmm(shape, small):
    rows, cols, n, d, er = shape
    w = CSR(5, rows, cols, d, empty_rows=er, shuffle_cols=small)
    for dtype in ACT if shape[2] == 70 or rows <= 5 else [torch.float32]:
        gt, xt = act(6, (rows, n), dtype), act(7, (cols, n), dtype)
        theta = torch.randn(w.nnz, generator=torch.Generator().manual_seed(8))
        reg = 0.37
        indptr, indices, gtd, xtd, thd = dev(w.indptr, w.indices, gt, xt, theta)
        out = tb.sddmm(indptr, indices, gtd, xtd, theta=thd, reg=reg,
                       **_cfg(small, indptr, "sddmm"))
        assert out.dtype == torch.float32 and out.shape == (w.nnz,)
        r, c = torch.from_numpy(w.r), torch.from_numpy(w.c)
        g64, x64, th64 = gt.double(), xt.double(), theta.double()
        exact = (g64 @ x64.t())[r, c] + reg * th64
        mag = (g64.abs() @ x64.abs().t())[r, c] + reg * th64.abs()
        assert_bound(out, exact, mag, n + 1, torch.float32)
        plain = tb.sddmm(indptr, indices, gtd, xtd)  # no regulariser
        assert_bound(plain, (g64 @ x64.t())[r, c], (g64.abs() @ x64.abs().t())[r, c], n,
                     torch.float32)


# --------------------------------------------------------------------------------------------
# Index dtypes, row order, out=, determinism
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ptr_dt", [torch.int32, torch.int64])
@pytest.mark.parametrize("idx_dt", [torch.int32, torch.int64])
def test_index_dtypes(ptr_dt, idx_dt):
    w = CSR(9, 13, 11, 0.4, empty_rows=0.2)
    xt, gt = act(10, (11, 20), torch.float32), act(11, (13, 20), torch.float32)
    ref_y = tb.spmm(*dev(w.indptr, w.indices, w.values, xt))
    ref_dx = tb.spmm_t(*dev(w.t_indptr, w.t_rows, w.t_perm, w.values, gt))
    ref_dw = tb.sddmm(*dev(w.indptr, w.indices, gt, xt))
    indptr, indices = dev(w.indptr.to(ptr_dt), w.indices.to(idx_dt))
    ti, tr, tp = dev(w.t_indptr.to(ptr_dt), w.t_rows.to(idx_dt), w.t_perm.to(idx_dt))
    order = tb.row_order(indptr).to(idx_dt)
    values, xtd, gtd = dev(w.values, xt, gt)
    # same structure, other index dtypes: bitwise the same results
    assert torch.equal(tb.spmm(indptr, indices, values, xtd, row_order=order), ref_y)
    assert torch.equal(tb.spmm_t(ti, tr, tp, values, gtd), ref_dx)
    assert torch.equal(tb.sddmm(indptr, indices, gtd, xtd, row_order=order), ref_dw)
    assert_bound(ref_y, w.dense @ xt.double(), w.dense.abs() @ xt.double().abs(), w.max_row,
                 torch.float32)


def test_row_order_is_longest_first_and_does_not_change_results():
    w = CSR(12, 17, 9, 0.5, empty_rows=0.3)
    indptr = w.indptr.to(DEVICE)
    order = tb.row_order(indptr)
    assert order.dtype == torch.int32
    lengths = (w.indptr[1:] - w.indptr[:-1])[order.cpu().long()]
    assert sorted(order.cpu().tolist()) == list(range(17))
    assert bool((lengths[:-1] >= lengths[1:]).all())
    xt = act(13, (9, 21), torch.bfloat16)
    args = dev(w.indptr, w.indices, w.values, xt)
    base = tb.spmm(*args, block_k=4)
    for rpp in (1, 2, 4):  # each row is summed the same way whichever program owns it
        assert torch.equal(tb.spmm(*args, row_order=order, rows_per_program=rpp, block_k=4),
                           base)


def test_sddmm_out_and_e_split():
    w = CSR(14, 11, 15, 0.7)
    gt, xt = act(15, (11, 40), torch.float16), act(16, (15, 40), torch.float16)
    indptr, indices, gtd, xtd = dev(w.indptr, w.indices, gt, xt)
    base = tb.sddmm(indptr, indices, gtd, xtd, block_e=4, e_split=1)
    for split in (2, 4, 8):
        assert torch.equal(tb.sddmm(indptr, indices, gtd, xtd, block_e=4, e_split=split), base)
    out = torch.full((w.nnz,), float("nan"), device=DEVICE)
    res = tb.sddmm(indptr, indices, gtd, xtd, out=out, block_e=4)
    assert res is out and torch.equal(out, base)
    theta = torch.randn(w.nnz, device=DEVICE)
    zero_reg = tb.sddmm(indptr, indices, gtd, xtd, theta=theta, reg=0.0, block_e=4)
    assert torch.equal(zero_reg, base)


def test_sddmm_n0_gives_regulariser_only():
    w = CSR(17, 4, 5, 0.6)
    theta = torch.randn(w.nnz)
    e = torch.empty(4, 0), torch.empty(5, 0)
    out = tb.sddmm(*dev(w.indptr, w.indices, e[0], e[1]), theta=theta.to(DEVICE), reg=0.5)
    assert torch.allclose(out.cpu(), 0.5 * theta)


def test_non_contiguous_activations():
    w = CSR(18, 6, 8, 0.5)
    xt_big = act(19, (8, 30), torch.float32)
    xt = xt_big[:, ::3]  # stride 3 along n: copied to contiguous by the wrapper
    y = tb.spmm(*dev(w.indptr, w.indices, w.values, xt))
    assert_bound(y, w.dense @ xt.double(), w.dense.abs() @ xt.double().abs(), w.max_row,
                 torch.float32)
    xt_rows = act(20, (16, 12), torch.float32)[::2]  # row stride 24, n contiguous: no copy
    y = tb.spmm(*dev(w.indptr, w.indices, w.values, xt_rows))
    assert_bound(y, w.dense @ xt_rows.double(), w.dense.abs() @ xt_rows.double().abs(),
                 w.max_row, torch.float32)


def test_row_layout_results_are_contiguous():
    """The dispatch point's row layout (what the layer calls) returns contiguous (n, out)
    results on the Triton backend too, as the CPU backend does and as the layer's fake
    implementation declares: torch.compile asserts those strides (an H200 run of a
    compiled layer failed on the transposed view this used to return)."""
    from sparsecore import kernels
    w = CSR(21, 6, 8, 0.5)
    x, g = act(22, (5, 8), torch.float32), act(23, (5, 6), torch.float32)
    bias = act(24, (6,), torch.float32)
    ctx = kernels.use_backend("triton") if DEVICE == "cpu" else contextlib.nullcontext()
    with ctx:
        ip, ix, v, tip, tr, tp, xd, gd, bd = dev(w.indptr, w.indices, w.values, w.t_indptr,
                                                 w.t_rows, w.t_perm, x, g, bias)
        y = kernels.spmm(ip, ix, v, xd, bias=bd, layout="row")
        dx = kernels.spmm_t(tip, tr, tp, v, gd, layout="row")
    assert y.shape == (5, 6) and y.is_contiguous()
    assert dx.shape == (5, 8) and dx.is_contiguous()
    assert_bound(y, x.double() @ w.dense.t() + bias.double(),
                 x.double().abs() @ w.dense.abs().t() + bias.double().abs(), w.max_row,
                 torch.float32)
    assert_bound(dx, g.double() @ w.dense, g.double().abs() @ w.dense.abs(), w.max_col,
                 torch.float32)


def test_torch_csr_comparison_path():
    w = CSR(21, 10, 12, 0.4)
    xt = act(22, (12, 7), torch.float32)
    y = tb.spmm_torch_csr(*dev(w.indptr, w.indices, w.values, xt))
    assert_bound(y, w.dense @ xt.double(), w.dense.abs() @ xt.double().abs(), w.max_row,
                 torch.float32)
    m = tb.to_torch_csr(*dev(w.indptr, w.indices, w.values), (10, 12))
    assert m.crow_indices().dtype == torch.int32 and m.col_indices().dtype == torch.int32


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

@pytest.fixture
def small():
    w = CSR(23, 5, 4, 0.5)
    return w, act(24, (4, 6), torch.float32), act(25, (5, 6), torch.float32)


def test_dtype_errors(small):
    w, xt, gt = small
    ip, ix, v, x, g = dev(w.indptr, w.indices, w.values, xt, gt)
    with pytest.raises(TypeError, match="values has dtype torch.float64"):
        tb.spmm(ip, ix, v.double(), x)
    with pytest.raises(TypeError, match="xt has dtype torch.int64"):
        tb.spmm(ip, ix, v, x.long())
    with pytest.raises(TypeError, match="xt has dtype torch.float64"):
        tb.spmm(ip, ix, v, x.double())
    with pytest.raises(TypeError, match="indices has dtype torch.float32"):
        tb.spmm(ip, ix.float(), v, x)
    with pytest.raises(TypeError, match="indptr has dtype torch.int16"):
        tb.spmm(ip.short(), ix, v, x)
    with pytest.raises(TypeError, match="xt has dtype torch.bfloat16 but gt has torch.float32"):
        tb.sddmm(ip, ix, g, x.bfloat16())
    with pytest.raises(TypeError, match="theta has dtype torch.float16"):
        tb.sddmm(ip, ix, g, x, theta=v.half(), reg=1.0)
    with pytest.raises(TypeError, match="t_perm has dtype torch.float32"):
        tb.spmm_t(*dev(w.t_indptr, w.t_rows), w.t_perm.float().to(DEVICE), v, g)


def test_shape_and_content_errors(small):
    w, xt, gt = small
    ip, ix, v, x, g = dev(w.indptr, w.indices, w.values, xt, gt)
    with pytest.raises(ValueError, match="values must be 1-D with"):
        tb.spmm(ip, ix, v[:-1], x)
    with pytest.raises(ValueError, match="xt has 3 rows; expected 4"):
        tb.spmm(ip, ix, v, x[:3], n_cols=4)
    with pytest.raises(IndexError, match="column index 3 is out of range"):
        tb.spmm(ip, ix, v, x[:3])  # n_cols taken from xt
    with pytest.raises(ValueError, match="xt must be 2-D"):
        tb.spmm(ip, ix, v, x[0])
    bad = ix.clone()
    bad[0] = 4
    with pytest.raises(IndexError, match="column index 4 is out of range"):
        tb.spmm(ip, bad, v, x)
    with pytest.raises(ValueError, match="end at nnz"):
        tb.spmm(ip, ix[:-1], v[:-1], x)
    with pytest.raises(ValueError, match="gt has n=6 columns but xt has n=5"):
        tb.sddmm(ip, ix, g, x[:, :5])
    with pytest.raises(ValueError, match="out must be a contiguous 1-D tensor"):
        tb.sddmm(ip, ix, g, x, out=torch.empty(w.nnz, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="t_perm has"):
        tb.spmm_t(*dev(w.t_indptr, w.t_rows, w.t_perm[:-1], w.values, gt))
    with pytest.raises(IndexError, match="t_perm points outside values"):
        tb.spmm_t(*dev(w.t_indptr, w.t_rows, w.t_perm + 100, w.values, gt))
    with pytest.raises(ValueError, match="row_order is not a permutation"):
        tb.spmm(ip, ix, v, x, row_order=torch.zeros(5, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="row_order has 2 entries"):
        tb.spmm(ip, ix, v, x, row_order=torch.zeros(2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="block_n must be a positive power of two"):
        tb.spmm(ip, ix, v, x, block_n=24)
    with pytest.raises(ValueError, match="block_k must be a positive power of two"):
        tb.spmm(ip, ix, v, x, block_k=0)


def test_device_errors(small, monkeypatch):
    w, xt, gt = small
    ip, ix, v, x = dev(w.indptr, w.indices, w.values, xt)
    with pytest.raises(ValueError, match="xt is on meta but indptr is on"):
        tb.spmm(ip, ix, v, x.to("meta"))
    with pytest.raises(ValueError, match="theta is on meta"):
        tb.sddmm(ip, ix, gt.to(DEVICE), x, theta=v.to("meta"), reg=1.0)
    with pytest.raises(ValueError, match="indptr is on meta; the Triton backend needs CUDA"):
        tb.spmm(*(t.to("meta") for t in (ip, ix, v, x)))
    with pytest.raises(TypeError, match="xt must be a torch.Tensor"):
        tb.spmm(ip, ix, v, x.cpu().numpy())
    monkeypatch.setattr(tb, "INTERPRET", False)  # as if imported without TRITON_INTERPRET
    with pytest.raises(ValueError, match="only work with TRITON_INTERPRET=1"):
        tb.spmm(w.indptr, w.indices, w.values, xt)


def test_import_error_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "try:\n    import sparsecore.kernels.triton_backend\n"
            "except ImportError as e:\n    print('MSG', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert "MSG sparsecore.kernels.triton_backend needs Triton" in r.stdout, r.stderr


# --------------------------------------------------------------------------------------------
# Real GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(COMPILED, reason="already running compiled")
def test_compiled_on_cuda():
    """This whole file again, with the kernels compiled for the GPU (CUDA tensors)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSECORE_TRITON_COMPILED"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.skipif(not COMPILED, reason="compiled (CUDA) run only: needs > 2**31 elements")
def test_int32_indices_into_huge_activations():
    """int32 columns into an xt of more than 2**31 elements: addresses must be int64."""
    cols, n = (1 << 16) + 3, (1 << 15) + 1  # 2**31 + ... bf16 values (~4.3 GB)
    xt = torch.zeros(cols, n, dtype=torch.bfloat16, device="cuda")
    hi = torch.tensor([5, cols - 2, cols - 1])
    xt[hi] = torch.arange(1, 4, dtype=torch.bfloat16, device="cuda")[:, None]
    indptr = torch.tensor([0, 2, 3], dtype=torch.int64, device="cuda")
    indices = torch.tensor([5, cols - 1, cols - 2], dtype=torch.int32, device="cuda")
    values = torch.tensor([1.0, 2.0, 4.0], device="cuda")
    y = tb.spmm(indptr, indices, values, xt)
    assert torch.equal(y[0].float().cpu(), torch.full((n,), 1.0 + 2.0 * 3.0))
    assert torch.equal(y[1].float().cpu(), torch.full((n,), 4.0 * 2.0))
    gt = torch.ones(2, n, dtype=torch.bfloat16, device="cuda")
    dw = tb.sddmm(indptr, indices, gt, xt)
    assert torch.equal(dw.cpu(), torch.tensor([1.0, 3.0, 2.0]) * n)


# --------------------------------------------------------------------------------------------
# The prepared GPU benchmark script (its CPU dry run)
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(COMPILED, reason="the dry run is interpreted; the GPU run is the real one")
def test_gpu_benchmark_dry_run(tmp_path):
    """benchmarks/gpu.py --dry-run: every timing path on tiny shapes, JSON written."""
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu.py"), "--dry-run",
                        "--skip-tests", "--out", str(out)], capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    recs = res["records"]
    kinds = {(x["product"], x["backend"]) for x in recs if "ms" in x}
    for prod in ("spmm", "spmm_t", "sddmm"):
        for b in ("triton-fp32", "triton-bf16", "torch-csr-fp32", "dense-fp32", "dense-tf32",
                  "dense-bf16"):
            assert (prod, b) in kinds
    errs = [x["max_rel_err"] for x in recs if "max_rel_err" in x]
    assert errs and max(errs) < 1e-2
    assert set(res["best_cfg"]) == {"spmm", "spmm_t", "sddmm"}


# --------------------------------------------------------------------------------------------
# Optional: radix-select threshold
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["random", "ties", "zeros_and_inf"])
def test_topk_threshold(case):
    g = torch.Generator().manual_seed(30)
    n = 3000
    if case == "random":
        v = torch.randn(n, generator=g) * torch.exp(4 * torch.randn(n, generator=g))
    elif case == "ties":  # few distinct magnitudes, both signs
        v = torch.randint(-5, 6, (n,), generator=g).float() * 0.25
    else:
        v = torch.randn(n, generator=g)
        v[::7] = 0.0
        v[5:9] = float("inf")
        v[100] = -float("inf")
    keys = v.abs().view(torch.int32).to(DEVICE)
    mags = v.abs().double()
    for k in (1, 2, 17, 1000, n // 2, n - 1, n):
        thr, above = tb.topk_threshold(keys, k, block=512)
        ref = torch.topk(mags, k).values[-1]  # the oracle: k-th largest magnitude
        got = torch.tensor([thr], dtype=torch.int32).view(torch.float32).double()[0]
        assert got == ref, (k, got, ref)
        assert above == int((mags > ref).sum()) and above < k <= above + int((mags == ref).sum())


def test_topk_threshold_errors():
    keys = torch.arange(10, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 10\]"):
        tb.topk_threshold(keys, 0)
    with pytest.raises(TypeError, match="values_abs_bits must be a 1-D torch.int32"):
        tb.topk_threshold(keys.float(), 3)
    with pytest.raises(ValueError, match="negative keys"):
        tb.topk_threshold(keys - 5, 3)


@pytest.mark.parametrize("idx_dt", [torch.int32, torch.int64])
def test_transpose_csr_on_device(idx_dt):
    for shape in [(13, 11, 0.4), (4, 6, 0.0), (7, 3, 1.0)]:
        w = CSR(31, *shape, empty_rows=0.2)
        ti, tr, tp = tb.transpose_csr(*dev(w.indptr.to(idx_dt), w.indices.to(idx_dt)), shape[1])
        assert (ti.dtype, tr.dtype, tp.dtype) == (torch.int64, torch.int32, torch.int64)
        assert torch.equal(ti.cpu(), w.t_indptr)  # the lexsort oracle of CSR()
        assert torch.equal(tr.cpu(), w.t_rows) and torch.equal(tp.cpu(), w.t_perm)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation for a GPU target (no GPU needed)
# --------------------------------------------------------------------------------------------

_AOT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import triton
from triton.backends import backends
if "nvidia" not in backends:
    print("NO_NVIDIA_BACKEND"); sys.exit(0)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparsecore.kernels import triton_backend as tb
assert not tb.INTERPRET
ROWS_SIG = ["indptr_ptr", "cols_ptr", "vals_ptr", "perm_ptr", "order_ptr", "x_ptr", "y_ptr",
            "n_rows", "n", "stride_x", "stride_y"]
SDDMM_SIG = ["indptr_ptr", "cols_ptr", "g_ptr", "x_ptr", "theta_ptr", "out_ptr", "order_ptr",
             "n_rows", "n", "stride_g", "stride_x", "reg"]
def sig(names, types, const):
    s = dict(zip(names, types))
    s.update({k: "constexpr" for k in const})
    return s
cases = [
    (tb._csr_rows_kernel, ROWS_SIG, ["*i64", "*i32", "*fp32", "*i32", "*i32", "*bf16", "*bf16",
      "i32", "i32", "i32", "i32"],
     dict(HAS_PERM=False, HAS_ORDER=False, ROWS=1, BLOCK_K=32, BLOCK_N=128)),
    (tb._csr_rows_kernel, ROWS_SIG, ["*i32", "*i64", "*fp32", "*i64", "*i64", "*fp32", "*fp32",
      "i32", "i32", "i64", "i64"],
     dict(HAS_PERM=True, HAS_ORDER=True, ROWS=2, BLOCK_K=16, BLOCK_N=64)),
    (tb._sddmm_kernel, SDDMM_SIG, ["*i64", "*i32", "*fp16", "*fp16", "*fp32", "*fp32", "*i32",
      "i32", "i32", "i32", "i32", "fp32"],
     dict(HAS_THETA=True, HAS_ORDER=True, ROWS=1, E_SPLIT=4, BLOCK_E=32, BLOCK_N=128)),
    (tb._radix_hist_kernel, ["keys_ptr", "n", "hist_ptr", "prefix", "shift"],
     ["*i32", "i32", "*i32", "i32", "i32"], dict(FIRST=False, BITS=8, BLOCK=1024)),
]
for fn, names, types, const in cases:
    k = triton.compile(ASTSource(fn, sig(names, types, const), const),
                       target=GPUTarget("cuda", 90, 32))
    assert "cubin" in k.asm, list(k.asm)
print("COMPILED", len(cases))
'''


@pytest.mark.skipif(COMPILED, reason="the interpreted run covers it")
def test_kernels_compile_for_sm90():
    """The kernels lower all the way to a cubin for sm_90 (H100) without a GPU."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _AOT], capture_output=True, text=True,
                       timeout=300, env=env, cwd=root)
    if "NO_NVIDIA_BACKEND" in r.stdout:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert r.returncode == 0 and "COMPILED 4" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
