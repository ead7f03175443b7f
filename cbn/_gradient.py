"""The backward's arguments, validated and bound to the gradient kernel (cbn._kernels.Gradient).

The bound kernel's ``sums()``, ``input_gradient()`` and ``backward()`` do the work, with the
GIL released; cbn.api calls them.
"""
import numpy as np

from . import _checks, _kernels
from ._buffers import (apart_from, bit_strides, dense_strides, empty_like, kernel_input,
                       writable_output)
from ._plans import axis_key, feature_axes, kernel_parameter, plan_and_own, plan_of


def bind_gradient(dy, x, mean, var, gamma, axis, epsilon, with_dx, out=None, through=None,
                  own_sums=False):
    """Validated backward arguments bound to the kernels.

    Returns (x as given, plan, kernel, dx buffer, dgamma, dbeta, dres) where dgamma and dbeta
    are the kernel-order vectors that receive Σ dy·x̂ and Σ dy.

    ``through`` = (activation, the forward's y, residual, mask): the kernel takes dz =
    dy·act'(z) for dy, act' from y or else from the mask, and writes dz to ``dres`` (new,
    dense_strides of dy) if ``residual``, else dres is None. The composed call it equals
    runs on a dz laid out as dres; where adding y and dres to the plan would split the work
    unlike that call, dz is formed in dres (or a temporary) first and the plain kernel runs
    on it: bitwise the same either way.
    ``own_sums``: the kernel computes the sums too, in dy's and x's own plan (SumsInOwnPlan)
    where dx's layout would change them.
    """
    x_in, x = kernel_input(x)
    axes, n, features = feature_axes(x.shape, axis_key(axis))
    dy_in, dy = kernel_input(dy, "dy", x.dtype)
    _checks.same_shape(dy_in, x_in)
    epsilon = _checks.as_epsilon(epsilon)
    act = dres = None
    if through is not None:   # (always with dx)
        act, y_in, residual, mask = through
        if mask is None:
            y_in = _checks.like_x(y_in, x_in, "y")
            y = kernel_input(y_in, "y", x.dtype)[1]
            sign_strides = y.strides
            dx = writable_output(x_in, x, out, dy_in, y_in)
        else:
            mask, y = _checks.mask_of(mask, x_in), None
            sign_strides = bit_strides(x.shape, x.itemsize)
            dx = writable_output(x_in, x, out, dy_in)
        dres = empty_like(dy, dense=True) if residual else None
    elif with_dx:
        dx = writable_output(x_in, x, out, dy_in)
    if with_dx:
        plan, own = plan_and_own(x.shape, axes, x.itemsize, 2, dy.strides, x.strides,
                                 dx.strides)
    else:
        dx, own = None, None
        plan = plan_of(x.shape, axes, x.itemsize, dy.strides, x.strides)
    if act is not None:
        fused = plan_of(x.shape, axes, x.itemsize, dy.strides, x.strides, dx.strides,
                        sign_strides, *(() if dres is None else (dres.strides,)))
        plain, own = plan_and_own(x.shape, axes, x.itemsize, 2, dense_strides(dy), x.strides,
                                  dx.strides)
        # Row groups sum a staged operand from its copy, where the fused loops read it in
        # place: such a plan forms dz first, as one whose work split differs.
        if fused.work(1) == (own or plain).work(1) == plain.work(1) and not fused.row_groups:
            plan = fused
        else:
            dz = empty_like(dy, dense=True) if dres is None else dres
            np.copyto(dz, act.gradient(dy, y, mask))
            plan, dy, act, y, dres = plain, dz, None, None, (None if dres is None else dz)
    mean, var, gamma = apart_from(
        out, kernel_parameter(plan, mean, "mean", features, required=True),
        kernel_parameter(plan, var, "var", features, required=True),
        kernel_parameter(plan, gamma, "gamma", features))
    dgamma, dbeta = np.zeros(plan.n_features), np.zeros(plan.n_features)
    if not x.size:
        kernel = None
    elif act is None:
        kernel = plain_gradient(plan, own if own_sums else None, dy, x, dx, mean, var, gamma,
                                epsilon, dgamma, dbeta, n)
    else:
        kernel = _kernels.Gradient(plan.kernel, dy, x, dx, mean, var, gamma, epsilon, dgamma,
                                   dbeta, n, act.kind, act.alpha, y, dres,
                                   plain.kernel.layout.operands[0].row_stride == 1, mask)
    return x_in, plan, kernel, dx, dgamma, dbeta, dres


def plain_gradient(plan, own, dy, x, dx, mean, var, gamma, epsilon, dgamma, dbeta, n):
    """The kernel of a backward without activation, bound to kernel-order arguments in
    ``plan``; its sums taken in plan ``own`` (dy's and x's, from plan_and_own) unless that
    is None."""
    kernel = _kernels.Gradient(plan.kernel, dy, x, dx, mean, var, gamma, epsilon, dgamma,
                               dbeta, n)
    if own is None:
        return kernel
    return SumsInOwnPlan(own, plan, kernel, (dgamma, dbeta), dy, x, mean, var, epsilon, n)


class SumsInOwnPlan:
    """A backward whose dx is laid out so that it would change how dy and x are split into
    work or read: the sums are taken in dy's and x's own plan, the same bits as without
    ``out=``, then dx from them in the plan with dx."""

    def __init__(self, own, plan, kernel, totals, dy, x, mean, var, epsilon, count):
        self.own, self.plan, self.kernel, self.totals = own, plan, kernel, totals
        self.own_totals = np.zeros(own.n_features), np.zeros(own.n_features)
        self.sums = _kernels.Gradient(
            own.kernel, dy, x, dx=None, mean=own.to_kernel(plan.from_kernel(mean)),
            var=own.to_kernel(plan.from_kernel(var)), gamma=None, epsilon=epsilon,
            sum_dy_xhat=self.own_totals[0], sum_dy=self.own_totals[1], count=count)

    def backward(self):
        self.sums.sums()
        for total, own_total in zip(self.totals, self.own_totals):
            total[...] = self.plan.to_kernel(self.own.from_kernel(own_total))
        self.kernel.input_gradient()


def backward_checked(dy, x, dx, mean, var, gamma, axes, epsilon):
    """batch_norm_backward's dx (written to ``dx``) and feature-shaped (dgamma, dbeta), of
    arguments checked as it checks them (cbn.torch checks them once per layer call): dy, x
    and dx native, aligned arrays of one shape and dtype (float32 or float64), dx sharing no
    memory with the others; mean, var, and gamma or None, float64 of the feature shape;
    axes sorted kept axes; epsilon a float >= 0."""
    plan, own = plan_and_own(x.shape, axes, x.itemsize, 2, dy.strides, x.strides, dx.strides)
    dgamma, dbeta = np.zeros(plan.n_features), np.zeros(plan.n_features)
    if x.size:
        mean, var, gamma = (None if v is None else plan.to_kernel(v) for v in (mean, var, gamma))
        plain_gradient(plan, own, dy, x, dx, mean, var, gamma, epsilon, dgamma, dbeta,
                       x.size // plan.n_features).backward()
    return plan.from_kernel(dgamma), plan.from_kernel(dbeta)
