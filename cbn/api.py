"""Public API: validate, lay out, allocate, and dispatch to the Cython kernels.

Dtype rule: y and dx have the dtype of x (float16 is computed in float32); every
per-feature result (mean, var, dgamma, dbeta) is float64, because the kernels accumulate
in double and rounding those small arrays would throw that precision away. Parameters
(gamma, beta, mean, var) of any real dtype are used in float64.
"""
import numbers
from functools import lru_cache

import numpy as np

from . import _checks, _kernels
from ._layout import make_plan

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_sums", "gradient_sums", "openmp_enabled"]


def openmp_enabled():
    """Whether the kernels were built with OpenMP (otherwise they run on one thread)."""
    return _kernels.openmp_enabled()


plan_for = lru_cache(maxsize=512)(make_plan)


def _kernel_input(array):
    """The array the kernels read: float32/float64 with whole-element strides.

    The only copies cbn ever makes of data are here: float16 (computed in float32) and
    misaligned views whose strides are not a multiple of the item size.
    """
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if not array.flags.aligned or any(s % array.itemsize for s in array.strides):
        return array.copy()
    return array


def _element_strides(*arrays):
    return tuple(tuple(s // a.itemsize for s in a.strides) for a in arrays)


class _Call:
    """What one public call needs: the kernel's view of x and the feature bookkeeping."""

    def __init__(self, x, axis):
        self.x_in = _checks.as_data(x)
        self.axes = _checks.kept_axes(self.x_in.ndim, axis)
        self.n = _checks.reduction_size(self.x_in.shape, self.axes)
        self.features = _checks.feature_shape(self.x_in.shape, self.axes)
        self.x = _kernel_input(self.x_in)
        self.empty = self.x.size == 0

    def output(self, out, name="out"):
        """The buffer the kernel writes: the caller's ``out`` when it is usable as is,
        else a new array laid out like x (``finish`` then delivers it)."""
        if out is not None:
            _checks.output_buffer(out, self.x_in, name)
            if out.dtype == self.x.dtype and not any(s % out.itemsize for s in out.strides):
                return out
        return np.empty_like(self.x, order="K")

    def plan(self, *operands):
        return plan_for(self.x.shape, self.axes, _element_strides(*operands))

    def parameter(self, plan, value, name, required=False):
        """A per-feature parameter as contiguous float64 in the kernels' feature order."""
        if value is None:
            if required:
                raise TypeError(f"{name} is required")
            return None
        value = _checks.as_parameter(value, name, self.features)
        return np.ascontiguousarray(value.transpose(plan.feature_order)).reshape(-1)

    def per_feature(self, plan, canonical):
        """Undo the kernels' feature order: a (n_features,) array back to feature shape."""
        permuted_shape = tuple(self.features[i] for i in plan.feature_order)
        inverse = np.argsort(plan.feature_order)
        return np.ascontiguousarray(canonical.reshape(permuted_shape).transpose(inverse))

    def finish(self, computed, out):
        """Deliver a per-element result in x's dtype, into ``out`` if the caller gave one."""
        if out is None:
            return computed.astype(self.x_in.dtype, copy=False)
        if computed is not out:
            np.copyto(out, computed, casting="unsafe")
        return out


def batch_stats(x, axis=-1):
    """Batch mean and biased variance of every feature.

    Parameters
    ----------
    x : ndarray of float16, float32 or float64, any layout
    axis : int or sequence of int
        The feature axes that are kept (Keras convention); statistics run over the others.

    Returns
    -------
    mean, var : float64 ndarrays of shape ``tuple(x.shape[a] for a in sorted(axis))``
        ``var`` is the population variance Σ(x − mean)²/n.
    """
    call = _Call(x, axis)
    plan = call.plan(call.x)
    mean, var = np.empty(plan.n_features), np.empty(plan.n_features)
    if not call.empty:
        _kernels.batch_stats(call.x, plan, mean, var)
    return call.per_feature(plan, mean), call.per_feature(plan, var)


def batch_norm_forward(x, gamma=None, beta=None, axis=-1, epsilon=1e-3, *, out=None):
    """Training-mode batch normalization.

    ``y = γ·(x − mean)/sqrt(var + ε) + β`` with the batch mean and biased variance of each
    feature. ``gamma``/``beta`` of feature shape, or None for no scale / no shift.
    ``out``, if given, receives y (same shape and dtype as x, any layout).

    Returns ``(y, mean, var)``; mean and var are float64.
    """
    call = _Call(x, axis)
    epsilon = _checks.as_epsilon(epsilon)
    y = call.output(out)
    plan = call.plan(call.x, y)
    gamma = call.parameter(plan, gamma, "gamma")
    shift = call.parameter(plan, beta, "beta")
    shift = np.zeros(plan.n_features) if shift is None else shift
    mean, var = np.empty(plan.n_features), np.empty(plan.n_features)
    if not call.empty:
        _kernels.batch_norm_forward(call.x, y, plan, gamma, shift, epsilon, mean, var)
    return call.finish(y, out), call.per_feature(plan, mean), call.per_feature(plan, var)


def batch_norm_inference(x, mean, var, gamma=None, beta=None, axis=-1, epsilon=1e-3, *,
                         out=None):
    """Inference-mode batch normalization with given (moving) statistics.

    ``y = γ·(x − mean)/sqrt(var + ε) + β``, computed per element as ``(x − mean)·s + β``
    in double so a large mean does not cost accuracy.
    """
    call = _Call(x, axis)
    epsilon = _checks.as_epsilon(epsilon)
    y = call.output(out)
    plan = call.plan(call.x, y)
    mean = call.parameter(plan, mean, "mean", required=True)
    var = call.parameter(plan, var, "var", required=True)
    gamma = call.parameter(plan, gamma, "gamma")
    shift = call.parameter(plan, beta, "beta")
    shift = np.zeros(plan.n_features) if shift is None else shift
    if not call.empty:
        _kernels.batch_norm_inference(call.x, y, plan, mean, var, gamma, shift, epsilon)
    return call.finish(y, out)


def _gradient(dy, x, mean, var, gamma, axis, epsilon, with_dx, out=None):
    """Validated backward arguments bound to the kernels: (call, kernel, dx, plan, sums)."""
    call = _Call(x, axis)
    dy = _checks.as_data(dy, "dy")
    _checks.same_shape(dy, call.x_in)
    dy = _kernel_input(dy.astype(call.x.dtype, copy=False))
    epsilon = _checks.as_epsilon(epsilon)
    dx = call.output(out) if with_dx else None
    plan = call.plan(dy, call.x, dx) if with_dx else call.plan(dy, call.x)
    mean = call.parameter(plan, mean, "mean", required=True)
    var = call.parameter(plan, var, "var", required=True)
    gamma = call.parameter(plan, gamma, "gamma")
    sum_dy_xhat, sum_dy = np.zeros(plan.n_features), np.zeros(plan.n_features)
    kernel = _kernels.Gradient(dy, call.x, dx, plan, mean, var, gamma, epsilon, sum_dy_xhat,
                               sum_dy, call.n)
    return call, kernel, dx, plan, (sum_dy_xhat, sum_dy)


def batch_norm_backward(dy, x, mean, var, gamma=None, axis=-1, epsilon=1e-3, *, out=None):
    """Gradients of training-mode batch normalization.

    With ``x̂ = (x − mean)/sqrt(var + ε)`` and n elements per feature::

        dbeta = Σ dy,   dgamma = Σ dy·x̂,
        dx = γ/sqrt(var + ε) · (dy − dbeta/n − x̂·dgamma/n)

    ``mean``/``var`` are the batch statistics returned by the forward pass. dy is used in
    x's dtype. ``out``, if given, receives dx. Returns ``(dx, dgamma, dbeta)``; dgamma and
    dbeta are float64.
    """
    call, kernel, dx, plan, (dgamma, dbeta) = _gradient(dy, x, mean, var, gamma, axis, epsilon,
                                                        True, out)
    if not call.empty:
        kernel.backward()
    return call.finish(dx, out), call.per_feature(plan, dgamma), call.per_feature(plan, dbeta)


def gradient_sums(dy, x, mean, var, axis=-1, epsilon=1e-3):
    """``(Σ dy·x̂, Σ dy)`` per feature: dgamma and dbeta without computing dx.

    One read of dy and x. With ``mean``/``var`` of a larger batch these are one shard's
    share of that batch's sums (what synchronized batch norm all-reduces).
    """
    call, kernel, _, plan, (dgamma, dbeta) = _gradient(dy, x, mean, var, None, axis, epsilon,
                                                       False)
    if not call.empty:
        kernel.sums()
    return call.per_feature(plan, dgamma), call.per_feature(plan, dbeta)


def batch_norm_backward_from_sums(dy, x, mean, var, gamma, sum_dy, sum_dy_xhat, count,
                                  axis=-1, epsilon=1e-3, *, out=None):
    """``dx`` of one shard of a batch whose sums ``Σ dy``, ``Σ dy·x̂`` are already known.

    ``dx = γ/sqrt(var + ε) · (dy − sum_dy/count − x̂·sum_dy_xhat/count)`` where ``mean``,
    ``var``, the sums and ``count`` (elements per feature) are those of the whole batch and
    ``dy``, ``x`` are this shard (which may have no elements). With the whole batch as the
    shard this is :func:`batch_norm_backward`'s dx.
    """
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an integer, got {count!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    x = _checks.as_data(x)
    if x.size == 0:
        _checks.same_shape(_checks.as_data(dy, "dy"), x)
        return np.empty(x.shape, x.dtype)
    call, kernel, dx, plan, (dgamma, dbeta) = _gradient(dy, x, mean, var, gamma, axis, epsilon,
                                                        True, out)
    dgamma[...] = call.parameter(plan, sum_dy_xhat, "sum_dy_xhat", required=True)
    dbeta[...] = call.parameter(plan, sum_dy, "sum_dy", required=True)
    kernel.set_count(count)
    kernel.input_gradient()
    return call.finish(dx, out)
