"""cbn.BatchNormalization: Keras semantics checked against plain float64 NumPy math,
finite differences and cbn.reference."""
import copy
import io
import pickle
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cbn
from cbn import reference
from budget import examples
from numerical import finite_difference


def numpy_stats(x, axes):
    """Float64 truth: mean and biased variance over the non-feature axes."""
    x = np.asarray(x, dtype=np.float64)
    reduced = tuple(a for a in range(x.ndim) if a not in axes)
    return x.mean(axis=reduced), x.var(axis=reduced)


def broadcast(v, ndim, axes):
    shape = [1] * ndim
    for a, n in zip(sorted(axes), v.shape):
        shape[a] = n
    return v.reshape(shape)


def numpy_bn(x, mean, var, gamma, beta, axes, eps):
    x = np.asarray(x, dtype=np.float64)
    b = lambda v: broadcast(np.asarray(v, dtype=np.float64), x.ndim, axes)  # noqa: E731
    return b(gamma) * (x - b(mean)) / np.sqrt(b(var) + eps) + b(beta)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------ forward & moving stats
def test_training_call_uses_batch_stats_and_updates_moving_averages(rng):
    x = rng.normal(3.0, 2.0, size=(16, 5))
    layer = cbn.BatchNormalization(momentum=0.9, epsilon=1e-3)
    layer.build(x.shape)
    layer.set_weights([rng.normal(size=5), rng.normal(size=5),
                       rng.normal(size=5), rng.uniform(0.5, 2, size=5)])
    mm0, mv0 = layer.moving_mean.copy(), layer.moving_variance.copy()
    y = layer(x, training=True)
    mean, var = numpy_stats(x, (1,))
    np.testing.assert_allclose(y, numpy_bn(x, mean, var, layer.gamma, layer.beta, (1,), 1e-3),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, mm0 * 0.9 + mean * 0.1, rtol=1e-13)
    np.testing.assert_allclose(layer.moving_variance, mv0 * 0.9 + var * 0.1, rtol=1e-13)


def test_training_defaults_to_false_and_uses_moving_stats(rng):
    x = rng.normal(size=(8, 3))
    layer = cbn.BatchNormalization(epsilon=0.01)
    layer.build(x.shape)
    mm, mv = rng.normal(size=3), rng.uniform(0.1, 3, size=3)
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    layer.set_weights([gamma, beta, mm, mv])
    y = layer(x)
    np.testing.assert_allclose(y, numpy_bn(x, mm, mv, gamma, beta, (1,), 0.01), rtol=1e-12)
    np.testing.assert_array_equal(layer.moving_mean, mm)       # no update in inference
    np.testing.assert_array_equal(layer.moving_variance, mv)


def test_moving_statistics_converge_to_data_statistics(rng):
    layer = cbn.BatchNormalization(momentum=0.5)
    x = rng.normal(10.0, 3.0, size=(4000, 2))
    for _ in range(60):
        layer(x, training=True)
    mean, var = numpy_stats(x, (1,))
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_dtype_and_parameter_dtype(rng, dtype):
    x = rng.normal(size=(6, 4)).astype(dtype)
    layer = cbn.BatchNormalization()
    y = layer(x, training=True)
    assert y.dtype == dtype
    assert layer.backward(np.ones_like(x)).dtype == dtype
    for w in layer.weights + layer.gradients:
        assert w.dtype == np.float64 and w.shape == (4,)


def test_input_is_not_modified(rng):
    x = rng.normal(size=(6, 4))
    x.flags.writeable = False
    layer = cbn.BatchNormalization()
    layer(x, training=True)
    layer.backward(np.ones_like(x))


# ------------------------------------------------------------------ multi-axis
def test_multi_axis_statistics_per_pixel(rng):
    x = rng.normal(size=(10, 3, 4)) * np.arange(1, 13).reshape(1, 3, 4)
    layer = cbn.BatchNormalization(axis=[1, 2], momentum=0.0)
    y = layer(x, training=True)
    assert layer.gamma.shape == (3, 4) and layer.count_params() == 4 * 12
    mean, var = numpy_stats(x, (1, 2))
    np.testing.assert_allclose(layer.moving_mean, mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-12)
    np.testing.assert_allclose(y, numpy_bn(x, mean, var, np.ones((3, 4)), np.zeros((3, 4)),
                                           (1, 2), 1e-3), rtol=1e-12, atol=1e-12)


def test_multi_axis_negative_and_non_adjacent(rng):
    x = rng.normal(size=(5, 2, 3, 4))
    layer = cbn.BatchNormalization(axis=[-1, 1], momentum=0.0)
    layer(x, training=True)
    assert layer.axes == (1, 3) and layer.gamma.shape == (2, 4)
    mean, var = numpy_stats(x, (1, 3))
    np.testing.assert_allclose(layer.moving_variance, var, rtol=1e-12)


def test_set_weights_accepts_keras2_broadcast_shape(rng):
    layer = cbn.BatchNormalization(axis=[1, 2])
    layer.build((None, 3, 4))
    values = [rng.normal(size=(1, 3, 4)) for _ in range(4)]
    layer.set_weights(values)
    np.testing.assert_array_equal(layer.moving_mean, values[2].reshape(3, 4))


def test_single_feature_axis_of_images(rng):
    # axis=-1 on (batch, height, width): one statistic per column, over batch and rows.
    x = rng.normal(size=(7, 5, 3))
    layer = cbn.BatchNormalization(momentum=0.0)
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean, x.mean(axis=(0, 1)), rtol=1e-12)


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("axis,shape", [(-1, (6, 3)), ([1, 2], (5, 2, 3)), (1, (4, 3, 2))])
def test_backward_matches_finite_differences(rng, training, axis, shape):
    x = rng.normal(1.0, 2.0, size=shape)
    weight = rng.normal(size=shape)
    layer = cbn.BatchNormalization(axis=axis, momentum=0.7)
    layer.build(shape)
    features = layer.feature_shape
    layer.set_weights([rng.normal(size=features), rng.normal(size=features),
                       rng.normal(size=features), rng.uniform(0.5, 2, size=features)])

    def loss():
        return float(np.sum(layer(x, training=training) * weight))

    loss()
    dx = layer.backward(weight)
    dgamma, dbeta = layer.gradients
    np.testing.assert_allclose(dx, finite_difference(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, finite_difference(loss, layer.gamma), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(dbeta, finite_difference(loss, layer.beta), rtol=1e-6,
                               atol=1e-7)


def test_backward_training_agrees_with_reference(rng):
    x = rng.normal(size=(9, 4)).astype(np.float32)
    dy = rng.normal(size=(9, 4)).astype(np.float32)
    layer = cbn.BatchNormalization(gamma_initializer=rng.normal(size=4))
    layer(x, training=True)
    dx = layer.backward(dy)
    mean, var = reference.batch_stats(x)
    rdx, rdgamma, rdbeta = reference.batch_norm_backward(dy, x, mean, var, layer.gamma)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.gradients[0], rdgamma, rtol=1e-6)
    np.testing.assert_allclose(layer.gradients[1], rdbeta, rtol=1e-6)


def test_inference_backward_is_scaled_dy(rng):
    x, dy = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    layer = cbn.BatchNormalization(gamma_initializer=[2.0, -1.0, 0.5],
                                   moving_variance_initializer=[3.0, 1.0, 0.25], epsilon=0.0)
    layer(x)
    np.testing.assert_allclose(layer.backward(dy),
                               dy * np.array([2.0, -1.0, 0.5]) / np.sqrt([3.0, 1.0, 0.25]),
                               rtol=1e-14)


def test_backward_without_center_and_scale(rng):
    x = rng.normal(size=(6, 3))
    layer = cbn.BatchNormalization(center=False, scale=False)
    layer(x, training=True)
    dx = layer.backward(np.ones_like(x))
    assert layer.gradients == [] and layer.trainable_weights == []
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)   # sum of a normalised column is 0


def test_backward_errors(rng):
    layer = cbn.BatchNormalization()
    with pytest.raises(RuntimeError, match="call the layer"):
        layer.backward(np.ones((2, 2)))
    layer(np.ones((4, 2)), training=True)
    with pytest.raises(ValueError, match="dy has shape"):
        layer.backward(np.ones((4, 3)))


# ------------------------------------------------------------------ frozen layer
def test_trainable_false_freezes_the_layer(rng):
    x = rng.normal(5.0, 2.0, size=(8, 3))
    layer = cbn.BatchNormalization()
    layer(x, training=True)
    layer.trainable = False
    before = layer.get_weights()
    y = layer(x, training=True)
    np.testing.assert_allclose(y, numpy_bn(x, before[2], before[3], before[0], before[1],
                                           (1,), 1e-3), rtol=1e-12)
    for old, new in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert layer.trainable_weights == []
    assert len(layer.non_trainable_weights) == 4
    layer.backward(np.ones_like(x))
    assert layer.gradients == []


# ------------------------------------------------------------------ weights & params
def test_count_params_and_weight_lists():
    layer = cbn.BatchNormalization()
    layer.build((None, 784))
    assert layer.count_params() == 3136
    assert [w is v for w, v in zip(layer.trainable_weights, [layer.gamma, layer.beta])] == [
        True, True]
    assert len(layer.non_trainable_weights) == 2
    assert sum(w.size for w in layer.non_trainable_weights) == 1568
    off = cbn.BatchNormalization(center=False)
    off.build((None, 10))
    assert off.beta is None and off.count_params() == 30
    assert len(off.get_weights()) == 3


def test_count_params_before_build():
    with pytest.raises(ValueError, match="not built"):
        cbn.BatchNormalization().count_params()


def test_initializers(rng):
    values = rng.normal(size=4)
    layer = cbn.BatchNormalization(
        gamma_initializer=values, beta_initializer=2.5,
        moving_mean_initializer=lambda shape, dtype: np.full(shape, 7.0, dtype),
        moving_variance_initializer="zeros")
    layer.build((3, 4))
    np.testing.assert_array_equal(layer.gamma, values)
    np.testing.assert_array_equal(layer.beta, 2.5)
    np.testing.assert_array_equal(layer.moving_mean, 7.0)
    np.testing.assert_array_equal(layer.moving_variance, 0.0)
    assert layer.gamma is not values                     # copied, not aliased
    with pytest.raises(ValueError, match="unknown"):
        cbn.BatchNormalization(gamma_initializer="glorot").build((2, 3))
    with pytest.raises(ValueError, match="shape"):
        cbn.BatchNormalization(gamma_initializer=np.ones(5)).build((2, 3))


def test_get_set_weights_keras_order(rng):
    layer = cbn.BatchNormalization()
    layer.build((None, 3))
    new = [rng.normal(size=3) for _ in range(4)]
    layer.set_weights(new)
    for name, value in zip(["gamma", "beta", "moving_mean", "moving_variance"], new):
        np.testing.assert_array_equal(getattr(layer, name), value)
    got = layer.get_weights()
    got[0][:] = 99.0                                    # copies: layer unchanged
    np.testing.assert_array_equal(layer.gamma, new[0])
    with pytest.raises(ValueError, match="expects 4 weights"):
        layer.set_weights(new[:3])
    with pytest.raises(ValueError, match="shape"):
        layer.set_weights([np.ones(4)] * 4)
    with pytest.raises(ValueError, match="not built"):
        cbn.BatchNormalization().set_weights(new)


def test_weight_arrays_keep_identity_across_updates(rng):
    layer = cbn.BatchNormalization()
    layer(rng.normal(size=(4, 2)), training=True)
    arrays = layer.weights
    layer(rng.normal(size=(4, 2)), training=True)
    layer.set_weights(layer.get_weights())
    assert all(a is b for a, b in zip(arrays, layer.weights))


# ------------------------------------------------------------------ config & files
def test_config_round_trip():
    layer = cbn.BatchNormalization(axis=[1, 2], momentum=0.9, epsilon=1e-5, center=False,
                                   name="bn_x")
    config = layer.get_config()
    clone = cbn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    assert config["axis"] == [1, 2] and config["momentum"] == 0.9 and config["name"] == "bn_x"


def test_config_carries_synchronized_flag():
    assert cbn.BatchNormalization().get_config()["synchronized"] is False
    # A config without the key (saved before it existed) still loads, unsynchronized.
    config = cbn.BatchNormalization().get_config()
    del config["synchronized"]
    assert not cbn.BatchNormalization.from_config(config).synchronized


def test_comm_without_synchronized_is_refused():
    with pytest.raises(ValueError, match="synchronized=True"):
        cbn.BatchNormalization(comm=object())


def test_synchronized_without_mpi4py_gives_a_clear_import_error(monkeypatch):
    # (tests/test_mpi.py runs synchronized layers under mpiexec; MPI is never started here.)
    monkeypatch.setitem(sys.modules, "mpi4py", None)            # import mpi4py fails
    monkeypatch.delitem(sys.modules, "cbn.mpi", raising=False)
    with pytest.raises(ImportError, match=r"synchronized=True.*pip install mpi4py mpich"):
        cbn.BatchNormalization(synchronized=True)
    cbn.BatchNormalization()                                    # unsynchronized: no mpi4py


@pytest.mark.parametrize("to_file", [True, False])
def test_save_and_load(tmp_path, rng, to_file):
    x = rng.normal(size=(6, 2, 3))
    layer = cbn.BatchNormalization(axis=[1, 2], momentum=0.8, scale=False)
    for _ in range(3):
        layer(x * rng.uniform(1, 3), training=True)
    target = tmp_path / "bn.npz" if to_file else io.BytesIO()
    layer.save(target)
    if not to_file:
        target.seek(0)
    else:
        assert set(np.load(target).files) == {"beta", "moving_mean", "moving_variance",
                                              "config", "input_shape"}
    loaded = cbn.BatchNormalization.load(target)
    assert loaded.get_config() == layer.get_config()
    for a, b in zip(layer.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded(x), layer(x))
    x_other_batch = rng.normal(size=(9, 2, 3))
    np.testing.assert_array_equal(loaded(x_other_batch), layer(x_other_batch))


@pytest.mark.parametrize("make_copy", ["pickle", "deepcopy"])
def test_pickled_and_deep_copied_layers_keep_weights_config_and_behaviour(rng, make_copy):
    # (Synchronized layers: tests/mpi_worker.py, scenario layer_copies.)
    layer = cbn.BatchNormalization(axis=[1, 2], momentum=0.8, center=False, name="bn_copy")
    x = [rng.normal(size=(6, 2, 3)) * (1 + step) for step in range(4)]
    layer(x[0], training=True)
    layer.backward(x[0])
    clone = (pickle.loads(pickle.dumps(layer)) if make_copy == "pickle"
             else copy.deepcopy(layer))
    assert clone.get_config() == layer.get_config()
    for ours, theirs in zip(clone.get_weights(), layer.get_weights()):
        assert ours.tobytes() == theirs.tobytes()
    assert clone.moving_mean is not layer.moving_mean
    for ours, theirs in zip(clone.gradients, layer.gradients):
        assert ours.tobytes() == theirs.tobytes()
    np.testing.assert_array_equal(clone.backward(x[0]), layer.backward(x[0]))
    for step in x[1:]:
        np.testing.assert_array_equal(clone(step, training=True), layer(step, training=True))
        np.testing.assert_array_equal(clone.backward(step), layer.backward(step))
        np.testing.assert_array_equal(clone(step), layer(step))
    for ours, theirs in zip(clone.get_weights(), layer.get_weights()):
        assert ours.tobytes() == theirs.tobytes()


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.ones(3))
    with pytest.raises(ValueError, match="not a saved BatchNormalization"):
        cbn.BatchNormalization.load(tmp_path / "other.npz")


# ------------------------------------------------------------------ bad input
def test_shape_mismatch_after_build_is_a_clear_error(rng):
    layer = cbn.BatchNormalization()
    layer(rng.normal(size=(4, 3)), training=True)
    layer(rng.normal(size=(10, 3)))                 # another batch size is fine
    with pytest.raises(ValueError, match="built for inputs of rank 2"):
        layer(rng.normal(size=(4, 5)))
    with pytest.raises(ValueError, match="built for inputs of rank 2"):
        layer(rng.normal(size=(4, 1, 3)), training=True)


def test_a_failed_first_call_leaves_the_layer_unbuilt(rng):
    layer = cbn.BatchNormalization()
    with pytest.raises(TypeError):
        layer(np.arange(12).reshape(4, 3), training=True)     # integers: refused by cbn
    assert not layer.built and layer.gamma is None
    layer(rng.normal(size=(4, 5)), training=True)             # another shape builds anew
    assert layer.feature_shape == (5,)


@pytest.mark.parametrize("axis,error", [(0, ValueError), ([1, 0], ValueError),
                                        (3, ValueError), ([1, 1], ValueError),
                                        ("x", TypeError), (1.5, TypeError)])
def test_bad_axis(axis, error):
    with pytest.raises(error):
        cbn.BatchNormalization(axis=axis).build((2, 3, 4))


@pytest.mark.parametrize("kwargs", [{"momentum": 1.5}, {"epsilon": -1.0},
                                    {"epsilon": float("nan")}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        cbn.BatchNormalization(**kwargs)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError):
        cbn.BatchNormalization()(np.ones((4, 3), dtype=np.int64), training=True)


# ------------------------------------------------------------------ property test
@examples(40)
@given(ndim=st.integers(2, 4), data=st.data())
def test_layer_matches_reference_on_random_shapes(ndim, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    shape = (data.draw(st.integers(2, 5)),) + shape[1:]
    axes = data.draw(st.lists(st.integers(1, ndim - 1), min_size=1, max_size=ndim - 1,
                              unique=True))
    spelled = [a - ndim if data.draw(st.booleans()) else a for a in axes]
    momentum = data.draw(st.floats(0.0, 1.0))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    layer = cbn.BatchNormalization(axis=spelled, momentum=momentum)
    layer.build(shape)
    features = layer.feature_shape
    gamma, beta = rng.normal(size=features), rng.normal(size=features)
    layer.set_weights([gamma, beta, np.zeros(features), np.ones(features)])
    y = layer(x, training=True)
    ry, rmean, rvar = reference.batch_norm_forward(x, gamma, beta, axis=spelled)
    np.testing.assert_allclose(y, ry, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.moving_mean, rmean * (1 - momentum), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, momentum + rvar * (1 - momentum),
                               rtol=1e-10, atol=1e-12)
