"""Activation functions and their derivatives, by Keras name.

Each activation is a pair ``forward(z) -> y`` and ``backward(dy, z, y) -> dz`` so that the
derivative can reuse the forward output (σ' = σ(1 − σ), tanh' = 1 − tanh², elu' = y + 1 for
z ≤ 0). ``softmax`` works on the last axis.
"""
import numpy as np

__all__ = ["get", "NAMES"]


def _linear(z):
    return z


def _linear_backward(dy, z, y):
    return dy


def _relu(z):
    return np.maximum(z, 0)


def _relu_backward(dy, z, y):
    return dy * (z > 0)


def _elu(z):
    return np.where(z > 0, z, np.expm1(np.minimum(z, 0)))


def _elu_backward(dy, z, y):
    return dy * np.where(z > 0, 1, y + 1)


def _sigmoid(z):
    e = np.exp(-np.abs(z))                    # never overflows
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def _sigmoid_backward(dy, z, y):
    return dy * y * (1 - y)


def _tanh(z):
    return np.tanh(z)


def _tanh_backward(dy, z, y):
    return dy * (1 - y * y)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_backward(dy, z, y):
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


_ACTIVATIONS = {
    "linear": (_linear, _linear_backward),
    "relu": (_relu, _relu_backward),
    "elu": (_elu, _elu_backward),
    "sigmoid": (_sigmoid, _sigmoid_backward),
    "tanh": (_tanh, _tanh_backward),
    "softmax": (_softmax, _softmax_backward),
}
NAMES = tuple(_ACTIVATIONS)


def get(name):
    """``(name, forward, backward)`` for a Keras activation name (None means linear)."""
    name = "linear" if name is None else name
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(NAMES)}")
    return (name,) + _ACTIVATIONS[name]
