"""Kernel initializers with Keras' definitions (fan_in/fan_out of a Dense kernel).

Keras' "normal" variance-scaling initializers draw from a normal truncated at two standard
deviations, whose standard deviation is then ``0.87962566103423978`` of the nominal one;
they divide the nominal value by that constant so the variance is as intended.
"""
import numpy as np

from . import config

__all__ = ["get", "NAMES"]

_TRUNCATED_STD = 0.87962566103423978


def _fans(shape):
    if len(shape) < 2:
        return shape[0], shape[0]
    receptive = int(np.prod(shape[:-2]))
    return shape[-2] * receptive, shape[-1] * receptive


def _truncated_normal(shape, std, rng):
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2
    return values * (std / _TRUNCATED_STD)


def _variance_scaling(scale, mode, distribution):
    def initializer(shape, dtype=None, rng=None):
        rng = config.generator() if rng is None else rng
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
        if distribution == "uniform":
            limit = np.sqrt(3.0 * scale / n)
            values = rng.uniform(-limit, limit, size=shape)
        else:
            values = _truncated_normal(shape, np.sqrt(scale / n), rng)
        return values.astype(dtype or config.floatx())
    return initializer


def _constant(value):
    def initializer(shape, dtype=None, rng=None):
        return np.full(shape, value, dtype=dtype or config.floatx())
    return initializer


_INITIALIZERS = {
    "glorot_uniform": _variance_scaling(1.0, "fan_avg", "uniform"),
    "glorot_normal": _variance_scaling(1.0, "fan_avg", "normal"),
    "he_normal": _variance_scaling(2.0, "fan_in", "normal"),
    "he_uniform": _variance_scaling(2.0, "fan_in", "uniform"),
    "lecun_normal": _variance_scaling(1.0, "fan_in", "normal"),
    "zeros": _constant(0.0),
    "ones": _constant(1.0),
}
NAMES = tuple(_INITIALIZERS)


def get(initializer):
    """An initializer ``f(shape, dtype)`` from a Keras name or a callable."""
    if callable(initializer):
        return initializer
    if initializer not in _INITIALIZERS:
        raise ValueError(f"unknown initializer {initializer!r}; use a callable "
                         f"f(shape, dtype) or one of {', '.join(NAMES)}")
    return _INITIALIZERS[initializer]
