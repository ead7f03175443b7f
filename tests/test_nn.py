"""cbn.nn: the chapter's facts (summary counts, clipping), gradients of whole models against
finite differences, training/evaluation bookkeeping against plain NumPy, and folding."""
import io
import re

import numpy as np
import pytest

import cbn
import cbn.nn as nn
from numerical import finite_difference


@pytest.fixture
def float64():
    previous = nn.floatx()
    nn.set_floatx("float64")
    yield
    nn.set_floatx(previous)


def chapter_model(input_shape=(28, 28), hidden=(300, 100), activation="elu",
                  kernel_initializer="he_normal", n_classes=10):
    """Flatten → BN → [Dense(act) → BN]* → Dense(softmax): BN after each hidden layer."""
    layers = [nn.Flatten(input_shape=list(input_shape)), nn.BatchNormalization()]
    for units in hidden:
        layers += [nn.Dense(units, activation=activation,
                            kernel_initializer=kernel_initializer),
                   nn.BatchNormalization()]
    return nn.Sequential(layers + [nn.Dense(n_classes, activation="softmax")])


def chapter_model_bn_before(input_shape=(28, 28), hidden=(300, 100), activation="elu",
                            n_classes=10):
    """Flatten → BN → [Dense(no bias) → BN → Activation]* → Dense(softmax)."""
    layers = [nn.Flatten(input_shape=list(input_shape)), nn.BatchNormalization()]
    for units in hidden:
        layers += [nn.Dense(units, kernel_initializer="he_normal", use_bias=False),
                   nn.BatchNormalization(), nn.Activation(activation)]
    return nn.Sequential(layers + [nn.Dense(n_classes, activation="softmax")])


def summary_text(model):
    lines = []
    model.summary(print_fn=lines.append)
    return "\n".join(lines)


def row_params(text):
    """Param # column of every layer row."""
    rows = [line for line in text.splitlines() if re.search(r"\(\w+\)\s+\(None", line)]
    return [int(line.split()[-1].replace(",", "")) for line in rows]


# ------------------------------------------------------------------ the chapter's facts
def test_summary_of_the_chapters_model():
    text = summary_text(chapter_model())
    assert row_params(text) == [0, 3136, 235500, 1200, 30100, 400, 1010]
    assert "Total params: 271,346" in text
    assert "Trainable params: 268,978" in text
    assert "Non-trainable params: 2,368" in text
    assert "(None, 784)" in text and "(None, 10)" in text


def test_summary_of_the_bn_before_activation_model():
    text = summary_text(chapter_model_bn_before())
    # Dense without bias: 784*300 and 300*100; BN layers as before; Activation layers 0.
    assert row_params(text) == [0, 3136, 235200, 1200, 0, 30000, 400, 0, 1010]
    trainable = 2 * (784 + 300 + 100) + 784 * 300 + 300 * 100 + 100 * 10 + 10
    assert f"Total params: {trainable + 2368:,}" in text
    assert f"Trainable params: {trainable:,}" in text
    assert "Non-trainable params: 2,368" in text


def test_summary_counts_frozen_bn_as_non_trainable():
    model = chapter_model()
    model.layers[1].trainable = False
    text = summary_text(model)
    assert "Trainable params: 268,978" not in text
    assert f"Trainable params: {268978 - 2 * 784:,}" in text
    assert f"Non-trainable params: {2368 + 2 * 784:,}" in text


def test_summary_before_build_is_an_error():
    with pytest.raises(ValueError, match="not built"):
        nn.Sequential([nn.Dense(3)]).summary()


def test_clipping_facts_from_the_chapter():
    g = np.array([0.9, 100.0])
    np.testing.assert_allclose(nn.clip_gradients([g], clipvalue=1.0)[0], [0.9, 1.0])
    np.testing.assert_allclose(nn.clip_gradients([g], clipnorm=1.0)[0],
                               [0.00899964, 0.9999595], rtol=1e-6)
    np.testing.assert_array_equal(g, [0.9, 100.0])                 # input untouched


def test_clipnorm_is_per_array_and_leaves_small_gradients():
    small, large = np.array([0.3, 0.4]), np.array([[3.0, 4.0]])
    out = nn.clip_gradients([small, large], clipnorm=1.0)
    np.testing.assert_array_equal(out[0], small)                   # norm 0.5 < 1: kept
    np.testing.assert_allclose(out[1], [[0.6, 0.8]])               # norm 5 → 1, own norm
    with pytest.raises(ValueError):
        nn.clip_gradients([small], clipnorm=0.0)


# ------------------------------------------------------------------ optimizer
def test_sgd_momentum_update_matches_formula():
    w = np.array([1.0, -2.0])
    opt = nn.SGD(learning_rate=0.1, momentum=0.9)
    g1, g2 = np.array([0.5, 1.0]), np.array([-1.0, 2.0])
    opt.apply_gradients([(g1, w)])
    v1 = -0.1 * g1
    np.testing.assert_allclose(w, [1.0, -2.0] + v1)
    opt.apply_gradients([(g2, w)])
    v2 = 0.9 * v1 - 0.1 * g2
    np.testing.assert_allclose(w, [1.0, -2.0] + v1 + v2)


def test_sgd_nesterov_and_clipping():
    w = np.zeros(2)
    opt = nn.SGD(learning_rate=1.0, momentum=0.5, nesterov=True, clipvalue=1.0)
    opt.apply_gradients([(np.array([0.9, 100.0]), w)])
    g = np.array([0.9, 1.0])
    np.testing.assert_allclose(w, 0.5 * (-g) - g)
    with pytest.raises(ValueError):
        nn.SGD(learning_rate=-1.0)


# ------------------------------------------------------------------ activations and losses
@pytest.mark.parametrize("name", ["elu", "relu", "sigmoid", "tanh", "softmax", None])
def test_activation_derivatives(float64, name):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(4, 5))
    z[np.abs(z) < 1e-3] = 0.5                        # keep relu away from its kink
    weight = rng.normal(size=z.shape)
    layer = nn.Activation(name) if name else nn.Dense(5, use_bias=False)
    if name is None:
        layer.build((None, 5))
        layer.kernel[...] = np.eye(5)
    loss = lambda: float(np.sum(layer(z) * weight))  # noqa: E731
    loss()
    np.testing.assert_allclose(layer.backward(weight), finite_difference(loss, z),
                               rtol=1e-6, atol=1e-8)


def test_activation_values():
    z = np.array([[-800.0, -1.0, 0.0, 2.0, 800.0]])
    np.testing.assert_allclose(nn.Activation("sigmoid", dtype="float64")(z),
                               [[0.0, 1 / (1 + np.e), 0.5, 1 / (1 + np.exp(-2)), 1.0]])
    np.testing.assert_allclose(nn.Activation("elu", dtype="float64")(z),
                               [[-1.0, np.exp(-1) - 1, 0.0, 2.0, 800.0]])
    p = nn.Activation("softmax", dtype="float64")(z)
    assert np.all(np.isfinite(p)) and p.sum() == pytest.approx(1.0)


def test_sparse_categorical_crossentropy():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    loss = nn.SparseCategoricalCrossentropy()
    assert loss([0, 1], p) == pytest.approx(-(np.log(0.7) + np.log(0.1)) / 2)
    logits = np.log(p) + 3.0
    assert nn.SparseCategoricalCrossentropy(from_logits=True)([0, 1], logits) == \
        pytest.approx(loss([0, 1], p))
    grad = loss.gradient([0, 1], p)
    np.testing.assert_allclose(grad, finite_difference(lambda: loss([0, 1], p), p), rtol=1e-6)
    with pytest.raises(ValueError, match="labels must be in"):
        loss([0, 3], p)
    with pytest.raises(ValueError, match="labels for"):
        loss([0], p)


# ------------------------------------------------------------------ whole-model gradients
def model_gradient_check(model, x, y, training):
    model.compile(loss="sparse_categorical_crossentropy", optimizer=nn.SGD())
    _, grads = model.loss_and_gradients(x, y, training=training)
    weights = model.trainable_weights
    assert len(grads) == len(weights) and len(weights) > 0
    for w, g in zip(weights, grads):
        assert g.shape == w.shape
        numeric = finite_difference(lambda: model.compute_loss(x, y, training=training), w)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("builder", [chapter_model, chapter_model_bn_before])
def test_whole_model_gradients_match_finite_differences(float64, builder, training):
    rng = np.random.default_rng(3)
    nn.set_random_seed(3)
    model = builder(input_shape=(2, 3), hidden=(5, 4), n_classes=3)
    for layer in model.layers:               # move BN away from its identity start
        if isinstance(layer, nn.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape) if i in (0, 3) else
                               rng.normal(0, 0.5, w.shape)
                               for i, w in enumerate(layer.get_weights())])
    x, y = rng.normal(size=(8, 2, 3)), rng.integers(0, 3, size=8)
    model_gradient_check(model, x, y, training)


@pytest.mark.parametrize("last", ["dense_linear_logits", "activation_softmax", "sigmoid_mse"])
def test_model_gradients_for_other_heads(float64, last):
    rng = np.random.default_rng(4)
    nn.set_random_seed(4)
    layers = [nn.Dense(4, activation="tanh", input_shape=[3]), nn.BatchNormalization()]
    x, y = rng.normal(size=(6, 3)), rng.integers(0, 3, size=6)
    if last == "dense_linear_logits":
        model = nn.Sequential(layers + [nn.Dense(3)])
        loss = nn.SparseCategoricalCrossentropy(from_logits=True)
    elif last == "activation_softmax":
        model = nn.Sequential(layers + [nn.Dense(3), nn.Activation("softmax")])
        loss = "sparse_categorical_crossentropy"
    else:
        model = nn.Sequential(layers + [nn.Dense(2, activation="sigmoid")])
        loss, y = "mse", rng.uniform(size=(6, 2))
    model.compile(loss=loss, optimizer=nn.SGD())
    _, grads = model.loss_and_gradients(x, y)
    for w, g in zip(model.trainable_weights, grads):
        numeric = finite_difference(lambda: model.compute_loss(x, y, training=True), w)
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ fit / evaluate / predict
def blobs(n=240, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(n_classes, 2, 2))
    y = rng.integers(0, n_classes, size=n)
    return centers[y] + rng.normal(size=(n, 2, 2)), y


def small_model(seed=0):
    nn.set_random_seed(seed)
    model = chapter_model(input_shape=(2, 2), hidden=(16, 8), n_classes=3)
    model.compile(loss="sparse_categorical_crossentropy",
                  optimizer=nn.SGD(learning_rate=0.05, momentum=0.9), metrics=["accuracy"])
    return model


def test_fit_learns_and_returns_history():
    x, y = blobs()
    model = small_model()
    stream = io.StringIO()
    history = model.fit(x[:200], y[:200], epochs=4, batch_size=16, stream=stream,
                        validation_data=(x[200:], y[200:]))
    assert history.epoch == [0, 1, 2, 3]
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "time"}
    assert all(len(v) == 4 for v in history.history.values())
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["val_accuracy"][-1] > 0.8
    lines = stream.getvalue().splitlines()            # not a terminal: one line per epoch
    assert len(lines) == 4 and lines[0].startswith("Epoch 1/4")
    assert "loss:" in lines[0] and "accuracy:" in lines[0] and "val_accuracy:" in lines[0]


def test_fit_progress_bar_on_a_terminal_and_silence():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    x, y = blobs(64)
    stream = Terminal()
    small_model().fit(x, y, epochs=2, batch_size=8, verbose=1, stream=stream)
    text = stream.getvalue()
    assert text.count("Epoch ") == 2 and "[" + "=" * 30 + "]" in text and "\r" in text
    quiet = io.StringIO()
    small_model().fit(x, y, epochs=1, verbose=0, stream=quiet)
    assert quiet.getvalue() == ""


def test_evaluate_and_predict_agree_with_numpy():
    x, y = blobs(50)
    model = small_model()
    model.fit(x, y, epochs=1, verbose=0)
    probabilities = model.predict(x, batch_size=7)
    assert probabilities.shape == (50, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # BN in inference mode is row-independent, but a float32 BLAS GEMM blocks by row count:
    # 7 rows and 50 rows may round differently in the last bits of the Dense layers.
    np.testing.assert_allclose(probabilities, model.predict(x, batch_size=50), rtol=1e-5)
    loss, accuracy = model.evaluate(x, y, batch_size=9)
    p = probabilities.astype(np.float64)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(50), y])), rel=1e-4)
    assert accuracy == pytest.approx(np.mean(p.argmax(axis=1) == y))


def test_same_seed_same_training():
    x, y = blobs(80)
    weights = []
    for _ in range(2):
        model = small_model(seed=7)
        model.fit(x, y, epochs=2, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_rebuilding_keeps_weights_and_layers_can_be_added():
    model = small_model()
    before = model.get_weights()
    model.build((None, 2, 2))
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    model.add(nn.Dense(2))
    assert model.layers[-1].kernel.shape == (3, 2)
    assert model.predict(np.ones((5, 2, 2))).shape == (5, 2)


def test_frozen_bn_is_not_updated_by_fit():
    x, y = blobs(64)
    model = small_model()
    bn = model.layers[1]
    bn.trainable = False
    before = bn.get_weights()
    model.fit(x, y, epochs=1, verbose=0)
    for a, b in zip(before, bn.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batch_size, error", [(0, ValueError), (-3, ValueError),
                                               (True, TypeError), (2.5, TypeError),
                                               ("32", TypeError), (np.float64(8), TypeError)])
def test_fit_evaluate_predict_refuse_a_bad_batch_size(batch_size, error):
    x, y = blobs(40)
    model = small_model()
    before = model.get_weights()
    for call in (lambda: model.fit(x, y, batch_size=batch_size, verbose=0),
                 lambda: model.evaluate(x, y, batch_size=batch_size),
                 lambda: model.predict(x, batch_size=batch_size)):
        with pytest.raises(error, match="batch_size"):
            call()
    for a, b in zip(before, model.get_weights()):
        assert a.tobytes() == b.tobytes()


def test_batch_size_none_means_32_and_numpy_integers_work():
    x, y = blobs(70)
    assert small_model().fit(x, y, batch_size=None, verbose=0).params["steps"] == 3
    assert small_model().fit(x, y, batch_size=np.int64(35), verbose=0).params["steps"] == 2


def mse_model():
    nn.set_random_seed(1)
    model = nn.Sequential([nn.Dense(4, activation="tanh", input_shape=[3]),
                           nn.BatchNormalization(), nn.Dense(2)])
    model.compile(loss="mse", optimizer=nn.SGD(learning_rate=0.1))
    return model


X, Y = blobs(40)
X3 = np.ones((40, 3))
BAD_FITS = {   # name: (model, (x, y, fit keywords), error, message)
    "label out of range in the last batch": (small_model, (X, np.r_[Y[:-1], 3], {}),
                                             ValueError, r"y: labels must be in \[0, 3\)"),
    "negative label": (small_model, (X, np.where(np.arange(40) == 17, -1, Y), {}),
                       ValueError, "labels must be in"),
    "fractional label": (small_model, (X, Y + 0.5 * (np.arange(40) == 33), {}),
                         TypeError, "integer class indices"),
    "string labels": (small_model, (X, Y.astype(str), {}), TypeError, "integer class indices"),
    "two labels per sample": (small_model, (X, np.stack([Y, Y], axis=1), {}),
                              ValueError, "per sample"),
    "bad validation label": (small_model, (X, Y, {"validation_data": (X, np.r_[Y[:-1], 7])}),
                             ValueError, "validation_data: labels must be in"),
    "validation inputs of another shape": (
        small_model, (X, Y, {"validation_data": (X.reshape(40, 4), Y)}),
        ValueError, "expects inputs of shape"),
    "mse targets of another size": (mse_model, (X3, np.ones((40, 3)), {}),
                                    ValueError, "per sample"),
    "mse targets that are not numbers": (mse_model, (X3, np.full((40, 2), "a"), {}),
                                         TypeError, "real numbers"),
}


@pytest.mark.parametrize("case", BAD_FITS)
def test_a_fit_refused_for_its_data_changes_nothing(case):
    builder, (x, y, keywords), error, message = BAD_FITS[case]
    model = builder()
    model(x[:2])                                             # built, as fit would build it
    before = model.get_weights()
    bn = next(layer for layer in model.layers if isinstance(layer, cbn.BatchNormalization))
    moving_before = [bn.moving_mean.copy(), bn.moving_variance.copy()]
    with pytest.raises(error, match=message):
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0, **keywords)
    for a, b in zip(before, model.get_weights()):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(moving_before, [bn.moving_mean, bn.moving_variance]):
        assert a.tobytes() == b.tobytes()


def test_initializer_statistics():
    nn.set_random_seed(0)
    he = nn.Dense(400, kernel_initializer="he_normal", dtype="float64")
    he.build((None, 500))
    assert he.kernel.std() == pytest.approx(np.sqrt(2 / 500), rel=0.02)
    assert np.abs(he.kernel).max() <= 2 * np.sqrt(2 / 500) / 0.87962566103423978
    glorot = nn.Dense(300, dtype="float64")
    glorot.build((None, 500))
    limit = np.sqrt(6 / 800)
    assert np.abs(glorot.kernel).max() <= limit
    assert glorot.kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.02)
    np.testing.assert_array_equal(glorot.bias, 0.0)


# ------------------------------------------------------------------ folding a model
@pytest.mark.parametrize("builder", [chapter_model, chapter_model_bn_before])
def test_folded_model_predicts_like_the_trained_one(float64, builder):
    x, y = blobs(120)
    nn.set_random_seed(1)
    model = builder(input_shape=(2, 2), hidden=(16, 8), n_classes=3)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=nn.SGD(0.05, 0.9))
    model.fit(x, y, epochs=3, verbose=0)
    before = model.get_weights()
    folded = nn.fold_batch_norm(model)
    assert not any(isinstance(layer, nn.BatchNormalization) for layer in folded.layers)
    assert len(folded.layers) == len(model.layers) - 3
    np.testing.assert_allclose(folded.predict(x), model.predict(x), rtol=1e-10, atol=1e-12)
    for a, b in zip(before, model.get_weights()):               # original untouched
        np.testing.assert_array_equal(a, b)


def test_folding_float32_model_and_unfoldable_bn():
    x, y = blobs(60)
    nn.set_random_seed(2)
    model = nn.Sequential([nn.Flatten(input_shape=[2, 2]),
                           nn.Dense(6, activation="relu"), nn.BatchNormalization(),
                           nn.Activation("tanh"), nn.BatchNormalization()])
    model.compile(loss="mse", optimizer=nn.SGD())
    model.fit(x, np.zeros((60, 6)), epochs=1, verbose=0)
    folded = nn.fold_batch_norm(model)
    # Both BNs have a nonlinearity before them and no Dense after them: kept.
    assert sum(isinstance(layer, nn.BatchNormalization) for layer in folded.layers) == 2
    np.testing.assert_allclose(folded.predict(x), model.predict(x), rtol=1e-6)
    model2 = small_model()
    model2.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_allclose(nn.fold_batch_norm(model2).predict(x), model2.predict(x),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bad input
def test_clear_errors():
    with pytest.raises(ValueError, match="unknown activation"):
        nn.Dense(3, activation="swishy")
    with pytest.raises(ValueError, match="unknown initializer"):
        nn.Dense(3, kernel_initializer="orthogonal_ish")
    model = small_model()
    with pytest.raises(ValueError, match=r"expects inputs of shape \(None, 2, 2\)"):
        model.predict(np.ones((2, 3, 3)))
    dense = nn.Dense(2)
    dense(np.ones((3, 4)))
    with pytest.raises(ValueError, match="expects 4 input features"):
        dense(np.ones((3, 5)))
    with pytest.raises(ValueError, match="unknown metric"):
        model.compile(metrics=["auc"])
    with pytest.raises(ValueError, match="samples"):
        model.fit(np.ones((4, 2, 2)), np.zeros(3))
    with pytest.raises(RuntimeError, match="compile"):
        nn.Sequential([nn.Dense(2, input_shape=[2])]).fit(np.ones((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="targets"):
        model.fit(np.ones((4, 2, 2)), None)
    with pytest.raises(ValueError, match="verbose"):
        model.fit(np.ones((4, 2, 2)), np.zeros(4), verbose=5)
