"""Public API: validate, lay out, allocate, and dispatch to the Cython kernels.

Dtype rule: y and dx have the dtype of x (float16 is computed in float32); every
per-feature result (mean, var, dgamma, dbeta) is float64, because the kernels accumulate
in double and rounding those small arrays would throw that precision away. Parameters
(gamma, beta, mean, var) of any real dtype are used in float64.

Everything that depends only on the shape, strides and axes of a call is computed once and
cached, so a small call costs little more than its arithmetic.
"""
from functools import lru_cache

import numpy as np

from . import _checks, _kernels, _machine
from ._layout import make_plan
from .activation import MASKABLE, as_activation, pack_mask

# Streaming and serial thresholds for this machine's caches (cbn._machine).
_machine.apply(_kernels, _machine.current())

__all__ = ["batch_stats", "batch_norm_forward", "batch_norm_inference", "batch_norm_backward",
           "batch_norm_backward_from_sums", "gradient_sums", "openmp_enabled"]


def openmp_enabled():
    """Whether the kernels were built with OpenMP (otherwise they run on one thread)."""
    return _kernels.openmp_enabled()


@lru_cache(maxsize=1024)
def _axes(shape, axis, statistics=True):
    """(kept axes, elements per feature, feature shape) of a shape and a hashable axis.

    With ``statistics`` (everything but inference) zero elements per feature is an error.
    """
    axes = _checks.kept_axes(len(shape), axis)
    n = (_checks.reduction_size if statistics else _checks.element_count)(shape, axes)
    return axes, n, _checks.feature_shape(shape, axes)


def _axis_key(axis):
    """axis as a hashable key: an int or a tuple of ints (bools, floats, strings refused)."""
    return axis if type(axis) is int else _checks.axis_spelling(axis)


class _Plan:
    """A cached kernel plan and how to map per-feature arrays to and from its order."""

    def __init__(self, shape, axes, itemsize, byte_strides):
        layout = make_plan(shape, axes, tuple(tuple(s // itemsize for s in strides)
                                              for strides in byte_strides))
        self.kernel = _kernels.KernelPlan(layout, itemsize)
        self.n_features = layout.n_features
        self.order = layout.feature_order
        self.identity = self.order == tuple(sorted(self.order))
        self.agree = layout.agree     # every operand steps fastest along the same axis
        self.row_groups = layout.row_group > 1
        self.one_axis = len(self.order) == 1
        features = _checks.feature_shape(shape, axes)
        self.permuted_shape = tuple(features[i] for i in self.order)
        self.inverse = tuple(np.argsort(self.order))
        self._shape = (layout.n_feature_outer, layout.n_feature_inner, layout.n_row_outer,
                       layout.n_row_inner, layout.features_inner, layout.agree,
                       layout.row_group, layout.feature_order,
                       any(o.feature_stride != 1 for o in layout.operands))
        self._walks = tuple((o.feature_offsets.tobytes(), o.feature_stride,
                             o.row_offsets.tobytes(), o.row_stride) for o in layout.operands)

    def work(self, operand):
        """What decides the work split, the runs and the order in which the given operand
        is summed: plans that agree on it sum that operand bitwise alike."""
        return self._shape + self._walks[operand]

    def to_kernel(self, value):
        """A feature-shaped float64 array as the contiguous vector the kernels index."""
        if self.one_axis and value.flags.c_contiguous:
            return value
        if self.identity:
            return np.ascontiguousarray(value).reshape(-1)
        return np.ascontiguousarray(value.transpose(self.order)).reshape(-1)

    def from_kernel(self, vector):
        if self.one_axis:
            return vector
        if self.identity:
            return vector.reshape(self.permuted_shape)
        return np.ascontiguousarray(vector.reshape(self.permuted_shape).transpose(self.inverse))


@lru_cache(maxsize=512)
def _plan(shape, axes, itemsize, *byte_strides):
    return _Plan(shape, axes, itemsize, byte_strides)


def _data(x, name="x", dtype=None):
    """(x as given, x as the kernels read it: in ``dtype`` if one is given).

    The only copies cbn makes of input data are here: float16 (computed in float32), dy of
    another dtype than x, byte-swapped and misaligned arrays.
    """
    if type(x) is np.ndarray:
        char = x.dtype.char
        if (char in "fd" and x.ndim and x.dtype.isnative and x.flags.aligned
                and (dtype is None or x.dtype == dtype)):
            return x, x     # the common case, checked first
    x = _checks.as_data(x, name)
    if dtype is None:
        dtype = np.float32 if x.dtype.char == "e" else x.dtype.newbyteorder("=")
    if x.dtype != dtype or not x.flags.aligned:
        return x, x.astype(dtype, order="K")
    return x, x


ALIGNED_MIN_BYTES = 1 << 20


def _dense_strides(x):
    """Byte strides of a dense array of x's shape with its axes in x's memory order."""
    strides = [0] * x.ndim
    step = x.itemsize
    for axis in sorted(range(x.ndim), key=lambda a: abs(x.strides[a]), reverse=True)[::-1]:
        strides[axis] = step
        step *= x.shape[axis]
    return tuple(strides)


def _bit_strides(shape, itemsize):
    """Byte strides (itemsize per element) of a C-ordered array of shape: the plan's walk of
    a mask then counts bits, element i of x's logical C order being bit i."""
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _empty_like(x, dense=False):
    """An uninitialised array shaped and ordered like x (NumPy's order 'K'; with ``dense``,
    strides always _dense_strides(x), which the fused backward plans with).

    Large ones start on a 64-byte boundary, so that every row whose length is a multiple of
    64 bytes fills whole cache lines and the kernels can write it with streaming stores.
    """
    if x.nbytes < ALIGNED_MIN_BYTES and not dense:
        return np.empty_like(x, order="K")
    raw = np.empty(x.nbytes + 64, np.uint8)
    offset = -raw.__array_interface__["data"][0] % 64
    return np.ndarray(x.shape, x.dtype, raw, offset, _dense_strides(x))


def _output(x_in, x, out, *inputs):
    """The buffer the kernel writes: the caller's ``out`` when usable as is, else new.

    ``out`` may be an input itself (in place) but must not partly overlap any input.
    """
    if out is not None:
        _checks.output_buffer(out, x_in)
        for other in inputs:
            _checks.no_partial_overlap(out, other)
        if out.dtype == x.dtype and out.flags.aligned and out.dtype.isnative:
            return out
    return _empty_like(x)


def _finish(x_in, computed, out):
    """Deliver a per-element result in x's dtype, into ``out`` if the caller gave one."""
    if out is None:
        return computed if computed.dtype == x_in.dtype else computed.astype(x_in.dtype)
    if computed is not out:
        np.copyto(out, computed, casting="unsafe")
    return out


def _parameter(plan, value, name, features, required=False):
    if value is None:
        if required:
            raise TypeError(f"{name} is required")
        return None
    return plan.to_kernel(_checks.as_parameter(value, name, features))


def _apart_from(out, *vectors):
    """The kernel vectors, each copied if it shares memory with ``out``: the kernels keep
    reading parameters while they write the output."""
    if out is None:
        return vectors
    return tuple(v.copy() if v is not None and np.may_share_memory(out, v) else v
                 for v in vectors)


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
    x_in, x = _data(x)
    axes, _, _ = _axes(x.shape, _axis_key(axis))
    plan = _plan(x.shape, axes, x.itemsize, x.strides)
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
    x_in, x = _data(x)
    axes, _, features = _axes(x.shape, _axis_key(axis))
    epsilon = _checks.as_epsilon(epsilon)
    y = _output(x_in, x, out)
    gamma, beta = _apart_from(out, _checks.as_parameter(gamma, "gamma", features),
                              _checks.as_parameter(beta, "beta", features))
    mean, var = _forward_checked(x, y, gamma, beta, axes, epsilon)
    return _finish(x_in, y, out), mean, var


def _forward_checked(x, y, gamma, beta, axes, epsilon, kind=0, alpha=0.0):
    """The training forward (with activation ``kind``, ``alpha``) of arguments checked as
    batch_norm_forward checks them (cbn.torch checks them once per layer call): x and y
    native, aligned float32 or float64 arrays of one shape and dtype, y sharing no memory
    with x, gamma or beta; gamma and beta float64 of the feature shape, or None; axes
    sorted kept axes; epsilon a float >= 0. Returns the feature-shaped mean and var."""
    plan = _plan(x.shape, axes, x.itemsize, x.strides, y.strides)
    gamma, beta = (None if v is None else plan.to_kernel(v) for v in (gamma, beta))
    fused = (kind, alpha, None, None) if kind else ()
    stats = _plan(x.shape, axes, x.itemsize, x.strides)
    if x.size and plan.work(0) != stats.work(0):
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
    x_in, x = _data(x)
    axes, _, features = _axes(x.shape, _axis_key(axis), False)   # no statistics taken
    epsilon = _checks.as_epsilon(epsilon)
    y = _output(x_in, x, out)
    plan = _plan(x.shape, axes, x.itemsize, x.strides, y.strides)
    mean, var, gamma, beta = _apart_from(
        out, _parameter(plan, mean, "mean", features, required=True),
        _parameter(plan, var, "var", features, required=True),
        _parameter(plan, gamma, "gamma", features), _parameter(plan, beta, "beta", features))
    if x.size:
        _kernels.batch_norm_inference(plan.kernel, x, y, mean, var, gamma, beta, epsilon)
    return _finish(x_in, y, out)


def _fused_normalization(x, gamma, beta, axis, epsilon, out, activation, residual,
                         statistics=None, return_mask=False):
    """y = act(BN(x) + residual): training mode, or inference with ``statistics``; with
    ``return_mask``, the mask of z > 0 is returned last."""
    x_in, x = _data(x)
    axes, _, features = _axes(x.shape, _axis_key(axis), statistics is None)
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
        residual = _data(residual, "residual", x.dtype)[1]
    y = _output(x_in, x, out, *(() if residual is None else (residual_in,)))
    mask = np.zeros((x.size + 7) // 8, np.uint8) if return_mask else None
    extra = (() if residual is None else (residual.strides,)) + (
        () if mask is None else (_bit_strides(x.shape, x.itemsize),))
    plan = _plan(x.shape, axes, x.itemsize, x.strides, y.strides, *extra)
    kind, alpha = (0, 0.0) if act is None else (act.kind, act.alpha)
    masked = () if mask is None else (mask,)
    gamma, beta = _apart_from(out, _parameter(plan, gamma, "gamma", features),
                              _parameter(plan, beta, "beta", features))
    if statistics is not None:
        mean, var = _apart_from(out, _parameter(plan, statistics[0], "mean", features, True),
                                _parameter(plan, statistics[1], "var", features, True))
        if x.size:
            _kernels.batch_norm_inference(plan.kernel, x, y, mean, var, gamma, beta, epsilon,
                                          kind, alpha, residual, mask)
        return (_finish(x_in, y, out),) + masked if masked else _finish(x_in, y, out)
    mean, var = np.empty(plan.n_features), np.empty(plan.n_features)
    if not x.size:
        return (_finish(x_in, y, out), plan.from_kernel(mean), plan.from_kernel(var)) + masked
    stats = _plan(x.shape, axes, x.itemsize, x.strides)
    if plan.work(0) == stats.work(0):
        _kernels.batch_norm_forward(plan.kernel, x, y, gamma, beta, epsilon, mean, var, kind,
                                    alpha, residual, mask)
        return (_finish(x_in, y, out), plan.from_kernel(mean), plan.from_kernel(var)) + masked
    # y, a residual or a mask laid out so that it changes the work split: x's own
    # statistics (bitwise the plain call's), then the normalization in the fused plan.
    mean, var = _statistics_then_normalization(stats, plan, x, y, gamma, beta, epsilon, kind,
                                               alpha, residual, mask)
    return (_finish(x_in, y, out), mean, var) + masked


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
    y = _finish(x, y, out)
    masked = (pack_mask(y > 0),) if return_mask else ()
    if statistics is not None:
        return (y,) + masked if masked else y
    return (y, mean, var) + masked


def _gradient(dy, x, mean, var, gamma, axis, epsilon, with_dx, out=None, through=None,
              own_sums=False):
    """Validated backward arguments bound to the kernels.

    Returns (x as given, plan, kernel, dx buffer, dgamma, dbeta, dres) where dgamma and dbeta
    are the kernel-order vectors that receive Σ dy·x̂ and Σ dy.

    ``through`` = (activation, the forward's y, residual, mask): the kernel takes dz =
    dy·act'(z) for dy, act' from y or else from the mask, and writes dz to ``dres`` (new,
    _dense_strides of dy) if ``residual``, else dres is None. The composed call it equals runs on a dz laid out as dres; where adding y and
    dres to the plan would split the work unlike that call, dz is formed in dres (or a
    temporary) first and the plain kernel runs on it: bitwise the same either way.
    ``own_sums``: the kernel computes the sums too, in dy's and x's own plan (_SumsInOwnPlan)
    where dx's layout would change them.
    """
    x_in, x = _data(x)
    axes, n, features = _axes(x.shape, _axis_key(axis))
    dy_in, dy = _data(dy, "dy", x.dtype)
    _checks.same_shape(dy_in, x_in)
    epsilon = _checks.as_epsilon(epsilon)
    act = dres = None
    if through is not None:   # (always with dx)
        act, y_in, residual, mask = through
        if mask is None:
            y_in = _checks.like_x(y_in, x_in, "y")
            y = _data(y_in, "y", x.dtype)[1]
            sign_strides = y.strides
            dx = _output(x_in, x, out, dy_in, y_in)
        else:
            mask, y = _checks.mask_of(mask, x_in), None
            sign_strides = _bit_strides(x.shape, x.itemsize)
            dx = _output(x_in, x, out, dy_in)
        dres = _empty_like(dy, dense=True) if residual else None
    elif with_dx:
        dx = _output(x_in, x, out, dy_in)
    if with_dx:
        plan = _plan(x.shape, axes, x.itemsize, dy.strides, x.strides, dx.strides)
    else:
        dx = None
        plan = _plan(x.shape, axes, x.itemsize, dy.strides, x.strides)
    if act is not None:
        fused = _plan(x.shape, axes, x.itemsize, dy.strides, x.strides, dx.strides,
                      sign_strides, *(() if dres is None else (dres.strides,)))
        plain = _plan(x.shape, axes, x.itemsize, _dense_strides(dy), x.strides, dx.strides)
        own = _plan(x.shape, axes, x.itemsize, _dense_strides(dy), x.strides)
        # Row groups sum a staged operand from its copy, where the fused loops read it in
        # place: such a plan forms dz first, as one whose work split differs.
        if fused.work(1) == own.work(1) == plain.work(1) and not fused.row_groups:
            plan = fused
        else:
            dz = _empty_like(dy, dense=True) if dres is None else dres
            np.copyto(dz, act.gradient(dy, y, mask))
            plan, dy, act, y, dres = plain, dz, None, None, (None if dres is None else dz)
    mean, var, gamma = _apart_from(
        out, _parameter(plan, mean, "mean", features, required=True),
        _parameter(plan, var, "var", features, required=True),
        _parameter(plan, gamma, "gamma", features))
    dgamma, dbeta = np.zeros(plan.n_features), np.zeros(plan.n_features)
    own = _plan(x.shape, axes, x.itemsize, dy.strides, x.strides) if own_sums else plan
    if not x.size:
        kernel = None
    elif act is None:
        kernel = _plain_gradient(plan, own, dy, x, dx, mean, var, gamma, epsilon, dgamma,
                                 dbeta, n)
    else:
        kernel = _kernels.Gradient(plan.kernel, dy, x, dx, mean, var, gamma, epsilon, dgamma,
                                   dbeta, n, act.kind, act.alpha, y, dres,
                                   plain.kernel.layout.operands[0].row_stride == 1, mask)
    return x_in, plan, kernel, dx, dgamma, dbeta, dres


def _plain_gradient(plan, own, dy, x, dx, mean, var, gamma, epsilon, dgamma, dbeta, n):
    """The kernel of a backward without activation, bound to kernel-order arguments in
    ``plan``; its sums taken in plan ``own`` (dy's and x's) where that splits them unlike."""
    kernel = _kernels.Gradient(plan.kernel, dy, x, dx, mean, var, gamma, epsilon, dgamma,
                               dbeta, n)
    if own.work(0) != plan.work(0) or own.work(1) != plan.work(1):
        kernel = _SumsInOwnPlan(own, plan, kernel, (dgamma, dbeta), n, dy, x, None,
                                own.to_kernel(plan.from_kernel(mean)),
                                own.to_kernel(plan.from_kernel(var)), None, epsilon)
    return kernel


class _SumsInOwnPlan:
    """A backward whose dx is laid out so that it would change how dy and x are split into
    work or read: the sums are taken in dy's and x's own plan, the same bits as without
    ``out=``, then dx from them in the plan with dx."""

    def __init__(self, own, plan, kernel, totals, count, *sums_arguments):
        self.own, self.plan, self.kernel, self.totals = own, plan, kernel, totals
        self.own_totals = np.zeros(own.n_features), np.zeros(own.n_features)
        self.sums = _kernels.Gradient(own.kernel, *sums_arguments, *self.own_totals, count)

    def backward(self):
        self.sums.sums()
        for total, own_total in zip(self.totals, self.own_totals):
            total[...] = self.plan.to_kernel(self.own.from_kernel(own_total))
        self.kernel.input_gradient()


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
    x_in, plan, kernel, dx, dgamma, dbeta, _ = _gradient(dy, x, mean, var, gamma, axis,
                                                         epsilon, True, out, own_sums=True)
    if kernel is not None:
        kernel.backward()
    return _finish(x_in, dx, out), plan.from_kernel(dgamma), plan.from_kernel(dbeta)


def _backward_checked(dy, x, dx, mean, var, gamma, axes, epsilon):
    """batch_norm_backward's dx (written to ``dx``) and feature-shaped (dgamma, dbeta), of
    arguments checked as it checks them (cbn.torch checks them once per layer call): dy, x
    and dx native, aligned arrays of one shape and dtype (float32 or float64), dx sharing no
    memory with the others; mean, var, and gamma or None, float64 of the feature shape;
    axes sorted kept axes; epsilon a float >= 0."""
    plan = _plan(x.shape, axes, x.itemsize, dy.strides, x.strides, dx.strides)
    dgamma, dbeta = np.zeros(plan.n_features), np.zeros(plan.n_features)
    if x.size:
        own = _plan(x.shape, axes, x.itemsize, dy.strides, x.strides)
        mean, var, gamma = (None if v is None else plan.to_kernel(v) for v in (mean, var, gamma))
        _plain_gradient(plan, own, dy, x, dx, mean, var, gamma, epsilon, dgamma, dbeta,
                        x.size // plan.n_features).backward()
    return plan.from_kernel(dgamma), plan.from_kernel(dbeta)


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
        dz = _empty_like(dy_in, dense=True).astype(np.float16, copy=False)
        dz[...] = act.gradient(dy_in.astype(np.float16),
                               None if y is None else _checks.like_x(y, x_in, "y"),
                               None if mask is None else _checks.mask_of(mask, x_in))
        grads = batch_norm_backward(dz, x_in, mean, var, gamma, axis, epsilon, out=out)
        return grads + (dz,) if residual else grads
    x_in, plan, kernel, dx, dgamma, dbeta, dres = _gradient(
        dy, x_in, mean, var, gamma, axis, epsilon, True, out, (act, y, bool(residual), mask),
        own_sums=True)
    if kernel is not None:
        kernel.backward()
    grads = _finish(x_in, dx, out), plan.from_kernel(dgamma), plan.from_kernel(dbeta)
    return grads + (_finish(x_in, dres, None),) if residual else grads


def gradient_sums(dy, x, mean, var, axis=-1, epsilon=1e-3):
    """``(Σ dy·x̂, Σ dy)`` per feature: dgamma and dbeta without computing dx.

    One read of dy and x. With ``mean``/``var`` of a larger batch these are one shard's
    share of that batch's sums (what synchronized batch norm all-reduces).
    """
    _, plan, kernel, _, dgamma, dbeta, _ = _gradient(dy, x, mean, var, None, axis, epsilon,
                                                     False)
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
    x_in, x = _data(x)
    if x.size == 0:   # a shard without rows: nothing to compute, but the call must be valid
        _checks.kept_axes(x.ndim, _axis_key(axis))
        _checks.same_shape(_data(dy, "dy")[0], x_in)
        return _finish(x_in, _output(x_in, x, out), out)
    x_in, plan, kernel, dx, dgamma, dbeta, _ = _gradient(dy, x_in, mean, var, gamma, axis,
                                                         epsilon, True, out)
    features = _axes(x_in.shape, _axis_key(axis))[2]
    dgamma[...] = plan.to_kernel(_checks.as_parameter(sum_dy_xhat, "sum_dy_xhat", features))
    dbeta[...] = plan.to_kernel(_checks.as_parameter(sum_dy, "sum_dy", features))
    kernel.set_count(count)
    kernel.input_gradient()
    return _finish(x_in, dx, out)
