# Import sparsecore before anything imports torch, so its OpenMP wait policy (see
# sparsecore/__init__.py) applies to torch's runtime too, as it does for users who
# import sparsecore first.
import os
import sys

# Triton kernels run in its interpreter on CPU tensors (tests/test_triton.py). The
# flag is read when triton is first imported, and other tests (torch.compile,
# transformers) import it, so it is set here, before anything else. On a GPU
# machine, SPARSECORE_TRITON_COMPILED=1 runs the compiled kernels instead.
if os.environ.get("SPARSECORE_TRITON_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sparsecore  # noqa: F401,E402

sys.path.insert(0, os.path.dirname(__file__))  # tests import the reference oracle
