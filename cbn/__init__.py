"""cbn: fast CPU batch normalization for NumPy.

The four functions run on Cython + OpenMP kernels; :mod:`cbn.reference` has the same four
in plain NumPy and is the oracle they are tested against. Moments of shards merge exactly
(:func:`merge_moments`), which :mod:`cbn.mpi` and :mod:`cbn.dask` build on.
"""
from . import reference
from .api import (batch_norm_backward, batch_norm_backward_from_sums, batch_norm_forward,
                  batch_norm_inference, batch_stats, openmp_enabled)
from .moments import Moments, batch_moments, merge_moments

__version__ = "0.1.0"
__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_sums", "Moments", "batch_moments", "merge_moments",
           "openmp_enabled", "reference"]
