"""Batch norm fused with an activation and a residual (issue 9 part 3).

Three oracles: the reference against finite differences in float64; the kernels bitwise
against the plain kernels composed with cbn.activation in x's dtype (what the fused calls
promise), in every layout of every operand, with cached and streaming stores, on 1 and 2
threads; and the kernels against the reference up to rounding.
"""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from threadpoolctl import threadpool_limits

import cbn
from cbn import _buffers, _kernels, _plans, reference
from cbn.activation import MASKABLE, Activation, as_activation, pack_mask

from layouts import assert_close, in_layout
from numerical import finite_difference

ACTIVATIONS = ("relu", "leaky_relu", "elu", ("leaky_relu", 0.01), ("elu", 0.5))
LAYOUTS = ("C", "F", "transposed", "stepped", "reversed", "broadcast")
OUT_LAYOUTS = ("C", "F", "transposed", "stepped", "reversed")


# ----------------------------------------------------------------------------------------
# The reference against finite differences
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,axis", [((5, 3), -1), ((2, 3, 2, 2), 1)])
def test_reference_backward_matches_finite_differences(shape, axis, activation):
    rng = np.random.default_rng(7)
    x, residual, w = (rng.normal(size=shape) for _ in range(3))
    features = (shape[axis],)
    gamma, beta = rng.normal(size=features) + 1.5, rng.normal(size=features)

    def loss():
        y, _, _ = reference.batch_norm_forward(x, gamma, beta, axis=axis,
                                               activation=activation, residual=residual)
        return math.fsum((w * y).ravel().tolist())

    y, mean, var = reference.batch_norm_forward(x, gamma, beta, axis=axis,
                                                activation=activation, residual=residual)
    dx, dgamma, dbeta, dresidual = reference.batch_norm_backward(
        w, x, mean, var, gamma, axis=axis, activation=activation, y=y, residual=True)
    if as_activation(activation).name in MASKABLE:
        *_, mask = reference.batch_norm_forward(x, gamma, beta, axis=axis, activation=activation,
                                                residual=residual, return_mask=True)
        through_mask = reference.batch_norm_backward(w, x, mean, var, gamma, axis=axis,
                                                     activation=activation, mask=mask)
        np.testing.assert_array_equal(through_mask[0], dx)
    for analytic, array in ((dx, x), (dgamma, gamma), (dbeta, beta), (dresidual, residual)):
        numeric = finite_difference(loss, array)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7)
    # the check sees the activation: batch norm's gradient of w itself does not pass it
    plain = reference.batch_norm_backward(w, x, mean, var, gamma, axis=axis)[0]
    assert not np.allclose(plain, finite_difference(loss, x), rtol=1e-6, atol=1e-7)


def test_activation_definitions():
    z = np.array([-2.0, -0.0, 0.0, 0.5, np.nan, -np.inf, np.inf], np.float32)
    relu = as_activation("relu").apply(z)
    np.testing.assert_array_equal(relu, np.maximum(z, 0))
    assert not np.signbit(relu[:2]).any()                      # +0 where z <= 0
    leaky = as_activation("leaky_relu").apply(z)
    np.testing.assert_array_equal(leaky, np.where(z > 0, z, np.float32(0.2) * z))
    elu = as_activation(("elu", 2.0)).apply(z.astype(np.float64))
    np.testing.assert_allclose(elu[:4], [2 * math.expm1(-2.0), 0, 0, 0.5])
    assert np.isnan(elu[4]) and elu[5] == -2.0 and elu[6] == np.inf
    assert as_activation(("leaky_relu", 0.2)).spec == "leaky_relu"
    assert as_activation(("elu", 0.5)).spec == ("elu", 0.5)


# ----------------------------------------------------------------------------------------
# The kernels: bitwise the plain kernels composed with the activation
# ----------------------------------------------------------------------------------------

@st.composite
def fused_case(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=rank, max_size=rank)))
    kept = sorted(draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=2,
                                unique=True)))
    layouts = {name: draw(st.sampled_from(LAYOUTS))
               for name in ("x", "residual", "dy", "y")}
    layouts["out"] = draw(st.sampled_from((None,) + OUT_LAYOUTS))
    return dict(shape=shape, axis=kept, layouts=layouts,
                dtype=draw(st.sampled_from([np.float32, np.float64, np.float16])),
                activation=draw(st.sampled_from((None,) + ACTIVATIONS)),
                with_residual=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def arrange(values, layout, seed):
    """values in layout; the same seed gives the same layout (transposed picks an order)."""
    return in_layout(values.copy(), layout, np.random.default_rng(seed))


def empty_in(layout, shape, dtype, seed):
    return None if layout is None else arrange(np.zeros(shape, dtype), layout, seed)


@pytest.fixture(params=[False, True], ids=["cached stores", "streaming stores"])
def streaming(request):
    """Streaming stores from 0 bytes on, so that small arrays take those paths too."""
    old = _kernels.set_stream_min_bytes(0 if request.param else 1 << 62)
    yield request.param
    _kernels.set_stream_min_bytes(old)


@pytest.fixture(params=[False, True], ids=["rows", "strips"])
def strips(request):
    """Rows of any width strip by strip (_simd.h's strips, the factors in registers), as
    rows whose factors take over half the L1d are written."""
    old = _kernels.set_strip_min_bytes(0 if request.param else 1 << 62)
    yield request.param
    _kernels.set_strip_min_bytes(old)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])   # set once per run
@given(case=fused_case())
def test_fused_calls_are_the_composed_calls_bitwise(case, streaming, strips):
    shape, axis, dtype, layouts, seed = (case["shape"], case["axis"], case["dtype"],
                                         case["layouts"], case["seed"])
    act = as_activation(case["activation"])
    rng = np.random.default_rng(seed)
    x = arrange((rng.standard_normal(shape) * 2 + 0.5).astype(dtype), layouts["x"], seed)
    residual = (arrange(rng.standard_normal(shape).astype(dtype), layouts["residual"], seed)
                if case["with_residual"] else None)
    features = tuple(shape[a] for a in axis)
    gamma, beta = rng.standard_normal(features), rng.standard_normal(features)
    out_layout = layouts["out"]

    def then_activation(y):
        z = y if residual is None else y + residual
        return z if act is None else act.apply(z)

    out = empty_in(out_layout, shape, dtype, seed)
    y, mean, var = cbn.batch_norm_forward(x, gamma, beta, axis=axis, out=out,
                                          activation=case["activation"], residual=residual)
    plain, mean_plain, var_plain = cbn.batch_norm_forward(
        x, gamma, beta, axis=axis, out=empty_in(out_layout, shape, dtype, seed))
    assert y.dtype == x.dtype and (out is None or y is out)
    assert then_activation(plain).tobytes() == np.ascontiguousarray(y).tobytes()
    assert mean.tobytes() == mean_plain.tobytes() and var.tobytes() == var_plain.tobytes()

    out = empty_in(out_layout, shape, dtype, seed)
    inferred = cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis, out=out,
                                        activation=case["activation"], residual=residual)
    plain = cbn.batch_norm_inference(x, mean, var, gamma, beta, axis=axis)
    assert then_activation(plain).tobytes() == np.ascontiguousarray(inferred).tobytes()

    y_forward = arrange(np.asarray(y), layouts["y"], seed)
    dy = arrange(rng.standard_normal(shape).astype(dtype), layouts["dy"], seed)
    out = empty_in(out_layout, shape, dtype, seed)
    grads = cbn.batch_norm_backward(
        dy, x, mean, var, gamma, axis=axis, out=out, activation=case["activation"],
        y=None if act is None else y_forward, residual=residual is not None)
    dz = dy   # the dz the fused backward stands for: laid out densely like dy
    if act is not None:
        dz = _buffers.empty_like(dy, dense=True)
        dz[...] = act.gradient(dy, y_forward)
    composed = cbn.batch_norm_backward(dz, x, mean, var, gamma, axis=axis,
                                       out=empty_in(out_layout, shape, dtype, seed))
    assert len(grads) == 3 + (residual is not None)
    for fused, expected in zip(grads, composed + (dz,)):
        assert fused.tobytes() == np.ascontiguousarray(expected).tobytes()

    if act is not None and act.name in MASKABLE:   # the mask stands for y, bit for bit
        *forward, mask = cbn.batch_norm_forward(
            x, gamma, beta, axis=axis, out=empty_in(out_layout, shape, dtype, seed),
            activation=case["activation"], residual=residual, return_mask=True)
        assert forward[0].tobytes() == y.tobytes()
        assert mask.tobytes() == pack_mask(np.asarray(y) > 0).tobytes()
        inferred, mask_inferred = cbn.batch_norm_inference(
            x, mean, var, gamma, beta, axis=axis, activation=case["activation"],
            residual=residual, return_mask=True)
        assert mask_inferred.tobytes() == pack_mask(inferred > 0).tobytes()
        through_mask = cbn.batch_norm_backward(
            dy, x, mean, var, gamma, axis=axis, out=empty_in(out_layout, shape, dtype, seed),
            activation=case["activation"], mask=pack_mask(y_forward > 0),
            residual=residual is not None)
        for fused, expected in zip(through_mask, grads):
            assert fused.tobytes() == expected.tobytes()

    # ... and the reference's results up to rounding
    y_ref = reference.batch_norm_forward(x, gamma, beta, axis=axis,
                                         activation=case["activation"], residual=residual)[0]
    assert_close(y, y_ref, dtype, condition=1e3)
    grads_ref = reference.batch_norm_backward(
        dy, x, mean, var, gamma, axis=axis, activation=case["activation"],
        y=None if act is None else y_forward, residual=residual is not None)
    assert_close(grads[0], grads_ref[0], dtype, condition=1e4)


@pytest.mark.parametrize("activation", ["relu", ("elu", 0.5)])
def test_in_place_into_the_residual_and_dy(activation):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 33)).astype(np.float32)
    residual = rng.standard_normal(x.shape).astype(np.float32)
    expected, mean, var = cbn.batch_norm_forward(x, activation=activation,
                                                 residual=residual.copy())
    y = cbn.batch_norm_forward(x, activation=activation, residual=residual, out=residual)[0]
    assert y is residual and y.tobytes() == expected.tobytes()
    dy = rng.standard_normal(x.shape).astype(np.float32)
    expected = cbn.batch_norm_backward(dy.copy(), x, mean, var, activation=activation, y=y)
    dx = cbn.batch_norm_backward(dy, x, mean, var, activation=activation, y=y, out=dy)[0]
    assert dx is dy and dx.tobytes() == expected[0].tobytes()


# The hypothesis cases are too small for a backward in the planes order (RI with 8 outer rows
# or more and several chunks of them, as NCHW): these are not, one with planes that start
# mid-byte of the mask (37 x 31 elements), and two of short planes, whose sums take several
# images' planes at once (7 x 7: mostly mid-byte, each chunk of 22 images ending in a
# shorter tile; 4 x 4: every plane's bits start a byte). Smaller arrays, one feature at a
# time: test_fused_backward_of_short_runs.
@pytest.mark.parametrize("shape", [(16, 8, 32, 32), (24, 6, 37, 31), (44, 80, 7, 7),
                                   (64, 128, 4, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation,through_mask,residual", [
    ("relu", True, False), ("leaky_relu", False, True), (("elu", 0.5), False, False)])
def test_fused_backward_in_the_planes_order(shape, dtype, activation, through_mask, residual):
    rng = np.random.default_rng(7)
    x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    gamma = rng.standard_normal(shape[1])
    act = as_activation(activation)
    y, mean, var, mask = (cbn.batch_norm_forward(x, gamma, axis=1, activation=activation,
                                                 return_mask=True) if through_mask else
                          cbn.batch_norm_forward(x, gamma, axis=1, activation=activation)
                          + (None,))
    kernel = _plans.plan_of(x.shape, (1,), x.itemsize, x.strides, x.strides).kernel
    assert kernel.layout.n_row_outer >= 8 and not kernel.second_pass_in_cache()   # planes
    grads = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=1, activation=activation,
                                    y=None if through_mask else y, mask=mask,
                                    residual=residual)
    dz = act.gradient(dy, y)
    composed = cbn.batch_norm_backward(dz, x, mean, var, gamma, axis=1)
    for fused, expected in zip(grads, composed + ((dz,) if residual else ())):
        assert fused.tobytes() == expected.tobytes()


# An image's planes, back to back in every operand and in the mask, are walked as one run
# (cbn_normalize_act_image, cbn_act_input_gradient_image): vectors that span two planes
# take each lane's factors from its own plane, and the bits of planes that start mid-byte
# (7 x 7, 37 x 31; 4 x 4 starts every plane on a byte) are gathered across them. The
# forward with a residual, every activation, on one and two threads: the composed call's
# bits, and the mask's; the backward the same through the mask and through y.
@pytest.mark.parametrize("shape", [(44, 80, 7, 7), (24, 6, 37, 31), (64, 24, 4, 4),
                                   (3, 5, 9, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_planes_walked_as_one_run_give_the_composed_bits(shape, dtype, activation, streaming):
    rng = np.random.default_rng(9)
    x, dy, residual = (rng.standard_normal(shape).astype(dtype) for _ in range(3))
    gamma, beta = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    act = as_activation(activation)
    maskable = act.name in MASKABLE
    plain, mean, var = cbn.batch_norm_forward(x, gamma, beta, axis=1)
    expected = act.apply(plain + residual)
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="openmp"):
            got = cbn.batch_norm_forward(x, gamma, beta, axis=1, activation=activation,
                                         residual=residual, return_mask=maskable)
            assert got[0].tobytes() == expected.tobytes()
            if maskable:
                assert got[3].tobytes() == pack_mask(expected > 0).tobytes()
            dz = act.gradient(dy, expected)
            composed = cbn.batch_norm_backward(dz, x, mean, var, gamma, axis=1)
            for mask in ((got[3], None) if maskable else (None,)):
                grads = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=1,
                                                activation=activation, residual=True,
                                                mask=mask, y=None if mask is not None
                                                else expected)
                for fused, want in zip(grads, composed + (dz,)):
                    assert fused.tobytes() == want.tobytes()


@pytest.mark.parametrize("shape", [(19, 8, 7, 7), (5, 8, 7, 7), (19, 6, 7, 3)])
@pytest.mark.parametrize("through_mask", [True, False])
def test_fused_backward_of_short_runs(shape, through_mask):
    """Short runs summed several at a time in a feature's item (one chunk per feature, or
    fewer than 8 outer rows): the fused sums as the composed call's."""
    rng = np.random.default_rng(8)
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    gamma = rng.standard_normal(shape[1])
    y, mean, var, mask = cbn.batch_norm_forward(x, gamma, axis=1, activation="relu",
                                                return_mask=True)
    grads = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=1, activation="relu",
                                    y=None if through_mask else y,
                                    mask=mask if through_mask else None)
    composed = cbn.batch_norm_backward(as_activation("relu").gradient(dy, y), x, mean, var,
                                       gamma, axis=1)
    for fused, expected in zip(grads, composed):
        assert fused.tobytes() == expected.tobytes()


# The planes' dx loop takes one call per feature_offsets entry of an outer row (the planes of
# its features a stride apart): here features over two non-adjacent axes (3 entries of 4
# features), with the mask, y and a residual's gradient, float32 and float64.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation,through_mask,residual", [
    ("relu", True, False), ("leaky_relu", True, True), (("elu", 0.5), False, True)])
def test_fused_planes_of_features_over_two_axes(dtype, activation, through_mask, residual):
    rng = np.random.default_rng(8)
    shape, axis = (16, 3, 8, 4, 96), (1, 3)
    x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    gamma = rng.standard_normal((3, 4))
    layout = _plans.plan_of(x.shape, axis, x.itemsize, x.strides, x.strides).kernel
    assert layout.layout.n_feature_outer == 3 and not layout.second_pass_in_cache()   # planes
    y, mean, var, *mask = cbn.batch_norm_forward(x, gamma, axis=axis, activation=activation,
                                                 return_mask=through_mask)
    grads = cbn.batch_norm_backward(dy, x, mean, var, gamma, axis=axis, activation=activation,
                                    y=None if through_mask else y,
                                    mask=mask[0] if through_mask else None, residual=residual)
    dz = as_activation(activation).gradient(dy, y)
    composed = cbn.batch_norm_backward(dz, x, mean, var, gamma, axis=axis)
    for fused, expected in zip(grads, composed + ((dz,) if residual else ())):
        assert fused.tobytes() == expected.tobytes()


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
@pytest.mark.parametrize("shape,axis", [((64, 30, 40), -1), ((8, 30, 400), 1), ((16, 8, 32, 32), 1),
                                         ((3, 9000), 0)])
def test_fused_bitwise_identical_for_one_and_two_threads(shape, axis):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(np.float32)
    residual, dy = (np.asfortranarray(rng.standard_normal(shape).astype(np.float32))
                    for _ in range(2))

    def run():
        y, mean, var = cbn.batch_norm_forward(x, axis=axis, activation="elu",
                                              residual=residual)
        masked = cbn.batch_norm_forward(x, axis=axis, activation="relu", residual=residual,
                                        return_mask=True)
        return (y, mean, var) + cbn.batch_norm_backward(
            dy, x, mean, var, axis=axis, activation="elu", y=y, residual=True) + masked + \
            cbn.batch_norm_backward(dy, x, mean, var, axis=axis, activation="relu",
                                    mask=masked[-1])
    with threadpool_limits(1, user_api="openmp"):
        serial = run()
    with threadpool_limits(2, user_api="openmp"):
        parallel = run()
    for a, b in zip(serial, parallel):
        assert a.tobytes() == b.tobytes()


def off_the_line(shape, dtype=np.float32, offset=16):
    """An empty array starting offset (16) bytes past a cache line: a streamed run then
    begins with scalar stores, and rows of whole lines are not line-aligned."""
    size = math.prod(shape)
    buffer = np.empty(size + 64 // np.dtype(dtype).itemsize, dtype)
    start = (-buffer.ctypes.data % 64 + offset) // buffer.itemsize
    return buffer[start:start + size].reshape(shape)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,axis,order", [
    ((150, 200), -1, None), ((3, 7, 9, 80), -1, None), ((6, 5, 37, 31), 1, None),
    ((10, 3, 37, 31), 1, None), ((3, 37, 31, 16), 1, (0, 3, 1, 2))])
def test_mask_bits_past_whole_words_and_off_the_line(shape, axis, order, threads, streaming,
                                                     strips):
    """Runs long enough for the kernels' 64-bit words of mask bits, starting mid-byte
    (37 x 31 planes), into an out= off the cache line, on one and two threads; and x a
    channels_last view (order), whose bits are adjacent along rows, not features."""
    x = np.random.default_rng(11).standard_normal(shape).astype(np.float32)
    out = off_the_line(shape)
    if order is not None:
        x, out = x.transpose(order), out.transpose(order)
    with threadpool_limits(threads, user_api="openmp"):
        y, _, _, mask = cbn.batch_norm_forward(x, axis=axis, out=out, activation="relu",
                                               return_mask=True)
    plain = cbn.batch_norm_forward(x, axis=axis)[0]
    assert y is out and y.tobytes() == as_activation("relu").apply(plain).tobytes()
    assert mask.tobytes() == pack_mask(plain > 0).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0, 16], ids=["on the line", "off the line"])
def test_strips_of_every_width(dtype, offset, streaming, strips):
    """Rows of 1-40 features and a few wider (strips of whole registers, of a line, of one
    vector; scalar columns before and after the streamed lines), each width with another
    activation and operands: y, the mask's bits (rows starting mid-byte for odd widths),
    dx through y and through the mask, dres; outputs on and 16 bytes off a cache line."""
    rng = np.random.default_rng(3)
    for width in list(range(1, 41)) + [48, 56, 63, 64, 72, 80, 96, 130]:
        shape = (11, width)
        activation = ACTIVATIONS[width % len(ACTIVATIONS)]
        act = as_activation(activation)
        x, dy = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
        residual = rng.standard_normal(shape).astype(dtype) if width % 3 == 0 else None
        gamma, beta = rng.standard_normal(width), rng.standard_normal(width)
        plain, mean, var = cbn.batch_norm_forward(x, gamma, beta)
        expected = act.apply(plain if residual is None else plain + residual)
        y = cbn.batch_norm_forward(x, gamma, beta, out=off_the_line(shape, dtype, offset),
                                   activation=activation, residual=residual)[0]
        assert y.tobytes() == expected.tobytes(), width
        dz = act.gradient(dy, expected)
        composed = cbn.batch_norm_backward(dz, x, mean, var, gamma) + (dz,)
        grads = cbn.batch_norm_backward(dy, x, mean, var, gamma, activation=activation, y=y,
                                        out=off_the_line(shape, dtype, offset),
                                        residual=residual is not None)
        through = [grads]
        if act.name in MASKABLE:
            *_, mask = cbn.batch_norm_forward(x, gamma, beta, activation=activation,
                                              out=off_the_line(shape, dtype, offset),
                                              residual=residual, return_mask=True)
            assert mask.tobytes() == pack_mask(expected > 0).tobytes(), width
            through.append(cbn.batch_norm_backward(
                dy, x, mean, var, gamma, activation=activation, mask=mask,
                out=off_the_line(shape, dtype, offset), residual=residual is not None))
        for fused in through:
            for got, want in zip(fused, composed):
                assert got.tobytes() == want.tobytes(), width


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["relu", ("leaky_relu", 0.5)])
@pytest.mark.parametrize("shape,axis", [((3, 16, 8, 8), 1), ((3, 8, 8, 16), -1), ((24, 40), -1)])
def test_mask_of_exact_zeros_and_nans(shape, axis, activation, dtype):
    """z exactly +0 (x at the mean, beta 0) and NaN: y as the activation gives it, and the
    mask bit clear (z > 0 is false) in every loop that stores the bits (runs, strips)."""
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, shape).astype(dtype)
    x.flat[::7] = np.nan
    features = x.shape[axis]
    mean, var = np.zeros(features), np.ones(features)
    gamma, beta = np.where(np.arange(features) % 2, 1.5, -1.5), np.zeros(features)
    plain = cbn.batch_norm_inference(x, mean, var, gamma, beta, axis)
    y, mask = cbn.batch_norm_inference(x, mean, var, gamma, beta, axis, activation=activation,
                                       return_mask=True)
    assert np.count_nonzero(plain == 0) and np.count_nonzero(np.isnan(plain))
    assert y.tobytes() == as_activation(activation).apply(plain).tobytes()
    assert mask.tobytes() == pack_mask(plain > 0).tobytes()


# ----------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------

X = np.zeros((4, 3), np.float32)
M, V = np.zeros(3), np.ones(3)


@pytest.mark.parametrize("activation,error,match", [
    ("gelu", ValueError, "unknown activation 'gelu'"),
    (("relu", 0.1), ValueError, "relu takes no alpha"),
    (("leaky_relu", -1.0), ValueError, "alpha must be a finite number >= 0"),
    (("elu", "one"), TypeError, "alpha must be a real number"),
    (3, TypeError, "activation must be None, a name or a"),
])
def test_bad_activation(activation, error, match):
    with pytest.raises(error, match=match):
        cbn.batch_norm_forward(X, activation=activation)
    with pytest.raises(error, match=match):
        cbn.batch_norm_backward(X, X, M, V, activation=activation, y=X)


@pytest.mark.parametrize("residual", [np.zeros((4, 2), np.float32), np.zeros((4, 3))])
def test_bad_residual(residual):
    with pytest.raises(ValueError, match="residual must have x's shape"):
        cbn.batch_norm_forward(X, residual=residual)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        reference.batch_norm_inference(X, M, V, residual=residual)


def test_bad_backward_arguments():
    with pytest.raises(ValueError, match="needs the forward's output: pass y="):
        cbn.batch_norm_backward(X, X, M, V, activation="relu")
    with pytest.raises(ValueError, match="y and mask are only used with an activation"):
        cbn.batch_norm_backward(X, X, M, V, y=X)
    mask = pack_mask(X > 0)
    with pytest.raises(ValueError, match="pass y or mask, not both"):
        cbn.batch_norm_backward(X, X, M, V, activation="relu", y=X, mask=mask)
    with pytest.raises(ValueError, match="elu's derivative needs y"):
        cbn.batch_norm_backward(X, X, M, V, activation="elu", mask=mask)
    for bad in (mask[:1], mask.astype(np.int8), np.zeros(12, np.uint8)):
        with pytest.raises(ValueError, match=r"mask must be a uint8 array of shape \(2,\)"):
            cbn.batch_norm_backward(X, X, M, V, activation="relu", mask=bad)
    with pytest.raises(ValueError, match="return_mask needs activation relu or leaky_relu"):
        cbn.batch_norm_forward(X, activation="elu", return_mask=True)
    with pytest.raises(ValueError, match="return_mask needs activation relu or leaky_relu"):
        cbn.batch_norm_inference(X, M, V, return_mask=True)
    with pytest.raises(ValueError, match="y must have x's shape"):
        cbn.batch_norm_backward(X, X, M, V, activation="relu", y=X[:2])
    with pytest.raises(TypeError, match="residual must be True or False"):
        cbn.batch_norm_backward(X, X, M, V, activation="relu", y=X, residual=X)


def test_out_partly_overlapping_the_residual_is_refused():
    buffer = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="partly overlaps"):
        cbn.batch_norm_forward(X, residual=buffer[1:], out=buffer[:4])


def test_activation_objects_are_accepted():
    act = Activation("leaky_relu", 0.3)
    assert as_activation(act) is act


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,cut", [((9, 3, 5, 24), slice(None, None, 2)),
                                       ((12, 4, 40), slice(None, None, 3)),
                                       ((10, 3, 6, 7), slice(None, None, -1))])
@pytest.mark.parametrize("dy_layout", ["C", "as x"])
@pytest.mark.parametrize("through", ["y", "mask"])
def test_fused_sums_of_runs_a_step_apart_are_the_composed_sums(shape, cut, dy_layout, through,
                                                               dtype):
    """x's runs a step apart (every other or every third W; W reversed beside a C-ordered
    dy): the fused backward gathers x and forms dz in the vector loops as the composed call
    sums its dz, so the bits are the composed call's. (The layouts above, drawn at random
    over shapes of up to 9, seldom reach these runs with a vector's worth of elements.)"""
    rng = np.random.default_rng(len(shape) + cut.step)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)[..., cut]
    dy = (rng.standard_normal(x.shape).astype(dtype) if dy_layout == "C"
          else rng.standard_normal(shape).astype(dtype)[..., cut])
    y, mean, var = cbn.batch_norm_forward(x, axis=1, activation="relu")
    given = {"y": y} if through == "y" else {"mask": pack_mask(np.asarray(y) > 0)}
    fused = cbn.batch_norm_backward(dy, x, mean, var, axis=1, activation="relu", **given)
    dz = _buffers.empty_like(dy, dense=True)
    dz[...] = as_activation("relu").gradient(dy, y)
    composed = cbn.batch_norm_backward(dz, x, mean, var, axis=1)
    for got, expected in zip(fused, composed):
        assert got.tobytes() == np.ascontiguousarray(expected).tobytes()
