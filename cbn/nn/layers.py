"""The layers of the chapter's model: Flatten, Dense, Activation (and BatchNormalization).

Every layer follows the same small protocol, which ``cbn.BatchNormalization`` also has:
``build(input_shape)``, ``compute_output_shape``, ``layer(x, training=False)``,
``backward(dy)`` (gradient of the last call; fills ``gradients``, aligned with
``trainable_weights``), ``non_trainable_weights``, ``count_params``, ``get_weights``,
``set_weights`` and ``get_config``. Layers cast their input to their dtype (float32 unless
``cbn.nn.set_floatx`` or ``dtype=`` says otherwise), as Keras layers do.
"""
import numpy as np

from ..layer import BatchNormalization, unique_name
from . import activations, config, initializers

__all__ = ["Layer", "Flatten", "Dense", "Activation", "BatchNormalization"]


def _snake_case(name):
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


class Layer:
    """Base class: naming, dtype, weight bookkeeping. Subclasses fill ``_weight_names``."""

    _weight_names = ()

    def __init__(self, name=None, dtype=None, input_shape=None, trainable=True):
        self.name = name if name is not None else unique_name(_snake_case(type(self).__name__))
        self.dtype = np.dtype(dtype) if dtype is not None else config.floatx()
        self.input_shape = None if input_shape is None else (None,) + tuple(input_shape)
        self.trainable = bool(trainable)
        self.built = False
        self.gradients = []
        self._cache = None

    def build(self, input_shape):
        self.input_shape = tuple(input_shape)
        self.built = True

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def _cast(self, x):
        x = np.asarray(x)
        if x.dtype.kind not in "fiub":
            raise TypeError(f"layer {self.name!r} needs real numbers, got dtype {x.dtype}")
        if not self.built:
            self.build((None,) + x.shape[1:])
        return x.astype(self.dtype, copy=False)

    def _last(self):
        if self._cache is None:
            raise RuntimeError(f"layer {self.name!r}: call the layer before backward")
        return self._cache

    @property
    def weights(self):
        return [getattr(self, n) for n in self._weight_names if getattr(self, n) is not None]

    @property
    def trainable_weights(self):
        return self.weights if self.trainable else []

    @property
    def non_trainable_weights(self):
        return [] if self.trainable else self.weights

    def count_params(self):
        if not self.built:
            raise ValueError(f"layer {self.name!r} is not built yet")
        return int(sum(w.size for w in self.weights))

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        names = [n for n in self._weight_names if getattr(self, n) is not None]
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"layer {self.name!r} expects {len(names)} weights {names}, "
                             f"got {len(weights)}")
        for name, value in zip(names, weights):
            current = getattr(self, name)
            value = np.asarray(value)
            if value.shape != current.shape:
                raise ValueError(f"{self.name}.{name} has shape {current.shape}, "
                                 f"got {value.shape}")
            current[...] = value

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class Flatten(Layer):
    """Flatten every axis but the batch axis: ``(batch, 28, 28) -> (batch, 784)``."""

    def compute_output_shape(self, input_shape):
        return (input_shape[0], int(np.prod(input_shape[1:], dtype=np.int64)))

    def __call__(self, x, training=False):
        x = self._cast(x)
        self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return np.asarray(dy).reshape(self._last())


class Activation(Layer):
    """An activation as a layer of its own (for BN before the activation)."""

    def __init__(self, activation, **kwargs):
        super().__init__(**kwargs)
        self.activation, self._forward, self._backward = activations.get(activation)

    def __call__(self, x, training=False):
        z = self._cast(x)
        y = self._forward(z)
        self._cache = (z, y)
        return y

    def backward(self, dy):
        z, y = self._last()
        return self._backward(np.asarray(dy), z, y)

    def get_config(self):
        return {**super().get_config(), "activation": self.activation}


class Dense(Layer):
    """``activation(x @ kernel + bias)`` on the last axis; kernel has shape (in, units)."""

    _weight_names = ("kernel", "bias")

    def __init__(self, units, activation=None, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.units = int(units)
        if self.units < 1:
            raise ValueError(f"units must be >= 1, got {units!r}")
        self.activation, self._forward, self._backward = activations.get(activation)
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self._kernel_init = initializers.get(kernel_initializer)
        self._bias_init = initializers.get(bias_initializer)
        self.use_bias = bool(use_bias)
        self.kernel = self.bias = None

    def build(self, input_shape):
        super().build(input_shape)
        n_in = input_shape[-1]
        if n_in is None:
            raise ValueError(f"layer {self.name!r} needs a known last input axis")
        self.kernel = np.asarray(self._kernel_init((int(n_in), self.units), dtype=self.dtype),
                                 dtype=self.dtype)
        self.bias = (np.asarray(self._bias_init((self.units,), dtype=self.dtype),
                                dtype=self.dtype) if self.use_bias else None)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def __call__(self, x, training=False):
        x = self._cast(x)
        if x.shape[-1] != self.kernel.shape[0]:
            raise ValueError(f"layer {self.name!r} expects {self.kernel.shape[0]} input "
                             f"features on the last axis, got an input of shape {x.shape}")
        z = x @ self.kernel
        if self.bias is not None:
            z += self.bias
        y = self._forward(z)
        self._cache = (x, z, y)
        return y

    def backward(self, dy, wrt_preactivation=False):
        """dL/dx from dL/dy; ``wrt_preactivation=True`` means ``dy`` is already dL/dz
        (used when softmax and cross-entropy are differentiated together)."""
        x, z, y = self._last()
        dz = np.asarray(dy) if wrt_preactivation else self._backward(np.asarray(dy), z, y)
        dz2 = dz.reshape(-1, self.units)
        x2 = x.reshape(-1, x.shape[-1])
        grads = [x2.T @ dz2]
        if self.bias is not None:
            grads.append(dz2.sum(axis=0))
        self.gradients = [g.astype(self.dtype, copy=False) for g in grads] if self.trainable \
            else []
        return dz @ self.kernel.T

    def get_config(self):
        return {**super().get_config(), "units": self.units, "activation": self.activation,
                "kernel_initializer": self.kernel_initializer,
                "bias_initializer": self.bias_initializer, "use_bias": self.use_bias}
