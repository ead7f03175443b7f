"""cbn._layout on its own: the plan addresses every element of every layout exactly once."""
import numpy as np
import pytest
from hypothesis import given

from cbn._layout import make_plan

from budget import examples
from layouts import batch_norm_case


def element_strides(x):
    return tuple(s // x.itemsize for s in x.strides)


def read_at_offsets(x, offsets):
    """x's values at element offsets from x[0, ..., 0], found through x's own indexing."""
    own_offsets = sum(index * stride for index, stride in
                      zip(np.indices(x.shape), element_strides(x))).ravel()
    order = np.argsort(own_offsets, kind="stable")
    position = np.searchsorted(own_offsets[order], offsets)
    assert (own_offsets[order][position] == offsets).all(), "plan points outside x"
    return x.reshape(-1)[order][position]  # reshape flattens in index order, like indices


def plan_offsets(plan, operand=0):
    """(n_features, n_rows) element offsets, features in the plan's order."""
    layout = plan.operands[operand]
    features = (layout.feature_offsets[:, None]
                + np.arange(plan.n_feature_inner) * layout.feature_stride).ravel()
    rows = (layout.row_offsets[:, None] + np.arange(plan.n_row_inner) * layout.row_stride).ravel()
    return features[:, None] + rows[None, :]


@examples(200)
@given(batch_norm_case())
def test_plan_addresses_every_element(case):
    x, _, axes, _ = case
    plan = make_plan(x.shape, axes, (element_strides(x),))
    assert plan.n_features == int(np.prod([x.shape[a] for a in axes]))
    assert plan.n_features * plan.n_rows == x.size
    got = read_at_offsets(x, plan_offsets(plan))
    # Row f of the plan must hold exactly the elements of feature f (in the plan's order,
    # a flipped kept axis numbered from its last index).
    features = [axes[i] for i in plan.feature_order]
    reduced = [a for a in range(x.ndim) if a not in axes]
    flipped = np.flip(x, [axes[i] for i in plan.flipped_features])
    want = np.transpose(flipped, features + reduced).reshape(plan.n_features, -1)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))


@pytest.mark.parametrize("shape,axes,order,features_inner,n_outer_tables", [
    ((32, 56, 56, 64), (3,), "C", True, (1, 1)),        # NHWC: rows x features
    ((32, 64, 56, 56), (1,), "C", False, (1, 32)),      # NCHW: outer x features x inner
    ((32, 56, 56, 64), (3,), "F", False, (1, 1)),       # Fortran NHWC: features x rows
    ((256, 28, 28), (1, 2), "C", True, (1, 1)),         # pixels as features
])
def test_common_layouts_fold_to_few_loops(shape, axes, order, features_inner, n_outer_tables):
    x = np.empty(shape, np.float32, order=order)
    plan = make_plan(shape, axes, (element_strides(x),))
    assert plan.features_inner == features_inner
    assert (plan.n_feature_outer, plan.n_row_outer) == n_outer_tables


def test_transposed_view_folds_without_tables():
    x = np.empty((1024, 8192), np.float32).T   # (8192, 1024) view, features strided
    plan = make_plan(x.shape, (1,), (element_strides(x),))
    assert not plan.features_inner
    assert plan.operands[0].row_stride == 1
    assert plan.n_feature_outer == plan.n_row_outer == 1


def test_operands_with_different_layouts_share_one_plan():
    x = np.empty((6, 5, 4))
    y = np.asfortranarray(x)
    plan = make_plan(x.shape, (2,), (element_strides(x), element_strides(y)))
    x_offsets, y_offsets = plan_offsets(plan, 0), plan_offsets(plan, 1)
    # The same (feature, row) cell must be the same index in both arrays.
    x_index = np.stack(np.unravel_index(x_offsets, x.shape))
    y_index = np.stack(np.unravel_index(y_offsets, x.shape, order="F"))
    np.testing.assert_array_equal(x_index, y_index)


@pytest.mark.parametrize("x_order,dy_order", [("F", "C"), ("C", "F"), ("NCHW", "C")])
def test_disagreeing_operands_get_tiles_of_whole_lines(x_order, dy_order):
    """Each operand's fastest axis is one of the two inner loops (features inner), so a
    tile of features x rows covers whole cache lines of both; both walk the same cells."""
    values = np.arange(8 * 14 * 14 * 64, dtype=np.float64).reshape(8, 14, 14, 64)

    def make(order):
        if order == "NCHW":
            return np.ascontiguousarray(values.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        return np.asarray(values, order=order)
    x, dy = make(x_order), make(dy_order)
    plan = make_plan(x.shape, (3,), (element_strides(x), element_strides(dy)))
    assert plan.features_inner
    for layout in plan.operands:
        assert 1 in (abs(layout.feature_stride), abs(layout.row_stride))
    np.testing.assert_array_equal(read_at_offsets(x, plan_offsets(plan, 0)),
                                  read_at_offsets(dy, plan_offsets(plan, 1)))


@pytest.mark.parametrize("images,row_group,features_outer", [(32, 56, False), (3, 56, True)])
def test_runs_of_a_feature_nearer_than_features_are_grouped(images, row_group,
                                                             features_outer):
    """NCHW with W reversed in x beside a C-ordered dy (W steps -1 in one, +1 in the other:
    H and W do not merge): each feature's H runs of an image make a row group, so the walk
    takes a channel's plane at a time, as memory runs, instead of one row of every channel
    in turn; with few images, each channel's images in turn. Matched, H and W merge."""
    values = np.empty((images, 64, 56, 56), np.float32)
    reversed_x = values[..., ::-1]
    plan = make_plan(values.shape, (1,), (element_strides(values), element_strides(reversed_x)))
    assert (plan.row_group, plan.features_outer) == (row_group, features_outer)
    assert plan.n_row_inner == 56
    matched = make_plan(values.shape, (1,), (element_strides(values),) * 2)
    assert (matched.row_group, matched.n_row_inner) == (1, 56 * 56)


def test_kept_axes_walked_backwards_by_every_operand_are_flipped():
    """Channels stored reversed in x and dy (NHWC, BGR <-> RGB): the feature axis is walked
    forwards, its features numbered from the last, so the plan is the C-ordered one's but
    for where each walk starts; beside a forward operand it is not flipped."""
    values = np.empty((8, 14, 14, 32), np.float32)
    reversed_c = values[..., ::-1]
    both = make_plan(values.shape, (3,), (element_strides(reversed_c),) * 2)
    plain = make_plan(values.shape, (3,), (element_strides(values),) * 2)
    assert both.flipped_features == (0,) and plain.flipped_features == ()
    assert [o.feature_stride for o in both.operands] == [1, 1]
    assert both.features_inner and both.n_row_outer == plain.n_row_outer == 1
    mixed = make_plan(values.shape, (3,), (element_strides(reversed_c), element_strides(values)))
    assert mixed.flipped_features == ()
