"""Public API: validate, lay out, allocate, and dispatch to the Cython kernels.

Dtype rule: y and dx have the dtype of x (float16 is computed in float32); every
per-feature result (mean, var, dgamma, dbeta) is float64, because the kernels accumulate
in double and rounding those small arrays would throw that precision away. Parameters
(gamma, beta, mean, var) of any real dtype are used in float64.

Plans are cached (cbn._plans), buffers made in cbn._buffers, and the backward's arguments
bound to its kernel in cbn._gradient.
"""
import numpy as np

from . import _checks, _kernels, _machine
from ._buffers import (apart_from, bit_strides, deliver, empty_like, kernel_input,
                       writable_output)
from ._gradient import bind_gradient
from ._plans import axis_key, feature_axes, kernel_parameter, plan_and_own, plan_of
from .activation import MASKABLE, as_activation, pack_mask

# Streaming and serial thresholds for this machine's caches (cbn._machine).
_machine.apply(_kernels, _machine.current())

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_sums", "gradient_sums", "openmp_enabled"]


def openmp_enabled():
    """Whether the kernels were built with OpenMP (otherwise they run on one thread)."""
    return _kernels.openmp_enabled()


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
    x_in, x = kernel_input(x)
    axes, _, _ = feature_axes(x.shape, axis_key(axis))
    plan = plan_of(x.shape, axes, x.itemsize, x.strides)
    mean, var = np.empty(plan.n_features), np.empty(plan.n_features)
    if x.size:
        _kernels.batch_stats(plan.kernel, x, mean, var)
    return plan.from_kernel(mean), plan.from_kernel(var)


def batch_norm_forward(x, gamma=None, beta=None, axis=-1, epsilon=1e-3, *, out=None,
                       activation=None, residual=None, return_mask=False):
    """Training-mode batch normalization.

    ``y = γ·(x − mean)/sqrt(var + ε) + β`` with the batch mean and biased variance of each
    feature. ``gamma``/``beta`` of feature shape, or None for no scale / no shift.
    ``out``, if given, receives y (same shape and dtype as x, any layout).
    ``activation`` (see :mod:`cbn.activation`) and ``residual`` (x's shape and dtype, any
    layout; ``out=residual`` allowed): y = act(BN(x) + residual) in the same pass, bitwise
    what applying them to the plain call's y in x's dtype gives. ``return_mask`` (relu and
    leaky_relu) also returns z > 0 as one bit per element (:func:`cbn.activation.pack_mask`),
    for the backward's ``mask=``.

    Returns ``(y, mean, var)`` (and the mask); mean and var are float64.
    """
    if activation is not None or residual is not None or return_mask:
        return _fused_normalization(x, gamma, beta, axis, epsilon, out, activation, residual,
                                    return_mask=return_mask)
    x_in, x = kernel_input(x)
    axes, _, features = feature_axes(x.shape, axis_key(axis))
    epsilon = _checks.as_epsilon(epsilon)
    y = writable_output(x_in, x, out)
    gamma, beta = apart_from(out, _checks.as_parameter(gamma, "gamma", features),
                              _checks.as_parameter(beta, "beta", features))
    mean, var = _forward_checked(x, y, gamma, beta, axes, epsilon)
    return deliver(x_in, y, out), mean, var


def _forward_checked(x, y, gamma, beta, axes, epsilon, kind=0, alpha=0.0):
    """The training forward (with activation ``kind``, ``alpha``) of arguments checked as
    batch_norm_forward checks them (cbn.torch checks them once per layer call): x and y
    native, aligned float32 or float64 arrays of one shape and dtype, y sharing no memory
    with x, gamma or beta; gamma and beta float64 of the feature shape, or None; axes
    sorted kept axes; epsilon a float >= 0. Returns the feature-shaped mean and var."""
    plan, stats = plan_and_own(x.shape, axes, x.itemsize, 1, x.strides, y.strides)
    gamma, beta = (None if v is None else plan.to_kernel(v) for v in (gamma, beta))
    fused = (kind, alpha, None, None) if kind else ()
    if x.size and stats is not None:
        return _statistics_then_normalization(stats, plan, x, y, gamma, beta, epsilon, *fused)
    mean, var = np.empty(plan.n_features), np.empty(plan.n_features)
    if x.size:
        _kernels.batch_norm_forward(plan.kernel, x, y, gamma, beta, epsilon, mean, var,
                                    *fused)
    return plan.from_kernel(mean), plan.from_kernel(var)


def _statistics_then_normalization(stats, plan, x, y, gamma, beta, epsilon, *fused):
    """The training forward in two calls: the statistics in plan ``stats``, then the
    normalization (with ``fused``: activation kind, alpha, residual, mask) in ``plan``.
    Returns the feature-shaped mean and var.

    Where y's layout would change how x is split into work or read (x and y disagree on
    layout, or only x's axes merge), the statistics are taken in x's own plan: they are a
    function of x alone, the same bits as batch_stats(x) whatever ``out=`` is."""
    mean, var = np.empty(stats.n_features), np.empty(stats.n_features)
    _kernels.batch_stats(stats.kernel, x, mean, var)
    mean, var = stats.from_kernel(mean), stats.from_kernel(var)
    _kernels.batch_norm_inference(plan.kernel, x, y, plan.to_kernel(mean), plan.to_kernel(var),
                                  gamma, beta, epsilon, *fused)
    return mean, var


def batch_norm_inference(x, mean, var, gamma=None, beta=None, axis=-1, epsilon=1e-3, *,
                         out=None, activation=None, residual=None, return_mask=False):
    """Inference-mode batch normalization with given (moving) statistics.

    ``y = γ·(x − mean)/sqrt(var + ε) + β``, computed per element as ``(x − mean)·s + β``
    in double so a large mean does not cost accuracy. ``activation``, ``residual`` and
    ``return_mask`` as in :func:`batch_norm_forward` (returns ``(y, mask)`` with the mask).
    """
    if activation is not None or residual is not None or return_mask:
        return _fused_normalization(x, gamma, beta, axis, epsilon, out, activation, residual,
                                    (mean, var), return_mask)
    x_in, x = kernel_input(x)
    axes, _, features = feature_axes(x.shape, axis_key(axis), False)   # no statistics taken
    epsilon = _checks.as_epsilon(epsilon)
    y = writable_output(x_in, x, out)
    plan = plan_of(x.shape, axes, x.itemsize, x.strides, y.strides)
    mean, var, gamma, beta = apart_from(
        out, kernel_parameter(plan, mean, "mean", features, required=True),
        kernel_parameter(plan, var, "var", features, required=True),
        kernel_parameter(plan, gamma, "gamma", features),
        kernel_parameter(plan, beta, "beta", features))
    if x.size:
        _kernels.batch_norm_inference(plan.kernel, x, y, mean, var, gamma, beta, epsilon)
    return deliver(x_in, y, out)


def _fused_normalization(x, gamma, beta, axis, epsilon, out, activation, residual,
                         statistics=None, return_mask=False):
    """y = act(BN(x) + residual): training mode, or inference with ``statistics``; with
    ``return_mask``, the mask of z > 0 is returned last."""
    x_in, x = kernel_input(x)
    axes, _, features = feature_axes(x.shape, axis_key(axis), statistics is None)
    epsilon = _checks.as_epsilon(epsilon)
    act = as_activation(activation)
    if return_mask and (act is None or act.name not in MASKABLE):
        raise ValueError(f"return_mask needs activation relu or leaky_relu, got "
                         f"{None if act is None else act.name} (elu's derivative needs y)")
    residual_in = residual = (None if residual is None
                              else _checks.like_x(residual, x_in, "residual"))
    if x_in.dtype.char == "e":   # computed in float32: composed here, in float16
        return _composed_float16(x_in, gamma, beta, axis, epsilon, out, act, residual,
                                 statistics, return_mask)
    if residual is not None:
        residual = kernel_input(residual, "residual", x.dtype)[1]
    y = writable_output(x_in, x, out, *(() if residual is None else (residual_in,)))
    mask = np.zeros((x.size + 7) // 8, np.uint8) if return_mask else None
    extra = (() if residual is None else (residual.strides,)) + (
        () if mask is None else (bit_strides(x.shape, x.itemsize),))
    plan, stats = plan_and_own(x.shape, axes, x.itemsize, 1, x.strides, y.strides, *extra)
    kind, alpha = (0, 0.0) if act is None else (act.kind, act.alpha)
    masked = () if mask is None else (mask,)
    gamma, beta = apart_from(out, kernel_parameter(plan, gamma, "gamma", features),
                              kernel_parameter(plan, beta, "beta", features))
    if statistics is not None:
        mean, var = apart_from(out, kernel_parameter(plan, statistics[0], "mean", features, True),
                                kernel_parameter(plan, statistics[1], "var", features, True))
        if x.size:
            _kernels.batch_norm_inference(plan.kernel, x, y, mean, var, gamma, beta, epsilon,
                                          kind, alpha, residual, mask)
        return (deliver(x_in, y, out),) + masked if masked else deliver(x_in, y, out)
    mean, var = np.empty(plan.n_features), np.empty(plan.n_features)
    if not x.size:
        return (deliver(x_in, y, out), plan.from_kernel(mean), plan.from_kernel(var)) + masked
    if stats is None:
        _kernels.batch_norm_forward(plan.kernel, x, y, gamma, beta, epsilon, mean, var, kind,
                                    alpha, residual, mask)
        return (deliver(x_in, y, out), plan.from_kernel(mean), plan.from_kernel(var)) + masked
    # y, a residual or a mask laid out so that it changes the work split: x's own
    # statistics (bitwise the plain call's), then the normalization in the fused plan.
    mean, var = _statistics_then_normalization(stats, plan, x, y, gamma, beta, epsilon, kind,
                                               alpha, residual, mask)
    return (deliver(x_in, y, out), mean, var) + masked


def _composed_float16(x, gamma, beta, axis, epsilon, out, act, residual, statistics,
                      return_mask):
    """float16 data: batch norm, then the residual and the activation in float16."""
    if out is not None:
        _checks.output_buffer(out, x)
        if residual is not None:
            _checks.no_partial_overlap(out, residual)
    if statistics is None:
        y, mean, var = batch_norm_forward(x, gamma, beta, axis, epsilon)
    else:
        y = batch_norm_inference(x, *statistics, gamma, beta, axis, epsilon)
    if residual is not None:
        y = y + residual
    if act is not None:
        y = act.apply(y)
    y = deliver(x, y, out)
    masked = (pack_mask(y > 0),) if return_mask else ()
    if statistics is not None:
        return (y,) + masked if masked else y
    return (y, mean, var) + masked


def batch_norm_backward(dy, x, mean, var, gamma=None, axis=-1, epsilon=1e-3, *, out=None,
                        activation=None, y=None, residual=False, mask=None):
    """Gradients of training-mode batch normalization.

    With ``x̂ = (x − mean)/sqrt(var + ε)`` and n elements per feature::

        dbeta = Σ dy,   dgamma = Σ dy·x̂,
        dx = γ/sqrt(var + ε) · (dy − dbeta/n − x̂·dgamma/n)

    ``mean``/``var`` are the batch statistics returned by the forward pass. dy is used in
    x's dtype. ``out``, if given, receives dx. Returns ``(dx, dgamma, dbeta)``; dgamma and
    dbeta are float64.

    After a fused forward: ``activation`` as given to it and its output ``y`` (x's shape
    and dtype): the gradient of BN followed by the activation, i.e. the above of
    dz = dy·act'(z) (:meth:`cbn.activation.Activation.gradient`), bitwise; for relu and
    leaky_relu the forward's ``mask`` (``return_mask=True``) can stand for y. ``residual=True``
    (the forward added one) also returns the residual's gradient dz, laid out like dy:
    ``(dx, dgamma, dbeta, dresidual)``.
    """
    if activation is not None or y is not None or residual is not False or mask is not None:
        return _backward_through(dy, x, mean, var, gamma, axis, epsilon, out, activation, y,
                                 residual, mask)
    x_in, plan, kernel, dx, dgamma, dbeta, _ = bind_gradient(dy, x, mean, var, gamma, axis,
                                                             epsilon, True, out, own_sums=True)
    if kernel is not None:
        kernel.backward()
    return deliver(x_in, dx, out), plan.from_kernel(dgamma), plan.from_kernel(dbeta)


def _backward_through(dy, x, mean, var, gamma, axis, epsilon, out, activation, y, residual,
                      mask):
    """batch_norm_backward after an activation and/or a residual."""
    if not isinstance(residual, (bool, np.bool_)):
        raise TypeError(f"residual must be True or False (whether the forward added one), "
                        f"got {type(residual).__name__}")
    act = as_activation(activation)
    if act is None:
        if y is not None or mask is not None:
            raise ValueError("y and mask are only used with an activation; pass activation=")
        dresidual = np.array(dy, dtype=_checks.as_data(x).dtype)   # before out=dy is written
        return batch_norm_backward(dy, x, mean, var, gamma, axis, epsilon,
                                   out=out) + (dresidual,)
    if y is not None and mask is not None:
        raise ValueError("pass y or mask, not both")
    if mask is not None and act.name not in MASKABLE:
        raise ValueError(f"{act.name}'s derivative needs y; a mask serves relu and "
                         f"leaky_relu only")
    if y is None and mask is None:
        raise ValueError(f"the backward of {act.name} needs the forward's output: pass y= "
                         f"(or the mask it returned)")
    x_in = _checks.as_data(x)
    if x_in.dtype.char == "e":   # computed in float32: composed here, in float16
        dy_in = _checks.as_data(dy, "dy")
        _checks.same_shape(dy_in, x_in)
        dz = empty_like(dy_in, dense=True).astype(np.float16, copy=False)
        dz[...] = act.gradient(dy_in.astype(np.float16),
                               None if y is None else _checks.like_x(y, x_in, "y"),
                               None if mask is None else _checks.mask_of(mask, x_in))
        grads = batch_norm_backward(dz, x_in, mean, var, gamma, axis, epsilon, out=out)
        return grads + (dz,) if residual else grads
    x_in, plan, kernel, dx, dgamma, dbeta, dres = bind_gradient(
        dy, x_in, mean, var, gamma, axis, epsilon, True, out, (act, y, bool(residual), mask),
        own_sums=True)
    if kernel is not None:
        kernel.backward()
    grads = deliver(x_in, dx, out), plan.from_kernel(dgamma), plan.from_kernel(dbeta)
    return grads + (deliver(x_in, dres, None),) if residual else grads


def gradient_sums(dy, x, mean, var, axis=-1, epsilon=1e-3):
    """``(Σ dy·x̂, Σ dy)`` per feature: dgamma and dbeta without computing dx.

    One read of dy and x. With ``mean``/``var`` of a larger batch these are one shard's
    share of that batch's sums (what synchronized batch norm all-reduces).
    """
    _, plan, kernel, _, dgamma, dbeta, _ = bind_gradient(dy, x, mean, var, None, axis,
                                                         epsilon, False)
    if kernel is not None:
        kernel.sums()
    return plan.from_kernel(dgamma), plan.from_kernel(dbeta)


def batch_norm_backward_from_sums(dy, x, mean, var, gamma, sum_dy, sum_dy_xhat, count,
                                  axis=-1, epsilon=1e-3, *, out=None):
    """``dx`` of one shard of a batch whose sums ``Σ dy``, ``Σ dy·x̂`` are already known.

    ``dx = γ/sqrt(var + ε) · (dy − sum_dy/count − x̂·sum_dy_xhat/count)`` where ``mean``,
    ``var``, the sums and ``count`` (elements per feature) are those of the whole batch and
    ``dy``, ``x`` are this shard (which may have no elements). With the whole batch as the
    shard this is :func:`batch_norm_backward`'s dx.
    """
    count = _checks.as_integer(count, "count")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    x_in, x = kernel_input(x)
    if x.size == 0:   # a shard without rows: nothing to compute, but the call must be valid
        _checks.kept_axes(x.ndim, axis_key(axis))
        _checks.same_shape(kernel_input(dy, "dy")[0], x_in)
        return deliver(x_in, writable_output(x_in, x, out), out)
    x_in, plan, kernel, dx, dgamma, dbeta, _ = bind_gradient(dy, x_in, mean, var, gamma,
                                                             axis, epsilon, True, out)
    features = feature_axes(x_in.shape, axis_key(axis))[2]
    dgamma[...] = plan.to_kernel(_checks.as_parameter(sum_dy_xhat, "sum_dy_xhat", features))
    dbeta[...] = plan.to_kernel(_checks.as_parameter(sum_dy, "sum_dy", features))
    kernel.set_count(count)
    kernel.input_gradient()
    return deliver(x_in, dx, out)
