"""Bad input gets a clear exception that names the problem, and nothing is modified."""
import numpy as np
import pytest

import cbn
from cbn import reference

X = np.random.default_rng(0).standard_normal((6, 4))
MEAN, VAR = X.mean(axis=0), X.var(axis=0)
CALLS = {
    "stats": lambda x, **kw: cbn.batch_stats(x, **kw),
    "forward": lambda x, **kw: cbn.batch_norm_forward(x, **kw),
    "inference": lambda x, **kw: cbn.batch_norm_inference(x, MEAN, VAR, **kw),
    "backward": lambda x, **kw: cbn.batch_norm_backward(x, x, MEAN, VAR, **kw),
}


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.complex128, np.bool_, object])
def test_non_float_dtype_is_a_type_error(call, dtype):
    x = X.astype(dtype)
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        CALLS[call](x)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("axis,message", [(2, "out of range"), (-3, "out of range"),
                                          ([0, -2], "same axis twice"), ([], "at least one")])
def test_bad_axis_is_a_value_error(call, axis, message):
    with pytest.raises(ValueError, match=message):
        CALLS[call](X, axis=axis)


@pytest.mark.parametrize("call", [c for c in CALLS if c != "inference"])   # needs no stats
def test_empty_reduction_is_a_value_error(call):
    with pytest.raises(ValueError, match="zero elements"):
        CALLS[call](np.zeros((0, 4)))


def test_parameter_of_wrong_shape():
    with pytest.raises(ValueError, match="gamma has shape"):
        cbn.batch_norm_forward(X, np.ones(3))
    with pytest.raises(ValueError, match="beta has shape"):
        cbn.batch_norm_forward(X, None, np.ones((4, 1)))
    with pytest.raises(ValueError, match="mean has shape"):
        cbn.batch_norm_inference(X, np.ones(6), VAR)
    with pytest.raises(ValueError, match="var has shape"):
        cbn.batch_norm_backward(X, X, MEAN, np.ones(5))


def test_parameter_of_bad_dtype():
    with pytest.raises(TypeError, match="gamma must be a real numeric array"):
        cbn.batch_norm_forward(X, np.ones(4, complex))


def test_missing_statistics():
    with pytest.raises(TypeError, match="mean is required"):
        cbn.batch_norm_inference(X, None, VAR)


def test_dy_of_other_shape():
    with pytest.raises(ValueError, match="dy has shape"):
        cbn.batch_norm_backward(X[:5], X, MEAN, VAR)


def test_bad_epsilon():
    for epsilon in (-1e-3, np.nan, np.inf):
        with pytest.raises(ValueError, match="epsilon"):
            cbn.batch_norm_forward(X, epsilon=epsilon)


def test_bad_out_buffers():
    with pytest.raises(ValueError, match="shape"):
        cbn.batch_norm_forward(X, out=np.empty((4, 6)))
    with pytest.raises(ValueError, match="dtype"):
        cbn.batch_norm_forward(X, out=np.empty((6, 4), np.float32))
    readonly = np.empty_like(X)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cbn.batch_norm_forward(X, out=readonly)
    big = np.empty((7, 4))
    with pytest.raises(ValueError, match="overlaps"):
        cbn.batch_norm_forward(big[:6], out=big[1:])
    with pytest.raises(ValueError, match="overlaps"):
        cbn.batch_norm_backward(big[1:], big[:6].copy(), MEAN, VAR, out=big[:6])
    with pytest.raises(TypeError, match="ndarray"):
        cbn.batch_norm_forward(X, out=[0.0] * 24)


def test_scalar_input():
    with pytest.raises(ValueError, match="at least one dimension"):
        cbn.batch_stats(np.float64(3.0))


@pytest.mark.parametrize("module", [cbn, reference])
def test_mixed_parameter_dtypes_follow_the_stated_rule(module):
    # Parameters of any real dtype are used in float64; y keeps x's dtype.
    x = X.astype(np.float32)
    y, mean, var = module.batch_norm_forward(x, np.ones(4, np.int64), np.zeros(4, np.float16))
    assert y.dtype == np.float32 and mean.dtype == var.dtype == np.float64
    dx, dgamma, dbeta = module.batch_norm_backward(X, x, mean, var)
    assert dx.dtype == np.float32 and dgamma.dtype == dbeta.dtype == np.float64
