"""The roofline benchmark's gather ceiling really reads what it claims to.

``benchmarks/roofline.py`` turns the time of a gather-only kernel into the
"gather" ceiling of every product; if that kernel skipped rows (or LLVM dropped
the loads), the ceiling would be too high and every fraction too low. The sum
it returns must equal numpy's sum of the same gathered rows.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
roofline = pytest.importorskip("roofline")


@pytest.mark.parametrize("P,dtype", [(64, np.float32), (128, np.float32), (32, np.float64)])
def test_gather_kernel_sums_the_gathered_rows(P, dtype):
    rng = np.random.default_rng(P)
    T, rows, m, reps = 2, 300, 1001, 3     # odd m: the last index is not read (pairs)
    buf = rng.standard_normal((T, rows, P)).astype(dtype)
    idx = rng.integers(0, rows, (T, m)).astype(np.int32)
    got = roofline._gather_kernel(P)(buf, idx, reps)
    want = [reps * buf[t, idx[t, : m - 1]].astype(np.float64).sum() for t in range(T)]
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == np.float32 else 1e-12)


def test_gather_rate_is_positive_and_finite():
    r = roofline.gather_rate(64, 256, np.dtype(np.float32), rounds=2)
    assert np.isfinite(r) and r > 0
