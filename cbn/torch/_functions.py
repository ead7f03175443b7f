"""Batch norm as ``torch.autograd.Function``s running on cbn's kernels.

The kernels read and write the tensors' own memory: a CPU tensor's ``.numpy()`` is a view of
its storage whatever its strides (contiguous, channels_last, sliced), and outputs are made
with ``torch.empty_like`` (x's memory format) and filled through their NumPy views (the
core API's ``out=``, or its entries for checked arguments). The channel dimension of every ``BatchNormNd`` input is dim 1, cbn's
``axis=1``. float32 and float64 are computed in place; float16 and bfloat16 (which NumPy
cannot view) are computed in float32 and the results converted back, as PyTorch's CPU kernels
do. Per-channel statistics and parameter gradients are accumulated in float64 by the kernels.

Three functions:

- :class:`Training`: batch statistics (``cbn.batch_norm_forward`` / ``batch_norm_backward``);
  also hands back the float64 batch mean and biased variance (NumPy, through a list) for
  the module's running statistics. With ``relu``, ``relu(BN(x))`` in the same pass (cbn's fused
  ``activation="relu"``), which saves the ReLU's pass over y in the forward; the backward is
  cbn's fused one, the ReLU's derivative taken from the saved output.
- :class:`Inference`: given (running) statistics; ``dx = dy·γ/sqrt(var + ε)``.
- :class:`Normalize`: given statistics of a larger batch whose gradient sums are combined by
  a caller-supplied function: the synchronized layer's local part (see ``sync.py``).
"""
import numpy as np
import torch
from torch.autograd.function import once_differentiable

import cbn
from cbn import _checks
from cbn.activation import as_activation
from cbn._gradient import backward_checked
from cbn.api import _forward_checked, gradient_sums

from ._memory import empty_like

COMPUTED = (torch.float32, torch.float64)
ACCEPTED = COMPUTED + (torch.float16, torch.bfloat16)
CHANNELS = (1,)        # the kept axis of every BatchNormNd input, as cbn's sorted axes
RELU = as_activation("relu")


def check_input(x, num_features):
    """Raise for what cbn cannot normalise: another device, a non-float dtype, a channel
    count (dim 1) other than the module's."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"cbn.torch runs on CPU tensors; this input is on {x.device}")
    if x.layout != torch.strided:
        raise TypeError(f"cbn.torch needs a strided (dense) tensor, got layout {x.layout}")
    if x.dtype not in ACCEPTED:
        raise TypeError(f"cbn.torch normalises float16, bfloat16, float32 and float64 tensors, "
                        f"got {x.dtype}")
    if x.dim() < 2 or x.shape[1] != num_features:
        raise ValueError(f"expected {num_features} channels in dim 1, got input of shape "
                         f"{tuple(x.shape)}")


def per_channel_count(x):
    """Elements each channel's statistics run over: everything but dim 1."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def computed(t):
    """The tensor the kernels work on: t itself, or a float32 copy of a half-precision t."""
    return t if t.dtype in COMPUTED else t.float()


def array(t):
    """A NumPy view of a CPU tensor's memory (no copy): ``force`` detaches it, in one call
    (no new tensor)."""
    return t.numpy(force=True)


def readable(t):
    """A NumPy view of t for the kernels to read: a copy where t's memory is misaligned for
    its dtype (a tensor made by ``torch.from_numpy`` can be), as the core API makes one."""
    view = array(t)
    return view if view.flags.aligned else view.copy()


def vector(t):
    """A per-channel parameter or statistic as a NumPy array (None stays None), which the
    core API uses in float64; only bfloat16, which NumPy lacks, is converted here."""
    if t is None:
        return None
    return (t.detach().double() if t.dtype == torch.bfloat16 else t).numpy(force=True)


def checked_parameter(t, name, num_features):
    """A weight or bias as the float64 vector the kernels read (None stays None), checked as
    the core API checks a gamma or beta (real dtype, shape)."""
    return _checks.as_parameter(vector(t), name, (num_features,))


def delivered(result, like):
    return result if result.dtype == like.dtype else result.to(like.dtype)


NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32,
                torch.float64: np.float64}


def parameter_gradient(values, dtype, needed):
    """A gradient for a parameter of ``dtype`` (None if the parameter has no gradient),
    rounded by NumPy where it has the dtype (a third of the cost of torch's ``.to``)."""
    if not needed:
        return None
    values = np.asarray(values)
    if dtype in NUMPY_DTYPES:
        return torch.from_numpy(values.astype(NUMPY_DTYPES[dtype], copy=False))
    return torch.from_numpy(values).to(dtype)


def sums(dy, x, mean, var, epsilon):
    """(Σ dy·x̂, Σ dy) per channel with the given statistics; zeros for an empty tensor."""
    if per_channel_count(x) == 0:
        zeros = np.zeros(x.shape[1])
        return zeros, zeros.copy()
    return gradient_sums(array(dy), array(x), mean, var, axis=1, epsilon=epsilon)


def input_gradient_with(var, gamma, dy, work, epsilon):
    """dx of normalisation with fixed statistics: dy·γ/sqrt(var + ε), in x's layout."""
    dx = empty_like(work)
    cbn.batch_norm_inference(array(dy), np.zeros_like(var), var, gamma, axis=1,
                             epsilon=epsilon, out=array(dx))
    return dx


def normalized(x, mean, var, weight, bias, epsilon):
    """γ·(x − mean)/sqrt(var + ε) + β with given float64 statistics, in x's dtype."""
    work = computed(x)
    y = empty_like(work)
    cbn.batch_norm_inference(array(work), mean, var, vector(weight), vector(bias), axis=1,
                             epsilon=epsilon, out=array(y))
    return delivered(y, x)


def remember(ctx, x, weight, bias, mean, var, epsilon, relu_output=None):
    """Keep what a backward needs: x and weight (saved, so in-place changes are caught),
    the float64 statistics, epsilon, the parameters' dtypes for their gradients, and a
    fused ReLU's output (saved too: an in-place change to it is caught, as after
    ``torch.nn.ReLU``)."""
    ctx.save_for_backward(x, weight, relu_output)
    ctx.statistics, ctx.epsilon = (mean, var), epsilon
    ctx.dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))


def recalled(ctx, dy):
    """(x, weight, x as computed, dy in that dtype, mean, var, epsilon, the fused ReLU's
    output or None) in a backward."""
    x, weight, relu_output = ctx.saved_tensors
    work = computed(x)
    if dy.dtype != work.dtype:
        dy = dy.to(work.dtype)
    return (x, weight, work, dy) + ctx.statistics + (ctx.epsilon, relu_output)


def gradients(ctx, x, dx, dgamma, dbeta, n_constants):
    """The backward's return: dx in x's dtype, the parameters' gradients in theirs, and
    None for the ``n_constants`` arguments that take no gradient."""
    need = ctx.needs_input_grad
    return ((None if dx is None else delivered(dx, x),
             parameter_gradient(dgamma, ctx.dtypes[0], need[1]),
             parameter_gradient(dbeta, ctx.dtypes[1], need[2])) + (None,) * n_constants)


class Training(torch.autograd.Function):
    """``y = Training.apply(x, weight, bias, eps, relu, statistics)``: batch statistics;
    ``y = relu(BN(x))`` if ``relu``. The batch mean and biased variance (float64 NumPy
    arrays, for the module's running statistics) are appended to the list ``statistics``:
    as outputs of the Function they would cost autograd's handling of two more tensors.

    The arguments are checked once per layer call, here, as the core API checks them (the
    input by the module's ``check_input``; epsilon, weight and bias here), and the kernels
    are called through the core's entries for checked arguments, forward and backward: the
    core API's checks at each kernel call took an eighth of a small layer's forward and
    backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon, relu, statistics):
        work = computed(x)
        y = empty_like(work)
        epsilon = _checks.as_epsilon(epsilon)
        gamma = checked_parameter(weight, "weight", x.shape[1])
        beta = checked_parameter(bias, "bias", x.shape[1])
        if per_channel_count(x):   # y is new: it shares no memory with x, gamma or beta
            mean, var = _forward_checked(readable(work), array(y), gamma, beta, CHANNELS,
                                         epsilon, *((RELU.kind, RELU.alpha) if relu else ()))
        else:   # an empty batch: nothing to normalise, no statistics (PyTorch's behaviour)
            mean, var = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        result = delivered(y, x)
        remember(ctx, x, weight, bias, mean, var, epsilon, y if relu else None)
        ctx.gamma = gamma    # the weight as checked; saved too, so a change is caught
        statistics += mean, var
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, work, dy, mean, var, epsilon, relu_output = recalled(ctx, dy)
        need_x = ctx.needs_input_grad[0]
        if need_x and per_channel_count(x):
            # With a fused ReLU, cbn's fused backward takes its derivative from the saved
            # output on the fly: faster than torch.nn.ReLU's backward (which writes a new
            # tensor) followed by batch norm's, or even with it, and the same bits (README,
            # Speed).
            dx = empty_like(work)
            if relu_output is None:
                dgamma, dbeta = backward_checked(readable(dy), readable(work), array(dx),
                                                 mean, var, ctx.gamma, CHANNELS, epsilon)
            else:
                _, dgamma, dbeta = cbn.batch_norm_backward(
                    array(dy), array(work), mean, var, ctx.gamma, axis=1, epsilon=epsilon,
                    out=array(dx), activation="relu", y=array(relu_output))
        else:   # one read of dy and x for the parameters' gradients alone
            if relu_output is not None:
                dy = torch.ops.aten.threshold_backward(dy, relu_output, 0)
            dx = torch.zeros_like(work) if need_x else None
            dgamma, dbeta = sums(dy, work, mean, var, epsilon)
        return gradients(ctx, x, dx, dgamma, dbeta, 3)


class Inference(torch.autograd.Function):
    """``y = Inference.apply(x, weight, bias, mean, var, eps)`` with fixed statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, epsilon):
        # float64 copies: the backward must see the statistics the forward used, even if
        # the module's buffers change in between.
        mean, var = np.array(vector(mean), np.float64), np.array(vector(var), np.float64)
        remember(ctx, x, weight, bias, mean, var, epsilon)
        return normalized(x, mean, var, weight, bias, epsilon)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, work, dy, mean, var, epsilon, _ = recalled(ctx, dy)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        dx = input_gradient_with(var, vector(weight), dy, work, epsilon) if need_x else None
        dgamma, dbeta = (sums(dy, work, mean, var, epsilon) if need_weight or need_bias
                         else (None, None))
        return gradients(ctx, x, dx, dgamma, dbeta, 3)


class Normalize(torch.autograd.Function):
    """``y = Normalize.apply(x, weight, bias, statistics, combine, eps)``: one shard of a
    larger batch, normalised with that batch's statistics.

    ``statistics`` is ``(mean, var, count)`` of the whole batch (float64 arrays, elements per
    channel); ``combine(local_sums)`` returns the whole batch's ``[Σ dy·x̂, Σ dy]`` (a
    ``(2, C)`` float64 array) from this shard's. The input gradient is this shard's part of
    the whole batch's; the parameters' gradients are this shard's sums, as PyTorch's
    SyncBatchNorm returns them (DistributedDataParallel then averages them over the ranks).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, statistics, combine, epsilon):
        mean, var, count = statistics
        remember(ctx, x, weight, bias, mean, var, epsilon)
        ctx.count, ctx.combine = count, combine
        return normalized(x, mean, var, weight, bias, epsilon)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, work, dy, mean, var, epsilon, _ = recalled(ctx, dy)
        dgamma, dbeta = sums(dy, work, mean, var, epsilon)
        total_dgamma, total_dbeta = ctx.combine(np.stack([dgamma, dbeta]))
        dx = None
        if ctx.needs_input_grad[0]:
            dx = empty_like(work)
            cbn.batch_norm_backward_from_sums(array(dy), array(work), mean, var,
                                              vector(weight), total_dbeta, total_dgamma,
                                              ctx.count, axis=1, epsilon=epsilon,
                                              out=array(dx))
        return gradients(ctx, x, dx, dgamma, dbeta, 3)
