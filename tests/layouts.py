"""Hypothesis strategies and helpers shared by the tests: arrays in every memory layout."""
import contextlib

import numpy as np
from hypothesis import strategies as st

from cbn import _kernels

DTYPES = (np.float16, np.float32, np.float64)
LAYOUTS = ("C", "F", "transposed", "stepped", "reversed", "broadcast", "readonly")


def in_layout(values, layout, rng):
    """``values`` (C-ordered) rearranged in memory as ``layout``, with the same contents."""
    if layout == "F":
        return np.asfortranarray(values)
    if layout == "transposed":
        perm = rng.permutation(values.ndim)
        return np.ascontiguousarray(values.transpose(perm)).transpose(np.argsort(perm))
    if layout == "stepped":
        big = np.zeros(tuple(2 * n + 1 for n in values.shape), values.dtype)
        view = big[tuple(slice(1, None, 2) for _ in values.shape)]
        view[...] = values
        return view
    if layout == "reversed":
        return np.ascontiguousarray(values[..., ::-1])[..., ::-1]
    if layout == "broadcast":
        # Make every size-k axis 0 a broadcast of its first entry (stride 0).
        first = values[:1]
        values[...] = first
        return np.broadcast_to(first, values.shape)
    if layout == "readonly":
        values = values.copy()
        values.flags.writeable = False
        return values
    return values


@st.composite
def batch_norm_case(draw, max_rank=5, max_side=6):
    """(x, axis spelled as given, sorted kept axes, rng) for random dtype, rank, axes, layout."""
    rank = draw(st.integers(1, max_rank))
    shape = draw(st.lists(st.integers(1, max_side), min_size=rank, max_size=rank))
    kept = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    # One element per feature (every axis kept, or reduced sides of 1) is an edge case, not
    # the usual one: most cases reduce over at least two elements.
    reduced = [a for a in range(rank) if a not in kept]
    if draw(st.integers(0, 9)) > 0 and all(shape[a] == 1 for a in reduced):
        if not reduced and rank > 1:
            kept.pop()
            reduced = [a for a in range(rank) if a not in kept]
        if reduced:
            shape[reduced[0]] = draw(st.integers(2, max_side))
    shape = tuple(shape)
    spelled = [a - rank if draw(st.booleans()) else a for a in kept]
    axis = spelled[0] if len(spelled) == 1 and draw(st.booleans()) else spelled
    return case_values(draw, shape, axis, tuple(sorted(a % rank for a in kept)))


# The kernels change strategy with size: FI tiles hold 1024 features and run 8-64 wide
# vector lanes; blocks of 65536 elements are folded into the moments, and from 131072
# elements (RI: 32768 rows per feature) the rows are split into chunks whose partial
# results are merged. Small cases reach none of that.
SIZED_ELEMENTS = (140_000, 320_000)


@st.composite
def sized_batch_norm_case(draw):
    """Like batch_norm_case, but wide (65-300 features, past the vector widths) or tall
    (1-24 features over enough rows for several blocks and chunks), with the rows in one
    or two axes on either side of the single kept axis."""
    if draw(st.sampled_from(["wide", "tall", "tall"])) == "wide":
        n_features, n_rows = draw(st.integers(65, 300)), draw(st.integers(1, 40))
    else:
        n_features = draw(st.integers(1, 24))
        n_rows = draw(st.integers(*(n // n_features for n in SIZED_ELEMENTS)))
    rows = (n_rows,)
    if draw(st.booleans()):
        outer = draw(st.integers(2, 16))
        rows = (outer, -(-n_rows // outer))
    position = draw(st.integers(0, len(rows)))
    shape = rows[:position] + (n_features,) + rows[position:]
    axis = position - len(shape) if draw(st.booleans()) else position
    return case_values(draw, shape, axis, (position,))


def case_values(draw, shape, axis, axes):
    """The case's x: random dtype, scale, offset and layout, and the rng that made it."""
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    offset = draw(st.sampled_from([0.0, 3.0, -50.0]))
    values = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    return in_layout(values, layout, rng), axis, axes, rng


def feature_shape(x, axes):
    return tuple(x.shape[a] for a in axes)


def tolerance(dtype):
    """Kernels and reference both compute in double; they differ by output rounding only."""
    return {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-6,
            np.dtype(np.float64): 1e-12}[np.dtype(dtype)]


def assert_close(actual, expected, dtype, condition=1.0):
    """Equal up to output rounding, plus double rounding amplified by ``condition``."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tolerance(dtype),
                               atol=tolerance(dtype) * scale + 1e-14 * condition)


def condition(x, var, gamma=None, epsilon=0.0):
    """How much an absolute error in x − mean is amplified in x̂·γ: max|x|·|γ|/std."""
    gamma_max = 1.0 if gamma is None else max(1.0, float(np.max(np.abs(gamma), initial=1.0)))
    spread = np.asarray(var, np.float64) + epsilon
    # A feature with var + epsilon = 0 gives 0/0 = NaN, which the tests compare as NaN; the
    # others set the tolerance (an infinite one would let every value pass).
    std = np.sqrt(np.min(spread[spread > 0], initial=np.inf))
    x_max = float(np.max(np.abs(x.astype(np.float64)), initial=0.0))
    return 16 * x_max * gamma_max / std


def assert_statistics_close(mean, var, mean_ref, var_ref, x):
    """Batch statistics equal up to double rounding of sums of |x|-sized terms.

    A mean is a sum, so its rounding error scales with the data, max|x|, not with the mean
    itself (which may be ~0 by cancellation); the reference is the exact side.
    """
    x_max = float(np.max(np.abs(x.astype(np.float64)), initial=0.0))
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-13, atol=1e-14 * x_max + 1e-300)
    np.testing.assert_allclose(var, var_ref, rtol=1e-10,
                               atol=1e-14 * (1 + np.abs(mean_ref).max(initial=0.0)))


@contextlib.contextmanager
def streaming_stores(on):
    """Streaming stores from 0 bytes on (so that small arrays take those paths), or never."""
    old = _kernels.set_stream_min_bytes(0 if on else 1 << 62)
    try:
        yield
    finally:
        _kernels.set_stream_min_bytes(old)
