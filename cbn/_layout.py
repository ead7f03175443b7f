"""Turn any array layout and choice of feature axes into the one shape the kernels know.

Every operand (x, y, dy, dx) is addressed by the same four indices::

    element(fo, fi, ro, ri) = base[feature_offsets[fo] + fi * feature_stride
                                   + row_offsets[ro] + ri * row_stride]

``fi``/``ri`` run over the innermost kept / reduced dimension (after merging dimensions that
are contiguous in every operand), ``fo``/``ro`` over all the others through small offset
tables. Feature index ``f = fo * n_feature_inner + fi`` enumerates the kept axes in memory
order, outermost first. ``features_inner`` says which inner loop has the smaller stride in
x, i.e. which loop order streams through memory: features innermost ("rows x features",
e.g. NHWC) or reduced elements innermost ("outer x features x inner", e.g. NCHW).

Strides are sorted by magnitude, so transposed, Fortran-ordered, reversed and stepped views
all land here without a copy.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OperandLayout:
    feature_offsets: np.ndarray   # int64, one entry per outer feature index
    feature_stride: int           # elements between consecutive inner features
    row_offsets: np.ndarray       # int64, one entry per outer reduced index
    row_stride: int               # elements between consecutive inner reduced elements


@dataclass(frozen=True)
class Plan:
    n_feature_outer: int
    n_feature_inner: int
    n_row_outer: int
    n_row_inner: int
    features_inner: bool          # loop order: True streams features, False streams rows
    agree: bool                   # every operand steps fastest along the same axis
    row_group: int                # RI: extent of the outer reduced dimension along which
                                  # another operand steps fastest (its rows' groups), or 1
    features_outer: bool          # row groups: each feature's groups in turn (_features_outer)
    feature_order: tuple          # kept axes (positions in the sorted kept-axis list) in memory order
    flipped_features: tuple       # kept axes (positions as above) walked from their last index
    operands: tuple               # one OperandLayout per operand, in the order given

    @property
    def n_features(self):
        return self.n_feature_outer * self.n_feature_inner

    @property
    def n_rows(self):
        return self.n_row_outer * self.n_row_inner


def _offset_table(groups, operand):
    """Offsets of every index combination of ``groups`` (outermost first), in elements."""
    offsets = np.zeros(1, dtype=np.int64)
    for extent, strides in groups:
        step = np.arange(extent, dtype=np.int64) * strides[operand]
        offsets = (offsets[:, None] + step[None, :]).ravel()
    return offsets


def _merge(dims):
    """Merge neighbouring (extent, strides) dims that are contiguous in every operand."""
    merged = []
    for extent, strides in dims:
        if merged:
            outer_extent, outer_strides = merged[-1]
            if all(o == extent * s for o, s in zip(outer_strides, strides)):
                merged[-1] = (outer_extent * extent, strides)
                continue
        merged.append((extent, strides))
    return merged


def _innermost(shape, strides):
    """The axis an operand steps along fastest (its cache lines run along it), or None."""
    moving = [a for a in range(len(shape)) if shape[a] > 1 and strides[a] != 0]
    return min(moving, key=lambda a: abs(strides[a])) if moving else None


def _features_outer(operands, row_group, n_feature_inner):
    """Row groups: whether to walk each feature's groups in turn rather than every feature's
    tile of a group, i.e. whether in every operand a feature's next group lies nearer than
    the next feature (NHWC x Fortran beside dy stored as NCHW: a feature is one block of x
    and 32 planes of dy; walked group by group, every group touched all of both arrays, 2.5x
    slower). Where one operand keeps the features nearer (x NCHW beside a Fortran dy: 32
    images of each channel back to back), the groups stay outer."""
    if row_group == 1:
        return False
    for o in operands:
        if len(o.row_offsets) <= row_group:
            return False
        group_step = abs(int(o.row_offsets[row_group] - o.row_offsets[0]))
        feature_step = (abs(o.feature_stride) if n_feature_inner > 1 else
                        abs(int(o.feature_offsets[1] - o.feature_offsets[0]))
                        if len(o.feature_offsets) > 1 else 0)
        if feature_step < group_step:
            return False
    return True


# Near rows (below) are grouped only where the outer rows hold at least this many groups, the
# elementwise passes' work items; with fewer, each feature's groups are walked in turn.
MIN_NEAR_GROUPS = 8


def _near_rows(shape, axes, element_strides, row_groups):
    """Whether a feature's runs (the inner reduced dimension) follow each other closer than
    the features do in every operand, without merging into one run: NCHW with W reversed
    in x beside a C-ordered dy or out= (W steps -1 in one, +1 in the other), or H stepped
    beside a contiguous operand. Walked outer row by outer row, each row visited every
    feature, a plane apart: 64 runs of 224 bytes, 12.5 KB apart, in flight at once, which
    the prefetchers do not follow. As row groups (the next reduced dimension's extent,
    H), the walk takes each feature's H runs in turn: memory order."""
    if len(row_groups) < 2:
        return False
    for k, strides in enumerate(element_strides):
        kept = [abs(strides[a]) for a in axes if shape[a] > 1 and strides[a] != 0]
        if not kept or not 0 < abs(row_groups[-2][1][k]) < min(kept):
            return False
    return True


def make_plan(shape, axes, element_strides):
    """Plan the kernel view of operands of ``shape`` whose strides (in elements) are given.

    ``axes`` is the sorted tuple of kept axes; the first operand's strides choose the order.

    Operands that disagree (one steps fastest along a feature axis, another along a reduced
    axis: a C-ordered dy with a Fortran-ordered or transposed x) get the features-inner loop
    order with each of those two axes innermost in its group, so that a tile of features
    times rows covers whole cache lines of every operand; the kernels transpose such tiles
    in cache (``mixed``). Operands whose fastest axes are two different reduced axes (x
    NCHW beside a Fortran-ordered dy: W and N) keep the first operand's order but for the
    other's fastest axis, which becomes the innermost outer reduced one (``row_group``): the
    kernels walk groups of outer rows, which are whole cache lines of every operand.
    """
    # An axis that every operand walks backwards (x[..., ::-1] and its gradient, a flipped
    # image, channels reversed as in BGR <-> RGB) is walked forwards instead: its runs then
    # merge and step up as C order's do. Walked backwards, NCHW with W reversed took 12x
    # (statistics) and 10x (backward) the C-ordered calls' time: runs of one row of W,
    # summed element by element; NHWC with C reversed staged every tile (inference 2x).
    # Only where each operand's walk starts changes: shifts move it to that axis' last
    # element, in the feature offsets (every element's address holds one; the rows' offsets
    # are left out where a chunk's rows are one run). A flipped kept axis numbers its
    # features from the last (flipped_features: cbn._plans maps the per-feature arrays);
    # each feature's sums run over the rows as before, so the bits are the unflipped call's.
    # Where another operand (a fresh out=) steps forwards the axis stays as it is, and the
    # sums, taken in x's (and dy's) own plan (cbn._plans.plan_and_own), keep their bits.
    flipped = [a for a in range(len(shape))
               if shape[a] > 1 and all(s[a] <= 0 for s in element_strides)
               and any(s[a] < 0 for s in element_strides)]
    shifts = [sum((shape[a] - 1) * s[a] for a in flipped) for s in element_strides]
    element_strides = tuple(tuple(-v if a in flipped else v for a, v in enumerate(s))
                            for s in element_strides)
    lead = element_strides[0]
    # Outermost first; the sort is stable, so ties (broadcast zeros) keep axis order.
    order = sorted(range(len(shape)), key=lambda a: -abs(lead[a]))
    fastest = [_innermost(shape, s) for s in element_strides]
    feature_fastest = [a for a in fastest if a is not None and a in axes]
    row_fastest = [a for a in fastest if a is not None and a not in axes]
    mixed = bool(feature_fastest and row_fastest)
    agree = len(set(feature_fastest + row_fastest)) <= 1
    if mixed:
        # Features in the order of the first operand that steps along them fastest, rows in
        # that of the first that steps along rows fastest.
        by_features = element_strides[fastest.index(feature_fastest[0])]
        by_rows = element_strides[fastest.index(row_fastest[0])]
        order = sorted(range(len(shape)),
                       key=lambda a: -abs((by_features if a in axes else by_rows)[a]))
    reduced_order = [a for a in order if a not in axes and shape[a] != 1]
    odd_rows = [a for a in row_fastest if reduced_order and a != reduced_order[-1]]
    if not mixed and odd_rows:
        # Another operand steps fastest along a reduced axis that is not the inner one (x
        # NCHW, out= Fortran): that axis becomes the innermost outer one, so that a group of
        # consecutive outer rows is whole cache lines of it (row_group, in the kernels).
        order.remove(odd_rows[0])
        order.insert(order.index(reduced_order[-1]), odd_rows[0])
    kept_order = [a for a in order if a in axes]
    feature_order = tuple(axes.index(a) for a in kept_order)

    def groups(kept):
        dims = [(shape[a], tuple(s[a] for s in element_strides))
                for a in order if (a in axes) == kept and shape[a] != 1]
        return _merge(dims) or [(1, (0,) * len(element_strides))]

    feature_groups, row_groups = groups(True), groups(False)
    fi_extent, fi_strides = feature_groups[-1]
    ri_extent, ri_strides = row_groups[-1]
    if mixed:
        features_inner = True
    elif fi_extent > 1 and ri_extent > 1:
        features_inner = abs(fi_strides[0]) <= abs(ri_strides[0])
    else:
        features_inner = ri_extent == 1
    near_rows = (not odd_rows and not features_inner
                 and _near_rows(shape, axes, element_strides, row_groups))
    row_group = (row_groups[-2][0] if (odd_rows or near_rows) and not features_inner
                 and len(row_groups) > 1 else 1)
    operands = tuple(
        OperandLayout(
            feature_offsets=_offset_table(feature_groups[:-1], k) + shifts[k],
            feature_stride=int(fi_strides[k]),
            row_offsets=_offset_table(row_groups[:-1], k),
            row_stride=int(ri_strides[k]))
        for k in range(len(element_strides)))
    n_feature_outer = len(operands[0].feature_offsets)
    n_row_outer = len(operands[0].row_offsets)
    features_outer = (_features_outer(operands, row_group, fi_extent)
                      or near_rows and n_row_outer // row_group < MIN_NEAR_GROUPS)
    return Plan(n_feature_outer, fi_extent, n_row_outer, ri_extent, features_inner, agree,
                row_group, features_outer, feature_order,
                tuple(axes.index(a) for a in flipped if a in axes), operands)
