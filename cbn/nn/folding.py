"""Turn a trained ``Sequential`` into an inference model without BatchNormalization layers.

Each BN (with one feature axis, the last) is folded into a neighbouring Dense layer using
:mod:`cbn.fold`:

* ``Dense(activation=None) → BN``: into the preceding Dense (``cbn.fold_dense``); this is
  the chapter's "BN before the activation" model, ``Dense(use_bias=False) → BN →
  Activation``, whose Dense gets a bias;
* ``BN → Dense``: into the following Dense (``cbn.fold_into_next_dense``); this covers a BN
  right after the input and the chapter's "BN after each hidden layer" model, where a
  nonlinearity stands between the BN and the preceding Dense.

A BN with an activation of its own (``BatchNormalization(activation=...)``) folds only into
the preceding Dense, which takes over the activation if cbn.nn has it (relu, elu with alpha 1).
A BN that fits neither pattern is kept (in inference mode it is still correct).
"""
from .. import fold
from ..layer import BatchNormalization
from .layers import Dense
from .model import Sequential

__all__ = ["fold_batch_norm"]


def _is_last_axis_bn(layer, ndim):
    return isinstance(layer, BatchNormalization) and layer.axes == (ndim - 1,)


def _activation_after_folding(bn):
    """The Dense activation that replaces ``bn``'s own, or None if there is none."""
    if bn.activation is None:
        return "linear"
    return bn.activation.spec if bn.activation.spec in ("relu", "elu") else None


def _copy(layer):
    if isinstance(layer, BatchNormalization):     # keeps a synchronized layer's communicator
        return type(layer).from_config(layer.get_config(), comm=layer.comm)
    clone = type(layer).from_config(layer.get_config())
    return clone


def fold_batch_norm(model):
    """A new model computing ``model``'s inference output with its BN layers folded away.

    The original model is not modified. Weights of the new model are copies.
    """
    if not model.built:
        raise ValueError("the model is not built yet")
    shapes, shape = [], model.input_shape
    for layer in model.layers:
        shapes.append(shape)
        shape = layer.compute_output_shape(shape)

    kept = []            # (new layer, weights to set after build)
    pending_bn = None    # a BN to fold into the Dense that comes next
    for layer, in_shape in zip(model.layers, shapes):
        bn_here = _is_last_axis_bn(layer, len(in_shape))
        plain_bn = bn_here and layer.activation is None
        previous = kept[-1] if kept else None
        if bn_here and previous is not None and isinstance(previous[0], Dense) \
                and previous[0].activation == "linear" and pending_bn is None \
                and _activation_after_folding(layer) is not None:
            dense, (kernel, *bias) = previous
            W2, b2 = fold.fold_dense(kernel, bias[0] if bias else None, layer.gamma,
                                     layer.beta, layer.moving_mean, layer.moving_variance,
                                     epsilon=layer.epsilon)
            config = dense.get_config()
            config["use_bias"] = True
            config["activation"] = _activation_after_folding(layer)
            kept[-1] = (Dense.from_config(config), [W2.astype(dense.dtype),
                                                    b2.astype(dense.dtype)])
            continue
        if plain_bn and pending_bn is None:
            pending_bn = layer
            continue
        if pending_bn is not None:
            if isinstance(layer, Dense):
                bn = pending_bn
                kernel, *bias = layer.get_weights()
                W2, b2 = fold.fold_into_next_dense(bn.gamma, bn.beta, bn.moving_mean,
                                                   bn.moving_variance, kernel,
                                                   bias[0] if bias else None,
                                                   epsilon=bn.epsilon)
                config = layer.get_config()
                config["use_bias"] = True
                kept.append((Dense.from_config(config), [W2.astype(layer.dtype),
                                                         b2.astype(layer.dtype)]))
                pending_bn = None
                continue
            kept.append((_copy(pending_bn), pending_bn.get_weights()))
            pending_bn = None
            if plain_bn:
                pending_bn = layer
                continue
        kept.append((_copy(layer), layer.get_weights()))
    if pending_bn is not None:
        kept.append((_copy(pending_bn), pending_bn.get_weights()))

    folded = Sequential([layer for layer, _ in kept], name=f"{model.name}_folded")
    folded.build(model.input_shape)
    for layer, weights in kept:
        layer.set_weights(weights)
    return folded
