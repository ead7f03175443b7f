"""``BatchNorm1d/2d/3d``: PyTorch's modules, computed by cbn's kernels.

Each class subclasses its ``torch.nn`` namesake and replaces only ``forward``, so the
constructor, parameters, buffers, ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), ``reset_parameters``, ``repr`` and
``isinstance(m, torch.nn.BatchNorm2d)`` are PyTorch's own, and a state_dict loads either way.
``forward`` follows ``torch.nn.modules.batchnorm._BatchNorm.forward`` step by step:

- training (or no running statistics): normalise with the batch mean and biased variance;
  with ``track_running_stats`` in training, ``num_batches_tracked += 1`` and
  ``running = (1 − f)·running + f·batch`` with the **unbiased** batch variance
  ``var·n/(n − 1)``, where ``f = momentum``, or ``1/num_batches_tracked`` (a cumulative
  average) when ``momentum`` is None;
- eval with running statistics: normalise with them.

A training batch with one value per channel is a ValueError, as in PyTorch; an empty batch
gives an empty output and leaves the running statistics alone.

``fused_relu`` (False unless ``convert(model, fuse_relu=True)`` set it, in place of the
``torch.nn.ReLU`` that followed the module) makes ``forward`` return ``relu(BN(x))``: in
training in the same pass as the normalization, forward and backward.
"""
import numpy as np
import torch

from . import _functions


class CbnForward:
    """The ``forward`` of cbn's batch-norm modules (a mixin placed before the torch class)."""

    fused_relu = False

    def extra_repr(self):
        return super().extra_repr() + (", fused_relu=True" if self.fused_relu else "")

    def _average_factor(self):
        """PyTorch's ``exponential_average_factor``; counts the batch when it is tracked."""
        if not (self.training and self.track_running_stats):
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _update_running(self, mean, var, count, factor):
        """Fold a batch's float64 mean and biased variance (NumPy arrays) into the running
        statistics, in float64."""
        if not (self.training and self.track_running_stats) or count == 0:
            return
        for running, batch in ((self.running_mean, mean),
                               (self.running_var, var * (count / (count - 1)))):
            if running.dtype in _functions.COMPUTED:   # in place through a NumPy view: a
                view = running.numpy()                 # few µs where torch ops cost tens
                np.add(view * (1.0 - factor), batch * factor, out=view)
            else:
                with torch.no_grad():
                    running.copy_(running.double() * (1.0 - factor)
                                  + torch.from_numpy(batch) * factor)

    def forward(self, input):
        _functions.check_input(input, self.num_features)
        self._check_input_dim(input)
        factor = self._average_factor()
        if not self.training and self.running_mean is not None:
            y = _functions.Inference.apply(input, self.weight, self.bias, self.running_mean,
                                           self.running_var, self.eps)
            return torch.relu(y) if self.fused_relu else y
        count = _functions.per_channel_count(input)
        refuse_single_value(count, input.shape)
        statistics = []
        y = _functions.Training.apply(input, self.weight, self.bias, self.eps,
                                      self.fused_relu, statistics)
        self._update_running(*statistics, count, factor)
        return y


def refuse_single_value(count, shape):
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {shape}")


class BatchNorm1d(CbnForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on cbn's kernels: input ``(N, C)`` or ``(N, C, L)``."""


class BatchNorm2d(CbnForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on cbn's kernels: input ``(N, C, H, W)``, any memory format."""


class BatchNorm3d(CbnForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on cbn's kernels: input ``(N, C, D, H, W)``."""
