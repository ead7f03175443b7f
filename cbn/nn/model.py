"""``Sequential``: a stack of layers with Keras' compile / fit / evaluate / predict.

Back-propagation walks the layers in reverse calling ``backward``; each layer leaves the
gradients of its trainable weights in ``layer.gradients``. When the model ends in a softmax
and the loss is sparse categorical cross-entropy on probabilities, the two are
differentiated together from the logits (as TensorFlow does), which stays exact when a
probability underflows. A BatchNormalization followed by ``Activation("relu")`` runs as one
fused cbn call (:mod:`cbn.activation`), forward and backward. (Not elu: cbn's fused elu calls
the C library's expm1 element by element, slower than NumPy's vectorized one.)
"""
import numbers
import time

import numpy as np

from ..activation import as_activation
from ..layer import BatchNormalization, unique_name
from . import config, losses, optimizers
from .layers import Activation
from .progress import EpochProgress, resolve_verbose

__all__ = ["Sequential", "History"]


class History:
    """What ``fit`` returns: ``history[metric]`` is a list with one value per epoch."""

    def __init__(self, params):
        self.params = params
        self.epoch = []
        self.history = {}

    def append(self, epoch, logs):
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)


def _batches(n, batch_size):
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _batch_size(batch_size):
    """A positive int; None means 32, as in Keras."""
    if batch_size is None:
        return 32
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
    return int(batch_size)


def _format_shape(shape):
    return "(" + ", ".join("None" if s is None else str(s) for s in shape) + \
        ("," if len(shape) == 1 else "") + ")"


def _fusable(layer, following):
    """A BN without an activation of its own, then an Activation cbn fuses at no cost."""
    return (isinstance(layer, BatchNormalization) and layer.activation is None
            and type(following) is Activation and following.activation == "relu")


class Sequential:
    """A linear stack of layers, built when its input shape is known.

    The input shape comes from the first layer's ``input_shape=`` (as in
    ``Flatten(input_shape=[28, 28])``), from :meth:`build`, or from the first data seen.
    """

    def __init__(self, layers=None, name=None):
        self.name = name if name is not None else unique_name("sequential")
        self.layers = []
        self.built = False
        self.input_shape = None
        self.optimizer = self.loss = None
        self.metrics = []
        self._fused = set()
        for layer in layers or []:
            self.add(layer)

    def add(self, layer):
        """Append a layer (built at once if the model already knows its input shape)."""
        self.layers.append(layer)
        if self.built:
            if not layer.built:
                layer.build(self.output_shape)
            self.output_shape = layer.compute_output_shape(self.output_shape)
        elif len(self.layers) == 1 and getattr(layer, "input_shape", None) is not None:
            self.build(layer.input_shape)

    # --------------------------------------------------------------- structure
    def build(self, input_shape):
        """Build every layer for inputs of ``input_shape`` (batch extent may be None)."""
        if not self.layers:
            raise ValueError("the model has no layers")
        shape = tuple(input_shape)
        self.input_shape = shape
        for layer in self.layers:
            if not layer.built:              # built layers keep their weights, as in Keras
                layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.output_shape = shape
        self.built = True

    def _require_built(self, what):
        if not self.built:
            raise ValueError(f"{what}: the model is not built yet; give the first layer an "
                             "input_shape, call build(input_shape), or call it on data")

    @property
    def trainable_weights(self):
        return [w for layer in self.layers for w in layer.trainable_weights]

    @property
    def non_trainable_weights(self):
        return [w for layer in self.layers for w in layer.non_trainable_weights]

    @property
    def gradients(self):
        """Gradients left by the last ``backward``, aligned with ``trainable_weights``."""
        return [g for layer in self.layers for g in layer.gradients]

    def count_params(self):
        self._require_built("count_params")
        return sum(layer.count_params() for layer in self.layers)

    def get_weights(self):
        return [w for layer in self.layers for w in layer.get_weights()]

    def set_weights(self, weights):
        weights = list(weights)
        for layer in self.layers:
            n = len(layer.get_weights())
            layer.set_weights(weights[:n])
            weights = weights[n:]
        if weights:
            raise ValueError(f"{len(weights)} weights left over after setting every layer")

    def summary(self, print_fn=print):
        """Print a Keras-like table of layers, output shapes and parameter counts."""
        self._require_built("summary")
        rows, shape = [], self.input_shape
        for layer in self.layers:
            shape = layer.compute_output_shape(shape)
            rows.append((f"{layer.name} ({type(layer).__name__})", _format_shape(shape),
                         f"{layer.count_params():,}"))
        widths = [max(29, max(len(r[0]) for r in rows) + 1),
                  max(26, max(len(r[1]) for r in rows) + 1), 10]
        line_length = sum(widths)

        def row(cells):
            return "".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

        trainable = sum(w.size for w in self.trainable_weights)
        non_trainable = sum(w.size for w in self.non_trainable_weights)
        lines = [f'Model: "{self.name}"', "_" * line_length,
                 row(("Layer (type)", "Output Shape", "Param #")), "=" * line_length]
        for i, r in enumerate(rows):
            lines.append(row(r))
            lines.append("=" * line_length if i == len(rows) - 1 else "_" * line_length)
        lines += [f"Total params: {trainable + non_trainable:,}",
                  f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {non_trainable:,}", "_" * line_length]
        print_fn("\n".join(lines))

    # --------------------------------------------------------------- forward & backward
    def __call__(self, x, training=False):
        x = self._checked_input(x)
        self._fused = set()      # indices of BNs that ran with the next Activation fused in
        i = 0
        while i < len(self.layers):
            layer = self.layers[i]
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if _fusable(layer, following):
                x = layer._call_then(x, training, as_activation(following.activation))
                following._cache = None          # its backward runs inside the BN's
                self._fused.add(i)
                i += 2
            else:
                x = layer(x, training=training)
                i += 1
        return x

    def _backward_layers(self, layers, dy):
        """Back-propagate through ``layers`` (a prefix of self.layers), fused pairs as one."""
        i = len(layers) - 1
        while i >= 0:
            if i - 1 in self._fused:
                dy = layers[i - 1].backward(dy)
                i -= 2
            else:
                dy = layers[i].backward(dy)
                i -= 1
        return dy

    def _checked_input(self, x):
        x = np.asarray(x)
        if not self.built:
            self.build((None,) + x.shape[1:])
        expected = self.input_shape
        if x.ndim != len(expected) or any(
                e is not None and e != n for e, n in zip(expected[1:], x.shape[1:])):
            raise ValueError(f"model {self.name!r} expects inputs of shape "
                             f"{_format_shape(expected)}, got an array of shape {x.shape}")
        return x

    def _fused_softmax(self):
        last = self.layers[-1] if self.layers else None
        return (isinstance(self.loss, losses.SparseCategoricalCrossentropy)
                and not self.loss.from_logits
                and getattr(last, "activation", None) == "softmax"
                and hasattr(last, "_cache") and last._cache is not None)

    def backward(self, dy):
        """Back-propagate dL/d(output) through every layer; returns dL/d(input)."""
        return self._backward_layers(self.layers, dy)

    def _logits(self):
        last = self.layers[-1]
        return last._cache[1] if type(last).__name__ == "Dense" else last._cache[0]

    def _loss_and_backward(self, x, y, training):
        self._require_compiled()
        output = self(x, training=training)
        if self._fused_softmax():
            logit_loss = losses.SparseCategoricalCrossentropy(from_logits=True)
            logits = self._logits()
            loss = logit_loss(y, logits)
            dz = logit_loss.gradient(y, logits)
            last = self.layers[-1]
            dy = (last.backward(dz, wrt_preactivation=True) if hasattr(last, "units")
                  else dz)
            self._backward_layers(self.layers[:-1], dy)
        else:
            loss = self.loss(y, output)
            self.backward(self.loss.gradient(y, output))
        return loss, output

    def compute_loss(self, x, y, training=False):
        """The loss of the compiled model on ``(x, y)`` (no gradients, no updates but BN's
        moving statistics in training mode)."""
        self._require_compiled()
        return self._loss_value(y, self(x, training=training))

    def _loss_value(self, y, output):
        """Loss of the last forward call, whose result was ``output``."""
        if self._fused_softmax():
            return losses.SparseCategoricalCrossentropy(from_logits=True)(y, self._logits())
        return self.loss(y, output)

    def loss_and_gradients(self, x, y, training=True):
        """``(loss, gradients)`` on one batch, gradients aligned with ``trainable_weights``."""
        loss, _ = self._loss_and_backward(x, y, training)
        return loss, self.gradients

    # --------------------------------------------------------------- training
    def compile(self, optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=None):
        self.optimizer = optimizers.SGD() if optimizer == "sgd" else optimizer
        if not hasattr(self.optimizer, "apply_gradients"):
            raise TypeError("optimizer must be 'sgd' or an object with apply_gradients")
        self.loss = losses.get(loss)
        self.metrics = list(metrics or [])
        for metric in self.metrics:
            if metric not in ("accuracy", "sparse_categorical_accuracy"):
                raise ValueError(f"unknown metric {metric!r}; only 'accuracy' is available")
            if not isinstance(self.loss, losses.SparseCategoricalCrossentropy):
                raise ValueError("'accuracy' is defined here for sparse categorical labels")

    def _require_compiled(self):
        if self.loss is None:
            raise RuntimeError("compile the model before training or evaluating it")

    def _check_data(self, x, y):
        x = np.asarray(x)
        if y is None:
            raise ValueError("y (the targets) is required")
        y = np.asarray(y)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        if x.shape[0] == 0:
            raise ValueError("no samples")
        return x, y

    def _check_training_data(self, x, y, what):
        """Inputs and targets as arrays, refused before any step if the model or its loss
        would refuse one of their batches (a failing step would leave the earlier steps'
        updates and its own BN statistics behind)."""
        x, y = self._check_data(x, y)
        x = self._checked_input(x)
        check_targets = getattr(self.loss, "check_targets", None)
        if check_targets is not None:
            try:
                check_targets(y, self.output_shape)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{what}: {error}") from None
        return x, y

    def _metric_logs(self, loss_sum, correct, n, prefix=""):
        logs = {prefix + "loss": loss_sum / n}
        for metric in self.metrics:
            logs[prefix + metric] = correct / n
        return logs

    def train_on_batch(self, x, y):
        """One optimizer step; returns the batch loss and the number of correct
        predictions (0 unless compiled with ``metrics=["accuracy"]``)."""
        loss, output = self._loss_and_backward(x, y, training=True)
        self.optimizer.apply_gradients(zip(self.gradients, self.trainable_weights))
        return loss, self._correct(output, y)

    def _correct(self, output, y):
        """Number of samples whose arg-max class is the label (0 without metrics)."""
        if not self.metrics:
            return 0
        return int(np.sum(np.argmax(output, axis=-1) == np.asarray(y).reshape(-1)))

    def fit(self, x, y, batch_size=32, epochs=1, verbose="auto", validation_data=None,
            shuffle=True, stream=None):
        """Train for ``epochs`` epochs; returns a :class:`History`.

        Logged per epoch: ``loss`` (and ``accuracy``) averaged over the epoch's batches in
        training mode, as Keras logs them, and ``val_loss``/``val_accuracy`` evaluated in
        inference mode on ``validation_data=(x_val, y_val)`` at the end of the epoch.
        ``batch_size=None`` means 32. Every argument, and every label, is checked before the
        first step: a fit that raises has changed nothing.
        """
        self._require_compiled()
        batch_size = _batch_size(batch_size)
        x, y = self._check_training_data(x, y, "y")
        if validation_data is not None:
            if len(validation_data) != 2:
                raise ValueError("validation_data must be a pair (x_val, y_val)")
            validation_data = self._check_training_data(*validation_data, "validation_data")
        verbose = resolve_verbose(verbose, stream)
        n = x.shape[0]
        batches = _batches(n, batch_size)
        history = History({"epochs": epochs, "steps": len(batches), "batch_size": batch_size})
        for epoch in range(int(epochs)):
            order = config.generator().permutation(n) if shuffle else np.arange(n)
            progress = EpochProgress(epoch, epochs, len(batches), verbose, stream)
            loss_sum, correct, seen = 0.0, 0, 0
            for step, (start, stop) in enumerate(batches, 1):
                index = order[start:stop]
                loss, batch_correct = self.train_on_batch(x[index], y[index])
                loss_sum += loss * (stop - start)
                correct += batch_correct
                seen += stop - start
                progress.update(step, self._metric_logs(loss_sum, correct, seen))
            logs = self._metric_logs(loss_sum, correct, seen)
            if validation_data is not None:
                logs.update(self._evaluate_logs(*validation_data, batch_size, prefix="val_"))
            logs["time"] = progress.finish({k: v for k, v in logs.items() if k != "time"})
            history.append(epoch, logs)
        return history

    def _evaluate_logs(self, x, y, batch_size, prefix=""):
        x, y = self._check_data(x, y)
        loss_sum, correct = 0.0, 0
        for start, stop in _batches(x.shape[0], _batch_size(batch_size)):
            output = self(x[start:stop])
            loss_sum += self._loss_value(y[start:stop], output) * (stop - start)
            correct += self._correct(output, y[start:stop])
        return self._metric_logs(loss_sum, correct, x.shape[0], prefix)

    def evaluate(self, x, y, batch_size=32, verbose=0):
        """Inference-mode loss (and accuracy): a float, or a list if metrics were compiled."""
        self._require_compiled()
        start = time.perf_counter()
        logs = self._evaluate_logs(x, y, batch_size)
        if verbose:
            print(f"evaluate - {time.perf_counter() - start:.1f}s" +
                  "".join(f" - {k}: {v:.4f}" for k, v in logs.items()))
        values = list(logs.values())
        return values if self.metrics else values[0]

    def predict(self, x, batch_size=32):
        """Inference-mode outputs, computed in batches."""
        x = np.asarray(x)
        return np.concatenate([self(x[start:stop])
                               for start, stop in _batches(x.shape[0], _batch_size(batch_size))])
