"""Non-finite and near-overflow data: the kernels give what cbn.reference gives on every path.

Features hold finite values up to the float64 limit (where x − K, Σ(x − K)² and the Chan
updates of the fast passes overflow), NaN, +inf, −inf or mixes, at any position, in
batches sized to reach every kernel path: one element, the vector widths (8, 32, 64
features or rows), several blocks per work item and several chunks merged (with threads).
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cbn
from cbn import reference

from budget import examples

# (rows, features): small; vector widths; FI multi-block and multi-chunk (8192 rows per
# block at 8 features, 2 chunks from 131072 elements); RI multi-chunk (>= 32768 rows) and
# multi-block (> 65536 rows per item).
SHAPES = [(1, 3), (2, 1), (7, 9), (33, 8), (65, 64), (40, 70), (3, 130), (20000, 8),
          (40000, 3), (70000, 2)]
KINDS = ("normal", "huge", "huge one sign", "wide", "far first", "nan", "+inf", "-inf", "both inf",
         "inf and huge")
SCALES = (1.0, 1e150, 1e153, 1e154, 1e200, 1e300, 1.7976931348623157e308)


def feature_values(kind, n, rng, scale):
    if kind == "normal":
        return rng.standard_normal(n)
    if kind == "huge":
        return scale * rng.uniform(-1, 1, n)
    if kind == "huge one sign":
        return scale * rng.uniform(0.5, 1, n)
    if kind == "wide":   # the variance is finite, its sums of squares are not
        return 1e152 * rng.standard_normal(n)
    if kind == "far first":   # Σ(x − x[0]) squared overflows, Σ(x − x[0])² does not
        values = 1e151 * (1 + 0.01 * rng.standard_normal(n))
        values[0] = 0.0
        return values
    values = rng.standard_normal(n) * (scale if kind == "inf and huge" else 1.0)
    specials = {"nan": [np.nan], "+inf": [np.inf], "-inf": [-np.inf],
                "both inf": [np.inf, -np.inf], "inf and huge": [np.inf]}[kind]
    for special in specials:
        count = int(rng.integers(1, 4))
        where = rng.choice([0, n - 1, *rng.integers(0, n, count)], size=count)
        values[where] = special
    return values


@st.composite
def extreme_case(draw):
    n_rows, n_features = draw(st.sampled_from(SHAPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    scale = draw(st.sampled_from(SCALES))
    columns = [feature_values(kinds[f % len(kinds)], n_rows, rng, scale)
               for f in range(n_features)]
    x = np.stack(columns, axis=1)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    with np.errstate(over="ignore"):
        x = x.astype(dtype)
    layout = draw(st.sampled_from(["features inner", "rows inner", "stepped"]))
    if layout == "rows inner":
        x = np.asfortranarray(x)
    elif layout == "stepped":
        big = np.zeros((n_rows, 2 * n_features), dtype)
        big[:, ::2] = x
        x = big[:, ::2]
    return x


def assert_same_statistic(got, want, data_scale, rtol):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got) * np.sign(got), np.isinf(want) * np.sign(want))
    finite = np.isfinite(want)
    error = np.abs(got[finite] - want[finite])
    bound = rtol * np.abs(want[finite]) + 1e-14 * data_scale[finite] + 1e-300
    assert (error <= bound).all(), (got, want, error, bound)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the reference's inf − inf
@examples(60)
@given(extreme_case())
def test_extreme_values_give_the_reference_statistics_on_every_path(x):
    finite = np.where(np.isfinite(x), np.abs(x.astype(np.float64)), 0.0)
    data_scale = finite.max(axis=0)
    mean_ref, var_ref = reference.batch_stats(x)
    for mean, var in (cbn.batch_stats(x), cbn.batch_norm_forward(x)[1:]):
        assert_same_statistic(mean, mean_ref, data_scale, 1e-13)
        assert_same_statistic(var, var_ref, data_scale ** 2, 1e-10)
    y, mean, var = cbn.batch_norm_forward(x)
    y_ref = reference.batch_norm_forward(x)[0]
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(y_ref))
    both = np.isfinite(y_ref)
    np.testing.assert_allclose(y[both], y_ref[both], rtol=1e-5, atol=1e-5)


def test_the_issue_examples():
    mean, var = cbn.batch_stats(np.array([[1e308], [-1e308]]))
    assert mean[0] == 0.0 and var[0] == np.inf
    for n in (3, 100, 100_000):
        x = np.ones((n, 2))
        x[n // 2, :] = np.inf
        mean, var = cbn.batch_stats(x)
        assert (mean == np.inf).all() and np.isnan(var).all()
