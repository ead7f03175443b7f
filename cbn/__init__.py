"""cbn: fast CPU batch normalization for NumPy."""
from . import reference
from .reference import batch_stats, batch_norm_forward, batch_norm_inference, batch_norm_backward

__version__ = "0.1.0"
__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "reference"]
