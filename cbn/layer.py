"""A Keras-style ``BatchNormalization`` layer for NumPy training code.

The layer holds state (γ, β and the moving statistics) and remembers what its last call
needs for ``backward``; all the arithmetic on data is done by the core functions
(``cbn.batch_norm_forward``, ``cbn.batch_norm_inference``, ``cbn.batch_norm_backward``),
looked up on :mod:`cbn` at call time so the fast kernels are used whenever they are
installed. The calls go through one small object, :class:`LocalStatistics`, or with
``synchronized=True`` :class:`SynchronizedStatistics`, which takes the statistics of the batch
split across the processes of an MPI communicator (:mod:`cbn.mpi`).

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
import contextlib
import copy
import importlib
import itertools
import json
import numbers
import operator

import numpy as np

import cbn
from . import _checks
from .activation import MASKABLE, as_activation

__all__ = ["BatchNormalization", "LocalStatistics", "SynchronizedStatistics", "unique_name"]

_name_counters = {}


def unique_name(prefix):
    """Keras-style automatic layer names: ``prefix``, ``prefix_1``, ``prefix_2``, ..."""
    counter = _name_counters.setdefault(prefix, itertools.count())
    index = next(counter)
    return prefix if index == 0 else f"{prefix}_{index}"


class LocalStatistics:
    """The core functions the layer calls, in one place.

    Statistics are those of the local batch. A synchronized variant (statistics reduced
    across processes) only needs to provide the same three methods. ``activation`` (a
    :class:`cbn.activation.Activation` or None) is fused into the calls; the backward takes
    it with the forward's output ``y`` and, where the forward returned one, its mask.
    """

    def forward(self, x, gamma, beta, axis, epsilon, activation=None):
        """``(y, mean, var, mask)``: for relu and leaky_relu the mask of z > 0 (one bit an
        element, what their backward needs: 1/32 of y's memory traffic in float32), else
        None (the backward reads y)."""
        if activation is None or activation.name not in MASKABLE:
            return cbn.batch_norm_forward(x, gamma, beta, axis=axis, epsilon=epsilon,
                                          activation=activation) + (None,)
        return cbn.batch_norm_forward(x, gamma, beta, axis=axis, epsilon=epsilon,
                                      activation=activation, return_mask=True)

    def inference(self, x, mean, var, gamma, beta, axis, epsilon, activation=None):
        return cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis, epsilon=epsilon,
                                        activation=activation)

    def backward(self, dy, x, mean, var, gamma, axis, epsilon, activation=None, y=None,
                 mask=None):
        return cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, epsilon=epsilon,
                                       activation=activation, y=None if mask is not None else y,
                                       mask=mask)

    def sum_gradients(self, gradients):
        """Parameter gradients summed over the batch: here the local batch is the batch."""
        return gradients

    def checks(self, operation):
        """Where the layer validates a call before ``operation``: errors raise at once."""
        return contextlib.nullcontext()


class SynchronizedStatistics(LocalStatistics):
    """The layer's calls with the batch split across the ranks of an MPI communicator.

    ``forward`` and ``backward`` are the collectives :func:`cbn.mpi.batch_norm_forward` and
    :func:`cbn.mpi.batch_norm_backward`: every rank of ``comm`` must make them together, in
    the same order. The returned ``mean``/``var`` are those of the whole (concatenated) batch
    and bitwise identical on every rank; so are ``dgamma``/``dbeta``, which are already summed
    over all ranks. ``inference`` is local (no communication). ``comm=None`` means
    ``MPI.COMM_WORLD``.
    """

    def __init__(self, comm=None):
        try:
            mpi = importlib.import_module("cbn.mpi")
        except ImportError as error:
            raise ImportError(
                "BatchNormalization(synchronized=True) needs mpi4py and an MPI library: "
                "`pip install mpi4py mpich`; "
                f"importing cbn.mpi failed with: {error}") from error
        self._mpi = mpi
        self.comm = comm

    def forward(self, x, gamma, beta, axis, epsilon, activation=None):
        """cbn.mpi has no fused activation: it is applied after, in x's dtype (the same
        values as the fused call's)."""
        y, mean, var = self._mpi.batch_norm_forward(x, gamma, beta, axis=axis, epsilon=epsilon,
                                                    comm=self.comm)
        return (y if activation is None else activation.apply(y)), mean, var, None

    def inference(self, x, mean, var, gamma, beta, axis, epsilon, activation=None):
        """Local: the moving statistics are the same on every rank. A rank may hold an empty
        shard (as in training-mode calls); it gets an empty result."""
        if np.asarray(x).size == 0:
            x = _checks.as_data(x)
            return np.empty(x.shape, dtype=x.dtype)
        return super().inference(x, mean, var, gamma, beta, axis, epsilon, activation)

    def backward(self, dy, x, mean, var, gamma, axis, epsilon, activation=None, y=None,
                 mask=None):
        if activation is not None:
            dy = activation.gradient(dy, y)
        return self._mpi.batch_norm_backward(dy, x, mean, var, gamma, axis=axis,
                                             epsilon=epsilon, comm=self.comm)

    def sum_gradients(self, gradients):
        """Sum per-rank parameter gradients over all ranks (collective), in rank order, so
        the result is bitwise identical on every rank.

        Used only after an inference-mode call, so that the layer's gradients mean the same
        in both modes.
        """
        return self._mpi.sum_over_ranks(gradients, self.comm)

    def checks(self, operation):
        """Where the layer validates a collective call. A rank whose check fails must not
        raise alone (the others would wait in the collective forever): its error joins the
        agreement that opens every cbn.mpi collective, and every rank raises it."""
        return self._mpi.checks_agreed(operation, self.comm)


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
    synchronized : bool
        ``True`` for data-parallel training over MPI (Keras' ``synchronized``, PyTorch's
        ``SyncBatchNorm``): each process calls the layer on its own shard of the global batch
        (shards may differ in size, or be empty), and a training-mode call normalises with
        the statistics of the WHOLE batch, gathered across the ranks of ``comm`` by
        :func:`cbn.mpi.batch_norm_forward`. The moving statistics are updated from those
        global statistics, which are bitwise identical on every rank, so the moving
        statistics stay identical everywhere. Training-mode calls and ``backward`` (while
        the layer is trainable, also after an inference-mode call, to sum dγ/dβ) are then
        collective: every rank must make them, in the same order. Inference-mode calls
        (``training=False`` or a frozen layer) need no communication. Needs mpi4py
        (imported only when ``synchronized=True``; ImportError otherwise).

        Gradients: ``gradients`` (dL/dγ, dL/dβ) of a synchronized layer are already summed
        over all ranks and identical on every rank — exactly those of one process running the
        layer on the concatenated batch, provided each rank's ``dy`` is its shard of that
        process's ``dy`` (for a loss averaged over the global batch, divide by the GLOBAL
        count). Do not all-reduce them again; ``dx`` is this rank's shard of the single-process
        ``dx``.
    comm : mpi4py communicator, optional
        With ``synchronized=True``: the processes that share the batch; ``None`` means
        ``MPI.COMM_WORLD``. Not part of :meth:`get_config`.
    activation : None, "relu", "leaky_relu", "elu" or (name, alpha)
        A cbn extension (Keras' layer has none): the activation that follows the
        normalization, fused into the same pass (:mod:`cbn.activation`); ``backward`` then
        differentiates both: after a training-mode call with relu or leaky_relu from the
        mask of the activation's sign that the forward kept (one bit an element), else from
        the output of the last call (do not modify it in place).
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 trainable=True, name=None, synchronized=False, comm=None, activation=None):
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
        self.synchronized = bool(synchronized)
        if comm is not None and not self.synchronized:
            raise ValueError("comm is only used with synchronized=True")
        self.comm = comm
        self.activation = as_activation(activation)
        self.statistics = self._statistics()
        self._unbuild()

    def _statistics(self):
        return SynchronizedStatistics(self.comm) if self.synchronized else LocalStatistics()

    # ---------------------------------------------------------------- building
    def _unbuild(self):
        self.built = False
        self.input_shape = None       # rank and feature extents; None for free axes
        self.axes = None              # normalised, sorted feature axes
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        self.gradients = []
        self._last_call = None

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
    def _checks(self, operation, collective):
        """The context in which a call is validated: with a synchronized layer, errors of
        a collective call are raised on every rank (see ``SynchronizedStatistics.checks``)."""
        return self.statistics.checks(operation) if collective else contextlib.nullcontext()

    def __call__(self, x, training=False):
        """Normalise ``x``: batch statistics if ``training`` (and trainable), else moving.

        A call that fails leaves the layer as it was, unbuilt if it was.
        """
        return self._call_then(x, training, self.activation)

    def _call_then(self, x, training, activation):
        """The call followed by ``activation`` (cbn.nn's Sequential fuses a following
        Activation layer this way)."""
        built_here = not self.built
        try:
            return self._normalize(x, training and self.trainable, activation)
        except BaseException:
            if built_here:
                self._unbuild()
            raise

    def _normalize(self, x, training, activation):
        with self._checks("batch_norm_forward", collective=training):
            x = np.asarray(x)
            if not self.built:
                self.build(x.shape)
            self._check_input(x)
        if training:
            y, mean, var, mask = self.statistics.forward(x, self.gamma, self.beta, self.axes,
                                                         self.epsilon, activation)
            # what act' is taken from: the mask where there is one, else y
            output = None if activation is None or mask is not None else y
            m = self.momentum
            self.moving_mean[...] = self.moving_mean * m + mean * (1.0 - m)
            self.moving_variance[...] = self.moving_variance * m + var * (1.0 - m)
            self._last_call = ("training", x, mean, var, activation, output, mask)
        else:
            y = self.statistics.inference(x, self.moving_mean, self.moving_variance,
                                          self.gamma, self.beta, self.axes, self.epsilon,
                                          activation)
            output = None if activation is None else y
            self._last_call = ("inference", x, None, None, activation, output, None)
        return y

    def backward(self, dy):
        """Gradient with respect to the input of the last call; fills ``gradients``.

        After a training-mode call the batch statistics depend on ``x`` and ``dx`` includes
        those paths; after an inference-mode call ``dx = dy * γ / sqrt(moving_var + ε)``.
        ``gradients`` holds dL/dγ, dL/dβ (those that exist, as float64), aligned with
        ``trainable_weights`` (empty while the layer is frozen).
        """
        # Collective unless frozen: the training-mode backward, or summing dγ, dβ after an
        # inference-mode call.
        with self._checks("batch_norm_backward", collective=self.trainable):
            if self._last_call is None:
                raise RuntimeError(f"layer {self.name!r}: call the layer before backward")
            mode, x, mean, var, activation, y, mask = self._last_call
            dy = np.asarray(dy)
            if dy.shape != x.shape:
                raise ValueError(f"dy has shape {dy.shape} but the last input had shape "
                                 f"{x.shape}")
            if dy.dtype.kind != "f":
                raise TypeError(f"dy must be a floating array, got dtype {dy.dtype}")
            dy = dy.astype(x.dtype, copy=False)
            if mode == "inference":
                if activation is not None:
                    dy = activation.gradient(dy, y)
                dx, dgamma, dbeta = self._inference_gradients(dy, x)
        if mode == "training":
            dx, dgamma, dbeta = self.statistics.backward(dy, x, mean, var, self.gamma,
                                                         self.axes, self.epsilon, activation, y,
                                                         mask)
        elif self.trainable:
            # As after a training-mode call: sums over the whole (all-rank) batch.
            dgamma, dbeta = self.statistics.sum_gradients([dgamma, dbeta])
        grads = []
        if self.trainable:
            if self.scale:
                grads.append(np.asarray(dgamma, dtype=np.float64))
            if self.center:
                grads.append(np.asarray(dbeta, dtype=np.float64))
        self.gradients = grads
        return dx

    def _inference_gradients(self, dy, x):
        """(dx, this batch's dγ, dβ) of an inference-mode call: local, no communication."""
        # dx: the inference map with mean 0 and no β is exactly y = dy·γ/sqrt(var + ε).
        zeros = np.zeros_like(self.moving_mean)
        dx = self.statistics.inference(dy, zeros, self.moving_variance, self.gamma, None,
                                       self.axes, self.epsilon)
        reduced = tuple(a for a in range(x.ndim) if a not in self.axes)
        dy64 = dy.astype(np.float64)
        dbeta = dy64.sum(axis=reduced) if self.center else None
        dgamma = None
        if self.scale:
            x_hat = self.statistics.inference(x, self.moving_mean, self.moving_variance, None,
                                              None, self.axes, self.epsilon)
            dgamma = (dy64 * x_hat).sum(axis=reduced)
        return dx, dgamma, dbeta

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
            "trainable": self.trainable, "synchronized": self.synchronized,
            "activation": None if self.activation is None else self.activation.spec,
        }

    @classmethod
    def from_config(cls, config, comm=None):
        """A layer from :meth:`get_config`'s dict. The communicator is not part of the config:
        a synchronized layer gets ``comm`` (default ``None``, the world communicator)."""
        if comm is not None:
            return cls(**config, comm=comm)
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
    def load(cls, file, comm=None):
        """Create a built layer from a file written by :meth:`save` (``comm`` as in
        :meth:`from_config`)."""
        with np.load(file, allow_pickle=False) as data:
            try:
                config = json.loads(str(data["config"]))
                input_shape = [None if n < 0 else int(n) for n in data["input_shape"]]
            except KeyError as missing:
                raise ValueError(f"{file!r} is not a saved BatchNormalization "
                                 f"(no {missing} entry)") from None
            layer = cls.from_config(config, comm=comm)
            layer.build(input_shape)
            layer.set_weights([data[name] for name in layer._weight_names()])
        return layer

    # ---------------------------------------------------------------- copies
    def __getstate__(self):
        """What pickle keeps: everything but the communicator, which belongs to the
        running processes (and the statistics object holding it). An unpickled
        synchronized layer uses ``MPI.COMM_WORLD``, as :meth:`from_config` without
        ``comm`` does."""
        state = {key: value for key, value in self.__dict__.items() if key != "statistics"}
        state["comm"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.statistics = self._statistics()

    def __deepcopy__(self, memo):
        """A copy in the same processes: it shares the communicator (which cannot be
        copied, and is what connects this layer's ranks) and copies everything else."""
        memo[id(self.comm)] = self.comm
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        state = {key: value for key, value in self.__dict__.items() if key != "statistics"}
        clone.__setstate__(copy.deepcopy(state, memo))
        return clone

    def __repr__(self):
        return (f"BatchNormalization(name={self.name!r}, axis={self.axis!r}, "
                f"momentum={self.momentum}, epsilon={self.epsilon}, center={self.center}, "
                f"scale={self.scale}, trainable={self.trainable}, "
                f"{'synchronized=True, ' if self.synchronized else ''}"
                f"{'' if self.activation is None else f'activation={self.activation.spec!r}, '}"
                f"built={self.built})")
