"""Mergeable statistics: cbn.batch_moments / cbn.merge_moments against the reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cbn
from cbn import reference

from budget import examples


def assert_stats_close(moments, x, axis):
    """Merged statistics equal the reference statistics of the whole batch x (float64 x)."""
    ref_mean, ref_var = reference.batch_stats(x, axis=axis)
    std = np.sqrt(ref_var)
    scale = np.abs(ref_mean) + std
    # The mean is good to a few ulps of its scale; the variance to a few ulps, plus the
    # δ² term's rounding which grows with |mean|/std (Chan's merge is still exact there to
    # ~eps·|mean|/std relative, where E[x²] − E[x]² would lose everything).
    np.testing.assert_array_less(np.abs(moments.mean - ref_mean), 1e-13 * scale + 1e-300)
    np.testing.assert_array_less(
        np.abs(moments.var - ref_var), 1e-11 * ref_var + 1e-13 * np.abs(ref_mean) * std + 1e-300)


@st.composite
def split_batches(draw):
    """x, its feature axes (random spelling), a reduced axis, and a split into shards."""
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    n_kept = draw(st.integers(1, ndim))
    kept = sorted(draw(st.permutations(range(ndim)))[:n_kept])
    reduced = [a for a in range(ndim) if a not in kept]
    if not reduced:   # every axis kept: split a feature-free dimension cannot happen; add one
        shape = (draw(st.integers(1, 5)),) + shape
        kept = [a + 1 for a in kept]
        reduced = [0]
        ndim += 1
    axis = [a - ndim if draw(st.booleans()) else a for a in kept]
    split_axis = draw(st.sampled_from(reduced))
    total = draw(st.integers(1, 40))
    shape = shape[:split_axis] + (total,) + shape[split_axis + 1:]
    n_cuts = draw(st.integers(0, 6))
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=n_cuts, max_size=n_cuts)))
    offset = draw(st.sampled_from([0.0, 1.0, -3e3, 1e4, 1e6, -1e8]))
    spread = draw(st.sampled_from([1.0, 1e-3, 1e2]))
    seed = draw(st.integers(0, 2**32 - 1))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    rng = np.random.default_rng(seed)
    x = (offset + spread * rng.standard_normal(shape)).astype(dtype)
    return x, axis, split_axis, cuts


@examples(150)
@given(split_batches(), st.randoms(use_true_random=False))
def test_merge_of_any_split_matches_reference(case, rnd):
    x, axis, split_axis, cuts = case
    shards = np.split(x, cuts, axis=split_axis)          # unequal, possibly empty shards
    parts = [cbn.batch_moments(s, axis=axis) for s in shards]
    rnd.shuffle(parts)
    merged = cbn.merge_moments(parts)
    assert merged.count == x.size // np.prod(merged.feature_shape, dtype=int)
    assert merged.dtype == x.dtype
    assert merged.mean.dtype == merged.var.dtype == np.float64
    assert_stats_close(merged, x.astype(np.float64), axis)


@examples(60)
@given(split_batches(), st.randoms(use_true_random=False))
def test_merge_is_bitwise_order_independent(case, rnd):
    x, axis, split_axis, cuts = case
    parts = [cbn.batch_moments(s, axis=axis) for s in np.split(x, cuts, axis=split_axis)]
    first = cbn.merge_moments(parts)
    rnd.shuffle(parts)
    second = cbn.merge_moments(parts)
    assert first.count == second.count
    assert first.mean.tobytes() == second.mean.tobytes()
    assert first.m2.tobytes() == second.m2.tobytes()


def test_single_shard_is_batch_stats():
    x = np.random.default_rng(0).standard_normal((7, 3, 4))
    m = cbn.batch_moments(x, axis=(0, -1))
    mean, var = cbn.batch_stats(x, axis=(0, -1))
    assert m.count == 3 and m.feature_shape == (7, 4)
    np.testing.assert_array_equal(m.mean, mean)
    np.testing.assert_allclose(m.var, var, rtol=1e-15)
    merged = cbn.merge_moments([m])
    np.testing.assert_array_equal(merged.mean, m.mean)


def test_thousands_of_shards_with_huge_offset():
    rng = np.random.default_rng(1)
    sizes = rng.integers(0, 4, size=5000)                # many empty shards too
    x = 1e9 + rng.standard_normal((int(sizes.sum()), 3))
    shards = np.split(x, np.cumsum(sizes)[:-1])
    merged = cbn.merge_moments(cbn.batch_moments(s) for s in shards)
    assert merged.count == x.shape[0]
    assert_stats_close(merged, x, -1)
    # The naive merge of plain sums and squares is useless at this offset: this is the case
    # the exact merge exists for.
    naive_var = np.mean(x * x, axis=0) - np.mean(x, axis=0) ** 2
    exact_var = reference.batch_stats(x)[1]
    assert np.max(np.abs(naive_var - exact_var)) > 1.0
    np.testing.assert_allclose(merged.var, exact_var, rtol=1e-6)


def test_empty_shards():
    x = np.arange(12.0).reshape(4, 3)
    empty = cbn.batch_moments(x[:0])
    assert empty.count == 0 and empty.feature_shape == (3,)
    with pytest.raises(ValueError, match="zero elements"):
        empty.var
    with pytest.raises(ValueError, match="zero elements"):
        empty.mean
    merged = cbn.merge_moments([empty, cbn.batch_moments(x), empty])
    np.testing.assert_array_equal(merged.mean, reference.batch_stats(x)[0])
    all_empty = cbn.merge_moments([empty, empty])
    assert all_empty.count == 0 and all_empty.feature_shape == (3,)


def test_one_row_and_constant_feature():
    x = np.full((5, 2), 3.25)
    merged = cbn.merge_moments([cbn.batch_moments(x[i:i + 1]) for i in range(5)])
    np.testing.assert_array_equal(merged.mean, [3.25, 3.25])
    np.testing.assert_array_equal(merged.var, [0.0, 0.0])


def test_nan_stays_in_its_feature():
    x = np.random.default_rng(2).standard_normal((10, 3))
    x[4, 1] = np.nan
    merged = cbn.merge_moments([cbn.batch_moments(x[:3]), cbn.batch_moments(x[3:])])
    assert np.isnan(merged.mean[1]) and np.isnan(merged.var[1])
    assert np.all(np.isfinite(merged.mean[[0, 2]])) and np.all(np.isfinite(merged.var[[0, 2]]))


def test_feature_shape_mismatch_is_a_clear_error():
    a = cbn.batch_moments(np.ones((3, 4)))
    b = cbn.batch_moments(np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"different feature shapes.*\(4,\).*\(5,\)"):
        cbn.merge_moments([a, b])


def test_dtype_mismatch_is_a_clear_error():
    a = cbn.batch_moments(np.ones((3, 4), dtype=np.float32))
    b = cbn.batch_moments(np.ones((3, 4), dtype=np.float64))
    with pytest.raises(ValueError, match="different dtypes"):
        cbn.merge_moments([a, b])
    # Moments built by hand without a dtype merge with anything.
    c = cbn.Moments(2, np.zeros(4), np.zeros(4))
    assert cbn.merge_moments([a, c]).dtype == np.float32


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        cbn.merge_moments([])
    with pytest.raises(TypeError, match="Moments objects"):
        cbn.merge_moments([(1, 0.0, 0.0)])
    with pytest.raises(ValueError, match="count must be >= 0"):
        cbn.Moments(-1, [0.0], [0.0])
    with pytest.raises(TypeError, match="count must be an integer"):
        cbn.Moments(1.5, [0.0], [0.0])
    with pytest.raises(ValueError, match="shape"):
        cbn.Moments(1, [0.0, 1.0], [0.0])
    with pytest.raises(TypeError):
        cbn.batch_moments(np.arange(4))                   # integer data, as in batch_stats
    with pytest.raises(ValueError):
        cbn.batch_moments(np.ones((2, 3)), axis=2)


def test_inputs_unchanged_and_results_independent():
    x = np.random.default_rng(3).standard_normal((6, 2))
    x.setflags(write=False)
    m = cbn.batch_moments(x)
    mean = m.mean
    mean[:] = 99.0                                        # a copy: Moments are values
    assert not np.any(m.mean == 99.0)
