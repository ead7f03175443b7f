"""``convert(model)``: turn every ``torch.nn`` batch-norm module into cbn's, in place."""
import collections

import torch

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .sync import SyncBatchNorm

_LOCAL = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
          torch.nn.BatchNorm3d: BatchNorm3d}


def _target(module, sync):
    """The class cbn's conversion gives ``module``, or None if it is not one to convert."""
    if sync and getattr(module, "fused_relu", False):
        raise ValueError("a batch norm with a fused ReLU cannot become a SyncBatchNorm "
                         "(which has no fused ReLU): convert with sync=True before, or "
                         "instead of, fuse_relu=True")
    if type(module) is torch.nn.SyncBatchNorm:   # it was meant to synchronise: keep that
        return SyncBatchNorm
    if sync and (type(module) in _LOCAL or type(module) in _LOCAL.values()):
        return SyncBatchNorm
    # cbn's own modules, subclasses with their own forward, lazy modules: left alone
    return _LOCAL.get(type(module))


def convert(model, sync=False, process_group=None, fuse_relu=False):
    """Turn every ``torch.nn.BatchNorm1d/2d/3d`` in ``model`` into cbn's module (and every
    ``torch.nn.SyncBatchNorm`` into cbn's SyncBatchNorm, keeping its process group), in
    place: each module object stays and only its class changes (cbn's classes subclass
    torch's and replace ``forward``; ``torch.nn.utils.parametrize`` changes classes the same
    way). So everything attached to it stays: its parameters and buffers (the same objects,
    so an optimizer built before keeps training them, with their ``requires_grad``, dtype and
    device), the training flag, forward, pre-forward, backward and state_dict hooks (and
    their handles), other attributes, and every reference to it, shared modules included.
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` keeps the parameters, buffers, training
    flag and ``qconfig`` but builds new modules, without the hooks.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place, ``model`` itself too if it is a batch-norm module.
    sync : bool
        Convert to :class:`cbn.torch.SyncBatchNorm` (statistics synchronised over
        ``process_group``, None meaning the default group) instead of the local modules,
        cbn's local modules included.
    fuse_relu : bool
        Also fuse each ``torch.nn.ReLU`` that directly follows one of cbn's local modules
        in a ``torch.nn.Sequential`` into it (see :func:`_fuse_relus`). Not with ``sync``.

    Returns
    -------
    torch.nn.Module
        ``model``. Modules that are already what was asked for are left alone.
    """
    if sync and fuse_relu:
        raise ValueError("fuse_relu fuses into cbn's local modules; SyncBatchNorm has no "
                         "fused ReLU (pass sync=False or fuse_relu=False)")
    targets = [(module, _target(module, sync)) for module in model.modules()]  # all checked
    for module, target in targets:                                            # before any
        if target is SyncBatchNorm:                                           # changes
            module.process_group = process_group or getattr(module, "process_group", None)
        if target is not None:
            module.__class__ = target
    if fuse_relu:
        _fuse_relus(model)
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
