# ---------------------------------------------------------------------------------------
# Normalization (training forward and inference)
# ---------------------------------------------------------------------------------------
# Part of cbn/_kernels.pyx, which includes it: one module, so the loops inline across files.

cdef inline void normalization_factors(Py_ssize_t f, const double *var, const double *gamma,
                                       double epsilon, double *scale) noexcept nogil:
    scale[f] = (1.0 if gamma == NULL else gamma[f]) / sqrt(var[f] + epsilon)


cdef void fi_normalize_item(const Grid *g, const floating *x, const Walk *xw, floating *y,
                            const Walk *yw, Py_ssize_t item, const double *mean,
                            const double *scale, const double *shift, floating *stage,
                            const Activation *act) noexcept nogil:
    """y of an FI item, run by run; with act.fused, plus the residual (its rows staged in
    the third stage) and the activation, and the mask's bits if one is wanted."""
    cdef FiItem it = fi_item(g, item)
    cdef const floating *x_tile = tile_of(x, xw, &it)
    cdef floating *y_tile = y + yw.feature_offsets[it.fo] + it.fi0 * yw.feature_stride
    cdef const floating *r_tile = NULL
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, g.rows_per_run)
    cdef Py_ssize_t n
    cdef int64_t x_row_stride, y_row_stride, r_row_stride = 0
    cdef const floating *x_rows
    cdef const floating *r_rows = NULL
    cdef floating *y_rows
    cdef bint y_staged = yw.feature_stride != 1
    cdef bint stream = g.stream and not y_staged
    cdef int64_t b, bit_row_stride = 0, bit_step = 0
    cdef Activation row_act = act[0]
    cdef bint bits_by_rows = False
    cdef Block x_block = Block(0, 0, 0), y_block = Block(0, 0, 0)
    if act.mask != NULL:
        bit_row_stride, bit_step = act.mask_walk.row_stride, act.mask_walk.feature_stride
        # A feature's rows have adjacent bits, a row's features do not (x a channels_last
        # or transposed view): the bits are set from y after each run (in cache, so not
        # streamed), feature by feature.
        bits_by_rows = bit_step != 1 and bit_row_stride == 1
        if bits_by_rows:
            row_act.mask = NULL
            stream = False
    if act.residual != NULL:
        r_tile = tile_of(<const floating *>act.residual, act.residual_walk, &it)
    if floating is float:
        if not act.fused and crosswise(g, xw, NULL, yw):
            runs = cross_rows(g, &it, y_tile, yw, g.n_ri)
            while runs.r < runs.end:
                n = run_length(g, &runs)
                cbn_normalize_cross_f32(x_tile + row_offset(xw, runs.ro, runs.ri),
                                        xw.row_stride, xw.feature_stride,
                                        y_tile + row_offset(yw, runs.ro, runs.ri),
                                        yw.row_stride, yw.feature_stride, n, it.width,
                                        mean + it.f0, scale + it.f0, shift + it.f0, g.stream)
                advance(g, &runs, n)
            return
    if stream and g.rows_contiguous and not act.fused:   # the whole chunk is one run
        normalize_rows(x_tile + it.r_begin * xw.row_stride, xw.row_stride,
                       y_tile + it.r_begin * yw.row_stride, yw.row_stride,
                       it.r_end - it.r_begin, it.width, mean + it.f0, scale + it.f0,
                       shift + it.f0, True)
        cbn_store_fence()
        return
    while runs.r < runs.end:
        n = run_length(g, &runs)
        x_rows = block_rows(g, x_tile, xw, &runs, n, it.width, &x_row_stride, stage, &x_block)
        if r_tile != NULL:
            r_rows = rows_of(g, r_tile, act.residual_walk, &runs, n, it.width, &r_row_stride,
                             stage + 2 * g.stage_elements)
        if not g.stream and not blocked(yw):
            prefetch_next_run(g, runs, n, y_tile, yw, it.width, True)
        y_rows = block_output(g, y_tile, yw, &runs, n, it.width, &y_row_stride,
                              stage + g.stage_elements, &y_block)
        if act.fused:
            b = mask_bit(act, g, it.f0, runs.ro, runs.ri)
            normalize_act_rows(x_rows, x_row_stride, r_rows, r_row_stride, y_rows,
                               y_row_stride, n, it.width, mean + it.f0, scale + it.f0,
                               shift + it.f0, &row_act, stream, b, bit_row_stride, bit_step)
            if bits_by_rows:
                set_row_signs(act.mask, b, bit_step, y_rows, y_row_stride, n, it.width)
        else:
            normalize_rows(x_rows, x_row_stride, y_rows, y_row_stride, n, it.width,
                           mean + it.f0, scale + it.f0, shift + it.f0, stream)
        flush_rows(g, y_rows, y_tile, yw, &runs, n, it.width, stage + g.stage_elements,
                   &y_block, g.stream)
        advance(g, &runs, n)
    if g.stream:
        cbn_store_fence()


cdef void ri_normalize_item(const Grid *g, const floating *x, const Walk *xw, floating *y,
                            const Walk *yw, RiItem it, double mean, double scale,
                            double shift) noexcept nogil:
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef floating *y_feature = y + feature_offset(yw, g, it.f)
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n
    while runs.r < runs.end:
        n = run_length(g, &runs)
        normalize_run(x_feature + row_offset(xw, runs.ro, runs.ri), xw.row_stride,
                      y_feature + row_offset(yw, runs.ro, runs.ri), yw.row_stride, n,
                      mean, scale, shift, g.stream)
        advance(g, &runs, n)
    if g.stream:
        cbn_store_fence()


cdef void normalize_items(const Grid *g, const floating *x, const Walk *xw, floating *y,
                          const Walk *yw, const double *mean, const double *scale,
                          const double *shift, const Buffers *ws,
                          const Activation *act) noexcept nogil:
    cdef Py_ssize_t item
    if g.planes:
        normalize_planes(g, x, xw, y, yw, mean, scale, shift, ws, act)
        return
    if g.n_threads == 1:
        for item in range(g.n_items):
            normalize_item(g, x, xw, y, yw, walk_item(g, item), mean, scale, shift,
                           ws.scratch, act)
        return
    for item in prange(g.n_items, num_threads=g.n_threads, schedule="dynamic"):
        normalize_item(g, x, xw, y, yw, walk_item(g, item), mean, scale, shift,
                       ws.scratch + threadid() * ws.scratch_per_thread, act)


# Planes grids (RI with at least PLANE_ORDER_MIN_OUTER outer rows): each feature is many
# runs (planes) spread over the whole array, one per outer row (an NCHW channel: one H x W
# plane per image, an image apart). Every pass walks them outer row by outer row, in memory
# order (NCHW: image by image), instead of feature by feature, jumping an image ahead at
# every plane; chunks are whole outer rows. On a 2-core AMD EPYC, with 129 MiB of NCHW data
# at one thread, this made inference 1.8x (64 channels of 56x56) and 2.6x (256 of 28x28),
# the statistics about 3x, the forward 1.5x and the backward 1.3x faster. Such grids give up
# the fused passes (a feature normalized while still in cache), whose channel-by-channel
# reads cost more than the second pass.
cdef void normalize_planes(const Grid *g, const floating *x, const Walk *xw, floating *y,
                           const Walk *yw, const double *mean, const double *scale,
                           const double *shift, const Buffers *ws,
                           const Activation *act) noexcept nogil:
    cdef Py_ssize_t i
    cdef Grid e = elementwise(g)
    if g.n_threads == 1:
        for i in range(planes_items(g)):
            normalize_group(&e, x, xw, y, yw, group_start(g, i % group_count(g)),
                            item_features(g, i), mean, scale, shift, <floating *>ws.scratch,
                            act)
        return
    for i in prange(planes_items(g), num_threads=g.n_threads, schedule="dynamic"):
        normalize_group(&e, x, xw, y, yw, group_start(g, i % group_count(g)),
                        item_features(g, i), mean, scale, shift,
                        <floating *>(ws.scratch + threadid() * ws.scratch_per_thread), act)


# Row groups. Where another operand steps fastest along an outer reduced axis (x NCHW beside
# a Fortran-ordered out=: W inner, N outer), the plan makes that axis the innermost outer
# one (row_group: its extent), and the planes walk takes group_rows consecutive outer rows
# at a time, each feature a tile of those rows: a tile covers whole cache lines of every
# operand, where one outer row at a time would touch each line of the odd operand once per
# pass over the whole array (15-30x the matched call). The odd operand's tile is transposed
# through a per-thread buffer (8x8 blocks in registers), so the SIMD loops serve it; where
# only an output's or only x's tile is odd, normalizing is done within that transpose (no
# buffer: 32.8M instructions to 19.7M for NHWC x Fortran, out= stored NCHW). The next tile
# is prefetched (its pieces are far apart). Where every operand keeps each feature's groups
# nearer than the next feature (plan.features_outer), each feature's groups are walked in
# turn: there walking every feature's tile of a group touched both whole arrays per group
# (NHWC x Fortran beside NCHW-stored, inference with out=: about 4x to 1.4-2.3x the slower
# matched call).
cdef inline Py_ssize_t group_count(const Grid *g) noexcept nogil:
    return g.n_ro // g.row_group * ceil_div(g.row_group, g.group_rows)


cdef inline Py_ssize_t group_start(const Grid *g, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t per_outer = ceil_div(g.row_group, g.group_rows)
    return i // per_outer * g.row_group + (i % per_outer) * g.group_rows


cdef inline Py_ssize_t group_length(const Grid *g, Py_ssize_t ro, Py_ssize_t ro_end) noexcept nogil:
    """Outer rows in the group from ro: up to group_rows, within one outer index, before ro_end."""
    return min(g.group_rows, g.row_group - ro % g.row_group, ro_end - ro)


cdef inline Py_ssize_t planes_items(const Grid *g) noexcept nogil:
    """Items of a planes walk: groups of outer rows, times features one at a time where each
    feature's groups are walked in turn (plan.features_outer), item by item in that order."""
    return group_count(g) * (g.n_features // g.group_features)


cdef inline Py_ssize_t item_features(const Grid *g, Py_ssize_t i) noexcept nogil:
    """The first feature of planes item i (it has group_features), in group i % group_count."""
    return i // group_count(g) * g.group_features


cdef inline bint group_staged(const Grid *g, const Walk *w) noexcept nogil:
    """Whether an operand's tiles go through a buffer: it steps by one element from outer row
    to outer row of a group, not along the rows; in the elementwise passes (backwards_staged)
    also where it steps back by one (NCHW out= with W reversed beside x Fortran), its tile
    then staged from its last row, so that the stage's rows are in the tile's order (written
    in place, it took an element at a time, 4-5x the slower matched call). The sums leave
    such an operand in place: staging it would change their order, hence their bits."""
    return g.row_group > 1 and w.row_stride != 1 and (
        w.group_stride == 1 or (g.backwards_staged and w.group_stride == -1))


cdef inline Grid elementwise(const Grid *g) noexcept nogil:
    """g for an elementwise pass (normalizing, dx): no order of its own to keep."""
    cdef Grid e = g[0]
    e.backwards_staged = True
    return e


cdef inline Py_ssize_t first_row(const Walk *w, Py_ssize_t n_rows) noexcept nogil:
    """The tile row a staged operand's transpose starts from: its lowest in memory."""
    return n_rows - 1 if w.group_stride == -1 else 0


cdef inline int64_t group_step(const Grid *g, const Walk *w) noexcept nogil:
    """Elements between neighbours along a tile's rows (group_row)."""
    return 1 if group_staged(g, w) else w.row_stride


cdef inline int64_t group_row_step(const Grid *g, const Walk *w, Py_ssize_t n) noexcept nogil:
    """Elements from a tile's row to the next (group_row)."""
    return n if group_staged(g, w) else w.group_stride


cdef inline floating *group_row(const Grid *g, floating *p, const Walk *w, Py_ssize_t ro,
                                Py_ssize_t t, Py_ssize_t ri, Py_ssize_t n,
                                floating *stage) noexcept nogil:
    """Where element ri of outer row ro + t of the feature at p is read or written: in
    place, or in stage, where a staged operand's tile is rows of n elements."""
    if group_staged(g, w):
        return stage + t * n
    return p + row_offset(w, ro + t, ri)


cdef inline void group_stage(const Grid *g, const floating *p, const Walk *w, Py_ssize_t ro,
                             Py_ssize_t ri, Py_ssize_t n_rows, Py_ssize_t n,
                             floating *stage) noexcept nogil:
    """A staged operand's tile (elements ri .. ri + n of outer rows ro .. ro + n_rows of the
    feature at p) copied to stage, rows of n."""
    cdef Py_ssize_t first = first_row(w, n_rows)
    if group_staged(g, w):
        transpose(p + row_offset(w, ro + first, ri), w.row_stride, n, n_rows, stage + first * n,
                  w.group_stride * n)


cdef inline void group_flush(const Grid *g, const floating *stage, floating *p, const Walk *w,
                             Py_ssize_t ro, Py_ssize_t ri, Py_ssize_t n_rows,
                             Py_ssize_t n) noexcept nogil:
    """group_stage's inverse, for an output."""
    cdef Py_ssize_t first = first_row(w, n_rows)
    if group_staged(g, w):
        transpose(stage + first * n, w.group_stride * n, n_rows, n,
                  p + row_offset(w, ro + first, ri), w.row_stride)


cdef inline void group_prefetch_next(const Grid *g, const floating *p, const Walk *w,
                                     Py_ssize_t f, Py_ssize_t ro, Py_ssize_t ri,
                                     Py_ssize_t n_rows, bint for_writing) noexcept nogil:
    """Prefetch an operand's (p: its base) tile after that of feature f, elements from ri,
    in the same item: a tile is dozens of short pieces far apart, which the hardware
    prefetchers do not follow, and the next is mostly another feature's, far from this one.
    Where features are outer, the next item's tile is the next group's, next to this one."""
    ri += g.group_run
    if ri >= g.n_ri:
        if g.group_features == 1:
            return
        ri, f = 0, f + 1
    if g.row_group == 1 or f >= g.n_features:
        return
    cdef Py_ssize_t first = first_row(w, n_rows)     # a tile stepping back: from its lowest
    cbn_prefetch_tile(<const char *>(p + feature_offset(w, g, f) + row_offset(w, ro + first, ri)),
                      1 if first else w.group_stride, w.row_stride, n_rows,
                      min(g.group_run, g.n_ri - ri), sizeof(floating), for_writing)


cdef inline void normalize_transposed(const Grid *g, const floating *x, const Walk *xw,
                                      floating *y, const Walk *yw, Py_ssize_t ro,
                                      Py_ssize_t ri, Py_ssize_t n_rows, Py_ssize_t n,
                                      double mean, double scale, double shift) noexcept nogil:
    """A tile of y from x's (features at x, y) where exactly one of them is staged: one
    transpose that normalizes on the way, no buffer; where the staged one steps back along
    the tile's rows, both are walked from the tile's last row, and where x, in place, steps
    back along them (x with W reversed beside a Fortran out=), both from the last element of
    its rows (through the stage, 4.4-5.8x the slower matched call in cache, Intel)."""
    cdef double affine[3]
    cdef const Walk *staged = yw if group_staged(g, yw) else xw
    cdef Py_ssize_t first = first_row(staged, n_rows)
    cdef int64_t y_stride = yw.row_stride
    affine[0], affine[1], affine[2] = mean, scale, shift
    x, y = x + row_offset(xw, ro + first, ri), y + row_offset(yw, ro + first, ri)
    if staged == yw:    # x in place, rows of n: y's rows are x's columns
        if xw.row_stride == -1:
            x, y, y_stride = x - (n - 1), y + (n - 1) * y_stride, -y_stride
        transpose(x, staged.group_stride * xw.group_stride, n_rows, n, y, y_stride, affine)
    else:               # x staged: its rows (along the tile's rows) become y's
        transpose(x, xw.row_stride, n, n_rows, y, staged.group_stride * yw.group_stride, affine)


cdef inline void normalize_image(const Grid *g, const floating *x, const Walk *xw, floating *y,
                                 const Walk *yw, Py_ssize_t ro, Py_ssize_t f0, const double *mean,
                                 const double *scale, const double *shift) noexcept nogil:
    """normalize_group's planes where they are back to back (planes_back_to_back): those of
    one feature_offsets entry in outer row ro as one run (cbn_normalize_planes, whose
    comment has the figures)."""
    cdef Py_ssize_t count, f = f0, f_end = f0 + g.group_features
    cdef const floating *x_run
    cdef floating *y_run
    while f < f_end:
        count = entry_features(g, f, f_end)
        x_run = x + feature_offset(xw, g, f) + row_offset(xw, ro, 0)
        y_run = y + feature_offset(yw, g, f) + row_offset(yw, ro, 0)
        if floating is float:
            cbn_normalize_planes_f32(x_run, y_run, count, g.n_ri, mean + f, scale + f, shift + f,
                                     g.stream)
        else:
            cbn_normalize_planes_f64(x_run, y_run, count, g.n_ri, mean + f, scale + f, shift + f,
                                     g.stream)
        f += count


cdef void normalize_group(const Grid *g, const floating *x, const Walk *xw, floating *y,
                          const Walk *yw, Py_ssize_t ro, Py_ssize_t f0, const double *mean,
                          const double *scale, const double *shift, floating *stage,
                          const Activation *act) noexcept nogil:
    """The runs of group_features features from f0 in the outer rows of the group from ro."""
    cdef Py_ssize_t f, segment, ri, n, n_rows = group_length(g, ro, g.n_ro)
    cdef bint stream = g.stream and not group_staged(g, yw)
    cdef int64_t x_step = group_step(g, xw), y_step = group_step(g, yw)
    cdef floating *x_stage = stage
    cdef floating *y_stage = stage + g.group_rows * g.group_run
    cdef const floating *x_feature
    cdef floating *y_feature
    if act.fused or (planes_back_to_back(g, xw) and planes_back_to_back(g, yw)):
        if act.fused:   # elementwise: the activated runs read every operand in place
            act_normalize_group(g, x, xw, y, yw, ro, n_rows, f0, mean, scale, shift, act)
        else:
            normalize_image(g, x, xw, y, yw, ro, f0, mean, scale, shift)
        if g.stream:
            cbn_store_fence()
        return
    for f in range(f0, f0 + g.group_features):
        x_feature = x + feature_offset(xw, g, f)
        y_feature = y + feature_offset(yw, g, f)
        for segment in range(ceil_div(g.n_ri, g.group_run)):
            ri = segment * g.group_run
            n = min(g.group_run, g.n_ri - ri)
            group_prefetch_next(g, x, xw, f, ro, ri, n_rows, False)
            if not stream:
                group_prefetch_next(g, y, yw, f, ro, ri, n_rows, True)
            if (group_staged(g, xw) != group_staged(g, yw) and (x_step == 1 or x_step == -1)
                    and y_step == 1):
                normalize_transposed(g, x_feature, xw, y_feature, yw, ro, ri, n_rows, n,
                                     mean[f], scale[f], shift[f])
                continue
            group_stage(g, x_feature, xw, ro, ri, n_rows, n, x_stage)
            normalize_tile(group_row(g, <floating *>x_feature, xw, ro, 0, ri, n, x_stage),
                           x_step, group_row_step(g, xw, n),
                           group_row(g, y_feature, yw, ro, 0, ri, n, y_stage), y_step,
                           group_row_step(g, yw, n), n_rows, n, mean[f], scale[f], shift[f],
                           stream)
            group_flush(g, y_stage, y_feature, yw, ro, ri, n_rows, n)
    if g.stream:
        cbn_store_fence()


cdef inline void normalize_item(const Grid *g, const floating *x, const Walk *xw, floating *y,
                                const Walk *yw, Py_ssize_t item, const double *mean,
                                const double *scale, const double *shift,
                                double *scratch, const Activation *act) noexcept nogil:
    cdef RiItem it
    if g.features_inner:
        fi_normalize_item(g, x, xw, y, yw, item, mean, scale, shift, <floating *>scratch, act)
    else:
        it = ri_item(g, item)
        ri_normalize_any(g, x, xw, y, yw, it, mean[it.f], scale[it.f], shift[it.f], act)


cdef inline void ri_normalize_any(const Grid *g, const floating *x, const Walk *xw, floating *y,
                                  const Walk *yw, RiItem it, double mean, double scale,
                                  double shift, const Activation *act) noexcept nogil:
    if act.fused:
        ri_normalize_activate_item(g, x, xw, y, yw, it, mean, scale, shift, act)
    else:
        ri_normalize_item(g, x, xw, y, yw, it, mean, scale, shift)


cdef void fused_forward(const Grid *g, const floating *x, const Walk *xw, floating *y,
                        const Walk *yw, const double *gamma, const double *shift,
                        double epsilon, double *mean, double *var, double *scale,
                        const Activation *act) noexcept nogil:
    """RI with one chunk per feature: normalize each feature right after its statistics."""
    cdef Py_ssize_t f
    if g.n_threads == 1:
        for f in range(g.n_features):
            fused_forward_feature(g, x, xw, y, yw, gamma, shift, epsilon, mean, var, scale, f,
                                  act)
        return
    for f in prange(g.n_features, num_threads=g.n_threads, schedule="dynamic"):
        fused_forward_feature(g, x, xw, y, yw, gamma, shift, epsilon, mean, var, scale, f, act)


cdef inline void fused_forward_feature(const Grid *g, const floating *x, const Walk *xw,
                                       floating *y, const Walk *yw, const double *gamma,
                                       const double *shift, double epsilon, double *mean,
                                       double *var, double *scale, Py_ssize_t f,
                                       const Activation *act) noexcept nogil:
    cdef RiItem it = ri_item(g, f)
    ri_moments(g, x, xw, it, &mean[f], &var[f])
    var[f] /= g.n_rows
    settle_moments(g, x, xw, f, &mean[f], &var[f])
    normalization_factors(f, var, gamma, epsilon, scale)
    ri_normalize_any(g, x, xw, y, yw, it, mean[f], scale[f], shift[f], act)


cdef void forward_nogil(const Grid *g, const floating *x, const Walk *xw, floating *y,
                        const Walk *yw, const Buffers *ws, const double *gamma, const double *shift,
                        double epsilon, double *mean, double *var, double *scale,
                        const Activation *act) noexcept nogil:
    cdef Py_ssize_t f
    cdef Grid second = second_pass(g, g.n_bytes)
    # Not with row groups, whose statistics (compute_moments: runs folded sum_rows at a
    # time) ri_moments sums in another order: the forward's statistics are batch_stats'
    # bits (x stepped along H beside a fresh y took near rows' row groups, then differed).
    if not g.features_inner and g.n_chunks == 1 and g.row_group == 1:
        fused_forward(g, x, xw, y, yw, gamma, shift, epsilon, mean, var, scale, act)
        return
    compute_moments(g, x, xw, ws, mean, var)
    for f in range(g.n_features):
        normalization_factors(f, var, gamma, epsilon, scale)
    normalize_items(&second, x, xw, y, yw, mean, scale, shift, ws, act)
