import os
import sys

# The suite runs on shared machines, and spawns subprocesses: passive OpenMP waiting
# (set before torch loads its runtime, inherited by the subprocesses) keeps idle
# threads from spinning on cores other work needs (docs/benchmarks.md, OpenMP wait
# policy). sparsecore itself never sets this; the test harness chooses it, as a user
# on a shared machine would.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Triton kernels run in its interpreter on CPU tensors (tests/test_triton.py). The
# flag is read when triton is first imported, and other tests (torch.compile,
# transformers) import it, so it is set here, before anything else. On a GPU
# machine, SPARSECORE_TRITON_COMPILED=1 runs the compiled kernels instead.
if os.environ.get("SPARSECORE_TRITON_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests import the reference oracle
