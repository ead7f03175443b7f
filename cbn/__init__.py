"""cbn: fast CPU batch normalization for NumPy."""
from . import reference
from .reference import batch_stats, batch_norm_forward, batch_norm_inference, batch_norm_backward
from .layer import BatchNormalization
from .fold import fold_dense, fold_conv_hwio, fold_conv_oihw, fold_into_next_dense

__version__ = "0.1.0"
__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "reference", "BatchNormalization", "fold_dense", "fold_conv_hwio",
           "fold_conv_oihw", "fold_into_next_dense"]
