"""Activations that batch norm can apply in the same pass: names, parameters, definitions.

``activation`` is None, a name (``"relu"``, ``"leaky_relu"``, ``"elu"``) or a pair
``(name, alpha)``. In the data type ``T`` of x, with ``z = BN(x) + residual``:

* relu:       ``z`` where ``z > 0`` or ``z`` is NaN, else ``+0`` (what ``np.maximum(z, 0)`` gives)
* leaky_relu: ``z`` where ``z > 0``, else ``T(alpha)·z``; alpha defaults to 0.2 (Keras 3's
  ``negative_slope``; PyTorch's default is 0.01: pass ``("leaky_relu", 0.01)``)
* elu:        ``z`` where ``z > 0``, else ``T(alpha·expm1(z))`` computed in double with the C
  library's ``expm1``; alpha defaults to 1.0 (Keras)

Their derivatives are taken from the output ``y = act(z)``, whose sign is z's for all three
(alpha >= 0), with or without a residual; ``dz = dy·act'(z)`` in ``T``:

* relu: ``dy`` where ``y > 0``, else 0;  leaky_relu: ``dy`` where ``y > 0``, else ``T(alpha)·dy``
* elu:  ``dy`` where ``y > 0``, else ``dy·(y + T(alpha))``  (``alpha·exp(z) = y + alpha``)

For relu and leaky_relu the sign of z is all the derivative needs: the forward can return it
as a mask of one bit per element (:func:`pack_mask`), which the backward takes instead of y.

The kernels (cbn/_activation.h) compute exactly these, so a fused call is bitwise the plain
one followed by :meth:`Activation.apply` (or preceded by :meth:`Activation.gradient`).
"""
import math
from dataclasses import dataclass

import numpy as np

from . import _checks

__all__ = ["Activation", "as_activation", "pack_mask", "unpack_mask"]
MASKABLE = ("relu", "leaky_relu")   # whose derivative the sign of z alone gives

# name -> (kernel code, default alpha); the codes are cbn/_activation.h's CBN_ACT_*.
_KINDS = {"relu": (1, None), "leaky_relu": (2, 0.2), "elu": (3, 1.0)}

# The C library's expm1 element by element: NumPy's own expm1 rounds differently.
_expm1 = np.frompyfunc(math.expm1, 1, 1)


@dataclass(frozen=True)
class Activation:
    name: str
    alpha: float = 0.0

    @property
    def kind(self):
        return _KINDS[self.name][0]

    @property
    def spec(self):
        """The argument that gives this activation back (for configs)."""
        default = _KINDS[self.name][1]
        return self.name if default is None or self.alpha == default else (self.name,
                                                                            self.alpha)

    def apply(self, z):
        """act(z) in z's dtype (z is not modified)."""
        z = np.asarray(z)
        t = z.dtype.type
        if self.name == "relu":
            return np.where((z > 0) | np.isnan(z), z, t(0))
        if self.name == "leaky_relu":
            return np.where(z > 0, z, t(self.alpha) * z)
        # expm1 of the non-positive side only: math.expm1 raises where it would overflow.
        negative = (self.alpha * _expm1(np.minimum(z.astype(np.float64), 0.0))).astype(z.dtype)
        return np.where(z > 0, z, negative)

    def gradient(self, dy, y=None, mask=None):
        """dz = dy·act'(z) from the output y = act(z), or from the mask of z > 0 (relu and
        leaky_relu), in dy's dtype."""
        dy = np.asarray(dy)
        t = dy.dtype.type
        positive = np.asarray(y) > 0 if mask is None else unpack_mask(mask, dy.shape)
        if self.name == "relu":
            return np.where(positive, dy, t(0))
        if self.name == "leaky_relu":
            return np.where(positive, dy, t(self.alpha) * dy)
        return np.where(positive, dy, dy * (np.asarray(y).astype(dy.dtype) + t(self.alpha)))


def as_activation(activation):
    """None, or the Activation an ``activation=`` argument names (ValueError/TypeError)."""
    if activation is None or isinstance(activation, Activation):
        return activation
    if isinstance(activation, str) and activation in _BY_NAME:   # the common call, cheaply
        return _BY_NAME[activation]
    if isinstance(activation, str):
        name, alpha = activation, None
    elif isinstance(activation, (tuple, list)) and len(activation) == 2:
        name, alpha = activation
    else:
        raise TypeError(f"activation must be None, a name or a (name, alpha) pair, got "
                        f"{activation!r}")
    if name not in _KINDS:
        raise ValueError(f"unknown activation {name!r}; cbn fuses {sorted(_KINDS)}")
    default = _KINDS[name][1]
    if default is None:
        if alpha is not None:
            raise ValueError(f"{name} takes no alpha (for a slope use 'leaky_relu')")
        return Activation(name)
    alpha = default if alpha is None else _checks.as_real(alpha, f"{name}'s alpha")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"{name}'s alpha must be a finite number >= 0, got {alpha!r}")
    return Activation(name, float(alpha))


_BY_NAME = {name: Activation(name, 0.0 if default is None else default)
            for name, (_, default) in _KINDS.items()}


def pack_mask(positive):
    """One bit per element of a boolean array, in its logical C order: bit k of byte i is
    element 8i + k (``np.packbits(..., bitorder="little")``)."""
    return np.packbits(np.asarray(positive, bool), axis=None, bitorder="little")


def unpack_mask(mask, shape):
    """The boolean array of ``shape`` that :func:`pack_mask` packed."""
    size = int(np.prod(shape, dtype=np.int64))
    return np.unpackbits(mask, count=size, bitorder="little").reshape(shape).astype(bool)
