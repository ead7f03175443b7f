"""A Keras-style ``BatchNormalization`` layer for NumPy training code.

The layer holds state (γ, β and the moving statistics) and remembers what its last call
needs for ``backward``; all the arithmetic on data is done by the core functions
(``cbn.batch_norm_forward``, ``cbn.batch_norm_inference``, ``cbn.batch_norm_backward``),
looked up on :mod:`cbn` at call time so the fast kernels are used whenever they are
installed. The calls go through one small object, :class:`LocalStatistics`, so a
synchronized (multi-process) variant can replace it without touching the layer.

Semantics follow tf.keras 2:

* ``layer(x, training=True)`` normalises with the batch statistics and updates
  ``moving = moving * momentum + batch * (1 - momentum)`` (biased batch variance);
* ``layer(x)`` (``training=False``) uses the moving statistics;
* ``trainable = False`` freezes the layer: it behaves as in inference even when called with
  ``training=True``, its moving statistics stay put, and γ/β count as non-trainable.

Parameters are stored in float64 with the shape ``tuple(x.shape[a] for a in sorted(axis))``
(the core API's feature shape); ``set_weights`` also accepts tf.keras 2's broadcast shape for
multi-axis layers, e.g. ``(1, 28, 28)`` for ``axis=[1, 2]`` on rank-3 inputs.
"""
import itertools
import json
import numbers
import operator

import numpy as np

import cbn

__all__ = ["BatchNormalization", "LocalStatistics", "unique_name"]

_name_counters = {}


def unique_name(prefix):
    """Keras-style automatic layer names: ``prefix``, ``prefix_1``, ``prefix_2``, ..."""
    counter = _name_counters.setdefault(prefix, itertools.count())
    index = next(counter)
    return prefix if index == 0 else f"{prefix}_{index}"


class LocalStatistics:
    """The core functions the layer calls, in one place.

    Statistics are those of the local batch. A synchronized variant (statistics reduced
    across processes) only needs to provide the same three methods.
    """

    def forward(self, x, gamma, beta, axis, epsilon):
        return cbn.batch_norm_forward(x, gamma, beta, axis=axis, epsilon=epsilon)

    def inference(self, x, mean, var, gamma, beta, axis, epsilon):
        return cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis, epsilon=epsilon)

    def backward(self, dy, x, mean, var, gamma, axis, epsilon):
        return cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, epsilon=epsilon)


_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


def _spelled_axis(axis):
    """Validate the type of ``axis`` at construction; ranges are checked at build."""
    if isinstance(axis, numbers.Integral):
        return int(axis)
    try:
        spelled = [operator.index(a) for a in axis]
    except TypeError:
        raise TypeError(f"axis must be an int or a sequence of ints, got {axis!r}") from None
    if not spelled:
        raise ValueError("axis must name at least one feature axis")
    return spelled


def _normalized_axes(axis, ndim):
    spelled = [axis] if isinstance(axis, int) else list(axis)
    axes = []
    for a in spelled:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for inputs of rank {ndim}")
        axes.append(a % ndim)
    if len(set(axes)) != len(axes):
        raise ValueError(f"axis {axis!r} names the same axis twice for inputs of rank {ndim}")
    if 0 in axes:
        raise ValueError(
            f"axis {axis!r} includes axis 0, the batch axis; batch normalization takes its "
            "statistics over the batch")
    return tuple(sorted(axes))


def _initial_value(initializer, shape, name):
    """An initializer is "zeros", "ones", a number, an array of ``shape`` or a callable
    ``f(shape, dtype)`` (as Keras initializers are)."""
    if isinstance(initializer, str):
        if initializer not in ("zeros", "ones"):
            raise ValueError(f"unknown {name}_initializer {initializer!r}; use 'zeros', "
                             "'ones', a number, an array or a callable f(shape, dtype)")
        return (np.zeros if initializer == "zeros" else np.ones)(shape, np.float64)
    if callable(initializer):
        value = np.asarray(initializer(shape, dtype=np.float64))
    else:
        value = np.asarray(initializer)
    if value.dtype.kind not in "fiub":
        raise TypeError(f"{name}_initializer gave dtype {value.dtype}, not a real number")
    if value.ndim == 0:
        return np.full(shape, float(value), np.float64)
    return _as_weight(value, shape, f"{name}_initializer")


def _as_weight(value, shape, name):
    """``value`` as a float64 array of ``shape``; a Keras 2 broadcast shape is accepted."""
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    if array.shape != shape:
        squeezed = tuple(n for n in array.shape if n != 1)
        if array.size != int(np.prod(shape)) or squeezed != tuple(n for n in shape if n != 1):
            raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
        array = array.reshape(shape)
    return np.array(array, dtype=np.float64)


def _jsonable(initializer):
    if isinstance(initializer, (str, numbers.Real)):
        return initializer
    if callable(initializer):
        return initializer          # kept as is: such a config is not JSON-serializable
    return np.asarray(initializer, dtype=np.float64).tolist()


class BatchNormalization:
    """Batch normalization layer with Keras' meaning.

    Parameters
    ----------
    axis : int or sequence of int
        The feature axis or axes (kept); statistics are taken over all the others.
        ``-1`` (channels last) by default; ``[1, 2]`` normalises each pixel of
        ``(batch, height, width)`` inputs on its own. Axis 0 (the batch) is not allowed.
    momentum : float
        ``moving = moving * momentum + batch * (1 - momentum)``.
    epsilon : float
        Added to the variance before the square root.
    center, scale : bool
        Whether β (offset) and γ (scale) exist.
    beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer
        ``"zeros"``, ``"ones"``, a number, an array of the feature shape, or a callable
        ``f(shape, dtype)``.
    trainable : bool
        ``False`` freezes the layer (inference behaviour, no updates).
    name : str, optional
        Defaults to ``batch_normalization``, ``batch_normalization_1``, ...
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 trainable=True, name=None):
        self.axis = _spelled_axis(axis)
        self.momentum = float(momentum)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.epsilon = float(epsilon)
        if not (self.epsilon >= 0.0 and np.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = beta_initializer
        self.gamma_initializer = gamma_initializer
        self.moving_mean_initializer = moving_mean_initializer
        self.moving_variance_initializer = moving_variance_initializer
        self.trainable = bool(trainable)
        self.name = name if name is not None else unique_name("batch_normalization")
        self.statistics = LocalStatistics()
        self.built = False
        self.input_shape = None       # rank and feature extents; None for free axes
        self.axes = None              # normalised, sorted feature axes
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.gradients = []
        self._last_call = None

    # ---------------------------------------------------------------- building
    def build(self, input_shape):
        """Create the weights for inputs of ``input_shape`` (batch extent may be None)."""
        input_shape = tuple(input_shape)
        axes = _normalized_axes(self.axis, len(input_shape))
        features = []
        for a in axes:
            if input_shape[a] is None or int(input_shape[a]) < 1:
                raise ValueError(f"feature axis {a} of input_shape {input_shape} must have "
                                 "a known extent >= 1")
            features.append(int(input_shape[a]))
        features = tuple(features)
        self.axes = axes
        self.input_shape = tuple(input_shape[a] if a in axes else None
                                 for a in range(len(input_shape)))
        self.gamma = (_initial_value(self.gamma_initializer, features, "gamma")
                      if self.scale else None)
        self.beta = (_initial_value(self.beta_initializer, features, "beta")
                     if self.center else None)
        self.moving_mean = _initial_value(self.moving_mean_initializer, features, "moving_mean")
        self.moving_variance = _initial_value(self.moving_variance_initializer, features,
                                              "moving_variance")
        self.built = True
        self._last_call = None

    @property
    def feature_shape(self):
        return None if not self.built else tuple(self.input_shape[a] for a in self.axes)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def _check_input(self, x):
        if self.axes is None:
            return
        expected = self.input_shape
        if x.ndim != len(expected) or any(
                x.shape[a] != expected[a] for a in self.axes):
            shown = tuple("?" if n is None else n for n in expected)
            raise ValueError(
                f"layer {self.name!r} was built for inputs of rank {len(expected)} with "
                f"shape {shown} ('?' = any extent) on feature axes {self.axes}; "
                f"got an input of shape {x.shape}")

    # ---------------------------------------------------------------- calling
    def __call__(self, x, training=False):
        """Normalise ``x``: batch statistics if ``training`` (and trainable), else moving."""
        x = np.asarray(x)
        if not self.built:
            self.build(x.shape)
        self._check_input(x)
        if training and self.trainable:
            y, mean, var = self.statistics.forward(x, self.gamma, self.beta, self.axes,
                                                   self.epsilon)
            m = self.momentum
            self.moving_mean[...] = self.moving_mean * m + mean * (1.0 - m)
            self.moving_variance[...] = self.moving_variance * m + var * (1.0 - m)
            self._last_call = ("training", x, mean, var)
        else:
            y = self.statistics.inference(x, self.moving_mean, self.moving_variance,
                                          self.gamma, self.beta, self.axes, self.epsilon)
            self._last_call = ("inference", x, None, None)
        return y

    def backward(self, dy):
        """Gradient with respect to the input of the last call; fills ``gradients``.

        After a training-mode call the batch statistics depend on ``x`` and ``dx`` includes
        those paths; after an inference-mode call ``dx = dy * γ / sqrt(moving_var + ε)``.
        ``gradients`` holds dL/dγ, dL/dβ (those that exist, as float64), aligned with
        ``trainable_weights`` (empty while the layer is frozen).
        """
        if self._last_call is None:
            raise RuntimeError(f"layer {self.name!r}: call the layer before backward")
        mode, x, mean, var = self._last_call
        dy = np.asarray(dy)
        if dy.shape != x.shape:
            raise ValueError(f"dy has shape {dy.shape} but the last input had shape {x.shape}")
        if dy.dtype.kind != "f":
            raise TypeError(f"dy must be a floating array, got dtype {dy.dtype}")
        dy = dy.astype(x.dtype, copy=False)
        if mode == "training":
            dx, dgamma, dbeta = self.statistics.backward(dy, x, mean, var, self.gamma,
                                                         self.axes, self.epsilon)
        else:
            # dx: the inference map with mean 0 and no β is exactly y = dy·γ/sqrt(var + ε).
            zeros = np.zeros_like(self.moving_mean)
            dx = self.statistics.inference(dy, zeros, self.moving_variance, self.gamma, None,
                                           self.axes, self.epsilon)
            reduced = tuple(a for a in range(x.ndim) if a not in self.axes)
            dy64 = dy.astype(np.float64)
            dbeta = dy64.sum(axis=reduced) if self.center else None
            if self.scale:
                x_hat = self.statistics.inference(
                    x, self.moving_mean, self.moving_variance, None, None, self.axes,
                    self.epsilon)
                dgamma = (dy64 * x_hat).sum(axis=reduced)
            else:
                dgamma = None
        grads = []
        if self.trainable:
            if self.scale:
                grads.append(np.asarray(dgamma, dtype=np.float64))
            if self.center:
                grads.append(np.asarray(dbeta, dtype=np.float64))
        self.gradients = grads
        return dx

    # ---------------------------------------------------------------- weights
    @property
    def trainable_weights(self):
        if not self.trainable:
            return []
        return [w for w in (self.gamma, self.beta) if w is not None]

    @property
    def non_trainable_weights(self):
        frozen = [] if self.trainable else [w for w in (self.gamma, self.beta) if w is not None]
        moving = [w for w in (self.moving_mean, self.moving_variance) if w is not None]
        return frozen + moving

    @property
    def weights(self):
        """All weights in Keras order: gamma, beta, moving_mean, moving_variance."""
        return [w for w in (self.gamma, self.beta, self.moving_mean, self.moving_variance)
                if w is not None]

    def _weight_names(self):
        return [n for n in _WEIGHT_NAMES if getattr(self, n) is not None]

    def count_params(self):
        """Number of scalars in all weights (4 per feature with center and scale)."""
        if not self.built:
            raise ValueError(f"layer {self.name!r} is not built yet; call it or build() it")
        return int(sum(w.size for w in self.weights))

    def get_weights(self):
        """Copies of ``[gamma, beta, moving_mean, moving_variance]`` (those that exist)."""
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        """Set the weights from a list in the order of :meth:`get_weights` (values copied)."""
        if not self.built:
            raise ValueError(f"layer {self.name!r} is not built yet; call it or "
                             "build(input_shape) before set_weights")
        names = self._weight_names()
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"layer {self.name!r} expects {len(names)} weights {names}, "
                             f"got {len(weights)}")
        values = [_as_weight(v, self.feature_shape, n) for n, v in zip(names, weights)]
        for name, value in zip(names, values):
            getattr(self, name)[...] = value

    # ---------------------------------------------------------------- config & files
    def get_config(self):
        return {
            "name": self.name, "axis": self.axis, "momentum": self.momentum,
            "epsilon": self.epsilon, "center": self.center, "scale": self.scale,
            "beta_initializer": _jsonable(self.beta_initializer),
            "gamma_initializer": _jsonable(self.gamma_initializer),
            "moving_mean_initializer": _jsonable(self.moving_mean_initializer),
            "moving_variance_initializer": _jsonable(self.moving_variance_initializer),
            "trainable": self.trainable,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save(self, file):
        """Write config, input shape and weights to an ``np.savez`` file (path or file)."""
        if not self.built:
            raise ValueError(f"layer {self.name!r} is not built yet; nothing to save")
        config = self.get_config()
        for key in [k for k in config if k.endswith("_initializer")]:
            if callable(config[key]):
                del config[key]     # the saved weights carry the values anyway
        arrays = {name: getattr(self, name) for name in self._weight_names()}
        arrays["config"] = np.array(json.dumps(config))
        arrays["input_shape"] = np.array([-1 if n is None else n for n in self.input_shape],
                                         dtype=np.int64)
        np.savez(file, **arrays)

    @classmethod
    def load(cls, file):
        """Create a built layer from a file written by :meth:`save`."""
        with np.load(file, allow_pickle=False) as data:
            try:
                config = json.loads(str(data["config"]))
                input_shape = [None if n < 0 else int(n) for n in data["input_shape"]]
            except KeyError as missing:
                raise ValueError(f"{file!r} is not a saved BatchNormalization "
                                 f"(no {missing} entry)") from None
            layer = cls.from_config(config)
            layer.build(input_shape)
            layer.set_weights([data[name] for name in layer._weight_names()])
        return layer

    def __repr__(self):
        return (f"BatchNormalization(name={self.name!r}, axis={self.axis!r}, "
                f"momentum={self.momentum}, epsilon={self.epsilon}, center={self.center}, "
                f"scale={self.scale}, trainable={self.trainable}, built={self.built})")
