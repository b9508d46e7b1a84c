"""sparsecore: truly sparse Top-KAST training for PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

from .layers import TopKASTLinear  # noqa: E402
from .topkast import RefreshError  # noqa: E402

__all__ = ["TopKASTLinear", "RefreshError", "__version__"]
