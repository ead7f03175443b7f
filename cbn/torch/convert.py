"""``convert(model)``: swap every ``torch.nn`` batch-norm module for cbn's."""
import collections

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
    if sync and getattr(module, "fused_relu", False):
        raise ValueError("a batch norm with a fused ReLU cannot become a SyncBatchNorm "
                         "(which has no fused ReLU): convert with sync=True before, or "
                         "instead of, fuse_relu=True")
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


def convert(model, sync=False, process_group=None, fuse_relu=False):
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` for cbn's module (and every
    ``torch.nn.SyncBatchNorm`` for cbn's SyncBatchNorm, keeping its process group), sharing
    the parameter and buffer tensors, so weights, running statistics and optimizer state
    carry over.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place (its children are replaced); if ``model`` itself is a batch-norm
        module, its replacement is returned.
    sync : bool
        Replace with :class:`cbn.torch.SyncBatchNorm` (statistics synchronised over
        ``process_group``, None meaning the default group) instead of the local modules,
        cbn's local modules included.
    fuse_relu : bool
        Also fuse each ``torch.nn.ReLU`` that directly follows one of cbn's local modules
        in a ``torch.nn.Sequential`` into it (see :func:`_fuse_relus`). Not with ``sync``.

    Returns
    -------
    torch.nn.Module
        ``model`` (or its replacement). Modules that are already what was asked for are
        left alone.
    """
    if sync and fuse_relu:
        raise ValueError("fuse_relu fuses into cbn's local modules; SyncBatchNorm has no "
                         "fused ReLU (pass sync=False or fuse_relu=False)")
    model = _converted(model, sync, process_group)
    if fuse_relu:
        _fuse_relus(model)
    return model


def _converted(model, sync, process_group):
    replacement = _replacement(model, sync, process_group)
    if replacement is not None:
        return replacement
    for name, child in model.named_children():
        converted = _converted(child, sync, process_group)
        if converted is not child:
            setattr(model, name, converted)
    return model


def _hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def _fuse_relus(model):
    """Fuse into cbn's ``BatchNorm1d/2d/3d`` each ``torch.nn.ReLU`` that follows it in a
    ``torch.nn.Sequential``: the batch norm gets ``fused_relu = True`` and the ReLU's place
    becomes a ``torch.nn.Identity``, changed in place; returns ``model``.

    Exact: in a plain Sequential the batch norm's output reaches nothing but the ReLU, and
    the fused module computes ``relu(BN(x))`` (forward and backward, as the two modules
    did), in place or not alike. Neither module has parameters or buffers of its own to
    move: the state_dict keys and values are unchanged, and load either way. Left alone
    (not exact, or not knowable): a Sequential subclass (its ``forward`` may differ), a
    batch norm reachable more than once in ``model`` (its other uses need no ReLU),
    either module with hooks (they would see another output or none).
    """
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for sequence in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(sequence._modules)
        for first, second in zip(names, names[1:]):
            norm, relu = sequence._modules[first], sequence._modules[second]
            if (type(norm) in _LOCAL.values() and not norm.fused_relu
                    and type(relu) is torch.nn.ReLU and uses[id(norm)] == 1
                    and not _hooked(norm) and not _hooked(relu)):
                norm.fused_relu = True
                setattr(sequence, second, torch.nn.Identity())
    return model
