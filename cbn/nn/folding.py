"""Turn a trained ``Sequential`` into an inference model without BatchNormalization layers.

Each BN (with one feature axis, the last) is folded into a neighbouring Dense layer using
:mod:`cbn.fold`:

* ``Dense(activation=None) → BN``: into the preceding Dense (``cbn.fold_dense``); this is
  the chapter's "BN before the activation" model, ``Dense(use_bias=False) → BN →
  Activation``, whose Dense gets a bias;
* ``BN → Dense``: into the following Dense (``cbn.fold_into_next_dense``); this covers a BN
  right after the input and the chapter's "BN after each hidden layer" model, where a
  nonlinearity stands between the BN and the preceding Dense.

A BN that fits neither pattern is kept (in inference mode it is still correct).
"""
from .. import fold
from ..layer import BatchNormalization
from .layers import Dense
from .model import Sequential

__all__ = ["fold_batch_norm"]


def _is_last_axis_bn(layer, ndim):
    return isinstance(layer, BatchNormalization) and layer.axes == (ndim - 1,)


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
        previous = kept[-1] if kept else None
        if bn_here and previous is not None and isinstance(previous[0], Dense) \
                and previous[0].activation == "linear" and pending_bn is None:
            dense, (kernel, *bias) = previous
            W2, b2 = fold.fold_dense(kernel, bias[0] if bias else None, layer.gamma,
                                     layer.beta, layer.moving_mean, layer.moving_variance,
                                     epsilon=layer.epsilon)
            config = dense.get_config()
            config["use_bias"] = True
            kept[-1] = (Dense.from_config(config), [W2.astype(dense.dtype),
                                                    b2.astype(dense.dtype)])
            continue
        if bn_here and pending_bn is None:
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
            if _is_last_axis_bn(layer, len(in_shape)):
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
