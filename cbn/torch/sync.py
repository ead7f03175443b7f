"""``SyncBatchNorm``: batch statistics synchronised over ``torch.distributed``, on CPU.

PyTorch's own ``SyncBatchNorm`` refuses CPU tensors, and DistributedDataParallel refuses a
CPU model that contains one; this module is neither, so it works in a CPU DDP model over
the gloo backend (any backend whose collectives take CPU tensors). The design is cbn.mpi's:

- forward: every rank computes its shard's moments ``(count, mean, M2)`` per channel
  (``cbn.batch_moments``) and all-gathers them, together with a small header saying whether
  its input was valid (and its dimension count and dtype), in ONE ``all_gather`` of
  ``4 + 2·C`` doubles per rank. Then every rank merges the moments exactly
  (``cbn.merge_moments``: Chan's pairwise formula in a canonical order, never
  E[x²] − E[x]²), so the statistics, and the running statistics, are bitwise identical on
  every rank; and it normalises its own shard with them.
- backward: every rank computes its shard's ``Σ dy·x̂`` and ``Σ dy`` with the global
  statistics, all-gathers them (``2·C`` doubles) and adds them up in rank order (bitwise the
  same everywhere); ``dx`` then follows from the whole batch's sums
  (``cbn.batch_norm_backward_from_sums``). The weight and bias gradients are the shard's own
  sums, as in PyTorch's SyncBatchNorm: DistributedDataParallel averages them over the ranks.
- bad input never hangs: an input that fails its checks on one rank travels in the header
  instead of raising there, and every rank raises the same exception, naming the ranks and
  their errors (the messages go in one extra ``all_gather_object``, only then). Ranks whose
  inputs disagree in dimension count or dtype raise together too.

Shards may differ in size and may be empty. Without an initialised process group, with one
rank, or in eval mode, the module is :class:`cbn.torch.BatchNorm2d` & co. (no communication).
"""
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

import cbn
from . import _functions
from .modules import CbnForward, refuse_single_value

HEADER = 4            # error kind, count per channel, number of dimensions, dtype
ERRORS = (None, ValueError, TypeError, RuntimeError)
DTYPES = (None,) + _functions.ACCEPTED


def _error_code(error):
    """The header's code of an exception's kind (anything unlisted travels as ValueError)."""
    return next((i for i, kind in enumerate(ERRORS[1:], 1) if isinstance(error, kind)), 1)


def all_gather_rows(vector, group):
    """Every rank's float64 vector (all of one length) as rows of a NumPy array, rank order."""
    tensor = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float64))
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, tensor, group=group)
    return torch.stack(rows).numpy()


def sum_over_ranks(array, group):
    """Element-wise sum of every rank's float64 array, in rank order: the same bits on every
    rank (an all-reduce may add in an order that differs between ranks)."""
    rows = all_gather_rows(array.reshape(-1), group)
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total.reshape(array.shape)


def _raise_everywhere(rows, error, group):
    """Raise on every rank the errors the header rows report (collective, like them)."""
    text = None if error is None else f"{type(error).__name__}: {error}"
    messages = [None] * len(rows)
    dist.all_gather_object(messages, text, group=group)
    failed = [rank for rank, row in enumerate(rows) if row[0]]
    kind = ERRORS[int(rows[failed[0]][0])]
    detail = "; ".join(f"rank {rank}: {messages[rank]}" for rank in failed)
    raise kind(f"bad input to cbn.torch.SyncBatchNorm — {detail}") from error


def global_moments(input, num_features, check, group):
    """Validate on every rank, then all-gather and merge every rank's moments (collective).

    ``check(input)`` raises for a bad input; its exception is raised on every rank.
    """
    send = np.zeros(HEADER + 2 * num_features)
    error = None
    try:
        check(input)
        work = _functions.computed(input)
        local = cbn.batch_moments(_functions.array(work), axis=1)
        send[1:4] = (local.count, input.dim(), DTYPES.index(input.dtype))
        if local.count:
            send[HEADER:HEADER + num_features] = local.mean
        send[HEADER + num_features:] = local.m2
    except Exception as caught:   # re-raised on every rank once all have reported
        error = caught
        send[0] = _error_code(error)
    rows = all_gather_rows(send, group)
    if rows[:, 0].any():
        _raise_everywhere(rows, error, group)
    for column, what in ((2, "number of dimensions"), (3, "dtype")):
        if (rows[:, column] != rows[0, column]).any():
            values = [int(v) if column == 2 else DTYPES[int(v)] for v in rows[:, column]]
            by_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"cbn.torch.SyncBatchNorm: ranks disagree on the input's {what} "
                             f"({by_rank})")
    return cbn.merge_moments(
        cbn.Moments(int(row[1]), row[HEADER:HEADER + num_features], row[HEADER + num_features:])
        for row in rows)


class SyncBatchNorm(CbnForward, _BatchNorm):
    """``torch.nn.SyncBatchNorm``'s interface and state_dict, synchronised on CPU (gloo).

    Parameters as ``torch.nn.SyncBatchNorm``: ``process_group`` None means the default
    (world) group. Training-mode calls are collective over that group when it has more
    than one rank: every rank must call every SyncBatchNorm layer, in the same order.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _group(self):
        """The process group to synchronise over, or None where there is nothing to sync."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _checked(self, input):
        _functions.check_input(input, self.num_features)
        self._check_input_dim(input)

    def forward(self, input):
        group = self._group()
        if group is None:
            return super().forward(input)
        merged = global_moments(input, self.num_features, self._checked, group)
        factor = self._average_factor()
        refuse_single_value(merged.count, f"{tuple(input.shape)} (over all ranks)")
        if merged.count == 0:      # every shard empty: PyTorch's empty-batch behaviour
            mean = var = np.zeros(self.num_features)
        else:
            mean, var = merged.mean, merged.var
        y = _functions.Normalize.apply(input, self.weight, self.bias,
                                       (mean, var, max(merged.count, 1)),
                                       lambda local: sum_over_ranks(local, group), self.eps)
        self._update_running(mean, var, merged.count, factor)
        return y
