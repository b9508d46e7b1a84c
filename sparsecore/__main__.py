"""``python -m sparsecore`` / the ``sparsecore`` console script: dispatch to
``train``, ``generate``, ``plan`` or ``info`` (see :mod:`sparsecore.cli`).
Without arguments it prints the version and the list of commands."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    """Entry point of the console script; returns the exit code."""
    import sparsecore  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
    from sparsecore.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
