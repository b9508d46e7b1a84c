"""sparsecore: truly sparse Top-KAST training for PyTorch.

Public API: :class:`TopKASTLinear`, :class:`TopKASTConv2d`, :class:`TopKASTConv1d`,
:class:`TopKASTMultiheadAttention`, :class:`SparseModel`,
:func:`save` / :func:`load`, and :mod:`sparsecore.export`.
"""
from __future__ import annotations

# Threads: sparsecore's Numba kernels run on the same OpenMP runtime as torch (Numba's
# ``omp`` layer binds to the libgomp that torch loaded), so there is one thread pool and
# one wait policy, fixed by the environment when torch loads that runtime. sparsecore
# does not change it: setting OMP_WAIT_POLICY at import reached torch only when
# sparsecore was imported first, which made the speed depend on import order. Measured
# (benchmarks/step_time.py --import-order, docs/benchmarks.md): on a quiet machine the
# default (spinning) policy is as fast or faster; on an oversubscribed one, torch's own
# dense ops slow down as much as the sparse ones, and OMP_WAIT_POLICY=PASSIVE set
# before Python starts helps both alike.

from ._version import __version__

from .layers import TopKASTConv2d, TopKASTLinear
from .adapters import TopKASTConv1d, TopKASTMultiheadAttention
from .memory import MemoryReport
from .model import SparseModel
from .optim import param_groups
from .topkast import RefreshError
from .checkpoint import CheckpointError, load, save
from . import export

__all__ = ["TopKASTLinear", "TopKASTConv2d", "TopKASTConv1d", "TopKASTMultiheadAttention",
           "SparseModel", "MemoryReport", "RefreshError",
           "CheckpointError", "save", "load", "export", "param_groups", "__version__"]
