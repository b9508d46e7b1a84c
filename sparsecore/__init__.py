"""sparsecore: truly sparse Top-KAST training for PyTorch.

Public API: :class:`TopKASTLinear`, :class:`TopKASTConv2d`, :class:`TopKASTConv1d`,
:class:`TopKASTMultiheadAttention`, :class:`SparseModel`,
:func:`save` / :func:`load`, and :mod:`sparsecore.export`.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# When torch is imported first, Numba's OpenMP layer binds to torch's libgomp (one
# runtime, one thread pool: checked with LD_DEBUG=bindings), so there is no second pool
# to tune: what matters is that runtime's wait policy, which libgomp reads once, when it
# is loaded. Its default (active spinning after every parallel region) makes idle
# workers burn the cores the next region and the main thread need; on a busy 2-core
# machine that measured 2.4-3.3x slower for a 4096^2 layer step and 11-50x for a small
# MLP step (benchmarks/step_time.py --import-order). Tried and not enough: Numba's
# workqueue layer (the MLP still 20x slower: torch's own workers spin), running Numba
# single-threaded (19x), running every small product on the calling thread (37x).
# There is no API to change the policy after load, so the difference remains when
# torch came first and we keep the warning.
# Passive waiting applies to every OpenMP runtime loaded after this line.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in _sys.modules:
        import warnings as _warnings
        _warnings.warn(
            "sparsecore was imported after torch, so the OpenMP runtime torch loaded (which "
            "sparsecore's kernels share) busy-waits between parallel regions; measured on a "
            "loaded 2-core machine: a layer step 2.4-3.3x and a small MLP step 11-50x slower "
            "than with passive waiting. Import sparsecore before torch, or set OMP_WAIT_POLICY=PASSIVE "
            "in the environment before starting Python (setting it to any value silences "
            "this).", RuntimeWarning, stacklevel=2)

from ._version import __version__  # noqa: E402

from .layers import TopKASTConv2d, TopKASTLinear  # noqa: E402
from .adapters import TopKASTConv1d, TopKASTMultiheadAttention  # noqa: E402
from .memory import MemoryReport  # noqa: E402
from .model import SparseModel  # noqa: E402
from .optim import param_groups  # noqa: E402
from .topkast import RefreshError  # noqa: E402
from .checkpoint import CheckpointError, load, save  # noqa: E402
from . import export  # noqa: E402

__all__ = ["TopKASTLinear", "TopKASTConv2d", "TopKASTConv1d", "TopKASTMultiheadAttention",
           "SparseModel", "MemoryReport", "RefreshError",
           "CheckpointError", "save", "load", "export", "param_groups", "__version__"]
