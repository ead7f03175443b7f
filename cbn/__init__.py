"""cbn: fast CPU batch normalization for NumPy.

The four functions run on Cython + OpenMP kernels; :mod:`cbn.reference` has the same four
in plain NumPy and is the oracle they are tested against. Moments of shards merge exactly
(:func:`merge_moments`), which :mod:`cbn.mpi` and :mod:`cbn.dask` build on. The Keras-style
layer and the folding helpers are built on the same four functions; :mod:`cbn.nn` (imported
explicitly) is a small NumPy training toolkit around them.
"""
# First: the kernels of the instruction-set level this CPU runs become cbn._kernels.
from ._dispatch import kernels as _kernels, simd_level  # noqa: F401
from . import _fork, reference  # noqa: F401  (_fork: makes forked children serial)
from .api import (batch_norm_backward, batch_norm_backward_from_sums, batch_norm_forward,
                  batch_norm_inference, batch_stats, openmp_enabled)
from .fold import fold_conv_hwio, fold_conv_oihw, fold_dense, fold_into_next_dense
from .layer import BatchNormalization
from .moments import Moments, batch_moments, merge_moments

__version__ = "0.1.0"
__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_sums", "Moments", "batch_moments", "merge_moments",
           "BatchNormalization", "fold_dense", "fold_conv_hwio", "fold_conv_oihw",
           "fold_into_next_dense", "openmp_enabled", "simd_level", "reference"]
