"""Helpers shared by the benchmark scripts."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_state() -> dict:
    """Commit and locally modified sparsecore files, recorded with every result."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=str(ROOT), capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "modified": git("status", "--porcelain", "--", "sparsecore").splitlines()}


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) if missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no PNG")
        return None
    return plt


def save_figure(fig, path) -> None:
    """Lay out, write ``fig`` as a PNG at ``path`` and say so."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
