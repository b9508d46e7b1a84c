"""sparsecore: truly sparse Top-KAST training for PyTorch.

Public API: :class:`TopKASTLinear`, :class:`TopKASTConv2d`, :class:`TopKASTConv1d`,
:class:`TopKASTMultiheadAttention`, :class:`SparseModel`,
:func:`save` / :func:`load`, and :mod:`sparsecore.export`.
"""
from __future__ import annotations

import os as _os
import sys as _sys

# Numba's and torch's OpenMP runtimes keep separate thread pools whose idle threads
# busy-wait; on a small machine each pool then starves the other (measured: a small
# MLP step 45x slower). Passive waiting removes that. It applies to every OpenMP
# runtime loaded after this line: always Numba's, and torch's too when sparsecore
# is imported before torch. Set OMP_WAIT_POLICY yourself to override.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if "torch" in _sys.modules:
        import warnings as _warnings
        _warnings.warn(
            "sparsecore was imported after torch, so torch's OpenMP threads busy-wait and "
            "compete with sparsecore's kernels (training steps measured up to 3x slower). "
            "Import sparsecore before torch, or set OMP_WAIT_POLICY=PASSIVE in the "
            "environment before starting Python (setting it to any value silences this).",
            RuntimeWarning, stacklevel=2)

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
