"""The one core operation synchronized (multi-shard) batch norm needs beyond the public API.

Pure NumPy in float64 for now, written like :mod:`cbn.reference`; it is a placeholder for a
kernel with the same signature and semantics (one read of ``dy`` and ``x``, one write of
``dx``: it is the last pass of the fused backward, with the per-feature sums supplied instead
of computed).

Training-mode backward over a batch of ``count`` elements per feature, split into shards::

    x̂  = (x − mean) / sqrt(var + ε)
    dx = γ / sqrt(var + ε) · (dy − sum_dy / count − x̂ · sum_dy_xhat / count)

where ``sum_dy = Σ dy`` and ``sum_dy_xhat = Σ dy·x̂`` are taken over the WHOLE batch (every
shard), ``count`` is the whole batch's element count per feature, and ``mean``/``var`` are the
whole batch's statistics. ``dy`` and ``x`` here are one shard only. With the shard being the
whole batch and the sums computed from it, this is exactly :func:`cbn.batch_norm_backward`'s
``dx`` (``sum_dy`` is its ``dbeta`` and ``sum_dy_xhat`` its ``dgamma``).
"""
import numbers

import numpy as np

from . import _checks

__all__ = ["batch_norm_backward_from_sums"]


def batch_norm_backward_from_sums(dy, x, mean, var, gamma, sum_dy, sum_dy_xhat, count,
                                  axis=-1, epsilon=1e-3):
    """``dx`` of one shard of training-mode batch norm, given the whole batch's sums.

    Parameters
    ----------
    dy, x : ndarray
        Upstream gradient and input of this shard (same shape; float16/32/64). The shard may
        have zero elements per feature (then an empty ``dx`` is returned).
    mean, var : array_like, feature shape
        Statistics of the whole batch (what the synchronized forward used).
    gamma : array_like or None
        Scale (None means 1).
    sum_dy, sum_dy_xhat : array_like, feature shape
        ``Σ dy`` and ``Σ dy·x̂`` over the whole batch (all shards).
    count : int
        Elements per feature in the whole batch (>= 1).
    axis, epsilon
        As in :func:`cbn.batch_norm_backward`.

    Returns
    -------
    dx : ndarray of ``x``'s dtype and shape.
    """
    x = _checks.as_data(x)
    dy = _checks.as_data(dy, "dy")
    _checks.same_shape(dy, x)
    axes = _checks.kept_axes(x.ndim, axis)
    features = _checks.feature_shape(x.shape, axes)
    broadcast_shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))

    def parameter(value, name, default=None):
        value = _checks.as_parameter(value, name, features)
        if value is None:
            if default is None:
                raise TypeError(f"{name} is required")
            return np.float64(default)
        return value.reshape(broadcast_shape)

    mean64, var64 = parameter(mean, "mean"), parameter(var, "var")
    gamma64 = parameter(gamma, "gamma", 1.0)
    sum_dy64 = parameter(sum_dy, "sum_dy")
    sum_dy_xhat64 = parameter(sum_dy_xhat, "sum_dy_xhat")
    epsilon = _checks.as_epsilon(epsilon)
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"count must be an integer, got {count!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if x.size == 0:
        return np.empty(x.shape, dtype=x.dtype)

    x64 = x.astype(np.float64)
    inv_std = 1.0 / np.sqrt(var64 + epsilon)
    x_hat = (x64 - mean64) * inv_std
    dx = gamma64 * inv_std * (dy.astype(np.float64) - sum_dy64 / count
                              - x_hat * sum_dy_xhat64 / count)
    return dx.astype(x.dtype)
