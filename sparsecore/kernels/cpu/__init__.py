"""The CPU backend: Numba kernels (``parallel=True``, ``cache=True``).

One module per operation: :mod:`.spmm` (Y = X W_A^T), :mod:`.spmm_t` (dX = G W_A,
over the cached transpose), :mod:`.sddmm` (the weight gradient on B),
:mod:`.select` (exact top-K by magnitude), :mod:`.init` (the counter-based
theta0 and the streaming scan) and :mod:`.pool` (the refresh's row pass over the
candidate pool). The public, validated entry points are in
:mod:`sparsecore.kernels`.
"""
