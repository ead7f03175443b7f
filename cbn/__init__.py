"""cbn: fast CPU batch normalization for NumPy."""
from . import reference
from .reference import batch_stats, batch_norm_forward, batch_norm_inference, batch_norm_backward
from ._sync_math import batch_norm_backward_from_sums
from .moments import Moments, batch_moments, merge_moments

__version__ = "0.1.0"
__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_sums", "Moments", "batch_moments", "merge_moments",
           "reference"]
