"""cbn as PyTorch's CPU batch-norm backend.

``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` are drop-in replacements for the
``torch.nn`` modules (same constructor, parameters, buffers, state_dict and semantics) whose
forward and backward run on cbn's kernels; ``SyncBatchNorm`` synchronises the batch
statistics over ``torch.distributed`` (gloo) on CPU, which PyTorch's own ``SyncBatchNorm``
refuses; ``convert(model)`` swaps them into an existing model. Importing cbn itself never
imports torch: this subpackage is imported explicitly (``import cbn.torch``).
"""
try:
    import torch  # noqa: F401
except ImportError as error:   # pragma: no cover - exercised without torch installed
    raise ImportError(
        "cbn.torch needs PyTorch. Install the CPU build cbn is tested with: "
        "`pip install -e \".[torch]\"` (torch==2.13.0).") from error

from .convert import convert
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]
