"""Folding BN into Dense/conv layers: the folded layer against an unfolded one computed with
plain float64 NumPy (a direct convolution written here, BN from its formula)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cbn

from budget import examples

EPS = 1e-3


def bn_inference(z, gamma, beta, mean, var, axis, eps=EPS):
    """The BN inference formula in float64, parameters broadcast along ``axis``."""
    shape = [1] * z.ndim
    shape[axis] = z.shape[axis]
    b = lambda v, default: (np.full(shape, default) if v is None  # noqa: E731
                            else np.asarray(v, np.float64).reshape(shape))
    return b(gamma, 1.0) * (z - b(mean, 0)) / np.sqrt(b(var, 0) + eps) + b(beta, 0.0)


def conv_nhwc(x, W_hwio, b):
    """Direct 'valid' cross-correlation, channels last (Keras Conv2D)."""
    kh, kw = W_hwio.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    out = np.einsum("nhwcij,ijco->nhwo", windows, W_hwio)
    return out if b is None else out + b


def conv_nchw(x, W_oihw, b):
    """Direct 'valid' cross-correlation, channels first (PyTorch Conv2d)."""
    kh, kw = W_oihw.shape[2:]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    out = np.einsum("nchwij,ocij->nohw", windows, W_oihw)
    return out if b is None else out + b[:, None, None]


def bn_params(rng, n, scale=True, center=True):
    gamma = rng.normal(size=n) if scale else None
    beta = rng.normal(size=n) if center else None
    return gamma, beta, rng.normal(size=n), rng.uniform(0.2, 3.0, size=n)


def test_conv_helpers_agree_with_scipy():
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(1, 6, 5, 1)), rng.normal(size=(3, 2, 1, 1))
    expected = signal.correlate2d(x[0, :, :, 0], W[:, :, 0, 0], mode="valid")
    np.testing.assert_allclose(conv_nhwc(x, W, None)[0, :, :, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(conv_nchw(x.transpose(0, 3, 1, 2), W.transpose(3, 2, 0, 1),
                                         None)[0, 0], expected, rtol=1e-12)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("scale,center", [(True, True), (False, True), (True, False),
                                          (False, False)])
def test_fold_dense(use_bias, scale, center):
    rng = np.random.default_rng(1)
    x, W = rng.normal(size=(7, 5)), rng.normal(size=(5, 4))
    b = rng.normal(size=4) if use_bias else None
    gamma, beta, mean, var = bn_params(rng, 4, scale, center)
    W2, b2 = cbn.fold_dense(W, b, gamma, beta, mean, var, epsilon=EPS)
    z = x @ W + (0 if b is None else b)
    np.testing.assert_allclose(x @ W2 + b2, bn_inference(z, gamma, beta, mean, var, -1),
                               rtol=1e-12, atol=1e-12)
    assert W2.shape == W.shape and b2.shape == (4,)


def test_fold_dense_matches_layer_inference():
    rng = np.random.default_rng(2)
    x, W, b = rng.normal(size=(6, 3)), rng.normal(size=(3, 4)), rng.normal(size=4)
    layer = cbn.BatchNormalization(epsilon=0.01)
    layer(rng.normal(2.0, 3.0, size=(50, 4)), training=True)
    W2, b2 = cbn.fold_dense(W, b, *layer.get_weights(), epsilon=layer.epsilon)
    np.testing.assert_allclose(x @ W2 + b2, layer(x @ W + b), rtol=1e-12, atol=1e-12)


def test_fold_keeps_float32_and_does_not_modify_inputs():
    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=2).astype(np.float32)
    params = bn_params(rng, 2)
    copies = [W.copy(), b.copy()] + [p.copy() for p in params]
    W2, b2 = cbn.fold_dense(W, b, *params)
    assert W2.dtype == np.float32 and b2.dtype == np.float32
    for original, copy in zip([W, b, *params], copies):
        np.testing.assert_array_equal(original, copy)
    W_int = np.arange(6).reshape(3, 2)
    assert cbn.fold_dense(W_int, None, None, None, [0, 0], [1, 1])[0].dtype == np.float64


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_conv_hwio(use_bias):
    rng = np.random.default_rng(4)
    x, W = rng.normal(size=(2, 6, 5, 3)), rng.normal(size=(3, 2, 3, 4))
    b = rng.normal(size=4) if use_bias else None
    gamma, beta, mean, var = bn_params(rng, 4)
    W2, b2 = cbn.fold_conv_hwio(W, b, gamma, beta, mean, var, epsilon=EPS)
    expected = bn_inference(conv_nhwc(x, W, b), gamma, beta, mean, var, axis=-1)
    np.testing.assert_allclose(conv_nhwc(x, W2, b2), expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_conv_oihw(use_bias):
    rng = np.random.default_rng(5)
    x, W = rng.normal(size=(2, 3, 6, 5)), rng.normal(size=(4, 3, 2, 3))
    b = rng.normal(size=4) if use_bias else None
    gamma, beta, mean, var = bn_params(rng, 4)
    W2, b2 = cbn.fold_conv_oihw(W, b, gamma, beta, mean, var, epsilon=EPS)
    expected = bn_inference(conv_nchw(x, W, b), gamma, beta, mean, var, axis=1)
    np.testing.assert_allclose(conv_nchw(x, W2, b2), expected, rtol=1e-11, atol=1e-11)


def test_fold_conv1d_kernels():
    rng = np.random.default_rng(6)
    W_wio = rng.normal(size=(3, 2, 5))          # Keras Conv1D kernel
    gamma, beta, mean, var = bn_params(rng, 5)
    W2, _ = cbn.fold_conv_hwio(W_wio, None, gamma, beta, mean, var)
    np.testing.assert_allclose(W2, W_wio * gamma / np.sqrt(var + EPS), rtol=1e-13)
    W_oiw = W_wio.transpose(2, 1, 0)            # PyTorch Conv1d weight
    W3, _ = cbn.fold_conv_oihw(W_oiw, None, gamma, beta, mean, var)
    np.testing.assert_allclose(W3, W2.transpose(2, 1, 0), rtol=1e-13)


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_into_next_dense(use_bias):
    rng = np.random.default_rng(7)
    h, W = rng.normal(size=(6, 5)), rng.normal(size=(5, 3))
    b = rng.normal(size=3) if use_bias else None
    gamma, beta, mean, var = bn_params(rng, 5)
    W2, b2 = cbn.fold_into_next_dense(gamma, beta, mean, var, W, b, epsilon=EPS)
    expected = bn_inference(h, gamma, beta, mean, var, -1) @ W + (0 if b is None else b)
    np.testing.assert_allclose(h @ W2 + b2, expected, rtol=1e-12, atol=1e-12)


@examples(30)
@given(n_in=st.integers(1, 6), n_out=st.integers(1, 6), seed=st.integers(0, 2**31),
       eps=st.sampled_from([0.0, 1e-5, 1e-3, 0.5]))
def test_fold_dense_random(n_in, n_out, seed, eps):
    rng = np.random.default_rng(seed)
    x, W, b = rng.normal(size=(4, n_in)), rng.normal(size=(n_in, n_out)), rng.normal(size=n_out)
    gamma, beta, mean, var = bn_params(rng, n_out)
    W2, b2 = cbn.fold_dense(W, b, gamma, beta, mean, var, epsilon=eps)
    expected = bn_inference(x @ W + b, gamma, beta, mean, var, -1, eps=eps)
    np.testing.assert_allclose(x @ W2 + b2, expected, rtol=1e-10, atol=1e-10)


def test_bad_inputs():
    W = np.ones((3, 2))
    good = dict(gamma=None, beta=None, moving_mean=np.zeros(2), moving_variance=np.ones(2))
    with pytest.raises(ValueError, match="moving_mean has shape"):
        cbn.fold_dense(W, None, **{**good, "moving_mean": np.zeros(3)})
    with pytest.raises(ValueError, match="b has shape"):
        cbn.fold_dense(W, np.zeros(3), **good)
    with pytest.raises(ValueError, match="2 dimensions"):
        cbn.fold_dense(np.ones((3, 2, 1)), None, **good)
    with pytest.raises(TypeError):
        cbn.fold_dense(np.array([["a", "b"]]), None, **good)
    with pytest.raises(ValueError, match="> 0"):
        cbn.fold_dense(W, None, None, None, np.zeros(2), np.zeros(2), epsilon=0.0)
    with pytest.raises(ValueError, match="gamma has shape"):
        cbn.fold_conv_oihw(np.ones((2, 3, 1, 1)), None, np.ones(3), None, np.zeros(2),
                           np.ones(2))
    with pytest.raises(ValueError, match="moving_mean has shape"):
        cbn.fold_into_next_dense(None, None, np.zeros(2), np.ones(2), W, None)
