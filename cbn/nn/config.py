"""Global settings of cbn.nn, as Keras keeps them: the random generator and the float type.

``set_random_seed(seed)`` makes weight initialisation and shuffling reproducible (like
``keras.utils.set_random_seed``); ``set_floatx("float64")`` makes new layers compute in
float64 (like ``keras.backend.set_floatx``), which gradient checks need.
"""
import numpy as np

__all__ = ["set_random_seed", "generator", "floatx", "set_floatx"]

_state = {"rng": np.random.default_rng(), "floatx": np.dtype(np.float32)}


def set_random_seed(seed):
    """Reseed the generator used for initial weights and for shuffling in ``fit``."""
    _state["rng"] = np.random.default_rng(seed)


def generator():
    """The current ``numpy.random.Generator``."""
    return _state["rng"]


def floatx():
    """The dtype new layers use by default (float32 unless changed)."""
    return _state["floatx"]


def set_floatx(dtype):
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"floatx must be float32 or float64, got {dtype}")
    _state["floatx"] = dtype
