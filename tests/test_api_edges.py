"""Fixed edge cases, numerics against float64 truth, and NaN/inf isolation."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cbn
from cbn import _kernels, reference

from layouts import assert_close, assert_statistics_close


def test_batch_of_one_gives_beta():
    x = np.array([[1.5, -2.0, 7.0]], np.float32)
    beta = np.array([0.25, -1.0, 3.0])
    y, mean, var = cbn.batch_norm_forward(x, np.array([2.0, 3.0, 4.0]), beta)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_array_equal(mean, x[0].astype(np.float64))
    np.testing.assert_array_equal(y, beta.astype(np.float32)[None, :])


def test_rank_one_keeps_every_entry_as_a_feature():
    x = np.arange(5.0)
    y, mean, var = cbn.batch_norm_forward(x, None, np.full(5, 0.5))
    np.testing.assert_array_equal(mean, x)
    np.testing.assert_array_equal(y, 0.5)


def test_rank_one_reduced_to_one_feature():
    x = np.array([1.0, 2.0, 3.0, 6.0])
    mean, var = cbn.batch_stats(x, axis=0)
    assert mean.shape == (4,)  # axis 0 is the only axis: it is kept
    x2 = x[:, None]
    mean, var = cbn.batch_stats(x2, axis=1)
    np.testing.assert_allclose(mean, [3.0])
    np.testing.assert_allclose(var, [3.5])


@pytest.mark.parametrize("shape,axis", [((7, 1), -1), ((1, 1, 4), [0, 2]), ((5, 1, 3), 1),
                                        ((2, 3, 1, 4), [1, 3]), ((1,), 0)])
def test_size_one_axes(shape, axis):
    x = np.random.default_rng(1).standard_normal(shape)
    for got, want in zip(cbn.batch_norm_forward(x, axis=axis),
                         reference.batch_norm_forward(x, axis=axis)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epsilon", [0.0, 1e-12, 1e-3, 1e6])
def test_epsilon_extremes(epsilon):
    x = np.random.default_rng(2).standard_normal((64, 3)) * 1e-4
    y, _, _ = cbn.batch_norm_forward(x, epsilon=epsilon)
    y_ref, _, _ = reference.batch_norm_forward(x, epsilon=epsilon)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-12)


def test_empty_feature_axis_gives_empty_results():
    x = np.zeros((4, 0))
    y, mean, var = cbn.batch_norm_forward(x)
    assert y.shape == (4, 0) and mean.shape == var.shape == (0,)


def test_large_offset_float32_matches_float64_truth():
    # Issue 2, point 4: mean 1e4, std 1e-2 in float32. Keras 3 misses y by ~0.1 here.
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.standard_normal((4096, 8))).astype(np.float32)
    truth = x.astype(np.float64)
    true_mean = truth.mean(axis=0)
    true_var = ((truth - true_mean) ** 2).mean(axis=0)
    y, mean, var = cbn.batch_norm_forward(x, epsilon=1e-3)
    np.testing.assert_allclose(mean, true_mean, rtol=1e-12)
    np.testing.assert_allclose(var, true_var, rtol=1e-5)
    y_true = (truth - true_mean) / np.sqrt(true_var + 1e-3)
    assert np.abs(y - y_true).max() < 1e-3
    y_inf = cbn.batch_norm_inference(x, mean, var, epsilon=1e-3)
    assert np.abs(y_inf - y_true).max() < 1e-3


def test_naive_moments_would_fail_this_data():
    # Guards the test above: E[x^2] - E[x]^2 in float32 is far off on the same data.
    x = (1e4 + 1e-2 * np.random.default_rng(3).standard_normal((4096, 8))).astype(np.float32)
    naive = (x * x).mean(axis=0) - x.mean(axis=0) ** 2
    true_var = x.astype(np.float64).var(axis=0)
    assert np.abs(naive - true_var).max() > 1e-2 * true_var.max()


@pytest.mark.parametrize("layout", ["features_inner", "rows_inner"])
def test_nan_and_inf_stay_in_their_feature(layout):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 6))
    x[3, 1] = np.nan
    x[7, 4] = np.inf
    if layout == "rows_inner":
        x = np.asfortranarray(x)
    y, mean, var = cbn.batch_norm_forward(x)
    dx, dgamma, dbeta = cbn.batch_norm_backward(np.ones_like(x), x, mean, var)
    clean = [0, 2, 3, 5]
    for result in (mean, var, dgamma):
        assert not np.isfinite(result[[1, 4]]).any() and np.isfinite(result[clean]).all()
    assert np.isnan(var[[1, 4]]).all()  # inf - inf: the poisoned features have no variance
    assert np.isnan(y[:, [1, 4]]).all() and np.isfinite(y[:, clean]).all()
    assert np.isfinite(dx[:, clean]).all()
    y_ref, _, _ = reference.batch_norm_forward(x[:, clean])
    np.testing.assert_allclose(y[:, clean], y_ref, rtol=1e-12, atol=1e-12)


def test_out_buffers_are_filled_and_returned():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 8)).astype(np.float32)
    out = np.empty_like(x)
    y, mean, var = cbn.batch_norm_forward(x, out=out)
    assert y is out
    np.testing.assert_allclose(out, reference.batch_norm_forward(x)[0], atol=1e-6)
    dx_out = np.asfortranarray(np.empty_like(x))
    dx, _, _ = cbn.batch_norm_backward(x, x, mean, var, out=dx_out)
    assert dx is dx_out
    np.testing.assert_allclose(dx, reference.batch_norm_backward(x, x, mean, var)[0], atol=1e-5)
    y16 = np.empty(x.shape, np.float16)
    assert cbn.batch_norm_inference(x.astype(np.float16), mean, var, out=y16) is y16


def test_output_keeps_memory_order_of_input():
    x = np.random.default_rng(6).standard_normal((8, 16, 4)).transpose(2, 0, 1)
    y, _, _ = cbn.batch_norm_forward(x, axis=0)
    assert y.strides == np.empty_like(x, order="K").strides
    assert not y.flags.c_contiguous


def test_in_place_output_is_allowed():
    x = np.random.default_rng(7).standard_normal((32, 4))
    expected = reference.batch_norm_forward(x)[0]
    y, _, _ = cbn.batch_norm_forward(x, out=x)
    assert y is x
    np.testing.assert_allclose(x, expected, rtol=1e-12, atol=1e-12)


def test_backward_in_place_on_dy_is_allowed():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40, 3, 5))
    dy = rng.standard_normal(x.shape)
    mean, var = reference.batch_stats(x, axis=1)
    expected = reference.batch_norm_backward(dy, x, mean, var, axis=1)[0]
    dx, _, _ = cbn.batch_norm_backward(dy, x, mean, var, axis=1, out=dy)
    assert dx is dy
    np.testing.assert_allclose(dy, expected, rtol=1e-12, atol=1e-12)


def test_byte_swapped_and_misaligned_inputs():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((30, 4))
    swapped = x.astype(x.dtype.newbyteorder(">" if np.little_endian else "<"))
    raw = np.zeros(x.nbytes + 1, np.uint8)[1:]          # float64 data at an odd address
    misaligned = raw.view(np.float64).reshape(x.shape)
    misaligned[...] = x
    assert not misaligned.flags.aligned
    expected = reference.batch_norm_forward(x)
    for variant in (swapped, misaligned):
        for got, want in zip(cbn.batch_norm_forward(variant), expected):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,width", [((19, 8, 7, 7), 7), ((16, 4, 4, 4), 4), ((19, 6, 7, 14), 7),
                                         ((19, 6, 7, 14), slice(None, None, 2)),
                                         ((44, 80, 7, 7), 7)])
def test_short_planes_statistics_and_gradient_sums(shape, width, dtype):
    """NCHW planes of a few dozen values: the statistics and the backward's sums take
    several images' planes of a channel at once (up to a tile's end, within a chunk). Half
    of a wider W keeps H and W apart: the planes are then rows of 7 at tabled offsets
    (every other W: not contiguous, summed element by element). (44, 80, 7, 7) is two
    chunks of 22 images, each ending in a shorter tile: the same bits on two threads."""
    rng = np.random.default_rng(3)
    cut = (Ellipsis, width if isinstance(width, slice) else slice(width))
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)[cut]
    dy = rng.standard_normal(shape).astype(dtype)[cut]
    gamma = rng.standard_normal(shape[1])
    mean, var = cbn.batch_stats(x, axis=1)
    assert_statistics_close(mean, var, *reference.batch_stats(x, axis=1), x)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=1)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy, x, mean, var, gamma,
                                                                  axis=1)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-11, atol=1e-11)
    assert_close(dx, dx_ref, dtype, condition=1e4)
    if cbn.openmp_enabled():
        old = _kernels.set_parallel_min_bytes(0)
        try:
            with threadpool_limits(2, user_api="openmp"):
                again = (*cbn.batch_stats(x, axis=1),
                         *cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=1))
        finally:
            _kernels.set_parallel_min_bytes(old)
        for a, b in zip(again, (mean, var, dx, dgamma, dbeta)):
            assert a.tobytes() == b.tobytes()


def same_bits(a, b):
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,flip", [((9, 6, 7, 19), 1, (3,)), ((9, 6, 7, 19), 1, (2, 3)),
                                             ((9, 6, 7, 19), 1, (0, 3)), ((5, 7, 9, 6), -1, (2,)),
                                             ((40, 13), -1, (0,)), ((9, 6, 7, 19), 1, (1, 3)),
                                             ((9, 6, 7, 19), 1, (1,)), ((5, 7, 9, 6), -1, (3,)),
                                             ((5, 7, 9, 70), -1, (2, 3)), ((40, 13), -1, (1,))])
def test_flipped_views_give_the_flipped_bits(shape, axis, flip, dtype):
    """A reduced axis that every operand walks backwards (a flipped image, x[..., ::-1],
    its gradient and out=) is walked forwards: the call then reads memory as the call on
    the unflipped arrays does and gives its bits, flipped; beside a fresh (C-ordered)
    output the sums are taken in x's and dy's own plan, so the same bits. A flipped feature
    axis (channels reversed) is walked forwards too, its features numbered from the last:
    each feature's sums run as in the unflipped call, so the same bits, flipped."""
    rng = np.random.default_rng(len(flip) * 10 + axis)
    x_mem = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy_mem = rng.standard_normal(shape).astype(dtype)
    flipped = tuple(slice(None, None, -1) if a in flip else slice(None) for a in range(len(shape)))
    features = tuple(slice(None, None, -1) if a in flip else slice(None)
                     for a in range(len(shape)) if a == axis % len(shape))
    x, dy = x_mem[flipped], dy_mem[flipped]
    mean, var = cbn.batch_stats(x, axis=axis)
    mean_mem, var_mem = cbn.batch_stats(x_mem, axis=axis)
    assert same_bits(mean, mean_mem[features]) and same_bits(var, var_mem[features])
    y_mem = cbn.batch_norm_forward(x_mem, axis=axis)[0]
    own = cbn.batch_norm_backward(dy_mem, x_mem, mean_mem, var_mem, axis=axis)
    for out in (None, np.empty_like(x_mem)[flipped]):   # a fresh output, or flipped too
        y = cbn.batch_norm_forward(x, axis=axis, out=out)[0]
        assert same_bits(y, y_mem[flipped])
        got = cbn.batch_norm_backward(dy, x, mean, var, axis=axis,
                                      out=None if out is None else np.empty_like(x_mem)[flipped])
        assert same_bits(got[0], own[0][flipped])
        assert same_bits(got[1], own[1][features]) and same_bits(got[2], own[2][features])
    assert_close(y, reference.batch_norm_forward(x, axis=axis)[0], dtype, condition=100)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("step", [2, 3])
@pytest.mark.parametrize("length", [7, 8, 31, 32, 33, 100])
def test_stepped_runs_are_summed_as_contiguous_ones(length, step, dtype):
    """Runs whose elements are a step apart (every other column) are summed by the same
    vector loops as contiguous runs, their elements gathered: the statistics and the
    backward's sums equal, bit for bit, those of a contiguous copy."""
    rng = np.random.default_rng(length * 10 + step)
    x = (rng.standard_normal((5, abs(step) * length)) * 3 + 1).astype(dtype)[:, ::step]
    dy = rng.standard_normal(x.shape).astype(dtype)
    x_copy, dy_copy = np.ascontiguousarray(x), np.ascontiguousarray(dy)
    stats = cbn.batch_stats(x, axis=0)
    assert all(same_bits(a, b) for a, b in zip(stats, cbn.batch_stats(x_copy, axis=0)))
    got = cbn.batch_norm_backward(dy, x, *stats, axis=0)
    own = cbn.batch_norm_backward(dy_copy, x_copy, *stats, axis=0)
    assert all(same_bits(a, b) for a, b in zip(got, own))
    assert_statistics_close(*stats, *reference.batch_stats(x, axis=0), x)
