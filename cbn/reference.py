"""Plain NumPy batch normalization: the oracle the kernels are tested against.

Written from the math, not for speed. Every function computes in float64 and casts the
per-element result back to the dtype of ``x``; per-feature results (statistics and
parameter gradients) are returned in float64, exactly as :mod:`cbn` does.

Notation: the statistics of each feature are taken over the ``n`` elements that share its
index on the feature axes ``axis``; ``x̂ = (x − mean) / sqrt(var + epsilon)`` and
``y = γ·x̂ + β``. ``var`` is the biased (population) variance, computed in two passes
(never as E[x²] − E[x]², which cancels catastrophically when |mean| ≫ std).

With ``activation`` and ``residual`` (see :mod:`cbn.activation`) the forward functions
return ``act(y + residual)`` and the backward is batch norm's of ``dz = dy·act'(z)``, act'
taken from the forward's output ``y``; all of it in float64.
"""
import math

import numpy as np

from . import _checks
from .activation import MASKABLE, as_activation, pack_mask

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward"]


def _prepare(x, axis, statistics=True):
    """x as float64, the reduced axes, and a function shaping parameters to broadcast.

    ``statistics``: the call takes statistics over the reduced axes (all but inference),
    so they must hold at least one element.
    """
    x = _checks.as_data(x)
    axes = _checks.kept_axes(x.ndim, axis)
    if statistics:
        _checks.reduction_size(x.shape, axes)
    reduced = tuple(a for a in range(x.ndim) if a not in axes)
    broadcast_shape = tuple(x.shape[a] if a in axes else 1 for a in range(x.ndim))
    features = _checks.feature_shape(x.shape, axes)

    def parameter(value, name, default=None):
        if value is None and default is None:
            raise TypeError(f"{name} is required")
        value = _checks.as_parameter(value, name, features)
        return np.float64(default) if value is None else value.reshape(broadcast_shape)

    return x.astype(np.float64), reduced, parameter


def _statistics(x64, reduced):
    """Mean and biased variance of each feature (reduced axes kept, size 1).

    Written to be the more exact side of every comparison:

    * the data of each feature are scaled by a power of two (exact) so that no sum can
      overflow: a variance beyond the float64 range comes out as inf, but never a mean;
    * the mean takes a correction step, ``m + mean(x − m)``, and the variance is the
      corrected two-pass ``(Σd² − (Σd)²/n)/n`` with ``d = x − m`` (Chan, Golub & LeVeque,
      "Algorithms for computing the sample variance", 1983): a constant feature gets
      exactly its value and a variance of exactly 0;
    * a feature holding NaN, or both +inf and −inf, has mean NaN; one holding infinities of
      one sign has that infinity as its mean; any non-finite value makes the variance NaN
      (it involves inf − inf), as IEEE arithmetic on the definition gives.
    """
    n = math.prod(x64.shape[a] for a in reduced)
    finite = np.isfinite(x64)
    finite_values = np.where(finite, x64, 0.0)
    _, exponent = np.frexp(np.max(np.abs(finite_values), axis=reduced, keepdims=True))
    scaled = np.ldexp(finite_values, -exponent)                     # |scaled| < 1
    mean = scaled.mean(axis=reduced, keepdims=True)
    mean = mean + (scaled - mean).mean(axis=reduced, keepdims=True)
    deviation = scaled - mean
    var = (np.square(deviation).sum(axis=reduced, keepdims=True)
           - np.square(deviation.sum(axis=reduced, keepdims=True)) / n) / n
    with np.errstate(over="ignore"):
        mean, var = np.ldexp(mean, exponent), np.ldexp(np.maximum(var, 0.0), 2 * exponent)
    if finite.all():
        return mean, var
    has_nan = np.isnan(x64).any(axis=reduced, keepdims=True)
    has_inf = (x64 == np.inf).any(axis=reduced, keepdims=True)
    has_minus_inf = (x64 == -np.inf).any(axis=reduced, keepdims=True)
    mean = np.where(has_nan | (has_inf & has_minus_inf), np.nan,
                    np.where(has_inf, np.inf, np.where(has_minus_inf, -np.inf, mean)))
    var = np.where(finite.all(axis=reduced, keepdims=True), var, np.nan)
    return mean, var


def batch_stats(x, axis=-1):
    """Batch mean and biased variance of each feature, in float64."""
    x64, reduced, _ = _prepare(x, axis)
    mean, var = _statistics(x64, reduced)
    return mean.squeeze(axis=reduced), var.squeeze(axis=reduced)


def _after(y64, x, activation, residual, return_mask):
    """act(y + residual) of float64 y, in x's dtype, and with ``return_mask`` the mask of
    z > 0 (a tuple then)."""
    if residual is not None:
        y64 = y64 + _checks.like_x(residual, _checks.as_data(x), "residual").astype(np.float64)
    activation = as_activation(activation)
    if return_mask and (activation is None or activation.name not in MASKABLE):
        raise ValueError("return_mask needs activation relu or leaky_relu")
    mask = pack_mask(y64 > 0) if return_mask else None
    if activation is not None:
        y64 = activation.apply(y64)
    y = y64.astype(np.asarray(x).dtype)
    return (y, mask) if return_mask else y


def batch_norm_forward(x, gamma=None, beta=None, axis=-1, epsilon=1e-3, *, activation=None,
                       residual=None, return_mask=False):
    """Training-mode batch norm: ``(y, mean, var)`` with the batch statistics of ``x``."""
    x64, reduced, parameter = _prepare(x, axis)
    gamma64, beta64 = parameter(gamma, "gamma", 1.0), parameter(beta, "beta", 0.0)
    epsilon = _checks.as_epsilon(epsilon)
    mean, var = _statistics(x64, reduced)
    y = gamma64 * (x64 - mean) / np.sqrt(var + epsilon) + beta64
    y = _after(y, x, activation, residual, return_mask)
    statistics = mean.squeeze(axis=reduced), var.squeeze(axis=reduced)
    return (y[0],) + statistics + (y[1],) if return_mask else (y,) + statistics


def batch_norm_inference(x, mean, var, gamma=None, beta=None, axis=-1, epsilon=1e-3, *,
                         activation=None, residual=None, return_mask=False):
    """Inference-mode batch norm with given (moving) statistics."""
    x64, _, parameter = _prepare(x, axis, statistics=False)
    mean64, var64 = parameter(mean, "mean"), parameter(var, "var")
    gamma64, beta64 = parameter(gamma, "gamma", 1.0), parameter(beta, "beta", 0.0)
    epsilon = _checks.as_epsilon(epsilon)
    y = gamma64 * (x64 - mean64) / np.sqrt(var64 + epsilon) + beta64
    return _after(y, x, activation, residual, return_mask)


def batch_norm_backward(dy, x, mean, var, gamma=None, axis=-1, epsilon=1e-3, *,
                        activation=None, y=None, residual=False, mask=None):
    """Gradients ``(dx, dgamma, dbeta)`` of training-mode batch norm.

    ``mean`` and ``var`` are the batch statistics the forward pass used, so ``dx`` includes
    the paths through them::

        dbeta  = Σ dy                dgamma = Σ dy·x̂
        dx     = γ / sqrt(var + ε) · (dy − dbeta/n − x̂·dgamma/n)

    With ``activation`` and the forward's output ``y`` (or its ``mask``), dy is first
    replaced by ``dz = dy·act'(z)``; ``residual=True`` appends the residual's gradient, dz.
    """
    x64, reduced, parameter = _prepare(x, axis)
    dy = _checks.as_data(dy, "dy")
    _checks.same_shape(dy, x64)
    dy64 = dy.astype(np.float64)
    activation = as_activation(activation)
    if activation is not None:
        if y is None and mask is None:
            raise ValueError(f"the backward of {activation.name} needs the forward's output: "
                             f"pass y= (or the mask it returned)")
        x_data = _checks.as_data(x)
        dy64 = activation.gradient(dy64, None if y is None else _checks.like_x(y, x_data, "y"),
                                   None if mask is None else _checks.mask_of(mask, x_data))
    mean64, var64 = parameter(mean, "mean"), parameter(var, "var")
    gamma64 = parameter(gamma, "gamma", 1.0)
    epsilon = _checks.as_epsilon(epsilon)
    n = math.prod(x64.shape[a] for a in reduced)   # elements per feature
    inv_std = 1.0 / np.sqrt(var64 + epsilon)
    x_hat = (x64 - mean64) * inv_std
    dbeta = dy64.sum(axis=reduced, keepdims=True)
    dgamma = (dy64 * x_hat).sum(axis=reduced, keepdims=True)
    dx = gamma64 * inv_std * (dy64 - dbeta / n - x_hat * dgamma / n)
    grads = (dx.astype(np.asarray(x).dtype), dgamma.squeeze(axis=reduced),
             dbeta.squeeze(axis=reduced))
    return grads + (dy64.astype(np.asarray(x).dtype),) if residual else grads
