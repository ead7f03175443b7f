"""Results are bitwise identical whatever the thread count, on every kernel path.

The cases are large enough to be split into many chunks and run in parallel; they are
also checked against the reference, so a wrong parallel split cannot hide.
"""
import os

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import cbn
from cbn import _kernels, reference

CASES = {
    # name: (shape, axis, layout) -- which kernel path each exercises
    "features inner, many chunks": ((20000, 64), -1, "C"),
    "features inner, feature tiles": ((64, 3000), -1, "C"),
    "rows inner, fused per feature": ((8, 64, 32, 32), 1, "C"),
    "rows inner, chunked features": ((4, 3, 256, 256), 1, "C"),
    "rows inner, streaming stores": ((8, 16, 200, 260), 1, "C"),   # output over 16 MB
    "features inner, streaming stores": ((60000, 75), -1, "C"),    # rows wrap mid-vector
    "transposed view": ((512, 768), -1, "T"),
    "non-adjacent kept axes": ((16, 6, 40, 5, 20), [1, 3], "C"),
}


def make(shape, layout, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype) * 2 + 1
    return np.ascontiguousarray(x.T).T if layout == "T" else x


def run_all(x, axis):
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    y, mean, var = cbn.batch_norm_forward(x, axis=axis)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, axis=axis)
    y_inf = cbn.batch_norm_inference(x, mean, var, axis=axis)
    return (y, mean, var, dx, dgamma, dbeta, y_inf), dy


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_bitwise_identical_for_one_and_two_threads(case, dtype):
    shape, axis, layout = CASES[case]
    x = make(shape, layout, dtype)
    with threadpool_limits(1, user_api="openmp"):
        assert _kernels.max_threads() == 1
        serial, _ = run_all(x, axis)
    with threadpool_limits(2, user_api="openmp"):
        assert _kernels.max_threads() == 2
        parallel, dy = run_all(x, axis)
    for a, b in zip(serial, parallel):
        assert a.dtype == b.dtype
        assert a.tobytes() == b.tobytes()

    y_ref, mean_ref, var_ref = reference.batch_norm_forward(x, axis=axis)
    np.testing.assert_allclose(parallel[1], mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parallel[2], var_ref, rtol=1e-11)
    tolerance = 1e-5 if dtype == np.float32 else 1e-11
    np.testing.assert_allclose(parallel[0], y_ref, atol=tolerance * 10)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy, x, mean_ref, var_ref,
                                                                  axis=axis)
    np.testing.assert_allclose(parallel[3], dx_ref, atol=tolerance * 10)
    np.testing.assert_allclose(parallel[4], dgamma_ref, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(parallel[5], dbeta_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.skipif(os.environ.get("CBN_OPENMP") == "0", reason="serial build requested")
def test_build_has_openmp():
    # gcc with libgomp is on every machine this project builds on: serial there is a bug.
    assert cbn.openmp_enabled()
