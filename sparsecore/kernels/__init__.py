"""Sparse kernels and the single dispatch point that picks a backend by device.

Every function here takes torch tensors and returns torch tensors. The products take
activations in either layout: ``layout="row"`` is (n, features) as torch hands them
(what the layer uses: no transposed copies), ``layout="feature"`` (the default, kept
for callers written against it) is (features, n). Sparse matrices are CSR: ``indptr`` int64 of
length rows+1, ``indices`` int32 column indices, ``values`` float32/float64.

With ``check=True`` (the default) inputs are validated and bad ones raise with a
message naming the value; non-contiguous dense inputs are made contiguous (a copy).
The engine calls with ``check=False`` on structures it built itself.

Backends, chosen here by the device of the tensors (the one dispatch point):

* ``numba-cpu`` for CPU tensors (:mod:`sparsecore.kernels.cpu`);
* ``triton`` for CUDA tensors (:mod:`sparsecore.kernels.triton_backend`; needs the
  ``triton`` package): float32 values, float32/bf16/fp16 activations, fp32
  accumulation.

``use_backend("triton")`` routes CPU tensors through the Triton kernels too; that
runs them in Triton's interpreter and needs ``TRITON_INTERPRET=1`` in the environment
before triton is first imported (the tests do this). Other devices raise
:class:`NotImplementedError`.
"""
from __future__ import annotations

import contextlib

import numba as nb
import numpy as np
import torch

from .cpu import init as _init
from .cpu import sddmm as _sddmm
from .cpu import select as _select
from .cpu import spmm as _spmm
from .cpu import spmm_t as _spmm_t
from ._validate import as_numpy, check_csr, check_dense, check_float

__all__ = ["backend_name", "spmm", "spmm_t", "transpose_csr", "sddmm", "share_packing",
           "select_topk", "init_values", "scan"]


_FORCED: list[str] = []  # innermost use_backend() override for CPU tensors


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, CPU tensors are served by backend ``name`` ("numba-cpu" or
    "triton"; the latter runs Triton's interpreter, for tests)."""
    if name not in ("numba-cpu", "triton"):
        raise ValueError(f"backend must be 'numba-cpu' or 'triton', got {name!r}")
    if name == "triton" and not _triton().INTERPRET:
        raise RuntimeError("use_backend('triton') on CPU tensors needs Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def _triton():
    try:
        from . import triton_backend
    except ImportError as e:
        raise NotImplementedError(f"CUDA tensors need the Triton backend: {e}") from None
    return triton_backend


def backend_name(device: torch.device | str = "cpu") -> str:
    """The backend that serves tensors on ``device`` (the dispatch point)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return _FORCED[-1] if _FORCED else "numba-cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} requested but torch.cuda.is_available() is False "
                               "(no GPU, or a CPU-only build of torch)")
        _triton()
        return "triton"
    raise NotImplementedError(
        f"sparsecore has no kernel backend for device {dev}; supported: cpu (Numba), "
        "cuda (Triton)")


def _on_triton(t: torch.Tensor) -> bool:
    if t.is_cpu and not _FORCED:   # the common case, without building a device object
        return False
    return backend_name(t.device) == "triton"


def value_dtypes(device: torch.device | str = "cpu") -> tuple:
    """The dtypes of ``values`` the backend for ``device`` supports."""
    return (torch.float32,) if backend_name(device) == "triton" else (torch.float32, torch.float64)


# Below this many flops a product runs on the calling thread only: waking a
# parallel region costs more than it saves, and on a busy machine the other
# OpenMP pool (torch's) may still be spinning on the other cores.
SERIAL_FLOPS = 1 << 20


def _run(flops: int, kernel, *args):
    """kernel(*args), on the calling thread only when the product is that small."""
    if flops >= SERIAL_FLOPS:
        return kernel(*args)
    prev = nb.get_num_threads()
    nb.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        nb.set_num_threads(prev)


def _np(t: torch.Tensor, name: str) -> np.ndarray:
    if not t.is_cpu:   # (the CPU always has a backend: skip the lookup per call)
        backend_name(t.device)
    return as_numpy(t, name)


def _layout(layout: str) -> bool:
    """True for row-major activations (n, features), False for feature-major."""
    if layout == "row":
        return True
    if layout == "feature":
        return False
    raise ValueError(f"layout must be 'row' or 'feature', got {layout!r}")


def _act(t: torch.Tensor, name: str, row: bool) -> np.ndarray:
    """The (n, features) numpy view of an activation given in either layout."""
    a = _np(t, name)
    return a if row else a.T


def _out(n: int, features: int, dtype, row: bool):
    """A fresh result tensor in the requested layout and its (n, features) numpy view."""
    dtype = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    if row:
        t = torch.empty(n, features, dtype=dtype)
        return t, t.numpy()
    t = torch.empty(features, n, dtype=dtype)
    return t, t.numpy().T


def spmm(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
         xt: torch.Tensor, *, n_cols: int | None = None, bias: torch.Tensor | None = None,
         layout: str = "feature", check: bool = True) -> torch.Tensor:
    """W (rows, n_cols) in CSR times activations, plus an optional bias (rows,).

    ``layout="feature"``: ``xt`` is (n_cols, n), returns W @ xt (+ bias[:, None]), (rows, n).
    ``layout="row"``: ``xt`` is x (n, n_cols) as torch hands it, returns
    x @ W^T (+ bias), (n, rows), with no transposed copy on the CPU backend."""
    row = _layout(layout)
    if _on_triton(xt):
        if row:
            # contiguous (n, rows), as the CPU backend returns and the layer's fake
            # implementation declares (torch.compile checks the strides)
            y = _triton().spmm(indptr, indices, values, xt.t().contiguous(), n_cols=n_cols,
                               check=check).t().contiguous()
            return y if bias is None else y.add_(bias)
        y = _triton().spmm(indptr, indices, values, xt, n_cols=n_cols, check=check)
        return y if bias is None else y + bias[:, None]
    rows = indptr.numel() - 1
    if check:
        check_float(values, "values")
        cols = (xt.shape[1 if row else 0] if xt.dim() == 2 else -1) if n_cols is None else n_cols
        check_csr(indptr, indices, rows, cols, "W")
        check_dense(xt, "x" if row else "xt", values.dtype, rows=None if row else cols)
        if row and xt.shape[1] != cols:
            raise ValueError(f"x has {xt.shape[1]} columns; expected {cols}")
        if values.numel() != indices.numel():
            raise ValueError(f"values has {values.numel()} entries; W stores {indices.numel()}")
        if bias is not None and (bias.dtype != values.dtype or bias.shape != (rows,)):
            raise ValueError(f"bias must be ({rows},) {values.dtype}")
    x = _act(xt, "xt", row)
    y, yv = _out(x.shape[0], rows, x.dtype, row)
    b = None if bias is None else _np(bias, "bias")
    _run(2 * indices.numel() * x.shape[0], _spmm.spmm, _np(indptr, "indptr"),
         _np(indices, "indices"), _np(values, "values"), x, b, yv)
    return y


@contextlib.contextmanager
def share_packing(t: torch.Tensor, *, layout: str = "row"):
    """Within the block, CPU products on the activation ``t`` (this thread) pack it
    once and reuse the packed panels (the layer's backward: spmm_t and sddmm both
    read dy). ``t`` must not be modified inside the block. No effect on other
    backends; results are unchanged."""
    if (t.device.type != "cpu" or _on_triton(t) or t.dim() != 2 or not t.numel()
            or t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous()):
        yield   # (a non-contiguous t is copied by each product: nothing to share)
        return
    a = _act(t, "t", _layout(layout))
    with _spmm.share_packing(a, _spmm.panel_width(a.shape[1], a.itemsize, a.shape[0])):
        yield


def transpose_csr(indptr: torch.Tensor, indices: torch.Tensor, n_cols: int, *,
                  check: bool = True):
    """(t_indptr, t_rows, t_perm) of W^T: row pointers over W's columns, W's row of
    each entry, and the position of that entry in W's value array."""
    if check:
        check_csr(indptr, indices, indptr.numel() - 1, n_cols, "W")
    out = _spmm_t.transpose_csr(_np(indptr, "indptr"), _np(indices, "indices"), int(n_cols))
    return tuple(torch.from_numpy(a) for a in out)


def spmm_t(t_indptr: torch.Tensor, t_rows: torch.Tensor, t_perm: torch.Tensor,
           values: torch.Tensor, gt: torch.Tensor, *, layout: str = "feature",
           check: bool = True) -> torch.Tensor:
    """W^T times activations, W^T from :func:`transpose_csr`.

    ``layout="feature"``: ``gt`` is (rows_of_W, n), returns W^T @ gt, (cols_of_W, n).
    ``layout="row"``: ``gt`` is g (n, rows_of_W), returns g @ W, (n, cols_of_W)."""
    row = _layout(layout)
    if _on_triton(gt):
        if row:
            return _triton().spmm_t(t_indptr, t_rows, t_perm, values, gt.t().contiguous(),
                                    check=check).t().contiguous()
        return _triton().spmm_t(t_indptr, t_rows, t_perm, values, gt, check=check)
    if check:
        check_float(values, "values")
        check_dense(gt, "g" if row else "gt", values.dtype)
        check_csr(t_indptr, t_rows, t_indptr.numel() - 1, gt.shape[1 if row else 0], "W^T")
        if t_perm.dtype not in (torch.int32, torch.int64) or t_perm.numel() != t_rows.numel():
            raise ValueError("t_perm must be int32 or int64 with one entry per stored value")
        if t_perm.numel() and (int(t_perm.min()) < 0 or int(t_perm.max()) >= values.numel()):
            raise IndexError(f"t_perm points outside values (length {values.numel()})")
    g = _act(gt, "gt", row)
    d, dv = _out(g.shape[0], t_indptr.numel() - 1, g.dtype, row)
    _run(2 * t_rows.numel() * g.shape[0], _spmm_t.spmm_t, _np(t_indptr, "t_indptr"),
         _np(t_rows, "t_rows"), _np(t_perm, "t_perm"), _np(values, "values"), g, dv)
    return d


def sddmm(indptr: torch.Tensor, indices: torch.Tensor, gt: torch.Tensor, xt: torch.Tensor,
          *, theta: torch.Tensor | None = None, reg: float = 0.0,
          out: torch.Tensor | None = None, layout: str = "feature",
          more=(), check: bool = True) -> torch.Tensor:
    """For each stored (row, col): sum_n g[n, row] * x[n, col], plus reg * theta.
    ``layout="feature"``: ``gt`` (rows, n), ``xt`` (cols, n); ``layout="row"``:
    g (n, rows), x (n, cols) as torch hands them. Writes into ``out`` (length nnz)
    when given. ``more``: further (indptr, indices, out) structures over the same
    activations (no regulariser), served by the same call so the activations are
    packed once (the layer passes B minus A here)."""
    row = _layout(layout)
    if _on_triton(gt):
        if row:
            gt, xt = gt.t().contiguous(), xt.t().contiguous()
        for ip, ix, o in more:
            _triton().sddmm(ip, ix, gt, xt, out=o, check=check)
        return _triton().sddmm(indptr, indices, gt, xt, theta=theta, reg=reg, out=out,
                               check=check)
    if check:
        f = 1 if row else 0
        check_float(gt, "gt")
        check_dense(gt, "gt", gt.dtype)
        check_dense(xt, "xt", gt.dtype)
        if gt.shape[f] != indptr.numel() - 1:
            raise ValueError(f"gt has {gt.shape[f]} rows; expected {indptr.numel() - 1}")
        check_csr(indptr, indices, indptr.numel() - 1, xt.shape[f], "W")
        if gt.shape[1 - f] != xt.shape[1 - f]:
            raise ValueError(f"gt has n={gt.shape[1 - f]} columns but xt has n={xt.shape[1 - f]}")
        if theta is not None and (theta.numel() != indices.numel() or theta.dtype != gt.dtype):
            raise ValueError(f"theta must have {indices.numel()} entries of {gt.dtype}")
    if out is not None:  # checked even with check=False: the kernel writes through it
        if (out.dim() != 1 or out.numel() != indices.numel() or out.dtype != gt.dtype
                or not out.is_contiguous() or out.device.type != "cpu"):
            raise ValueError(f"out must be a contiguous 1-D CPU tensor of {indices.numel()} "
                             f"{gt.dtype} values; got shape {tuple(out.shape)}, {out.dtype}, "
                             f"contiguous={out.is_contiguous()}, device {out.device}")
    for ip, ix, o in more:
        if (o.dim() != 1 or o.numel() != ix.numel() or o.dtype != gt.dtype
                or not o.is_contiguous() or o.device.type != "cpu" or ip.dtype != torch.int64
                or ix.dtype != torch.int32):
            raise ValueError("each of more must be (int64 indptr, int32 indices, contiguous "
                             "1-D CPU out of one value per index)")
        if check:
            check_csr(ip, ix, indptr.numel() - 1, xt.shape[1 if row else 0],
                      "a structure in more")
    o = None if out is None else _np(out, "out")
    th = None if theta is None else _np(theta, "theta")
    # either layout is read as the (n, features) view it is: the kernel packs both
    # operands into sample panels itself (once per call, shared by every structure)
    g, x = _act(gt, "gt", row), _act(xt, "xt", row)
    extra = [(_np(ip, "indptr"), _np(ix, "indices"), _np(oo, "out")) for ip, ix, oo in more]
    nnz = indices.numel() + sum(ix.numel() for _, ix, _ in more)
    r = _run(2 * nnz * g.shape[0], _sddmm.sddmm, _np(indptr, "indptr"),
             _np(indices, "indices"), g, x, th, reg, o, extra)
    return out if out is not None else torch.from_numpy(r)


def select_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending int64 positions of the k largest |values| (ties: smaller position)."""
    check_float(values, "values")
    if values.dim() != 1:
        raise ValueError(f"values must be 1-D, got shape {tuple(values.shape)}")
    v = _np(values, "values")
    if not np.isfinite(v).all():
        raise ValueError("values contain NaN or Inf; top-K by magnitude is undefined")
    return torch.from_numpy(_select.select_topk(v, int(k)))


def _np_float(dtype: torch.dtype):
    if dtype == torch.float32:
        return np.float32
    if dtype == torch.float64:
        return np.float64
    raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _kind(kind: str) -> int:
    if kind not in _init.KINDS:
        raise ValueError(f"kind must be one of {sorted(_init.KINDS)}, got {kind!r}")
    return _init.KINDS[kind]


def init_values(key: int, flat_idx: torch.Tensor, *, kind: str = "uniform", param: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """theta0(key, i) at the given flat indices (see :mod:`sparsecore.kernels.init`)."""
    nd = _np_float(dtype)
    return torch.from_numpy(_init.init_values(key, _np(flat_idx, "flat_idx"),
                                              _kind(kind), param, nd))


def scan(key: int, n_total: int, floor: float, *, kind: str = "uniform", param: float,
         dtype: torch.dtype = torch.float32, skip: torch.Tensor | None = None,
         chunk: int = 1 << 26) -> torch.Tensor:
    """Sorted flat indices in [0, n_total) with |theta0| >= floor, not in ``skip``
    (any order; duplicates allowed). ``chunk`` coordinates are streamed at a time."""
    nd = _np_float(dtype)
    k = _kind(kind)
    if not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    sk = None
    if skip is not None:
        sk = _np(skip, "skip").astype(np.int64, copy=False)
        if sk.size > 1 and not (np.diff(sk) > 0).all():
            sk = np.unique(sk)
    return torch.from_numpy(_init.scan(key, n_total, floor, k, param,
                                       dtype=nd, skip=sk, chunk=chunk))
