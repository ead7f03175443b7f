"""Folding an inference-mode batch normalization into the neighbouring linear layer.

After training, a BN layer computes ``y = γ·(z − μ)/sqrt(σ² + ε) + β`` with fixed moving
statistics, an affine map per feature. When ``z = x·W + b`` comes from a Dense or
convolution layer the two can be fused (Géron, *Hands-On Machine Learning*, ch. 11)::

    s  = γ / sqrt(σ² + ε)
    W' = W · s            (each output channel's kernel scaled by its s)
    b' = (b − μ)·s + β

The arithmetic is done by :func:`cbn.batch_norm_inference` itself: ``W'`` is that function
applied to ``W`` (output channels as features) with mean 0 and no β, and ``b'`` is it
applied to ``b``. So a folded model computes exactly what the kernels would.

A BN that comes *before* a Dense layer (for example right after a nonlinearity) folds into
that following layer instead; see :func:`fold_into_next_dense`.

All functions return new arrays in the floating dtype of ``W`` (float64 if ``W`` is not
floating) and never modify their inputs. ``gamma``/``beta`` may be None (``scale=False`` /
``center=False``) and ``b`` may be None (``use_bias=False``).
"""
import numpy as np

import cbn

__all__ = ["fold_dense", "fold_conv_hwio", "fold_conv_oihw", "fold_into_next_dense"]


def _as_kernel(W, name="W", ndim=None):
    W = np.asarray(W)
    if W.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {W.dtype}")
    if ndim is not None and W.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {W.shape}")
    if W.dtype.kind != "f":
        W = W.astype(np.float64)
    return W


def _as_vector(v, name, n):
    v = np.asarray(v)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {v.dtype}")
    if v.shape != (n,):
        raise ValueError(f"{name} has shape {v.shape}, expected ({n},) to match the kernel")
    return v.astype(np.float64)


def _bn_parameters(n, gamma, beta, moving_mean, moving_variance, epsilon):
    """The BN's four per-feature vectors, checked against the n features they act on."""
    moving_mean = _as_vector(moving_mean, "moving_mean", n)
    moving_variance = _as_vector(moving_variance, "moving_variance", n)
    gamma = None if gamma is None else _as_vector(gamma, "gamma", n)
    beta = None if beta is None else _as_vector(beta, "beta", n)
    if np.any(moving_variance + float(epsilon) <= 0):
        raise ValueError("moving_variance + epsilon must be > 0 for every feature")
    return gamma, beta, moving_mean, moving_variance


def _fold(W, b, gamma, beta, moving_mean, moving_variance, epsilon, channel_axis):
    n_channels = W.shape[channel_axis]
    gamma, beta, moving_mean, moving_variance = _bn_parameters(
        n_channels, gamma, beta, moving_mean, moving_variance, epsilon)
    bias = np.zeros(n_channels) if b is None else _as_vector(b, "b", n_channels)
    zeros = np.zeros(n_channels)
    W2 = cbn.batch_norm_inference(W, zeros, moving_variance, gamma, None,
                                  axis=channel_axis, epsilon=epsilon)
    b2 = cbn.batch_norm_inference(bias[np.newaxis, :], moving_mean, moving_variance, gamma,
                                  beta, axis=-1, epsilon=epsilon)[0]
    return W2, b2.astype(W2.dtype)


def fold_dense(W, b, gamma, beta, moving_mean, moving_variance, epsilon=1e-3):
    """Fold a BN (``axis=-1``) that follows a Dense layer into it.

    Parameters
    ----------
    W : array (n_in, n_out)
        Dense kernel, used as ``x @ W + b``.
    b : array (n_out,) or None
    gamma, beta : array (n_out,) or None
    moving_mean, moving_variance : array (n_out,)
    epsilon : float

    Returns
    -------
    W2, b2 : arrays (n_in, n_out) and (n_out,) with
        ``x @ W2 + b2 == BN_inference(x @ W + b)`` up to float rounding.
    """
    W = _as_kernel(W, ndim=2)
    return _fold(W, b, gamma, beta, moving_mean, moving_variance, epsilon, channel_axis=-1)


def fold_conv_hwio(W, b, gamma, beta, moving_mean, moving_variance, epsilon=1e-3):
    """Fold a channels-last BN into the convolution before it (Keras/TensorFlow layout).

    ``W`` has the Keras ``Conv2D`` kernel layout ``(kernel_h, kernel_w, in, out)`` (any
    number of leading spatial axes works: Conv1D/Conv3D kernels too); the BN normalises the
    last (channel) axis of the convolution's output.
    """
    W = _as_kernel(W)
    if W.ndim < 2:
        raise ValueError(f"W must be a (..., in, out) convolution kernel, got shape {W.shape}")
    return _fold(W, b, gamma, beta, moving_mean, moving_variance, epsilon, channel_axis=-1)


def fold_conv_oihw(W, b, gamma, beta, moving_mean, moving_variance, epsilon=1e-3):
    """Fold a channels-first BN (``BatchNorm2d``, ``axis=1``) into the convolution before it.

    ``W`` has the PyTorch ``Conv2d`` weight layout ``(out, in, kernel_h, kernel_w)`` (any
    number of trailing spatial axes works: Conv1d/Conv3d weights too).
    """
    W = _as_kernel(W)
    if W.ndim < 2:
        raise ValueError(f"W must be an (out, in, ...) convolution weight, got shape {W.shape}")
    return _fold(W, b, gamma, beta, moving_mean, moving_variance, epsilon, channel_axis=0)


def fold_into_next_dense(gamma, beta, moving_mean, moving_variance, W, b, epsilon=1e-3):
    """Fold a BN (``axis=-1``) whose output feeds a Dense layer into that Dense layer.

    With ``s = γ/sqrt(σ² + ε)`` and ``t = β − μ·s`` the BN is ``h·s + t``, so
    ``(h·s + t) @ W + b = h @ (s[:, None]·W) + (t @ W + b)``. This is the fold that applies
    when the BN sits after a nonlinearity (the chapter's "BN after each hidden layer" model)
    or right after the input.

    Returns ``W2, b2`` with ``h @ W2 + b2 == BN_inference(h) @ W + b`` up to rounding.
    """
    W = _as_kernel(W, ndim=2)
    n_in, n_out = W.shape
    gamma, beta, moving_mean, moving_variance = _bn_parameters(
        n_in, gamma, beta, moving_mean, moving_variance, epsilon)
    bias = np.zeros(n_out) if b is None else _as_vector(b, "b", n_out)
    W2 = cbn.batch_norm_inference(W, np.zeros(n_in), moving_variance, gamma, None,
                                  axis=0, epsilon=epsilon)
    # t = BN_inference(0): the image of the zero input.
    shift = cbn.batch_norm_inference(np.zeros((1, n_in)), moving_mean, moving_variance,
                                     gamma, beta, axis=-1, epsilon=epsilon)[0]
    b2 = shift @ W.astype(np.float64) + bias
    return W2, b2.astype(W2.dtype)
