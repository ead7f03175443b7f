"""Kernel plans: everything that depends only on a call's shape, strides and axes, computed
once and cached, so a small call costs little more than its arithmetic."""
from functools import lru_cache

import numpy as np

from . import _checks, _kernels
from ._layout import make_plan


@lru_cache(maxsize=1024)
def feature_axes(shape, axis, statistics=True):
    """(kept axes, elements per feature, feature shape) of a shape and a hashable axis.

    With ``statistics`` (everything but inference) zero elements per feature is an error.
    """
    axes = _checks.kept_axes(len(shape), axis)
    n = (_checks.reduction_size if statistics else _checks.element_count)(shape, axes)
    return axes, n, _checks.feature_shape(shape, axes)


def axis_key(axis):
    """axis as a hashable key: an int or a tuple of ints (bools, floats, strings refused)."""
    return axis if type(axis) is int else _checks.axis_spelling(axis)


class Plan:
    """A cached kernel plan and how to map per-feature arrays to and from its order."""

    def __init__(self, shape, axes, itemsize, byte_strides):
        layout = make_plan(shape, axes, tuple(tuple(s // itemsize for s in strides)
                                              for strides in byte_strides))
        self.kernel = _kernels.KernelPlan(layout, itemsize)
        self.n_features = layout.n_features
        self.order = layout.feature_order
        self.flipped = layout.flipped_features
        self.identity = self.order == tuple(sorted(self.order))
        self.agree = layout.agree     # every operand steps fastest along the same axis
        self.row_groups = layout.row_group > 1
        self.one_axis = len(self.order) == 1
        features = _checks.feature_shape(shape, axes)
        self.permuted_shape = tuple(features[i] for i in self.order)
        self.inverse = tuple(np.argsort(self.order))
        self._shape = (layout.n_feature_outer, layout.n_feature_inner, layout.n_row_outer,
                       layout.n_row_inner, layout.features_inner, layout.agree,
                       layout.row_group, layout.feature_order, layout.flipped_features,
                       any(o.feature_stride != 1 for o in layout.operands))
        self._walks = tuple((o.feature_offsets.tobytes(), o.feature_stride,
                             o.row_offsets.tobytes(), o.row_stride) for o in layout.operands)

    def work(self, operand):
        """What decides the work split, the runs and the order in which the given operand
        is summed: plans that agree on it sum that operand bitwise alike."""
        return self._shape + self._walks[operand]

    def to_kernel(self, value):
        """A feature-shaped float64 array as the contiguous vector the kernels index."""
        if self.flipped:
            value = np.flip(value, self.flipped)
        if self.one_axis and value.flags.c_contiguous:
            return value
        if self.identity:
            return np.ascontiguousarray(value).reshape(-1)
        return np.ascontiguousarray(value.transpose(self.order)).reshape(-1)

    def from_kernel(self, vector):
        if self.one_axis:
            value = vector
        elif self.identity:
            value = vector.reshape(self.permuted_shape)
        else:
            value = np.ascontiguousarray(
                vector.reshape(self.permuted_shape).transpose(self.inverse))
        return np.ascontiguousarray(np.flip(value, self.flipped)) if self.flipped else value


@lru_cache(maxsize=512)
def plan_of(shape, axes, itemsize, *byte_strides):
    return Plan(shape, axes, itemsize, byte_strides)




def kernel_parameter(plan, value, name, features, required=False):
    if value is None:
        if required:
            raise TypeError(f"{name} is required")
        return None
    return plan.to_kernel(_checks.as_parameter(value, name, features))


@lru_cache(maxsize=512)
def plan_and_own(shape, axes, itemsize, n_own, *byte_strides):
    """(the plan of all the operands, the plan of the first ``n_own`` of them alone where
    the joint plan would split them into work or read them unlike that one, else None).

    Results that are functions of those operands alone (x's statistics; the sums of dy and
    x) are taken in their own plan, so that another operand's layout (``out=``, a residual,
    a mask) never changes their bits. Cached: a call pays one lookup for both plans."""
    joint = plan_of(shape, axes, itemsize, *byte_strides)
    own = plan_of(shape, axes, itemsize, *byte_strides[:n_own])
    agree = all(joint.work(operand) == own.work(operand) for operand in range(n_own))
    return joint, None if agree else own
