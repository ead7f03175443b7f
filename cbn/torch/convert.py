"""``convert(model)``: swap every ``torch.nn`` batch-norm module for cbn's."""
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, CbnForward
from .sync import SyncBatchNorm

_LOCAL = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
          torch.nn.BatchNorm3d: BatchNorm3d}


def _replacement(module, sync, process_group):
    """cbn's module for a torch batch-norm module (sharing its parameters and buffers), or
    None if ``module`` is not one to replace."""
    if not isinstance(module, _BatchNorm) or isinstance(module, SyncBatchNorm):
        return None
    arguments = (module.num_features, module.eps, module.momentum, module.affine,
                 module.track_running_stats)
    if isinstance(module, torch.nn.SyncBatchNorm):   # it was meant to synchronise: keep that
        new = SyncBatchNorm(*arguments, process_group or module.process_group)
    elif sync and (type(module) in _LOCAL or isinstance(module, CbnForward)):
        new = SyncBatchNorm(*arguments, process_group)
    elif type(module) in _LOCAL:
        new = _LOCAL[type(module)](*arguments)
    else:   # cbn's own module, a subclass with its own forward, a lazy module: left alone
        return None
    # The same Parameter and buffer objects, as torch.nn.SyncBatchNorm.convert_sync_batchnorm
    # does: an optimizer built before the conversion keeps training them.
    new.weight, new.bias = module.weight, module.bias
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(module, name))
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert(model, sync=False, process_group=None):
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` for cbn's module (and every
    ``torch.nn.SyncBatchNorm`` for cbn's SyncBatchNorm, keeping its process group), sharing the parameter and buffer tensors, so weights, running
    statistics and optimizer state carry over.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place (its children are replaced); if ``model`` itself is a batch-norm
        module, its replacement is returned.
    sync : bool
        Replace with :class:`cbn.torch.SyncBatchNorm` (statistics synchronised over
        ``process_group``, None meaning the default group) instead of the local modules,
        cbn's local modules included.

    Returns
    -------
    torch.nn.Module
        ``model`` (or its replacement). Modules that are already what was asked for are
        left alone.
    """
    replacement = _replacement(model, sync, process_group)
    if replacement is not None:
        return replacement
    for name, child in model.named_children():
        converted = convert(child, sync, process_group)
        if converted is not child:
            setattr(model, name, converted)
    return model
