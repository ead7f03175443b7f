"""Operands laid out differently from each other: x in one layout, dy and out= in others.

The plan takes a tile order that suits all of them and transposes tiles of the odd operand
in cache (cbn._layout, stage_rows in cbn/_kernels.pyx); every pairing must give the
reference's result, and the same bits for any thread count.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st
from threadpoolctl import threadpool_limits

import cbn
import cbn.api
from cbn import _kernels, _machine, reference
from cbn._layout import make_plan

from budget import examples
from layouts import assert_close, in_layout

PAIRED_LAYOUTS = ("C", "F", "transposed", "stepped", "reversed")


@st.composite
def mixed_case(draw):
    """(values, dy values, axis, x layout, dy layout, out layout, dtype, rng)."""
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 19), min_size=rank, max_size=rank)))
    kept = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=2, unique=True))
    layouts = [draw(st.sampled_from(PAIRED_LAYOUTS)) for _ in range(3)]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return values, dy, sorted(kept), layouts, dtype, rng


@examples(120)
@given(mixed_case())
def test_every_layout_pairing_matches_reference(case):
    values, dy_values, axis, (x_layout, dy_layout, out_layout), dtype, rng = case
    x = in_layout(values, x_layout, rng)
    dy = in_layout(dy_values, dy_layout, rng)
    features = tuple(values.shape[a] for a in axis)
    gamma, beta = rng.standard_normal(features), rng.standard_normal(features)

    out = in_layout(np.zeros_like(values), out_layout, rng)
    y, mean, var = cbn.batch_norm_forward(x, gamma, beta, axis=axis, out=out)
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(values, gamma, beta, axis=axis)
    assert y is out
    assert_close(y, y_ref, dtype, condition=1e4)
    assert_close(mean, mean_ref, np.float64, condition=1e4)
    # The statistics are x's alone: out='s layout does not change their bits.
    for own, got in zip(cbn.batch_stats(x, axis=axis), (mean, var)):
        assert own.tobytes() == got.tobytes()

    out = in_layout(np.zeros_like(values), out_layout, rng)
    y = cbn.batch_norm_inference(x, mean_ref, var_ref, gamma, beta, axis=axis, out=out)
    assert_close(y, y_ref, dtype, condition=1e4)

    out = in_layout(np.zeros_like(values), out_layout, rng)
    dx, dgamma, dbeta = cbn.batch_norm_backward(dy, x, mean_ref, var_ref, gamma, axis=axis,
                                                out=out)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy_values, values, mean_ref,
                                                                  var_ref, gamma, axis=axis)
    assert dx is out
    assert_close(dx, dx_ref, dtype, condition=1e4)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-9)
    sums = cbn.api.gradient_sums(dy, x, mean_ref, var_ref, axis=axis)
    np.testing.assert_allclose(sums[0], dgamma_ref, rtol=1e-9, atol=1e-9)
    # Nor do they change the sums', or dx's: the same bits as without out=, and the sums
    # gradient_sums' (what a sharded backward all-reduces).
    unplaced = cbn.batch_norm_backward(dy, x, mean_ref, var_ref, gamma, axis=axis)
    for own, got in zip(unplaced + sums, (dx, dgamma, dbeta, dgamma, dbeta)):
        assert own.tobytes() == np.ascontiguousarray(got).tobytes()

    np.testing.assert_array_equal(x, values)     # inputs untouched
    np.testing.assert_array_equal(dy, dy_values)


def nchw_as_nhwc(values):
    """NHWC values stored as NCHW: the transposed activation of a training loop."""
    return np.ascontiguousarray(values.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)


LAYOUT_MAKERS = {"C": np.ascontiguousarray, "F": np.asfortranarray, "NCHW": nchw_as_nhwc}
# F beside NCHW-stored: row groups walked feature by feature (features_outer), y's tile
# normalized within the transpose (normalize_transposed), 19 images and rows of 12 making
# partial 8 x 8 blocks.
PAIRS = [("F", "C"), ("C", "F"), ("NCHW", "C"), ("C", "NCHW"), ("F", "NCHW"), ("NCHW", "F")]


def run_all(x, dy, out_like, axis=-1):
    y = cbn.batch_norm_forward(x, axis=axis, out=out_like())
    mean, var = y[1], y[2]
    return (y[0], mean, var, cbn.batch_norm_inference(x, mean, var, axis=axis, out=out_like()),
            *cbn.batch_norm_backward(dy, x, mean, var, axis=axis, out=out_like()))


@pytest.fixture(params=[False, True], ids=["cached stores", "streaming stores"])
def streaming(request):
    """Streaming stores from 0 bytes on, so that small arrays take those paths too."""
    old = _kernels.set_stream_min_bytes(0 if request.param else 1 << 62)
    yield request.param
    _kernels.set_stream_min_bytes(old)


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_layout,other_layout", PAIRS)
def test_mixed_layouts_bitwise_identical_for_one_and_two_threads(x_layout, other_layout,
                                                                 dtype, streaming):
    # 19 x 5 x 12 rows of 40 features: many chunks, rows that are not a multiple of 8.
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((19, 5, 12, 40)) * 2 + 1).astype(dtype)
    x = LAYOUT_MAKERS[x_layout](values)
    dy = LAYOUT_MAKERS[other_layout](rng.standard_normal(values.shape).astype(dtype))

    def out_like():
        return LAYOUT_MAKERS[other_layout](np.empty_like(values))

    with threadpool_limits(1, user_api="openmp"):
        serial = run_all(x, dy, out_like)
    with threadpool_limits(2, user_api="openmp"):
        parallel = run_all(x, dy, out_like)
    for a, b in zip(serial, parallel):
        assert a.tobytes() == b.tobytes()
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(values)
    assert_close(parallel[0], y_ref, dtype, condition=100)
    assert_close(parallel[3], y_ref, dtype, condition=100)
    dx_ref, _, _ = reference.batch_norm_backward(np.asarray(dy), values, mean_ref, var_ref)
    assert_close(parallel[4], dx_ref, dtype, condition=100)


# Operands whose fastest axes are two different reduced axes (x NCHW, the others Fortran:
# W and N) are walked in groups of outer rows (row_group in cbn/_kernels.pyx): 70 images
# make groups of 64 and 6, rows of 300 make tiles of part of a row, and 280 outer rows make
# 3 chunks whose bounds cut groups.
ROW_GROUP_LAYOUTS = {"C": np.ascontiguousarray, "F": np.asfortranarray,
                     "stepped": lambda a: in_layout(a, "stepped", None),
                     "reversed": lambda a: in_layout(a, "reversed", None)}


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_layout,other_layout", [("C", "F"), ("F", "C"), ("F", "stepped"),
                                                   ("reversed", "F")])
def test_row_groups_match_reference_and_threads(x_layout, other_layout, dtype):
    rng = np.random.default_rng(5)
    values = (rng.standard_normal((70, 3, 4, 300)) * 2 + 1).astype(dtype)
    dy_values = rng.standard_normal(values.shape).astype(dtype)
    x = ROW_GROUP_LAYOUTS[x_layout](values)
    dy = ROW_GROUP_LAYOUTS[other_layout](dy_values)

    def out_like():
        return ROW_GROUP_LAYOUTS[other_layout](np.zeros_like(values))

    with threadpool_limits(1, user_api="openmp"):
        serial = run_all(x, dy, out_like, axis=1)
    with threadpool_limits(2, user_api="openmp"):
        parallel = run_all(x, dy, out_like, axis=1)
    for a, b in zip(serial, parallel):
        assert a.tobytes() == b.tobytes()
    y_ref, mean_ref, var_ref = reference.batch_norm_forward(values, axis=1)
    assert_close(parallel[0], y_ref, dtype, condition=100)
    assert_close(parallel[3], y_ref, dtype, condition=100)
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy_values, values, mean_ref,
                                                                  var_ref, axis=1)
    assert_close(parallel[4], dx_ref, dtype, condition=100)
    np.testing.assert_allclose(parallel[5], dgamma_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(parallel[6], dbeta_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x_layout,other_layout,outer", [("F", "NCHW", True),
                                                         ("NCHW", "F", True),
                                                         ("C", "F", False)])
def test_row_groups_walk_features_outer_where_every_operand_keeps_them_apart(
        x_layout, other_layout, outer):
    # NHWC x Fortran beside NCHW-stored: a feature is one block of x and planes of the other,
    # each feature's groups in turn; x C beside Fortran (NCHW axis 1 below: images of a
    # channel adjacent in the Fortran operand) keeps every feature's tile of a group.
    values = np.zeros((6, 5, 7, 9))
    x, other = LAYOUT_MAKERS[x_layout](values), LAYOUT_MAKERS[other_layout](values)
    axes = (3,) if outer else (1,)
    strides = tuple(tuple(s // 8 for s in a.strides) for a in (x, other, other))
    plan = make_plan(values.shape, axes, strides)
    assert plan.row_group > 1 and plan.features_outer == outer


@pytest.mark.parametrize("axis,other", [(1, np.asfortranarray), (-1, np.asfortranarray),
                                        (-1, nchw_as_nhwc)])
def test_forward_statistics_of_unlike_out_are_x_own(axis, other):
    # x and out= laid out unlike: the statistics come from x's own plan, in memory order.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5, 7, 9)) * 3 + 1
    y, mean, var = cbn.batch_norm_forward(x, axis=axis, out=other(np.empty_like(x)))
    own_mean, own_var = cbn.batch_stats(x, axis=axis)
    assert mean.tobytes() == own_mean.tobytes() and var.tobytes() == own_var.tobytes()
    y_ref, _, _ = reference.batch_norm_forward(x, axis=axis)
    assert_close(y, y_ref, x.dtype, condition=100)


def test_fused_backward_with_row_groups_is_the_composed_call_bitwise():
    # x Fortran, dy C (dense like itself): the fused plan and the composed call's agree on
    # the work split, but row groups sum x from its staged copy, so dz is formed first.
    rng = np.random.default_rng(11)
    values = rng.standard_normal((70, 3, 4, 300))
    x, dy = np.asfortranarray(values), rng.standard_normal(values.shape)
    y, mean, var = cbn.batch_norm_forward(x, axis=1, activation="relu")
    fused = cbn.batch_norm_backward(dy, x, mean, var, axis=1, activation="relu", y=y)
    composed = cbn.batch_norm_backward(np.where(y > 0, dy, 0), x, mean, var, axis=1)
    for a, b in zip(fused, composed):
        assert a.tobytes() == b.tobytes()


@pytest.mark.skipif(not cbn.openmp_enabled(), reason="serial build: one thread only")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_layout,dy_layout", [("F", "NCHW"), ("NCHW", "F")])
def test_row_group_backward_of_unlike_inputs_same_bits_every_way(x_layout, dy_layout, dtype,
                                                                 streaming):
    # NHWC x Fortran beside dy stored as NCHW (and the other way round): each tile's sums and
    # dx in one pass, dy's or x's 8x8 blocks transposed in registers (cbn_*_pair), feature by
    # feature. 19 images and rows of 12: whole and partial blocks both ways; 2 chunks. dx laid
    # out like x (the tile walked as its transpose) or like dy, the sums of the backward (one
    # pass per feature) and of gradient_sums (two passes) must agree bitwise, for 1 and 2
    # threads.
    rng = np.random.default_rng(13)
    values = (rng.standard_normal((19, 9, 12, 64)) * 2 + 1).astype(dtype)
    dy_values = rng.standard_normal(values.shape).astype(dtype)
    x = LAYOUT_MAKERS[x_layout](values)
    dy = LAYOUT_MAKERS[dy_layout](dy_values)
    mean, var = cbn.batch_stats(x)
    assert make_plan(values.shape, (3,), tuple(tuple(s // values.itemsize for s in a.strides)
                                               for a in (dy, x))).features_outer
    results = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="openmp"):
            like_x = cbn.batch_norm_backward(dy, x, mean, var)
            like_dy = cbn.batch_norm_backward(dy, x, mean, var,
                                              out=LAYOUT_MAKERS[dy_layout](np.empty_like(values)))
            sums = cbn.api.gradient_sums(dy, x, mean, var)
        results.append((like_x, like_dy, sums))
    for like_x, like_dy, sums in results:
        assert like_x[0].tobytes() == like_dy[0].tobytes()
        for a, b in zip(like_x[1:], sums):
            assert a.tobytes() == b.tobytes()
    for a, b in zip(results[0][0], results[1][0]):
        assert a.tobytes() == b.tobytes()
    dx_ref, dgamma_ref, dbeta_ref = reference.batch_norm_backward(dy_values, values, mean, var)
    assert_close(results[0][0][0], dx_ref, dtype, condition=100)
    np.testing.assert_allclose(results[0][0][1], dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(results[0][0][2], dbeta_ref, rtol=1e-9, atol=1e-9)


def reversed_features(values):
    """The last (feature) axis walked backwards: a negative feature stride."""
    return np.ascontiguousarray(values[..., ::-1])[..., ::-1]


def line_aligned_fortran(values):
    """A Fortran-ordered copy whose data starts on a 64-byte line (NumPy's large arrays
    start 16 bytes into one): every feature's run of rows is then whole lines."""
    size, item = values.size, values.itemsize
    buffer = np.empty(size + 64 // item, values.dtype)
    start = (-buffer.ctypes.data % 64) // item
    out = buffer[start:start + size].reshape(values.shape[::-1]).T
    out[...] = values
    return out


STAGED_LAYOUTS = {"C": np.ascontiguousarray, "F": np.asfortranarray,
                  "aligned F": line_aligned_fortran, "reversed": reversed_features}


# FI tiles of an operand whose features are not adjacent go through a stage (stage_rows,
# unstage_rows): reversed features one vector and a permute at a time (tails of 1-7
# features), rows of 256 float32 or 128 float64 features (1 KiB) in a stage whose rows are
# a line further apart (stage_pitch), and with streaming stores a staged output whose
# features are whole lines written by streaming 8x8 / 4x4 transposes (cbn_transpose_out;
# 260 features: 4 beyond the blocks, ordinary stores). Every result must be the
# reference's; out= must not change its bits, nor x's layout inference's.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_layout,other_layout", [("C", "reversed"), ("reversed", "C"),
                                                   ("reversed", "reversed"), ("C", "F"),
                                                   ("F", "C"), ("C", "aligned F")])
@pytest.mark.parametrize("features", [13, 37, 128, 256, 260])
def test_staged_tiles_match_reference_and_own_bits(x_layout, other_layout, features, dtype,
                                                   streaming):
    rng = np.random.default_rng(17)
    values = (rng.standard_normal((96, features)) * 2 + 1).astype(dtype)
    dy_values = rng.standard_normal(values.shape).astype(dtype)
    x = STAGED_LAYOUTS[x_layout](values)
    dy = STAGED_LAYOUTS[other_layout](dy_values)
    mean, var = cbn.batch_stats(values)

    def out_like():
        return STAGED_LAYOUTS[other_layout](np.zeros_like(values))

    forward = cbn.batch_norm_forward(x, out=out_like())
    inference = cbn.batch_norm_inference(x, mean, var, out=out_like())
    backward = cbn.batch_norm_backward(dy, x, mean, var, out=out_like())
    for got, own in [(forward, cbn.batch_norm_forward(x)),
                     (backward, cbn.batch_norm_backward(dy, x, mean, var)),
                     ((inference,), (cbn.batch_norm_inference(values, mean, var),))]:
        for a, b in zip(got, own):
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    y_ref, _, _ = reference.batch_norm_forward(values)
    assert_close(forward[0], y_ref, dtype, condition=100)
    assert_close(inference, y_ref, dtype, condition=100)
    dx_ref, _, _ = reference.batch_norm_backward(dy_values, values, mean, var)
    assert_close(backward[0], dx_ref, dtype, condition=100)


# NCHW with W reversed (RI runs stepping by -1): the elementwise passes read each run
# forwards (normalize_run, input_gradient_run); 19 columns: SIMD bodies and tails.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reversed_runs_match_reference_and_c_bits(dtype, streaming):
    rng = np.random.default_rng(19)
    values = (rng.standard_normal((9, 6, 7, 19)) * 2 + 1).astype(dtype)
    dy_values = rng.standard_normal(values.shape).astype(dtype)
    x, dy = reversed_features(values), reversed_features(dy_values)
    mean, var = cbn.batch_stats(values, axis=1)
    inference = cbn.batch_norm_inference(x, mean, var, axis=1,
                                         out=reversed_features(np.zeros_like(values)))
    own = cbn.batch_norm_inference(values, mean, var, axis=1)
    assert np.ascontiguousarray(inference).tobytes() == own.tobytes()
    dx = cbn.batch_norm_backward(dy, x, mean, var, axis=1,
                                 out=reversed_features(np.zeros_like(values)))
    for a, b in zip(dx, cbn.batch_norm_backward(dy, x, mean, var, axis=1,
                                                out=np.zeros_like(values))):
        assert np.ascontiguousarray(a).tobytes() == b.tobytes()
    dx_ref, _, _ = reference.batch_norm_backward(dy_values, values, mean, var, axis=1)
    assert_close(dx[0], dx_ref, dtype, condition=100)
    y = cbn.batch_norm_forward(x, axis=1, out=reversed_features(np.zeros_like(values)))[0]
    assert_close(y, reference.batch_norm_forward(values, axis=1)[0], dtype, condition=100)


# NHWC x in Fortran order beside C-ordered dy and out=: runs of 5 images, and as many runs
# as the stage holds staged as one block (block_of) where they continue one another in x.
# Every other row of H (a stepped Fortran view) breaks that continuity at every run, and
# 150 features make tiles of 128 and 22 (blocks of different pitches).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("step", [1, 2])
def test_blocks_of_runs_match_reference_and_own_bits(step, dtype):
    rng = np.random.default_rng(23)
    values = (rng.standard_normal((5, 6, 7, 150)) * 2 + 1).astype(dtype)
    dy_values = rng.standard_normal(values.shape).astype(dtype)
    wide = np.zeros((5, 6 * step, 7, 150), dtype, order="F")
    x = wide[:, ::step]
    x[...] = values
    mean, var = cbn.batch_stats(values)
    y = cbn.batch_norm_inference(x, mean, var, out=np.zeros_like(values))
    assert y.tobytes() == cbn.batch_norm_inference(values, mean, var).tobytes()
    assert_close(y, reference.batch_norm_forward(values)[0], dtype, condition=100)
    backward = cbn.batch_norm_backward(dy_values, x, mean, var, out=np.zeros_like(values))
    for a, b in zip(backward, cbn.batch_norm_backward(dy_values, x, mean, var)):
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    dx_ref, _, _ = reference.batch_norm_backward(dy_values, values, mean, var)
    assert_close(backward[0], dx_ref, dtype, condition=100)


# NCHW with W reversed in some operands only (RI runs stepping by 1 in one, -1 in another):
# each image's H runs of a channel are one tile (near rows, cbn._layout), whose reversed
# runs are loaded and stored with their lanes reversed (_simd.h's cbn_stepped, cbn_scatter).
# 150 columns make vector bodies and tails; rows of 16 back to back in out= a span that
# streams whole lines (cbn_tile_stream_end), also one element past a line start ("C+1",
# where no vector may straddle two rows: none streams); rows of 7, vectors that would
# straddle rows; 3 images, each channel's images in turn (MIN_NEAR_GROUPS). A Fortran out=
# beside reversed x takes row groups, x's runs reversed beside the staged tile. Elementwise
# results are the all-C call's bits.
OPPOSITE_LAYOUTS = {"C": np.ascontiguousarray, "F": np.asfortranarray,
                    "reversed": reversed_features,
                    "C+1": lambda values: shifted(values, "C", 1)}


def assert_nchw_elementwise_c_bits(shape, layouts, dtype, seed):
    """NCHW values of shape, x, dy and out= in the given layouts (OPPOSITE_LAYOUTS): the
    elementwise results (inference, the forward's y, dx) have the bits of the same call in
    C order (the forward's and backward's without out=: their statistics and sums are x's
    and dy's own) on one thread and on two, and the reference's values."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy_values = rng.standard_normal(values.shape).astype(dtype)
    x_layout, dy_layout, out_layout = layouts
    x = OPPOSITE_LAYOUTS[x_layout](values)
    dy = OPPOSITE_LAYOUTS[dy_layout](dy_values)
    mean, var = cbn.batch_stats(values, axis=1)

    def out_like():
        return OPPOSITE_LAYOUTS[out_layout](np.zeros_like(values))

    inference = cbn.batch_norm_inference(x, mean, var, axis=1, out=out_like())
    assert (np.ascontiguousarray(inference).tobytes()
            == cbn.batch_norm_inference(values, mean, var, axis=1).tobytes())
    y = cbn.batch_norm_forward(x, axis=1, out=out_like())[0]
    assert (np.ascontiguousarray(y).tobytes()
            == np.ascontiguousarray(cbn.batch_norm_forward(x, axis=1)[0]).tobytes())
    assert_close(y, reference.batch_norm_forward(values, axis=1)[0], dtype, condition=100)
    dx = cbn.batch_norm_backward(dy, x, mean, var, axis=1, out=out_like())
    for a, b in zip(dx, cbn.batch_norm_backward(dy, x, mean, var, axis=1,
                                                out=np.zeros_like(values))):
        assert np.ascontiguousarray(a).tobytes() == b.tobytes()
    dx_ref, _, _ = reference.batch_norm_backward(dy_values, values, mean, var, axis=1)
    assert_close(dx[0], dx_ref, dtype, condition=100)
    if cbn.openmp_enabled():    # and the same bits on two threads, however small the call
        old = _kernels.set_parallel_min_bytes(0)
        try:
            with threadpool_limits(2, user_api="openmp"):
                again = (cbn.batch_norm_inference(x, mean, var, axis=1, out=out_like()),
                         cbn.batch_norm_forward(x, axis=1, out=out_like())[0],
                         *cbn.batch_norm_backward(dy, x, mean, var, axis=1, out=out_like()))
        finally:
            _kernels.set_parallel_min_bytes(old)
        for a, b in zip(again, (inference, y, *dx)):
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_layout,dy_layout,out_layout", [
    ("C", "C", "reversed"), ("reversed", "C", "C"), ("reversed", "reversed", "C"),
    ("C", "reversed", "reversed"), ("reversed", "C", "F"), ("C", "reversed", "C"),
    ("reversed", "C", "C+1")])
@pytest.mark.parametrize("shape", [(3, 4, 5, 150), (9, 3, 5, 16), (9, 2, 3, 7)])
def test_runs_stepping_both_ways_match_reference_and_c_bits(shape, x_layout, dy_layout,
                                                            out_layout, dtype, streaming):
    assert_nchw_elementwise_c_bits(shape, (x_layout, dy_layout, out_layout), dtype, seed=29)


# x alone takes near rows' row groups (stepped along H, NCHW): the training forward's
# statistics must still be batch_stats' bits, with a fresh y or any out= (with one chunk per
# feature, the forward took its fused statistics-and-normalize walk, which summed those
# runs in another order than batch_stats' row groups: a last bit off).
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(15, 7, 17, 23), (9, 3, 8, 40)])
def test_forward_statistics_are_batch_stats_bits_with_row_groups(shape, dtype):
    rng = np.random.default_rng(41)
    values = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    x = np.zeros(shape[:2] + (2 * shape[2], shape[3]), dtype)[:, :, ::2]
    x[...] = values
    assert cbn._plans.plan_of(shape, (1,), x.itemsize, x.strides).kernel.layout.row_group > 1
    mean, var = cbn.batch_stats(x, axis=1)
    y_ref = reference.batch_norm_forward(values, axis=1)[0]
    for out in (None, np.zeros(shape, dtype), np.zeros(shape, dtype, order="F")):
        y, got_mean, got_var = cbn.batch_norm_forward(x, axis=1, out=out)
        assert got_mean.tobytes() == mean.tobytes() and got_var.tobytes() == var.tobytes()
        assert_close(y, y_ref, dtype, condition=100)


# The plan's first operand (x; dy in the backward) Fortran beside another with W reversed
# (NCHW): row groups along W, whose tile in the reversed operand steps back from outer row
# to outer row; the elementwise passes stage it from its last row (group_staged's
# backwards_staged, first_row), or normalize it within the transpose walked from there
# (normalize_transposed). 70 columns make groups of 64 and 6, 19 images partial 8 x 8
# blocks.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_layout,dy_layout,out_layout", [
    ("F", "C", "reversed"), ("F", "reversed", "reversed"), ("reversed", "F", "F"),
    ("C", "F", "reversed")])
def test_row_groups_stepping_back_match_reference_and_c_bits(x_layout, dy_layout, out_layout,
                                                             dtype):
    assert_nchw_elementwise_c_bits((19, 3, 2, 70), (x_layout, dy_layout, out_layout), dtype,
                                   seed=31)


def shifted(values, layout, offset):
    """values in C order (any rank) or Fortran order (2-d), starting offset elements past a
    cache line start;
    "C-" and "F-" walk the inner axis backwards (a reversed view of either)."""
    buffer = np.zeros(values.size + 64, values.dtype)
    start = (-buffer.ctypes.data % 64) // values.itemsize + offset
    flat = buffer[start:start + values.size]
    out = (flat.reshape(values.shape) if layout[0] == "C"
           else flat.reshape(values.shape[::-1]).T)
    if layout.endswith("-"):
        out = out[:, ::-1] if layout[0] == "C" else out[::-1]
    out[...] = values
    return out


def stepped_fortran(values):
    """A Fortran-ordered view of every other row: staged an element at a time, never
    crosswise (its rows are not adjacent)."""
    wide = np.zeros((2 * values.shape[0], values.shape[1]), values.dtype, order="F")
    wide[::2] = values
    return wide[::2]


@pytest.fixture(params=[False, True], ids=["staged C outputs", "crosswise C outputs"])
def cross_rows_out(request):
    """Outputs by rows beside inputs by features (C beside F) crosswise or staged: the route
    is the machine's choice (python -m cbn calibrate), so both must hold."""
    old = _kernels.set_cross_rows_out(request.param)
    yield request.param
    _kernels.set_cross_rows_out(old)


@pytest.fixture(params=[False, True], ids=["L2 segments", "shortest segments"])
def segments(request):
    """The backward's crosswise passes in segments of the machine's L2, or of one quantum
    each (16 rows for dx, the stage's run for the sums): the bits must not change."""
    shortest = 1 if request.param else _machine.current().cross_block_bytes
    old = _kernels.set_cross_block_bytes(shortest)
    yield request.param
    _kernels.set_cross_block_bytes(old)


# Dense float32 beside its transpose: each item taken crosswise (cbn/_cross.h), 8x8 blocks
# straight from the inputs to the output or the sums, no stage; an operand walked backwards
# along its inner axis (C-, F-) has its blocks' lanes reversed. The gradient sums must
# keep the staged runs' bits (those of a stepped Fortran operand, staged an element at a
# time in the same runs). 3504 rows of 48
# features make two chunks, every feature (Fortran) and row (C) of the output whole lines
# apart, so streaming items start on the output's next line (cross_rows: 13 rows on for an
# output 3 elements into a line); 3501 rows of 37 features leave rows and features beyond
# the blocks; 1203 rows of 208 features make the stage's pieces short (157 rows), so a
# C-ordered output streams crosswise there (cross_rows_pay) and stays staged on the others.
# The results are the C-ordered call's (inference, dx of the same sums) and the
# reference's, on one thread and on two.
@pytest.mark.parametrize("x_layout,other_layout", [("C", "F"), ("F", "C"), ("C-", "F"),
                                                    ("F", "C-"), ("C", "F-"), ("F-", "C-")])
@pytest.mark.parametrize("shape", [(3504, 48), (3501, 37), (1203, 208)])
@pytest.mark.parametrize("offset", [0, 3])
def test_crosswise_tiles_match_reference_and_c_bits(x_layout, other_layout, shape, offset,
                                                    streaming, cross_rows_out, segments):
    rng = np.random.default_rng(37)
    values = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy_values = rng.standard_normal(shape).astype(np.float32)
    x, dy = shifted(values, x_layout, 1), shifted(dy_values, other_layout, 2)
    staged = tuple(stepped_fortran(a) if abs(a.strides[0]) == 4 else a for a in (dy, x))
    assert_crosswise_calls(values, dy_values, x, dy,
                           lambda: shifted(values, other_layout, offset), staged)


def assert_crosswise_calls(values, dy_values, x, dy, out_like, staged):
    """Inference, forward and backward of x (and dy) into out_like() outputs, the backward
    into a fresh one, and the gradient sums: each the reference's; the elementwise results
    the bits of the C-ordered call (inference), of the call into x's own layout (forward)
    or of the fresh output (dx); the sums those of staged, a (dy, x) pair the stage takes
    in the same runs; the same bits on one thread and on two."""
    mean, var = cbn.batch_stats(values)
    y_ref, _, _ = reference.batch_norm_forward(values)
    dx_ref, _, _ = reference.batch_norm_backward(dy_values, values, mean, var)

    def calls():
        return (cbn.batch_norm_inference(x, mean, var, out=out_like()),
                cbn.batch_norm_forward(x, out=out_like())[0],
                cbn.batch_norm_backward(dy, x, mean, var, out=out_like())[0],
                cbn.batch_norm_backward(dy, x, mean, var)[0],
                *cbn.api.gradient_sums(dy, x, mean, var))

    with threadpool_limits(1, user_api="openmp"):
        inference, y, dx, dx_like_x, *sums = results = calls()
    for a, b in zip(sums, cbn.api.gradient_sums(*staged, mean, var)):
        assert a.tobytes() == b.tobytes()
    assert (np.ascontiguousarray(inference).tobytes()
            == cbn.batch_norm_inference(values, mean, var).tobytes())
    assert (np.ascontiguousarray(y).tobytes()
            == np.ascontiguousarray(cbn.batch_norm_forward(x)[0]).tobytes())
    assert np.ascontiguousarray(dx).tobytes() == np.ascontiguousarray(dx_like_x).tobytes()
    assert_close(inference, y_ref, np.float32, condition=100)
    assert_close(y, y_ref, np.float32, condition=100)
    assert_close(dx, dx_ref, np.float32, condition=100)
    if cbn.openmp_enabled():
        with threadpool_limits(2, user_api="openmp"):
            again = calls()
        for a, b in zip(again, results):
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def channels_first(values, offset=0, step=1):
    """NHWC values stored as NCHW (a channels-first array seen as NHWC), starting offset
    elements past a cache line start; step 2 takes every other W of one twice as wide, whose
    rows are not adjacent (staged an element at a time, never crosswise)."""
    n, h, w, c = values.shape
    buffer = np.zeros(values.size * step + 64, values.dtype)
    start = (-buffer.ctypes.data % 64) // values.itemsize + offset
    stored = buffer[start:start + values.size * step].reshape(n, c, h, w * step)[..., ::step]
    view = stored.transpose(0, 2, 3, 1)
    view[...] = values
    return view


# NHWC x stored as NCHW beside C-ordered dy and out= (and the other way round): each image's
# rows are one crosswise segment of the tile (a run that ends where the image does), where
# images are at least the stage's run long. 6 images of 24 x 40 pixels and 40 channels
# make 3 chunks, the second starting 396 rows into the fourth image; each channel of an
# NCHW-stored output is 960 floats, whole cache lines, so streaming items start on its
# next line within their image (cross_rows). 4 images of 30 x 31 pixels and 37 channels
# leave rows and features beyond the blocks; 5 x 7 images are staged. The sums must
# keep the stage's runs' bits (those of an x whose W steps by 2, staged an element at a
# time in the same runs); every result the reference's, the same on one thread and two.
@pytest.mark.parametrize("x_first", [True, False], ids=["x NCHW-stored", "dy NCHW-stored"])
@pytest.mark.parametrize("shape", [(6, 24, 40, 40), (4, 30, 31, 37), (3, 5, 7, 13)])
@pytest.mark.parametrize("offset", [0, 3])
def test_crosswise_images_match_reference_and_staged_bits(x_first, shape, offset, streaming,
                                                          cross_rows_out, segments):
    rng = np.random.default_rng(41)
    values = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy_values = rng.standard_normal(shape).astype(np.float32)

    def arranged(array, first, step=1):
        return channels_first(array, 1, step) if first else array.copy()

    def out_like_dy():
        zeros = np.zeros_like(values)
        return shifted(zeros, "C", offset) if x_first else channels_first(zeros, offset)

    staged = (arranged(dy_values, not x_first, 2), arranged(values, x_first, 2))
    assert_crosswise_calls(values, dy_values, arranged(values, x_first),
                           arranged(dy_values, not x_first), out_like_dy, staged)
