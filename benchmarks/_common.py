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


def reference_lines(ax, xs, ram_bytes: int) -> None:
    """On a log-log plot of bytes against dense-equivalent parameters: dense Adam
    training and masked-dense Top-KAST per parameter (from sparsecore.memory) and
    the machine's RAM."""
    from sparsecore.memory import dense_training_bytes, masked_dense_topkast_bytes
    dense, masked = dense_training_bytes(1), masked_dense_topkast_bytes(1)
    ax.plot(xs, [dense * x for x in xs], "k--", lw=1, label=f"dense Adam, {dense} B/param")
    ax.plot(xs, [masked * x for x in xs], "k:", lw=1,
            label=f"masked-dense Top-KAST, {masked} B/param")
    ax.axhline(ram_bytes, color="r", lw=1.2, label=f"machine RAM ({ram_bytes / 2**30:.0f} GiB)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("dense-equivalent parameters")
