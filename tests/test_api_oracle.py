"""The kernels agree with cbn.reference on every layout, dtype and choice of axes."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cbn
from cbn import reference

from budget import examples
from layouts import (assert_close, assert_statistics_close, batch_norm_case, condition,
                     feature_shape, in_layout, sized_batch_norm_case, streaming_stores)


@examples(150)
@given(batch_norm_case())
def test_batch_stats_matches_reference(case):
    x, axis, axes, _ = case
    before = x.copy()
    mean, var = cbn.batch_stats(x, axis=axis)
    mean_ref, var_ref = reference.batch_stats(x, axis=axis)
    assert mean.dtype == var.dtype == np.float64
    assert mean.shape == var.shape == feature_shape(x, axes)
    assert_statistics_close(mean, var, mean_ref, var_ref, x)
    np.testing.assert_array_equal(x, before)


# epsilon 0 on a constant feature is 0/0 in the reference too: NaN, checked below.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@examples(150)
@given(batch_norm_case())
def test_forward_and_inference_match_reference(case):
    x, axis, axes, rng = case
    features = feature_shape(x, axes)
    gamma = rng.standard_normal(features) if rng.random() < 0.8 else None
    beta = rng.standard_normal(features).astype(np.float32) if rng.random() < 0.8 else None
    epsilon = float(rng.choice([0.0, 1e-5, 1e-3, 1.0]))
    before = x.copy()
    y, mean, var = cbn.batch_norm_forward(x, gamma, beta, axis=axis, epsilon=epsilon)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, gamma, beta, axis=axis,
                                                            epsilon=epsilon)
    assert y.dtype == x.dtype and y.shape == x.shape
    finite = np.isfinite(y_ref)  # epsilon 0 with constant features gives 0/0 in both
    np.testing.assert_array_equal(np.isfinite(y), finite)
    assert_close(y[finite], y_ref[finite], x.dtype, condition(x, var_ref, gamma, epsilon))
    assert mean.dtype == var.dtype == np.float64 and mean.shape == var.shape == features
    assert_statistics_close(mean, var, mean_ref, var_ref, x)

    moving_mean = mean_ref + rng.standard_normal(features)
    moving_var = var_ref + rng.random(features)
    y_inf = cbn.batch_norm_inference(x, moving_mean, moving_var, gamma, beta, axis=axis,
                                     epsilon=epsilon)
    y_inf_ref = reference.batch_norm_inference(x, moving_mean, moving_var, gamma, beta,
                                               axis=axis, epsilon=epsilon)
    assert y_inf.dtype == x.dtype
    assert_close(y_inf, y_inf_ref, x.dtype, condition(x, moving_var, gamma, epsilon))
    np.testing.assert_array_equal(x, before)


@examples(150)
@given(batch_norm_case())
def test_backward_matches_reference(case):
    x, axis, axes, rng = case
    features = feature_shape(x, axes)
    gamma = rng.standard_normal(features) if rng.random() < 0.8 else None
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    mean, var = reference.batch_stats(x, axis=axis)
    before = x.copy(), dy.copy()
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy, x, mean, var, gamma,
                                                                  axis=axis)
    assert dx.dtype == x.dtype and dgamma.dtype == dbeta.dtype == np.float64
    assert dgamma.shape == dbeta.shape == features
    assert_close(dx, dx_ref, x.dtype,
                 condition(x, var, gamma, 1e-3) * np.abs(dy.astype(np.float64)).max(initial=1.0))
    scale = 1.0 + np.abs(dy.astype(np.float64)).sum()
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(dy, before[1])


@examples(100)
@given(batch_norm_case(), st.sampled_from(["C", "F", "transposed", "stepped", "reversed"]))
def test_out_buffers_of_any_layout(case, out_layout):
    x, axis, axes, rng = case
    mean, var = reference.batch_stats(x, axis=axis)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    expected = {"forward": reference.batch_norm_forward(x, axis=axis)[0],
                "inference": reference.batch_norm_inference(x, mean, var, axis=axis),
                "backward": reference.batch_norm_backward(dy, x, mean, var, axis=axis)[0]}
    calls = {"forward": lambda out: cbn.batch_norm_forward(x, axis=axis, out=out)[0],
             "inference": lambda out: cbn.batch_norm_inference(x, mean, var, axis=axis, out=out),
             "backward": lambda out: cbn.batch_norm_backward(dy, x, mean, var, axis=axis,
                                                             out=out)[0]}
    for name, call in calls.items():
        out = in_layout(np.full(x.shape, np.nan, x.dtype), out_layout, rng)
        assert call(out) is out
        finite = np.isfinite(expected[name])
        assert_close(out[finite], expected[name][finite], x.dtype,
                     condition(x, var, None, 1e-3) * max(1.0, float(np.abs(dy).max())))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@examples(30)
@given(sized_batch_norm_case(), st.booleans())
def test_every_output_matches_reference_past_vector_widths_and_chunks(case, streaming):
    """Wide features and batches of several blocks and chunks, stored both ways."""
    x, axis, axes, rng = case
    features = feature_shape(x, axes)
    gamma, beta = rng.standard_normal(features), rng.standard_normal(features)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    before = x.copy()
    with streaming_stores(streaming):
        stats = cbn.batch_stats(x, axis=axis)
        y, mean, var = cbn.batch_norm_forward(x, gamma, beta, axis=axis)
        y_inf = cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis)
        dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, gamma, beta, axis=axis)
    for got_mean, got_var in (stats, (mean, var)):
        assert_statistics_close(got_mean, got_var, mean_ref, var_ref, x)
    tol = condition(x, var_ref, gamma, 1e-3)
    assert_close(y, y_ref, x.dtype, tol)
    assert_close(y_inf, y_ref, x.dtype, tol)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy, x, mean, var, gamma,
                                                                  axis=axis)
    assert_close(dx, dx_ref, x.dtype, tol * float(np.abs(dy).max()))
    scale = 1.0 + np.abs(dy.astype(np.float64)).sum()
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_array_equal(x, before)
