"""The fused activation in the layer (``BatchNormalization(activation=...)``) and in cbn.nn:
Sequential runs BN + Activation as one fused call, fold_batch_norm keeps predictions."""
import numpy as np
import pytest

import cbn
from cbn import nn
from cbn.activation import as_activation


def test_layer_with_activation_is_the_fused_call():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = cbn.BatchNormalization(activation=("elu", 0.5), gamma_initializer=2.0)
    y = layer(x, training=True)
    expected, mean, var = cbn.batch_norm_forward(x, layer.gamma, layer.beta,
                                                 activation=("elu", 0.5))
    assert y.tobytes() == expected.tobytes()
    dx = layer.backward(dy)
    dx_expected, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean, var, layer.gamma,
                                                         activation=("elu", 0.5), y=y)
    assert dx.tobytes() == dx_expected.tobytes()
    np.testing.assert_array_equal(layer.gradients[0], dgamma)
    np.testing.assert_array_equal(layer.gradients[1], dbeta)

    # inference mode: the plain layer's gradients of dz = dy·act'(z)
    y = layer(x)
    plain = cbn.BatchNormalization.from_config({**layer.get_config(), "activation": None})
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    plain(x)
    dz = as_activation(("elu", 0.5)).gradient(dy, y)
    np.testing.assert_array_equal(layer.backward(dy), plain.backward(dz))
    np.testing.assert_array_equal(layer.gradients[0], plain.gradients[0])


@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.1)])
def test_layer_backward_takes_the_forward_mask(activation):
    """relu and leaky_relu: the layer keeps the forward's mask, not y, for its backward."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    layer = cbn.BatchNormalization(activation=activation)
    y = layer(x, training=True)
    _, mean, var = cbn.batch_norm_forward(x, layer.gamma, layer.beta, activation=activation)
    expected = cbn.batch_norm_backward(dy, x, mean, var, layer.gamma, activation=activation,
                                       y=y.copy())
    y[...] = 0      # a caller reusing the output's buffer: the mask still holds the signs
    assert layer.backward(dy).tobytes() == expected[0].tobytes()
    np.testing.assert_array_equal(layer.gradients[0], expected[1])


def test_activation_survives_config_files_and_copies(tmp_path):
    import copy
    import pickle
    layer = cbn.BatchNormalization(activation="leaky_relu")
    layer(np.ones((4, 3)), training=True)
    assert layer.get_config()["activation"] == "leaky_relu"
    path = tmp_path / "bn.npz"
    layer.save(path)
    for clone in (cbn.BatchNormalization.load(path), pickle.loads(pickle.dumps(layer)),
                  copy.deepcopy(layer),
                  cbn.BatchNormalization.from_config(layer.get_config())):
        assert clone.activation == layer.activation
    odd = cbn.BatchNormalization(activation=("elu", 0.3))
    assert odd.get_config()["activation"] == ("elu", 0.3)
    assert "activation=('elu', 0.3)" in repr(odd)
    with pytest.raises(ValueError, match="unknown activation"):
        cbn.BatchNormalization(activation="swish")


def _model(bn_activation=None, then=("relu",)):
    nn.set_floatx("float64")
    try:
        layers = [nn.Dense(7, input_shape=[5]), nn.BatchNormalization(activation=bn_activation)]
        layers += [nn.Activation(name) for name in then]
        layers += [nn.Dense(3, activation="softmax")]
        return nn.Sequential(layers)
    finally:
        nn.set_floatx("float32")


@pytest.mark.parametrize("activation", ["relu", "elu"])
def test_sequential_fuses_bn_and_relu(activation):
    rng = np.random.default_rng(1)
    x, labels = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    model = _model(then=(activation,))
    model.compile(loss="sparse_categorical_crossentropy")
    loss, gradients = model.loss_and_gradients(x, labels)
    assert model._fused == ({1} if activation == "relu" else set())

    # the same model run layer by layer, unfused
    fused_output = model(x, training=True)
    h = x
    for layer in model.layers:
        h = layer(h, training=True)
    np.testing.assert_allclose(fused_output, h, rtol=1e-12, atol=1e-14)
    logits_gradient = nn.losses.SparseCategoricalCrossentropy(from_logits=True).gradient(
        labels, model.layers[-1]._cache[1])
    dy = model.layers[-1].backward(logits_gradient, wrt_preactivation=True)
    for layer in reversed(model.layers[:-1]):
        dy = layer.backward(dy)
    unfused = [g.copy() for g in model.gradients]
    for fused, plain in zip(gradients, unfused):
        np.testing.assert_allclose(fused, plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bn_activation,then", [("relu", ()), (None, ("elu",)),
                                                (("leaky_relu", 0.1), ())])
def test_fold_batch_norm_keeps_predictions(bn_activation, then):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 5))
    model = _model(bn_activation, then)
    model.compile()
    for _ in range(3):
        model.loss_and_gradients(x, rng.integers(0, 3, 64))
    folded = nn.fold_batch_norm(model)
    np.testing.assert_allclose(folded.predict(x), model.predict(x), rtol=1e-9, atol=1e-12)
    has_bn = any(isinstance(layer, cbn.BatchNormalization) for layer in folded.layers)
    assert has_bn == (bn_activation == ("leaky_relu", 0.1))   # nn has no leaky_relu layer
