"""Input validation shared by the kernels' API and the reference.

Every public function funnels its arguments through here, so a bad input gets the same
clear exception whichever implementation is called, and nothing is ever modified.
"""
import math
import operator
from collections.abc import Sequence

import numpy as np


def is_data_dtype(dtype):
    return np.dtype(dtype).char in "efd"


def refuse_masked(value, name):
    """np.asarray would hand the kernels a masked array's raw data, masked entries included."""
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array: cbn would ignore its mask; pass "
                        f"the data to use (e.g. {name}.compressed() or {name}.filled(...))")


def as_data(x, name="x"):
    """Return ``x`` as an ndarray of float16, float32 or float64 (either byte order),
    without copying. float16 is accepted but computed in float32 (its sums overflow)."""
    if type(x) is np.ndarray:
        array = x
    else:
        refuse_masked(x, name)
        array = np.asarray(x)
    if not is_data_dtype(array.dtype):
        raise TypeError(
            f"{name} must be float16, float32 or float64, got dtype {array.dtype}")
    if array.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return array


def _is_text_or_bool(value):
    return isinstance(value, (str, bytes, bool, np.bool_)) or (
        isinstance(value, np.ndarray) and value.dtype.kind in "bSUO")


def as_integer(value, name):
    """A Python int from an integer, a NumPy integer or a 0-d integer array (not a bool)."""
    if not _is_text_or_bool(value):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an integer, got {value!r}")


def axis_spelling(axis):
    """``axis`` as an int or a tuple of ints (hashable), types checked, values not yet.

    Accepts what NumPy accepts for ``axis``: an integer (NumPy integers and 0-d integer
    arrays included) or a sequence of them; refuses bools, strings and floats, which
    Python would otherwise read as 1, as characters or not at all.
    """
    try:
        return as_integer(axis, "axis")
    except TypeError:
        if (_is_text_or_bool(axis) or not isinstance(axis, (Sequence, np.ndarray))
                or isinstance(axis, np.ndarray) and axis.ndim == 0):
            raise TypeError(f"axis must be an integer or a sequence of integers, "
                            f"got {axis!r}") from None
    return tuple(as_integer(a, "axis entries") for a in axis)


def kept_axes(ndim, axis):
    """Normalise ``axis`` (int or sequence, negatives allowed) to a sorted tuple."""
    spelled = axis_spelling(axis)
    spelled = (spelled,) if isinstance(spelled, int) else spelled
    if len(spelled) == 0:
        raise ValueError("axis must name at least one feature axis")
    axes = []
    for a in spelled:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for an array of rank {ndim}")
        axes.append(a % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {spelled} names the same axis twice")
    return tuple(sorted(axes))


def feature_shape(shape, axes):
    """Shape of the per-feature parameter and statistic arrays."""
    return tuple(shape[a] for a in axes)


def element_count(shape, axes):
    """Number of elements per feature: the product of the extents of the reduced axes.

    Zero for a shard with no rows, which is fine for partial statistics.
    """
    n = 1
    for a, extent in enumerate(shape):
        if a not in axes:
            n *= extent
    return n


def reduction_size(shape, axes):
    """Number of elements each feature's statistics are taken over (ValueError if zero)."""
    n = element_count(shape, axes)
    if n == 0:
        raise ValueError(
            f"cannot take batch statistics over zero elements (x.shape={tuple(shape)}, "
            f"feature axes={axes})")
    return n


def as_parameter(value, name, expected_shape):
    """Return a per-feature parameter as a float64 array of ``expected_shape``, or None.

    Parameters of any real dtype, byte order, alignment and strides are accepted and used
    in float64: they are small, and the per-feature factors computed from them should not
    lose what the kernels accumulated. The result is native and aligned (the kernels read
    its memory directly), but not necessarily contiguous.
    """
    if value is None:
        return None
    if (type(value) is np.ndarray and value.dtype == np.float64 and value.flags.aligned
            and value.shape == expected_shape):
        return value
    refuse_masked(value, name)
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    if array.shape != expected_shape:
        raise ValueError(
            f"{name} has shape {array.shape}, but the feature axes give {expected_shape}")
    if array.dtype == np.float64 and array.flags.aligned:
        return array
    return array.astype(np.float64)


def as_real(value, name):
    """A Python float from a real number or a 0-d real array (not a bool, string or complex)."""
    if isinstance(value, np.ndarray):
        real = value.ndim == 0 and value.dtype.kind in "fiu"
    else:
        real = not isinstance(value, (str, bytes, bool, np.bool_, complex, np.complexfloating))
    if real:
        try:
            return float(value)
        except OverflowError:      # an int beyond float64: as large as a float gets
            return math.copysign(math.inf, value)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{name} must be a real number, got {value!r}")


def as_epsilon(epsilon):
    value = as_real(epsilon, "epsilon")
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return value


def same_shape(dy, x):
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape} but x has shape {x.shape}")


def output_buffer(out, x, name="out"):
    """Check a caller-supplied output buffer for an array shaped like x."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be an ndarray, got {type(out).__name__}")
    refuse_masked(out, name)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"{name} must have shape {x.shape} and dtype {x.dtype}, "
                         f"got {out.shape} {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    no_partial_overlap(out, x, name)


def no_partial_overlap(out, array, name="out"):
    """``out`` may be ``array`` itself (same memory and strides) but not overlap it otherwise:
    the kernels would read values they had already overwritten."""
    if np.may_share_memory(out, array) and not (
            out.__array_interface__["data"][0] == array.__array_interface__["data"][0]
            and out.strides == array.strides):
        raise ValueError(f"{name} partly overlaps an input; pass the input itself or a "
                         f"separate buffer")


def like_x(value, x, name):
    """An operand that goes element by element with x (a residual, the forward's output):
    an ndarray of x's shape and dtype (either byte order)."""
    refuse_masked(value, name)
    value = np.asarray(value)
    if value.shape != x.shape or value.dtype.char != x.dtype.char:
        raise ValueError(f"{name} must have x's shape {x.shape} and dtype {x.dtype}, got "
                         f"{value.shape} {value.dtype}")
    return value


def mask_of(mask, x):
    """A mask of z > 0 for an x of this shape: uint8, one bit per element."""
    refuse_masked(mask, "mask")
    mask = np.asarray(mask)
    n_bytes = (math.prod(x.shape) + 7) // 8
    if mask.dtype != np.uint8 or mask.shape != (n_bytes,):
        raise ValueError(f"mask must be a uint8 array of shape ({n_bytes},) (one bit per "
                         f"element of x), got {mask.shape} {mask.dtype}")
    return mask
