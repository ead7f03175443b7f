"""Losses: value and gradient with respect to the model output.

``SparseCategoricalCrossentropy`` follows Keras: on probabilities it clips them to
``[1e-7, 1 - 1e-7]`` before the log; when the model ends in a softmax, ``Sequential``
differentiates softmax and cross-entropy together from the logits (as TensorFlow does),
which gives the exact, well-conditioned ``(softmax(z) - onehot) / n``.

``check_targets(y_true, output_shape)`` refuses targets that no batch could use, so that
``Sequential.fit`` can refuse them before its first step; a custom loss may define it too.
"""
import numpy as np

__all__ = ["SparseCategoricalCrossentropy", "MeanSquaredError", "get"]

_EPSILON = 1e-7


def _labels(y_true, n_classes):
    labels = np.asarray(y_true)
    if labels.dtype.kind not in "iuf" or (labels.dtype.kind == "f"
                                          and np.any(labels != np.round(labels))):
        raise TypeError("sparse labels must be integer class indices")
    labels = labels.astype(np.intp).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


def _per_sample(y_true, expected, shape_of_one):
    """Refuse targets whose samples do not hold ``expected`` values each."""
    found = int(np.prod(np.shape(y_true)[1:], dtype=np.int64))
    if found != expected:
        raise ValueError(f"targets of shape {np.shape(y_true)} hold {found} values per "
                         f"sample; the model's output needs {expected} ({shape_of_one})")


def _check_batch(labels, y_pred):
    if labels.shape[0] != y_pred.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {y_pred.shape[0]} predictions")


class SparseCategoricalCrossentropy:
    """Mean over the batch of ``-log p[label]``; labels are integer class indices."""

    name = "sparse_categorical_crossentropy"

    def __init__(self, from_logits=False):
        self.from_logits = bool(from_logits)

    def _log_probabilities(self, y_pred):
        y_pred = np.asarray(y_pred, dtype=np.float64).reshape(-1, np.shape(y_pred)[-1])
        if self.from_logits:
            shifted = y_pred - y_pred.max(axis=1, keepdims=True)
            return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return np.log(np.clip(y_pred, _EPSILON, 1 - _EPSILON))

    def __call__(self, y_true, y_pred):
        log_p = self._log_probabilities(y_pred)
        labels = _labels(y_true, log_p.shape[1])
        _check_batch(labels, log_p)
        return float(-log_p[np.arange(labels.size), labels].mean())

    def check_targets(self, y_true, output_shape):
        """Refuse labels that no batch of outputs of ``output_shape`` could use."""
        n_classes = output_shape[-1]
        _labels(y_true, n_classes)
        _per_sample(y_true, int(np.prod(output_shape[1:-1], dtype=np.int64)),
                    f"one label per output row of {n_classes} class probabilities")

    def gradient(self, y_true, y_pred):
        """dL/dy_pred (dL/dlogits when ``from_logits``), same shape and dtype as y_pred."""
        y_pred = np.asarray(y_pred)
        flat = y_pred.reshape(-1, y_pred.shape[-1]).astype(np.float64)
        labels = _labels(y_true, flat.shape[1])
        _check_batch(labels, flat)
        n, rows = labels.size, np.arange(labels.size)
        if self.from_logits:
            grad = np.exp(self._log_probabilities(flat))
            grad[rows, labels] -= 1.0
            grad /= n
        else:
            grad = np.zeros_like(flat)
            p = flat[rows, labels]
            inside = (p > _EPSILON) & (p < 1 - _EPSILON)   # the clip's gradient is 0 outside
            grad[rows, labels] = np.where(inside, -1.0 / (n * np.maximum(p, _EPSILON)), 0.0)
        return grad.reshape(y_pred.shape).astype(y_pred.dtype, copy=False)


class MeanSquaredError:
    """Mean over all elements of ``(y_true - y_pred)²``."""

    name = "mean_squared_error"
    from_logits = False

    def __call__(self, y_true, y_pred):
        diff = np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64).reshape(
            np.shape(y_pred))
        return float(np.mean(diff * diff))

    def check_targets(self, y_true, output_shape):
        """Refuse targets that no batch of outputs of ``output_shape`` could use."""
        y_true = np.asarray(y_true)
        if y_true.dtype.kind not in "fiub":
            raise TypeError(f"targets must be real numbers, got dtype {y_true.dtype}")
        _per_sample(y_true, int(np.prod(output_shape[1:], dtype=np.int64)),
                    f"outputs of shape {tuple(output_shape[1:])}")

    def gradient(self, y_true, y_pred):
        y_pred = np.asarray(y_pred)
        diff = y_pred.astype(np.float64) - np.asarray(y_true, np.float64).reshape(y_pred.shape)
        return (2.0 * diff / diff.size).astype(y_pred.dtype, copy=False)


_LOSSES = {"sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
           "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError}


def get(loss):
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(_LOSSES)}")
        return _LOSSES[loss]()
    if not (callable(loss) and hasattr(loss, "gradient")):
        raise TypeError("loss must be a name or an object with __call__(y_true, y_pred) "
                        "and gradient(y_true, y_pred)")
    return loss
