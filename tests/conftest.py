"""Test-session settings shared by every test module."""

import os

# JAX's CPU QR/SVD call scipy's OpenBLAS, whose worker threads busy-wait when pytest-xdist workers share the
# cores; one BLAS thread per worker keeps the small decompositions in these tests from stalling (results are
# the same, only the scheduling changes). Must be set before numpy/scipy load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
