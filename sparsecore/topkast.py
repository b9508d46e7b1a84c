"""The Top-KAST selection algorithm over the candidate pool (no dense theta).

State of one layer, all sorted by flat index i = row * in + col:
  * B = A + X (X = B minus A), whose current values are the trainable parameter;
  * the reserve R: further coordinates with their exact current values;
  * ``floor``: every coordinate outside the pool P = B + R has never been in B,
    still holds theta0(key, i), and |theta0_i| < floor.

:func:`refresh_pool` computes the new A and B exactly as dense Top-KAST would
(TopK over all N coordinates, ties to the smaller flat index): inside the pool
whenever the K_B-th largest pool magnitude is >= floor, after replenishing the
pool from a streaming scan of theta0 when it is not. It is a pure function: it
returns a :class:`RefreshResult` and mutates nothing, so a failure leaves the
layer untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kernels import init as _init
from .kernels import pool as _pool
from .kernels import select as _select


class RefreshError(ValueError):
    """A refresh could not be carried out (the layer is left unchanged)."""


@dataclass
class InitSpec:
    key: int            # 64-bit layer key
    kind: int           # init.UNIFORM or init.NORMAL
    param: float        # bound (uniform) or std (normal)
    dtype: np.dtype     # np.float32 or np.float64


@dataclass
class RefreshResult:
    a_flat: np.ndarray          # (K_A,) sorted
    x_flat: np.ndarray          # (K_B-K_A,) sorted
    values: np.ndarray          # (K_B,) A first then X
    src: np.ndarray             # (K_B,) old position in values, -1 if not in old B
    r_flat: np.ndarray          # reserve, sorted
    r_val: np.ndarray
    floor: float
    replenished: int            # number of streaming scans run
    scanned_added: int          # coordinates added to the pool by those scans


def _scan_floor(floor: float, need: int, n_total: int, spec: InitSpec) -> float:
    """A floor f < ``floor`` such that about ``need`` (with margin) coordinates with
    |theta0| in [f, floor) are expected among the n_total."""
    want = need * 1.05 + 64
    g_hi = _init.magnitude_cdf(floor, spec.kind, spec.param) if math.isfinite(floor) else 1.0
    g_lo = g_hi - want / n_total
    if g_lo <= 0.0:
        return 0.0
    f = _init.magnitude_quantile(g_lo, spec.kind, spec.param)
    return min(f, np.nextafter(floor, 0.0)) if math.isfinite(floor) else f


def refresh_pool(a_flat, x_flat, values, r_flat, r_val, floor: float, *,
                 k_a: int, k_b: int, n_total: int, reserve_target: int,
                 spec: InitSpec, name: str = "layer") -> RefreshResult:
    """Exact Top-KAST refresh over the pool; see the module docstring."""
    values = np.asarray(values)
    if not np.isfinite(values).all():
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise RefreshError(f"{name}: theta_B holds a non-finite value ({values[bad]}) at "
                           f"position {bad}; refusing to refresh (nothing was changed)")
    ka_old, kb_old = a_flat.shape[0], values.shape[0]
    flat, val, src = _pool.merge_sorted([
        (a_flat, values[:ka_old], np.arange(ka_old, dtype=np.int64)),
        (x_flat, values[ka_old:], np.arange(ka_old, kb_old, dtype=np.int64)),
        (r_flat, r_val, np.full(r_flat.shape[0], -1, np.int64))])
    replenished = 0
    added = 0
    while True:
        kth = _select.kth_largest_magnitude(val, k_b) if flat.shape[0] >= k_b else -math.inf
        if kth >= floor:
            break
        # pool too small to decide exactly: lower the floor and stream in candidates
        have = int(np.count_nonzero(np.abs(val) >= floor)) if math.isfinite(floor) else 0
        need = k_b + reserve_target - have
        new_floor = _scan_floor(floor, need, n_total, spec)
        new = _init.scan(spec.key, n_total, new_floor, spec.kind, spec.param,
                         dtype=spec.dtype, skip=flat)
        new_val = _init.init_values(spec.key, new, spec.kind, spec.param, spec.dtype)
        flat, val, src = _pool.merge_sorted([
            (flat, val, src), (new, new_val, np.full(new.shape[0], -1, np.int64))])
        floor = float(new_floor)
        replenished += 1
        added += int(new.shape[0])
    b_pos = _select.select_topk(val, k_b)
    a_in_b = _select.select_topk(val[b_pos], k_a)
    a_flat, x_flat, new_values, new_src, r_flat, r_val = _pool.split_pool(
        flat, val, src, b_pos, a_in_b)
    return RefreshResult(
        a_flat=a_flat, x_flat=x_flat, values=new_values, src=new_src,
        r_flat=r_flat, r_val=r_val, floor=floor,
        replenished=replenished, scanned_added=added)


def flat_to_csr(flat: np.ndarray, n_rows: int, n_cols: int):
    """CSR (indptr int64, cols int32) of sorted flat indices."""
    rows = flat // n_cols
    indptr = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, (flat - rows * n_cols).astype(np.int32)


def csr_to_flat(indptr: np.ndarray, cols: np.ndarray, n_cols: int) -> np.ndarray:
    rows = np.repeat(np.arange(indptr.shape[0] - 1, dtype=np.int64), np.diff(indptr))
    return rows * n_cols + cols.astype(np.int64)


def layer_key(seed: int, name: str = "") -> int:
    """64-bit key of a layer, derived from the model seed and its qualified name."""
    import hashlib
    h = hashlib.blake2b(f"sparsecore/{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def sizes(in_features: int, out_features: int, forward_sparsity: float,
          backward_sparsity: float) -> tuple[int, int]:
    """(K_A, K_B) for a layer: K_A = max(1, round(D N)), K_B = max(K_A, round((1-S_b) N))."""
    n = in_features * out_features
    k_a = max(1, round((1.0 - forward_sparsity) * n))
    k_b = max(k_a, round((1.0 - backward_sparsity) * n))
    return k_a, min(k_b, n)
