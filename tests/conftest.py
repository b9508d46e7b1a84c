# Import sparsecore before anything imports torch, so its OpenMP wait policy (see
# sparsecore/__init__.py) applies to torch's runtime too, as it does for users who
# import sparsecore first.
import os
import sys

import sparsecore  # noqa: F401

sys.path.insert(0, os.path.dirname(__file__))  # tests import the reference oracle
