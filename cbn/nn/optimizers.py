"""SGD with momentum and Keras' gradient clipping.

Update (tf.keras ``SGD``): ``velocity = momentum * velocity - learning_rate * g`` then
``w += velocity`` (Nesterov: ``w += momentum * velocity - learning_rate * g``). Weights are
updated in place, so layers keep their arrays.
"""
import numpy as np

__all__ = ["SGD", "clip_gradients"]


def _check_threshold(value, name):
    if value is None:
        return None
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def clip_gradients(grads, clipvalue=None, clipnorm=None):
    """Clip each gradient array as Keras does; returns new arrays.

    ``clipnorm``: an array whose L2 norm exceeds it is rescaled to that norm (direction
    kept), each array on its own (``tf.clip_by_norm``). ``clipvalue``: every component is
    clipped to ``[-clipvalue, clipvalue]`` (direction may change). With both, clipnorm is
    applied first, as tf.keras did.

    >>> clip_gradients([np.array([0.9, 100.0])], clipvalue=1.0)[0]
    array([0.9, 1. ])
    >>> clip_gradients([np.array([0.9, 100.0])], clipnorm=1.0)[0]
    array([0.00899964, 0.9999595 ])
    """
    clipvalue = _check_threshold(clipvalue, "clipvalue")
    clipnorm = _check_threshold(clipnorm, "clipnorm")
    clipped = []
    for g in grads:
        g = np.array(g, copy=True)
        if g.dtype.kind != "f":
            g = g.astype(np.float64)
        if clipnorm is not None:
            norm = float(np.sqrt(np.sum(np.square(g, dtype=np.float64))))
            if norm > clipnorm:
                g *= clipnorm / norm
        if clipvalue is not None:
            np.clip(g, -clipvalue, clipvalue, out=g)
        clipped.append(g)
    return clipped


class SGD:
    """Stochastic gradient descent (Keras defaults: ``learning_rate=0.01``, no momentum)."""

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, clipvalue=None,
                 clipnorm=None):
        self.learning_rate = float(learning_rate)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        self.momentum = float(momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.nesterov = bool(nesterov)
        self.clipvalue = _check_threshold(clipvalue, "clipvalue")
        self.clipnorm = _check_threshold(clipnorm, "clipnorm")
        self._velocities = {}          # id(weight) -> (weight, velocity)
        self.iterations = 0

    def apply_gradients(self, grads_and_vars):
        """Update each weight array in place from its gradient."""
        pairs = list(grads_and_vars)
        grads = clip_gradients([g for g, _ in pairs], self.clipvalue, self.clipnorm)
        lr, momentum = self.learning_rate, self.momentum
        for g, (_, w) in zip(grads, pairs):
            if g.shape != w.shape:
                raise ValueError(f"gradient of shape {g.shape} for a weight of shape {w.shape}")
            if momentum == 0.0:
                w -= (lr * g).astype(w.dtype, copy=False)
                continue
            entry = self._velocities.get(id(w))
            if entry is None or entry[0] is not w:
                entry = (w, np.zeros_like(w))
                self._velocities[id(w)] = entry
            velocity = entry[1]
            velocity *= momentum
            velocity -= (lr * g).astype(w.dtype, copy=False)
            if self.nesterov:
                w += momentum * velocity - (lr * g).astype(w.dtype, copy=False)
            else:
                w += velocity
        self.iterations += 1

    def get_config(self):
        return {"learning_rate": self.learning_rate, "momentum": self.momentum,
                "nesterov": self.nesterov, "clipvalue": self.clipvalue,
                "clipnorm": self.clipnorm}
