"""sparsecore: truly sparse Top-KAST training for PyTorch.

Public API: :class:`TopKASTLinear`, :class:`TopKASTConv2d`, :class:`SparseModel`,
:func:`save` / :func:`load`, and :mod:`sparsecore.export`.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .layers import TopKASTConv2d, TopKASTLinear  # noqa: E402
from .model import MemoryReport, SparseModel  # noqa: E402
from .topkast import RefreshError  # noqa: E402
from .checkpoint import CheckpointError, load, save  # noqa: E402
from . import export  # noqa: E402

__all__ = ["TopKASTLinear", "TopKASTConv2d", "SparseModel", "MemoryReport", "RefreshError",
           "CheckpointError", "save", "load", "export", "__version__"]
