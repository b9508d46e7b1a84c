"""GPU kernels (Triton) for the three sparse products, Sputnik-style.

Same semantics and argument conventions as the Numba wrappers in
:mod:`sparsecore.kernels`: activations are *feature-major* (``xt`` is (in, n),
``gt`` is (out, n)), sparse matrices are CSR (``indptr`` of length rows+1,
``indices``), ``values`` is 1-D.

* :func:`spmm`   -- ``yt = W @ xt``                              (rows, n)
* :func:`spmm_t` -- ``dxt = W^T @ gt`` over the cached transpose  (in, n)
* :func:`sddmm`  -- ``out[k] = sum_n gt[row_k, n] * xt[col_k, n] + reg * theta[k]``

plus :func:`row_order` (load-balance permutation), :func:`transpose_csr` (W^T's structure
on the device, torch ops), the torch.sparse comparison path :func:`spmm_torch_csr` /
:func:`to_torch_csr` (benchmarks only) and the optional :func:`topk_threshold`.

Layout and tiling (see docs/gpu.md):

* **spmm / spmm_t**: one program per (block of ``rows_per_program`` CSR rows, tile of
  ``block_n`` columns of n). For each row the program walks the row's stored entries
  ``block_k`` at a time, gathers those ``block_k`` rows of the activations (an
  (block_k, block_n) tile), scales them by the values and reduces over k into a
  ``block_n`` accumulator. One program owns each output tile: no atomics, and the
  summation order is fixed by the structure and the tile sizes. ``spmm_t`` is the same
  kernel on the transposed structure, reading values through ``t_perm``.
* **sddmm**: one program per (block of rows, entry split). The program walks its
  row's entries ``block_e`` at a time; for each chunk it loops over n in tiles of
  ``block_n``, gathering an (block_e, block_n) tile of ``xt`` and one ``block_n``
  slice of the row of ``gt``, and reduces over n. ``e_split`` programs share a row
  (strided chunks) so a few long rows still fill the GPU. Regulariser fused.
* **Load balance**: rows may be visited in an order given by :func:`row_order`
  (longest first), a permutation computed once per structure, so each program holds
  rows of similar length and the long ones are scheduled first.

Dtypes: activations float32, bfloat16 or float16; values and theta float32 (the master
weights). Accumulation is always float32. spmm/spmm_t return the activation dtype;
sddmm returns float32 (a gradient of the float32 values; the CPU backend returns the
activation dtype, which is the same thing when everything is float32).

Index dtypes: ``indptr``, ``indices``, ``t_perm`` and ``row_order`` may each be int32
or int64; they are passed to the kernels as they are (no cast, no copy), Triton
compiles one variant per dtype combination, and every address is computed in int64
inside the kernels, so int32 indices into activations with more than 2**31 elements
are safe. The engine's layout (int64 row pointers, int32 columns) is the intended one.

Interpreter mode: with ``TRITON_INTERPRET=1`` in the environment *before this module
is imported* (Triton reads it when each ``@triton.jit`` function is defined), the
kernels run on the CPU and the wrappers accept CPU tensors; that is how the tests run
on machines without a GPU. Otherwise the wrappers need CUDA tensors. Setting the
variable after import has no effect on the already defined kernels.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

try:
    import triton
    import triton.language as tl
except ImportError as _e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "sparsecore.kernels.triton_backend needs Triton (the GPU backend): install it with "
        "`pip install triton` or `pip install sparsecore[gpu]`. Original error: " + str(_e)
    ) from _e

import torch

from ._validate import check_csr_content

__all__ = ["INTERPRET", "row_order", "transpose_csr", "spmm", "spmm_t", "sddmm", "to_torch_csr",
           "spmm_torch_csr", "topk_threshold"]


def _interpret_flag() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


#: True when the kernels below were defined under ``TRITON_INTERPRET=1`` (they then run
#: on CPU tensors). Fixed at import time.
INTERPRET: bool = _interpret_flag()

ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _csr_rows_kernel(indptr_ptr, cols_ptr, vals_ptr, perm_ptr, order_ptr, x_ptr, y_ptr,
                     n_rows, n, stride_x, stride_y,
                     HAS_PERM: tl.constexpr, HAS_ORDER: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[r, tile] = sum_k vals[perm[k]] * x[cols[k], tile] over the stored k of row r."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    for i in range(ROWS):
        slot = pid_r * ROWS + i
        if slot < n_rows:
            if HAS_ORDER:
                row = tl.load(order_ptr + slot).to(tl.int64)
            else:
                row = slot.to(tl.int64)
            start = tl.load(indptr_ptr + row).to(tl.int64)
            end = tl.load(indptr_ptr + row + 1).to(tl.int64)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(start, end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < end
                c = tl.load(cols_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
                if HAS_PERM:
                    p = tl.load(perm_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
                    w = tl.load(vals_ptr + p, mask=mask_k, other=0.0)
                else:
                    w = tl.load(vals_ptr + offs_k, mask=mask_k, other=0.0)
                xv = tl.load(x_ptr + c[:, None] * stride_x + offs_n[None, :],
                             mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc += tl.sum(w.to(tl.float32)[:, None] * xv.to(tl.float32), axis=0)
            tl.store(y_ptr + row * stride_y + offs_n, acc.to(y_ptr.dtype.element_ty),
                     mask=mask_n)


@triton.jit
def _sddmm_kernel(indptr_ptr, cols_ptr, g_ptr, x_ptr, theta_ptr, out_ptr, order_ptr,
                  n_rows, n, stride_g, stride_x, reg,
                  HAS_THETA: tl.constexpr, HAS_ORDER: tl.constexpr, ROWS: tl.constexpr,
                  E_SPLIT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[k] = sum_n g[row_k, n] * x[cols[k], n] (+ reg * theta[k]) for the stored k of
    this program's rows; program (i, j) takes chunks j, j + E_SPLIT, ... of each row."""
    pid_r = tl.program_id(0)
    pid_e = tl.program_id(1)
    for i in range(ROWS):
        slot = pid_r * ROWS + i
        if slot < n_rows:
            if HAS_ORDER:
                row = tl.load(order_ptr + slot).to(tl.int64)
            else:
                row = slot.to(tl.int64)
            start = tl.load(indptr_ptr + row).to(tl.int64)
            end = tl.load(indptr_ptr + row + 1).to(tl.int64)
            g_row = g_ptr + row * stride_g
            for e0 in range(start + pid_e * BLOCK_E, end, E_SPLIT * BLOCK_E):
                offs_e = e0 + tl.arange(0, BLOCK_E)
                mask_e = offs_e < end
                c = tl.load(cols_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
                acc = tl.zeros([BLOCK_E], dtype=tl.float32)
                for n0 in range(0, n, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    mask_n = offs_n < n
                    gv = tl.load(g_row + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                    xv = tl.load(x_ptr + c[:, None] * stride_x + offs_n[None, :],
                                 mask=mask_e[:, None] & mask_n[None, :], other=0.0)
                    acc += tl.sum(xv.to(tl.float32) * gv[None, :], axis=1)
                if HAS_THETA:
                    th = tl.load(theta_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
                    acc += reg * th
                tl.store(out_ptr + offs_e, acc, mask=mask_e)


# ----------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------

def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_devices(**tensors) -> torch.device:
    """All given tensors on one device, and a device the kernels can run on."""
    named = [(k, t) for k, t in tensors.items() if t is not None]
    for k, t in named:
        _check_tensor(t, k)
    dev = named[0][1].device
    for k, t in named[1:]:
        if t.device != dev:
            raise ValueError(f"{k} is on {t.device} but {named[0][0]} is on {dev}; "
                             "all tensors must be on the same device")
    if dev.type == "cuda":
        return dev
    if dev.type == "cpu" and INTERPRET:
        return dev
    if dev.type == "cpu":
        raise ValueError(
            f"{named[0][0]} is on the CPU; the Triton backend needs CUDA tensors (CPU tensors "
            "only work with TRITON_INTERPRET=1 set before sparsecore.kernels.triton_backend "
            "is imported; use sparsecore.kernels for the Numba CPU backend)")
    raise ValueError(f"{named[0][0]} is on {dev}; the Triton backend needs CUDA tensors")


def _check_index(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected torch.int32 or torch.int64")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return t.contiguous()


def _check_values(t: torch.Tensor, name: str, nnz: int) -> torch.Tensor:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton backend keeps master "
                        "weights in torch.float32")
    if t.dim() != 1 or t.numel() != nnz:
        raise ValueError(f"{name} must be 1-D with {nnz} entries (one per stored value); "
                         f"got shape {tuple(t.shape)}")
    return t.detach().contiguous()


def _check_act(t: torch.Tensor, name: str, rows: int | None = None) -> torch.Tensor:
    if t.dtype not in ACT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected torch.float32, torch.bfloat16 "
                        "or torch.float16")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (features, n); got shape {tuple(t.shape)}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows; expected {rows}")
    t = t.detach()
    if t.shape[1] > 1 and t.stride(1) != 1:
        t = t.contiguous()
    return t


def _check_order(order, n_rows: int, dev: torch.device, check: bool):
    if order is None:
        return None
    _check_tensor(order, "row_order")
    if order.device != dev:
        raise ValueError(f"row_order is on {order.device} but the structure is on {dev}")
    order = _check_index(order, "row_order")
    if order.numel() != n_rows:
        raise ValueError(f"row_order has {order.numel()} entries; expected one per row "
                         f"({n_rows})")
    if check and n_rows:
        seen = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        if int(order.min()) < 0 or int(order.max()) >= n_rows:
            raise IndexError(f"row_order has entries outside [0, {n_rows})")
        seen[order.long()] = True
        if not bool(seen.all()):
            raise ValueError("row_order is not a permutation of the rows")
    return order


def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _block_n(n: int, block_n: int | None) -> int:
    if block_n is None:
        block_n = min(128, max(16, _pow2(n)))
    if block_n <= 0 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a positive power of two, got {block_n}")
    return block_n


def _pos_pow2(v: int, name: str) -> int:
    if not isinstance(v, int) or v <= 0 or v & (v - 1):
        raise ValueError(f"{name} must be a positive power of two, got {v!r}")
    return v


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch_kwargs(num_warps: int | None) -> dict:
    return {} if num_warps is None else {"num_warps": int(num_warps)}


# ----------------------------------------------------------------------------------------
# Wrappers
# ----------------------------------------------------------------------------------------

def row_order(indptr: torch.Tensor) -> torch.Tensor:
    """Rows sorted by stored length, longest first (stable): an int32 permutation on the
    device of ``indptr``, to be computed once per structure and passed as ``row_order``
    to the products (for :func:`spmm_t`, of the transposed structure's ``t_indptr``)."""
    _check_tensor(indptr, "indptr")
    indptr = _check_index(indptr, "indptr")
    lengths = indptr[1:] - indptr[:-1]
    order = torch.sort(lengths, descending=True, stable=True).indices
    return order.to(torch.int32)


def transpose_csr(indptr: torch.Tensor, indices: torch.Tensor, n_cols: int, *,
                  check: bool = True):
    """(t_indptr int64, t_rows int32, t_perm int64) of W^T on W's device, with the
    conventions of :func:`sparsecore.kernels.transpose_csr` (rows ascending within each
    column; W^T's k-th value is ``values[t_perm[k]]``). Torch ops, not a Triton kernel:
    a stable sort of the column indices (torch.sort on CUDA needs nnz < 2**31)."""
    _check_devices(indptr=indptr, indices=indices)
    indptr = _check_index(indptr, "indptr")
    indices = _check_index(indices, "indices")
    if check:
        check_csr_content(indptr, indices, int(n_cols), "W")
    dev = indices.device
    rows = indptr.numel() - 1
    lengths = (indptr[1:] - indptr[:-1]).to(torch.int64)
    row_of = torch.repeat_interleave(torch.arange(rows, device=dev, dtype=torch.int32),
                                     lengths, output_size=indices.numel())
    t_perm = torch.sort(indices, stable=True).indices.to(torch.int64)
    t_indptr = torch.zeros(int(n_cols) + 1, dtype=torch.int64, device=dev)
    if indices.numel():
        t_indptr[1:] = torch.cumsum(torch.bincount(indices, minlength=int(n_cols)), 0)
    return t_indptr, row_of[t_perm], t_perm


def _rows_product(indptr, cols, perm, values, act, order, n_out_rows, *,
                  rows_per_program, block_k, block_n, num_warps):
    n = act.shape[1]
    if cols.numel() == 0:  # nothing stored: no launch (and no empty-tensor pointers)
        return torch.zeros((n_out_rows, n), dtype=act.dtype, device=act.device)
    y = torch.empty((n_out_rows, n), dtype=act.dtype, device=act.device)
    if n_out_rows == 0 or n == 0:
        return y
    rows_per_program = _pos_pow2(rows_per_program, "rows_per_program")
    block_k = _pos_pow2(block_k, "block_k")
    block_n = _block_n(n, block_n)
    grid = (triton.cdiv(n_out_rows, rows_per_program), triton.cdiv(n, block_n))
    dummy = cols  # never read when the matching constexpr flag is off
    with _on(act.device):
        _csr_rows_kernel[grid](
            indptr, cols, values, dummy if perm is None else perm,
            dummy if order is None else order, act, y,
            n_out_rows, n, act.stride(0), y.stride(0),
            HAS_PERM=perm is not None, HAS_ORDER=order is not None,
            ROWS=rows_per_program, BLOCK_K=block_k, BLOCK_N=block_n,
            **_launch_kwargs(num_warps))
    return y


def spmm(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
         xt: torch.Tensor, *, n_cols: int | None = None, row_order: torch.Tensor | None = None,
         check: bool = True, rows_per_program: int = 1, block_k: int = 32,
         block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """yt = W @ xt for W (rows, n_cols) in CSR and xt (n_cols, n); returns (rows, n) in
    xt's dtype (float32 accumulation).

    ``row_order`` (from :func:`row_order`) sets the order rows are visited in; any
    permutation gives the same result. ``check=False`` skips the checks that need a
    device sync (CSR content, row_order being a permutation); dtype, shape and device
    are always checked. ``rows_per_program``, ``block_k``, ``block_n`` (powers of two)
    and ``num_warps`` are tuning knobs.
    """
    _check_devices(indptr=indptr, indices=indices, values=values, xt=xt)
    indptr = _check_index(indptr, "indptr")
    indices = _check_index(indices, "indices")
    values = _check_values(values, "values", indices.numel())
    cols = xt.shape[0] if (n_cols is None and xt.dim() == 2) else n_cols
    xt = _check_act(xt, "xt", rows=cols)
    rows = indptr.numel() - 1
    if check:
        check_csr_content(indptr, indices, cols, "W")
    order = _check_order(row_order, rows, xt.device, check)
    return _rows_product(indptr, indices, None, values, xt, order, rows,
                         rows_per_program=rows_per_program, block_k=block_k,
                         block_n=block_n, num_warps=num_warps)


def spmm_t(t_indptr: torch.Tensor, t_rows: torch.Tensor, t_perm: torch.Tensor,
           values: torch.Tensor, gt: torch.Tensor, *, row_order: torch.Tensor | None = None,
           check: bool = True, rows_per_program: int = 1, block_k: int = 32,
           block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """dxt = W^T @ gt for gt (rows_of_W, n); W^T given by
    :func:`sparsecore.kernels.transpose_csr` (``t_perm[k]`` is the position in
    ``values`` of W^T's k-th entry). Returns (in, n) in gt's dtype. ``row_order`` is
    over W^T's rows (``row_order(t_indptr)``); other knobs as in :func:`spmm`."""
    _check_devices(t_indptr=t_indptr, t_rows=t_rows, t_perm=t_perm, values=values, gt=gt)
    t_indptr = _check_index(t_indptr, "t_indptr")
    t_rows = _check_index(t_rows, "t_rows")
    t_perm = _check_index(t_perm, "t_perm")
    if t_perm.numel() != t_rows.numel():
        raise ValueError(f"t_perm has {t_perm.numel()} entries; W^T stores {t_rows.numel()}")
    values = _check_values(values, "values", t_rows.numel())
    gt = _check_act(gt, "gt")
    n_in = t_indptr.numel() - 1
    if check:
        check_csr_content(t_indptr, t_rows, gt.shape[0], "W^T")
        if t_perm.numel() and (int(t_perm.min()) < 0 or int(t_perm.max()) >= values.numel()):
            raise IndexError(f"t_perm points outside values (length {values.numel()})")
    order = _check_order(row_order, n_in, gt.device, check)
    return _rows_product(t_indptr, t_rows, t_perm, values, gt, order, n_in,
                         rows_per_program=rows_per_program, block_k=block_k,
                         block_n=block_n, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(
        torch.cuda.current_device() if index is None else index).multi_processor_count


def _e_split(nnz: int, rows: int, rows_per_program: int, block_e: int, device) -> int:
    """Programs per row block for sddmm: enough programs to fill the GPU (about 8 per
    SM) without splitting an average row into chunks smaller than block_e. Uses only
    host-side sizes (no sync)."""
    sms = _sm_count(device.index) if device.type == "cuda" else 4
    blocks = triton.cdiv(rows, rows_per_program)
    chunks = triton.cdiv(triton.cdiv(nnz, max(rows, 1)), block_e)
    want = triton.cdiv(8 * sms, max(blocks, 1))
    split = max(1, min(chunks, want, 64))
    return 1 << (split.bit_length() - 1)  # a power of two <= split (few compiled variants)


def sddmm(indptr: torch.Tensor, indices: torch.Tensor, gt: torch.Tensor, xt: torch.Tensor,
          *, theta: torch.Tensor | None = None, reg: float = 0.0,
          out: torch.Tensor | None = None, row_order: torch.Tensor | None = None,
          check: bool = True, rows_per_program: int = 1, block_e: int = 32,
          block_n: int | None = None, e_split: int | None = None,
          num_warps: int | None = None) -> torch.Tensor:
    """For each stored (row, col) of W: sum_n gt[row, n] * xt[col, n], plus reg * theta.

    ``gt`` (rows, n) and ``xt`` (n_cols, n) share one activation dtype; the result is
    float32 (float32 accumulation), written into ``out`` (contiguous, float32, length
    nnz, same device) when given. ``theta`` is float32 of length nnz. ``e_split``
    programs share each row block (default: chosen from the sizes); other knobs as in
    :func:`spmm` (``block_e`` is the number of entries per chunk).
    """
    _check_devices(indptr=indptr, indices=indices, gt=gt, xt=xt, theta=theta, out=out)
    indptr = _check_index(indptr, "indptr")
    indices = _check_index(indices, "indices")
    nnz = indices.numel()
    rows = indptr.numel() - 1
    gt = _check_act(gt, "gt", rows=rows)
    xt = _check_act(xt, "xt")
    if xt.dtype != gt.dtype:
        raise TypeError(f"xt has dtype {xt.dtype} but gt has {gt.dtype}; they must match")
    if gt.shape[1] != xt.shape[1]:
        raise ValueError(f"gt has n={gt.shape[1]} columns but xt has n={xt.shape[1]}")
    if theta is not None:
        theta = _check_values(theta, "theta", nnz)
    if out is not None:
        if (out.dim() != 1 or out.numel() != nnz or out.dtype != torch.float32
                or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous 1-D tensor of {nnz} float32 values; "
                             f"got shape {tuple(out.shape)}, {out.dtype}, "
                             f"contiguous={out.is_contiguous()}")
    if check:
        check_csr_content(indptr, indices, xt.shape[0], "W")
    order = _check_order(row_order, rows, gt.device, check)
    if out is None:
        out = torch.empty(nnz, dtype=torch.float32, device=gt.device)
    if nnz == 0:
        return out
    n = gt.shape[1]
    if n == 0:
        if theta is not None and reg != 0.0:
            torch.mul(theta, float(reg), out=out)
        else:
            out.zero_()
        return out
    rows_per_program = _pos_pow2(rows_per_program, "rows_per_program")
    block_e = _pos_pow2(block_e, "block_e")
    block_n = _block_n(n, block_n)
    if e_split is None:
        e_split = _e_split(nnz, rows, rows_per_program, block_e, gt.device)
    e_split = _pos_pow2(e_split, "e_split")
    use_theta = theta is not None and float(reg) != 0.0
    grid = (triton.cdiv(rows, rows_per_program), e_split)
    with _on(gt.device):
        _sddmm_kernel[grid](
            indptr, indices, gt, xt, theta if use_theta else out, out,
            indices if order is None else order,
            rows, n, gt.stride(0), xt.stride(0), float(reg),
            HAS_THETA=use_theta, HAS_ORDER=order is not None, ROWS=rows_per_program,
            E_SPLIT=e_split, BLOCK_E=block_e, BLOCK_N=block_n, **_launch_kwargs(num_warps))
    return out


# ----------------------------------------------------------------------------------------
# torch.sparse (cuSPARSE) comparison path -- benchmarks only
# ----------------------------------------------------------------------------------------

def to_torch_csr(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 shape: tuple[int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A ``torch.sparse_csr_tensor`` of W with int32 row pointers *and* int32 columns.

    cuSPARSE reads both index arrays with the row pointers' dtype, so the engine's
    int64 pointers + int32 columns would be misread; one index dtype is used here.
    ``values`` are cast to ``dtype`` (torch's sparse matmul wants one dtype)."""
    _check_devices(indptr=indptr, indices=indices, values=values)
    if indices.numel() >= 2**31:
        raise ValueError(f"{indices.numel()} stored values do not fit int32 CSR indices")
    v = values.detach()
    if dtype is not None:
        v = v.to(dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(indptr.to(torch.int32), indices.to(torch.int32), v,
                                       size=tuple(shape), check_invariants=False)


def spmm_torch_csr(indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                   xt: torch.Tensor, *, n_cols: int | None = None) -> torch.Tensor:
    """yt = W @ xt through torch.sparse CSR (cuSPARSE on CUDA); comparison only."""
    cols = xt.shape[0] if n_cols is None else n_cols
    w = to_torch_csr(indptr, indices, values, (indptr.numel() - 1, cols), xt.dtype)
    return w @ xt


# ----------------------------------------------------------------------------------------
# Optional: radix-select threshold for an on-device top-K (not used by the engine)
# ----------------------------------------------------------------------------------------

_RADIX_BITS = 8
_RADIX_SHIFTS = (24, 16, 8, 0)  # keys are non-negative int32: 31 significant bits


@triton.jit
def _radix_hist_kernel(keys_ptr, n, hist_ptr, prefix, shift, FIRST: tl.constexpr,
                       BITS: tl.constexpr, BLOCK: tl.constexpr):
    """hist[d] += #{keys whose bits above shift + BITS equal prefix and whose digit at
    shift is d}; every key counts in the first pass."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = tl.load(keys_ptr + offs, mask=m, other=0)
    if not FIRST:
        m = m & ((key >> (shift + BITS)) == prefix)
    digit = (key >> shift) & ((1 << BITS) - 1)
    h = tl.histogram(digit, 1 << BITS, mask=m)
    tl.atomic_add(hist_ptr + tl.arange(0, 1 << BITS), h)


def topk_threshold(values_abs_bits: torch.Tensor, k: int, *, block: int = 1024):
    """Radix (histogram) select of the k-th largest key; optional, not used by the engine.

    ``values_abs_bits`` is the int32 view of float32 magnitudes
    (``values.abs().view(torch.int32)``): non-negative floats order like these integers.
    Returns ``(threshold_bits, n_above)``: the k-th largest key and how many keys are
    strictly larger, so the top-k are all keys above the threshold plus the first
    ``k - n_above`` equal to it (the tie rule: smaller position wins). Four passes of 8
    bits, each one histogram kernel (per-program ``tl.histogram`` merged with atomics)
    and one small device-to-host copy. NaN magnitudes sort above +inf.
    """
    _check_tensor(values_abs_bits, "values_abs_bits")
    keys = values_abs_bits
    dev = _check_devices(values_abs_bits=keys)
    if keys.dtype != torch.int32 or keys.dim() != 1:
        raise TypeError(f"values_abs_bits must be a 1-D torch.int32 tensor (the bits of "
                        f"float32 magnitudes); got {keys.dtype}, shape {tuple(keys.shape)}")
    n = keys.numel()
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}], got {k!r}")
    keys = keys.contiguous()
    if int(keys.min()) < 0:
        raise ValueError("values_abs_bits has negative keys: pass the bits of |values|")
    block = _pos_pow2(block, "block")
    prefix, remaining, above = 0, k, 0
    hist = torch.empty(1 << _RADIX_BITS, dtype=torch.int32, device=dev)
    for shift in _RADIX_SHIFTS:
        hist.zero_()
        with _on(dev):
            _radix_hist_kernel[(triton.cdiv(n, block),)](
                keys, n, hist, prefix, shift, FIRST=shift == _RADIX_SHIFTS[0], BITS=_RADIX_BITS,
                BLOCK=block)
        counts = hist.cpu().tolist()
        for digit in range(len(counts) - 1, -1, -1):  # from the largest digit down
            if counts[digit] >= remaining:
                break
            remaining -= counts[digit]
            above += counts[digit]
        prefix = (prefix << _RADIX_BITS) | digit
    return prefix, above
