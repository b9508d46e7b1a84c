"""The analytic memory model: bytes by kind of a Top-KAST layer, of dense training
and of masked-dense Top-KAST. ``SparseModel.memory_report()`` and the memory
planner (``sparsecore plan``) both use these formulas, so a prediction made
before anything is allocated is the same number the built model reports.

Steady-state layout of one sparse layer (see docs/design.md, "Memory"):

=================  =========================================================
kind               bytes
=================  =========================================================
values             K_B * v          (theta on B, fp32 master weights: v = 4)
gradients          K_B * v
optimizer_state    K_B * v * s      (s tensors shaped like values; AdamW: 2)
indices            4 K_B            (int32 columns of A and B minus A)
                   + 8 (out + 1) * 2 (int64 row pointers of A and B minus A)
                   + K_A * (4 + p)  (transpose of A: int32 rows, perm p = 4
                                     while K_A < 2^31, else 8)
                   + 8 (in + 1)     (int64 row pointers of the transpose)
reserve            R * (8 + v)      (int64 flat index + value per entry)
=================  =========================================================
"""
from __future__ import annotations

import math

INT32_MAX = (1 << 31) - 1


def perm_bytes(k_a: int) -> int:
    """Width of one entry of the transpose permutation (int32 while it fits)."""
    return 4 if k_a <= INT32_MAX else 8


def sparse_layer_bytes(in_features: int, out_features: int, k_a: int, k_b: int,
                       reserve_entries: int, *, value_bytes: int = 4,
                       optimizer_states: int = 2, gradients: bool = True) -> dict:
    """Steady-state bytes by kind of one Top-KAST layer (bias excluded)."""
    idx = (4 * k_b + 16 * (out_features + 1) + k_a * (4 + perm_bytes(k_a))
           + 8 * (in_features + 1))
    return {"values": k_b * value_bytes,
            "gradients": k_b * value_bytes if gradients else 0,
            "optimizer_state": k_b * value_bytes * optimizer_states,
            "indices": idx,
            "reserve": reserve_entries * (8 + value_bytes)}


def compact_ideal_bytes(k_a: int, k_b: int, reserve_entries: int) -> int:
    """The compact ideal of issue 7: 20 B per B entry (fp32 value, gradient, two
    AdamW states, int32 column), 8 B per A entry (transpose), 12 B per reserve entry."""
    return 20 * k_b + 8 * k_a + 12 * reserve_entries


def dense_training_bytes(n_params: int, *, value_bytes: int = 4,
                         optimizer_states: int = 2) -> int:
    """Dense training: weights, gradients and optimizer state (Adam: 16 B/param)."""
    return n_params * value_bytes * (2 + optimizer_states)


def masked_dense_topkast_bytes(n_params: int, *, value_bytes: int = 4,
                               optimizer_states: int = 2) -> int:
    """Masked-dense Top-KAST (the paper's and every peer's layout): the dense theta,
    its gradient and optimizer state, plus two boolean masks (A and B)."""
    return dense_training_bytes(n_params, value_bytes=value_bytes,
                                optimizer_states=optimizer_states) + 2 * n_params


def fmt_bytes(b: float) -> str:
    """Human-readable bytes (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(b) < 1024 or unit == "PiB":
            return f"{b:,.1f} {unit}" if unit != "B" else f"{int(b):,} B"
        b /= 1024
    return f"{b} B"  # pragma: no cover


class MemoryReport(dict):
    """Bytes by kind (a dict) plus ``total``, ``dense_equivalent`` and ``ratio``;
    ``str()`` gives a readable table. Entries listed in ``off_ram`` (e.g. a spilled
    cold tier on disk) are shown but not counted in ``total``."""

    def __init__(self, parts: dict, dense_equivalent: int, off_ram: dict | None = None):
        super().__init__(parts)
        self["total"] = sum(parts.values())
        for k, v in (off_ram or {}).items():
            self[k] = v
        self._off_ram = tuple(off_ram or ())
        self["dense_equivalent"] = dense_equivalent
        self["ratio"] = self["total"] / dense_equivalent if dense_equivalent else math.nan

    def __str__(self) -> str:
        skip = {"total", "dense_equivalent", "ratio", *self._off_ram}
        rows = [(k, v) for k, v in self.items() if k not in skip]
        lines = [f"{'kind':<20}{'bytes':>16}"]
        lines += [f"{k:<20}{fmt_bytes(v):>16}" for k, v in rows]
        lines.append(f"{'total (RAM)':<20}{fmt_bytes(self['total']):>16}")
        for k in self._off_ram:
            lines.append(f"{k:<20}{fmt_bytes(self[k]):>16}  (on disk, not in total)")
        lines.append(f"{'dense equivalent':<20}{fmt_bytes(self['dense_equivalent']):>16}"
                     "  (weights + grads + 2 Adam states)")
        lines.append(f"{'sparse / dense':<20}{self['ratio']:>16.4%}")
        return "\n".join(lines)


def sparse_layers_bytes(shapes, forward_sparsity: float, backward_sparsity: float, *,
                        reserve: float = 0.25, value_bytes: int = 4,
                        optimizer_states: int = 2) -> dict:
    """Bytes by kind of several Top-KAST layers, given ``shapes`` as
    ``(in_features, out_features)`` pairs, without building any of them: K_A and K_B
    come from ``sparsecore.topkast.sizes`` and the reserve holds
    ``ceil(reserve * K_B)`` entries, as in a built layer. Biases are not included.
    Also returns ``k_a`` and ``k_b`` (summed element counts)."""
    from .topkast import sizes  # imported here: topkast imports nothing from this module

    total = dict.fromkeys(("values", "gradients", "optimizer_state", "indices", "reserve",
                           "k_a", "k_b"), 0)
    for fan_in, fan_out in shapes:
        k_a, k_b = sizes(fan_in, fan_out, forward_sparsity, backward_sparsity)
        part = sparse_layer_bytes(fan_in, fan_out, k_a, k_b, int(math.ceil(reserve * k_b)),
                                  value_bytes=value_bytes, optimizer_states=optimizer_states)
        for k, v in part.items():
            total[k] += v
        total["k_a"] += k_a
        total["k_b"] += k_b
    return total


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mib": 1024 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3,
          "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


def parse_bytes(text: str) -> int:
    """Parse a size such as ``"80GB"``, ``"80 GiB"``, ``"512M"`` or ``"1000000"``
    (decimal units for K/M/G/T and KB/MB/GB/TB, binary for KiB/MiB/GiB/TiB).
    Raises ValueError naming the text when it is not a positive size."""
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = math.nan
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive size such as 80GB, 16GiB or 512M, got {text!r}")
    return int(value * _UNITS[unit])
