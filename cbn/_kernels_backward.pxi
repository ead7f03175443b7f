# ---------------------------------------------------------------------------------------
# Backward (training mode)
# ---------------------------------------------------------------------------------------
# Part of cbn/_kernels.pyx, which includes it: one module, so the loops inline across files.

cdef void fi_gradient_sums_item(const Grid *g, const floating *dy, const Walk *dyw,
                                const floating *x, const Walk *xw, Py_ssize_t item,
                                const double *mean, double *scratch, double *chunk_dy,
                                double *chunk_dy_xc) noexcept nogil:
    cdef FiItem it = fi_item(g, item)
    cdef double *acc_dy = scratch
    cdef double *acc_dy_xc = scratch + g.tile_width
    cdef floating *stage = <floating *>(scratch + 2 * g.tile_width)
    cdef const floating *dy_tile = dy + dyw.feature_offsets[it.fo] + it.fi0 * dyw.feature_stride
    cdef const floating *x_tile = x + xw.feature_offsets[it.fo] + it.fi0 * xw.feature_stride
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, g.rows_per_run)
    cdef Py_ssize_t j, n
    cdef Block dy_block = Block(0, 0, 0), x_block = Block(0, 0, 0)
    cdef int64_t dy_row_stride, x_row_stride
    cdef const floating *dy_rows
    cdef const floating *x_rows
    for j in range(it.width):
        acc_dy[j] = 0.0
        acc_dy_xc[j] = 0.0
    if floating is float:
        if crosswise(g, dyw, xw, NULL):     # the stage's runs, without it: the same bits
            runs = make_runs(g, it.r_begin, it.r_end, cross_segment(g, g.rows_per_run))
            while runs.r < runs.end:
                n = run_length(g, &runs)
                cbn_gradient_sums_cross_f32(
                    dy_tile + row_offset(dyw, runs.ro, runs.ri), dyw.row_stride,
                    dyw.feature_stride, x_tile + row_offset(xw, runs.ro, runs.ri),
                    xw.row_stride, xw.feature_stride, n, it.width, g.rows_per_run,
                    mean + it.f0, acc_dy, acc_dy_xc)
                advance(g, &runs, n)
    while runs.r < runs.end:
        n = run_length(g, &runs)
        dy_rows = block_rows(g, dy_tile, dyw, &runs, n, it.width, &dy_row_stride, stage,
                             &dy_block)
        x_rows = block_rows(g, x_tile, xw, &runs, n, it.width, &x_row_stride,
                            stage + g.stage_elements, &x_block)
        add_gradient_rows(dy_rows, dy_row_stride, x_rows, x_row_stride, n, it.width,
                          mean + it.f0, acc_dy, acc_dy_xc)
        advance(g, &runs, n)
    for j in range(it.width):
        chunk_dy[it.chunk * g.n_features + it.f0 + j] = acc_dy[j]
        chunk_dy_xc[it.chunk * g.n_features + it.f0 + j] = acc_dy_xc[j]


cdef void ri_gradient_sums(const Grid *g, const floating *dy, const Walk *dyw,
                           const floating *x, const Walk *xw, RiItem it, double mean,
                           double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """sum_dy += Σ dy, sum_dy_xc += Σ dy·(x − mean) over the item, run by run, or whole
    short runs several at a time (sum_rows)."""
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, it.f)
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n, n_runs
    while runs.r < runs.end:
        n_runs = whole_runs(g, &runs)
        if n_runs > 1 and dyw.row_stride == 1 and xw.row_stride == 1:
            rows_gradient_sums(dy_feature, dyw.row_offsets + runs.ro, x_feature,
                               xw.row_offsets + runs.ro, n_runs, g.n_ri, mean, sum_dy,
                               sum_dy_xc)
            skip_runs(g, &runs, n_runs)
            continue
        n = run_length(g, &runs)
        gradient_run(dy_feature + row_offset(dyw, runs.ro, runs.ri), dyw.row_stride,
                     x_feature + row_offset(xw, runs.ro, runs.ri), xw.row_stride, n, mean,
                     sum_dy, sum_dy_xc)
        advance(g, &runs, n)


cdef void fi_input_gradient_item(const Grid *g, const floating *dy, const Walk *dyw,
                                 const floating *x, const Walk *xw, floating *dx,
                                 const Walk *dxw, Py_ssize_t item, const GradientFactors *k,
                                 floating *stage) noexcept nogil:
    """dx of an FI item, run by run. With an activation (k.act.fused), dz = dy·act'(z)
    takes dy's place, act' from y's rows (staged in activation_slot 0) or from the mask,
    and dz is stored as the residual's gradient if one is wanted (staged in slot 1)."""
    cdef const Activation *act = k.act
    cdef FiItem it = fi_item(g, item)
    cdef const floating *dy_tile = tile_of(dy, dyw, &it)
    cdef const floating *x_tile = tile_of(x, xw, &it)
    cdef const floating *o_tile = NULL
    cdef floating *dx_tile = dx + dxw.feature_offsets[it.fo] + it.fi0 * dxw.feature_stride
    cdef const Walk *rw = act.residual_gradient_walk
    cdef floating *r_tile = NULL
    cdef floating *r_rows = NULL
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, g.rows_per_run)
    cdef Py_ssize_t n
    cdef int64_t dy_row_stride, x_row_stride, o_row_stride = 0, dx_row_stride, r_row_stride = 0
    cdef const floating *dy_rows
    cdef const floating *x_rows
    cdef const floating *o_rows = NULL
    cdef floating *dx_rows
    cdef int64_t bit_row_stride = 0, bit_step = 0
    cdef bint dx_staged = dxw.feature_stride != 1
    cdef bint r_staged = False
    cdef bint stream
    cdef Block dy_block = Block(0, 0, 0), x_block = Block(0, 0, 0), dx_block = Block(0, 0, 0)
    if act.residual_gradient != NULL:
        r_tile = (<floating *>act.residual_gradient + rw.feature_offsets[it.fo]
                  + it.fi0 * rw.feature_stride)
        r_staged = rw.feature_stride != 1
    stream = g.stream and not dx_staged and not r_staged
    if act.mask != NULL:
        bit_row_stride, bit_step = act.mask_walk.row_stride, act.mask_walk.feature_stride
    elif act.fused:
        o_tile = tile_of(<const floating *>act.output, act.output_walk, &it)
    if floating is float:   # dense x C beside a Fortran dy and out=: 2.8x to 2.3x
        if not act.fused and crosswise(g, dyw, xw, dxw):
            runs = cross_rows(g, &it, dx_tile, dxw, cross_segment(g, 16))
            while runs.r < runs.end:
                n = run_length(g, &runs)
                cbn_input_gradient_cross_f32(
                    dy_tile + row_offset(dyw, runs.ro, runs.ri), dyw.row_stride,
                    dyw.feature_stride, x_tile + row_offset(xw, runs.ro, runs.ri),
                    xw.row_stride, xw.feature_stride,
                    dx_tile + row_offset(dxw, runs.ro, runs.ri), dxw.row_stride,
                    dxw.feature_stride, n, it.width, k.mean + it.f0, k.coef_dy + it.f0,
                    k.coef_xc + it.f0, k.offset + it.f0, g.stream)
                advance(g, &runs, n)
            return
    if stream and g.rows_contiguous and not act.fused:   # the whole chunk is one run
        input_gradient_rows(dy_tile + it.r_begin * dyw.row_stride, dyw.row_stride,
                            x_tile + it.r_begin * xw.row_stride, xw.row_stride,
                            dx_tile + it.r_begin * dxw.row_stride, dxw.row_stride,
                            it.r_end - it.r_begin, it.width, k.mean + it.f0, k.coef_dy + it.f0,
                            k.coef_xc + it.f0, k.offset + it.f0, True)
        cbn_store_fence()
        return
    while runs.r < runs.end:
        n = run_length(g, &runs)
        dy_rows = block_rows(g, dy_tile, dyw, &runs, n, it.width, &dy_row_stride, stage,
                             &dy_block)
        x_rows = block_rows(g, x_tile, xw, &runs, n, it.width, &x_row_stride,
                            stage + g.stage_elements, &x_block)
        if o_tile != NULL:
            o_rows = rows_of(g, o_tile, act.output_walk, &runs, n, it.width, &o_row_stride,
                             activation_slot(g, stage, 0))
        if not g.stream and not blocked(dxw):
            prefetch_next_run(g, runs, n, dx_tile, dxw, it.width, True)
        dx_rows = block_output(g, dx_tile, dxw, &runs, n, it.width, &dx_row_stride,
                               stage + 2 * g.stage_elements, &dx_block)
        if r_tile != NULL:
            r_row_stride = rw.row_stride
            r_rows = output_rows(r_tile + row_offset(rw, runs.ro, runs.ri), &r_row_stride,
                                 rw.feature_stride, it.width, activation_slot(g, stage, 1))
        if act.fused:
            act_input_gradient_rows(dy_rows, dy_row_stride, o_rows, o_row_stride, x_rows,
                                    x_row_stride, dx_rows, dx_row_stride, r_rows,
                                    r_row_stride, n, it.width, k.mean + it.f0,
                                    k.coef_dy + it.f0, k.coef_xc + it.f0, k.offset + it.f0,
                                    act, stream, mask_bit(act, g, it.f0, runs.ro, runs.ri),
                                    bit_row_stride, bit_step)
        else:
            input_gradient_rows(dy_rows, dy_row_stride, x_rows, x_row_stride, dx_rows,
                                dx_row_stride, n, it.width, k.mean + it.f0, k.coef_dy + it.f0,
                                k.coef_xc + it.f0, k.offset + it.f0, stream)
        flush_rows(g, dx_rows, dx_tile, dxw, &runs, n, it.width, stage + 2 * g.stage_elements,
                   &dx_block, g.stream)
        if r_staged:
            unstage_rows(r_rows, n, it.width, r_tile + row_offset(rw, runs.ro, runs.ri),
                         rw.row_stride, rw.feature_stride)
        advance(g, &runs, n)
    if g.stream:
        cbn_store_fence()


cdef void ri_input_gradient_item(const Grid *g, const floating *dy, const Walk *dyw,
                                 const floating *x, const Walk *xw, floating *dx,
                                 const Walk *dxw, RiItem it, double mean, double coef_dy,
                                 double coef_xc, double offset) noexcept nogil:
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, it.f)
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef floating *dx_feature = dx + feature_offset(dxw, g, it.f)
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n
    while runs.r < runs.end:
        n = run_length(g, &runs)
        input_gradient_run(dy_feature + row_offset(dyw, runs.ro, runs.ri), dyw.row_stride,
                           x_feature + row_offset(xw, runs.ro, runs.ri), xw.row_stride,
                           dx_feature + row_offset(dxw, runs.ro, runs.ri), dxw.row_stride, n,
                           mean, coef_dy, coef_xc, offset, g.stream)
        advance(g, &runs, n)
    if g.stream:
        cbn_store_fence()


cdef struct GradientFactors:
    const double *mean
    const double *var
    const double *gamma
    double epsilon
    Py_ssize_t count        # elements per feature in the whole batch (may span shards)
    double *sum_dy          # Σ dy: dbeta
    double *sum_dy_xhat     # Σ dy·(x − mean) until scaled by inv_std: dgamma
    double *coef_dy
    double *coef_xc
    double *offset
    const Activation *act


cdef inline void scale_to_xhat(Py_ssize_t f, GradientFactors *k) noexcept nogil:
    """Σ dy·(x − mean) becomes Σ dy·x̂ = dgamma."""
    k.sum_dy_xhat[f] /= sqrt(k.var[f] + k.epsilon)


cdef inline void gradient_factors(Py_ssize_t f, GradientFactors *k) noexcept nogil:
    """dx = γ·inv_std·(dy − Σdy/n − x̂·Σdy·x̂/n), folded into per-feature coefficients."""
    cdef double inv_std = 1.0 / sqrt(k.var[f] + k.epsilon)
    cdef double scale = (1.0 if k.gamma == NULL else k.gamma[f]) * inv_std
    k.coef_dy[f] = scale
    k.coef_xc[f] = -scale * inv_std * k.sum_dy_xhat[f] / k.count
    k.offset[f] = -scale * k.sum_dy[f] / k.count


cdef inline void gradient_sums_item(const Grid *g, const floating *dy, const Walk *dyw,
                                    const floating *x, const Walk *xw, const Buffers *ws,
                                    double *scratch, GradientFactors *k,
                                    Py_ssize_t item) noexcept nogil:
    cdef RiItem it
    if g.features_inner:
        if k.act.fused:
            fi_gradient_sums_activate_item(g, dy, dyw, x, xw, item, k.mean, scratch, ws.chunk_a,
                                           ws.chunk_b, k.act)
        else:
            fi_gradient_sums_item(g, dy, dyw, x, xw, item, k.mean, scratch, ws.chunk_a,
                                  ws.chunk_b)
    else:
        it = ri_item(g, item)
        ri_gradient_sums_any(g, dy, dyw, x, xw, it, k.mean[it.f],
                             &ws.chunk_a[it.chunk * g.n_features + it.f],
                             &ws.chunk_b[it.chunk * g.n_features + it.f], k.act)


cdef inline void ri_gradient_sums_any(const Grid *g, const floating *dy, const Walk *dyw,
                                      const floating *x, const Walk *xw, RiItem it,
                                      double mean, double *sum_dy, double *sum_dy_xc,
                                      const Activation *act) noexcept nogil:
    """sum_dy, sum_dy_xc = the item's Σ dy, Σ dy·(x − mean) (of dz with an activation)."""
    sum_dy[0] = 0.0
    sum_dy_xc[0] = 0.0
    if act.fused:
        ri_gradient_sums_activate(g, dy, dyw, x, xw, it, mean, sum_dy, sum_dy_xc, act)
    else:
        ri_gradient_sums(g, dy, dyw, x, xw, it, mean, sum_dy, sum_dy_xc)


cdef void gradient_sums_nogil(const Grid *g, const floating *dy, const Walk *dyw,
                              const floating *x, const Walk *xw, const Buffers *ws,
                              GradientFactors *k) noexcept nogil:
    """Σ dy and Σ dy·x̂ of every feature, summed over chunks in chunk order."""
    cdef Py_ssize_t item, f
    if g.planes and g.n_threads == 1:
        for item in range(g.n_chunks):
            planes_gradient_sums_chunk(g, dy, dyw, x, xw, k.mean, item, ws.chunk_a, ws.chunk_b,
                                       <floating *>ws.scratch, k.act)
    elif g.planes:
        for item in prange(g.n_chunks, num_threads=g.n_threads, schedule="dynamic"):
            planes_gradient_sums_chunk(g, dy, dyw, x, xw, k.mean, item, ws.chunk_a, ws.chunk_b,
                                       <floating *>(ws.scratch
                                                    + threadid() * ws.scratch_per_thread),
                                       k.act)
    elif g.n_threads == 1:
        for item in range(g.n_items):
            gradient_sums_item(g, dy, dyw, x, xw, ws, ws.scratch, k, item)
    else:
        for item in prange(g.n_items, num_threads=g.n_threads, schedule="dynamic"):
            gradient_sums_item(g, dy, dyw, x, xw, ws,
                               ws.scratch + threadid() * ws.scratch_per_thread, k, item)
    for f in range(g.n_features):
        combine_chunks(g, ws, k, f)


cdef inline void combine_chunks(const Grid *g, const Buffers *ws, GradientFactors *k,
                                Py_ssize_t f) noexcept nogil:
    """Feature f's Σ dy and Σ dy·x̂ from its chunks' partial sums, in chunk order."""
    cdef Py_ssize_t c
    k.sum_dy[f] = 0.0
    k.sum_dy_xhat[f] = 0.0
    for c in range(g.n_chunks):
        k.sum_dy[f] += ws.chunk_a[c * g.n_features + f]
        k.sum_dy_xhat[f] += ws.chunk_b[c * g.n_features + f]
    scale_to_xhat(f, k)


cdef void planes_gradient_sums_chunk(const Grid *g, const floating *dy, const Walk *dyw,
                                     const floating *x, const Walk *xw, const double *mean,
                                     Py_ssize_t c, double *chunk_dy, double *chunk_dy_xc,
                                     floating *stage, const Activation *act) noexcept nogil:
    """Chunk c of a planes grid outer row by outer row: per feature the same runs as
    ri_gradient_sums (ri_gradient_sums_activate) over the chunk, so the same bits; with row
    groups, a group's tile at a time, its runs summed into one set of accumulators where
    both operands' runs are contiguous, a staged operand read from its copy (cbn.api then
    never fuses an activation into such a plan's backward, whose RI loops read it in place:
    with an activation, a group is one outer row and a run is its n_ri elements)."""
    cdef Py_ssize_t rows_per_chunk = g.chunk_length // g.n_ri
    cdef Py_ssize_t ro0 = c * rows_per_chunk, ro, f
    cdef Py_ssize_t ro1 = min(g.n_ro, ro0 + rows_per_chunk)
    cdef double *sum_dy = chunk_dy + c * g.n_features
    cdef double *sum_dy_xc = chunk_dy_xc + c * g.n_features
    for f in range(g.n_features):
        sum_dy[f] = 0.0
        sum_dy_xc[f] = 0.0
    cdef Py_ssize_t n_rows
    if g.group_features == 1:   # each feature's groups in turn: the same runs, another order
        for f in range(g.n_features):
            feature_chunk_sums(g, dy, dyw, x, xw, mean, f, ro0, ro1, &sum_dy[f], &sum_dy_xc[f],
                               stage, act)
        return
    ro = ro0
    while ro < ro1:     # a row group at a time, or without row groups sum_rows rows
        n_rows = sums_length(g, ro, ro1)
        for f in range(g.n_features):
            group_gradient_sums(g, dy, dyw, x, xw, mean, f, ro, n_rows, &sum_dy[f],
                                &sum_dy_xc[f], stage, act)
        ro += n_rows


cdef inline Py_ssize_t sums_length(const Grid *g, Py_ssize_t ro, Py_ssize_t ro_end) noexcept nogil:
    """Outer rows from ro whose runs of a feature the statistics and gradient sums take at
    once: a row group, or without row groups up to sum_rows (within the chunk: the bits do
    not depend on the threads)."""
    if g.row_group > 1:
        return group_length(g, ro, ro_end)
    return min(g.sum_rows, ro_end - ro)


cdef inline void feature_chunk_sums(const Grid *g, const floating *dy, const Walk *dyw,
                                    const floating *x, const Walk *xw, const double *mean,
                                    Py_ssize_t f, Py_ssize_t ro0, Py_ssize_t ro1,
                                    double *sum_dy, double *sum_dy_xc, floating *stage,
                                    const Activation *act) noexcept nogil:
    """Feature f's sums over outer rows ro0 .. ro1 (a chunk), group by group."""
    cdef Py_ssize_t ro = ro0, n_rows
    while ro < ro1:
        n_rows = sums_length(g, ro, ro1)
        group_gradient_sums(g, dy, dyw, x, xw, mean, f, ro, n_rows, sum_dy, sum_dy_xc, stage,
                            act)
        ro += n_rows


cdef inline void group_gradient_sums(const Grid *g, const floating *dy, const Walk *dyw,
                                     const floating *x, const Walk *xw, const double *mean,
                                     Py_ssize_t f, Py_ssize_t ro, Py_ssize_t n_rows,
                                     double *sum_dy, double *sum_dy_xc, floating *stage,
                                     const Activation *act) noexcept nogil:
    """Feature f's sums over the group of n_rows outer rows from ro, tile by tile (the
    tile's runs reduced once: 62M instructions to 50M for NHWC x Fortran, dy stored NCHW),
    or without row groups over n_rows whole runs (sums_length). (cbn.api never fuses an
    activation into a backward with row groups: there a group is one outer row.)"""
    cdef Py_ssize_t segment, ri, n
    cdef int64_t dy_step = group_step(g, dyw), x_step = group_step(g, xw)
    cdef floating *dy_stage = stage
    cdef floating *x_stage = stage + g.group_rows * g.group_run
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, f)
    cdef const floating *x_feature = x + feature_offset(xw, g, f)
    cdef RiItem planes
    if g.row_group == 1 or act.fused:    # whole runs, as an RI item of those rows sums them
        planes.f, planes.r_begin, planes.r_end = f, ro * g.n_ri, (ro + n_rows) * g.n_ri
        if act.fused:
            ri_gradient_sums_activate(g, dy, dyw, x, xw, planes, mean[f], sum_dy, sum_dy_xc,
                                      act)
        else:
            ri_gradient_sums(g, dy, dyw, x, xw, planes, mean[f], sum_dy, sum_dy_xc)
        return
    for segment in range(ceil_div(g.n_ri, g.group_run)):
        ri = segment * g.group_run
        n = min(g.group_run, g.n_ri - ri)
        group_prefetch_next(g, dy, dyw, f, ro, ri, n_rows, False)
        group_prefetch_next(g, x, xw, f, ro, ri, n_rows, False)
        if pair_tile(g, dyw, xw):
            pair_gradient_sums(g, dy_feature, dyw, x_feature, xw, ro, ri, n_rows, n, mean[f],
                               sum_dy, sum_dy_xc)
            continue
        group_stage(g, dy_feature, dyw, ro, ri, n_rows, n, dy_stage)
        group_stage(g, x_feature, xw, ro, ri, n_rows, n, x_stage)
        tile_gradient_sums(group_row(g, <floating *>dy_feature, dyw, ro, 0, ri, n, dy_stage),
                           dy_step, group_row_step(g, dyw, n),
                           group_row(g, <floating *>x_feature, xw, ro, 0, ri, n, x_stage),
                           x_step, group_row_step(g, xw, n), n_rows, n, mean[f], sum_dy,
                           sum_dy_xc)


# Row groups where exactly one of dy and x is staged (NHWC: x Fortran beside a dy stored as
# NCHW, or the other way round): a tile's sums, and its dx, in one pass each, the blocks of
# the input laid out unlike the other (and, for dx, unlike dx) transposed in registers as
# they are read (cbn_*_pair in _simd.h), no buffer. With planes_backward_feature, a whole
# backward of NHWC (32, 56, 56, 64) float32, x Fortran beside dy stored NCHW, went from 98.8M
# to 60.9M instructions (callgrind, avx2 level; the matched call 34.9M) and from 3.7-6.3x to
# 1.4-2.7x the matched call's time (one thread, interleaved, on a loaded machine).
cdef inline bint pair_tile(const Grid *g, const Walk *dyw, const Walk *xw) noexcept nogil:
    """Whether exactly one of dy and x is staged, the other running along the tile's rows
    (cbn_*_pair read the staged one's tile rows forwards: not one stepping back)."""
    return (group_staged(g, dyw) != group_staged(g, xw) and group_step(g, dyw) == 1
            and group_step(g, xw) == 1 and dyw.group_stride != -1 and xw.group_stride != -1)


cdef inline bint pair_steps(const Grid *g, const Walk *dyw, const Walk *xw, bint transposed,
                            int64_t *a_step, int64_t *b_step) noexcept nogil:
    """Whether dy is the a of cbn_*_pair, and a's and b's steps: a is the input in place (its
    rows the tile's), or with transposed the staged one (the tile walked as its transpose,
    its rows the staged input's: dx laid out like that one)."""
    cdef bint a_is_dy = group_staged(g, dyw) == transposed
    cdef const Walk *aw = dyw if a_is_dy else xw
    cdef const Walk *bw = xw if a_is_dy else dyw
    a_step[0] = aw.row_stride if transposed else aw.group_stride
    b_step[0] = bw.group_stride if transposed else bw.row_stride
    return a_is_dy


cdef inline void pair_gradient_sums(const Grid *g, const floating *dy, const Walk *dyw,
                                    const floating *x, const Walk *xw, Py_ssize_t ro,
                                    Py_ssize_t ri, Py_ssize_t n_rows, Py_ssize_t n, double mean,
                                    double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """group_gradient_sums of a tile (dy, x at their feature) where pair_tile holds."""
    cdef int64_t a_step, b_step
    cdef bint a_is_dy = pair_steps(g, dyw, xw, False, &a_step, &b_step)
    cdef const floating *a = (dy + row_offset(dyw, ro, ri) if a_is_dy
                              else x + row_offset(xw, ro, ri))
    cdef const floating *b = (x + row_offset(xw, ro, ri) if a_is_dy
                              else dy + row_offset(dyw, ro, ri))
    if floating is float:
        cbn_gradient_sums_pair_f32(a, a_step, b, b_step, n_rows, n, a_is_dy, mean, sum_dy,
                                   sum_dy_xc)
    else:
        cbn_gradient_sums_pair_f64(a, a_step, b, b_step, n_rows, n, a_is_dy, mean, sum_dy,
                                   sum_dy_xc)


cdef inline void pair_input_gradient(const Grid *g, const floating *dy, const Walk *dyw,
                                     const floating *x, const Walk *xw, floating *dx,
                                     const Walk *dxw, Py_ssize_t ro, Py_ssize_t ri,
                                     Py_ssize_t n_rows, Py_ssize_t n, double mean,
                                     double coef_dy, double coef_xc,
                                     double offset) noexcept nogil:
    """input_gradient_group's tile (dy, x, dx at their feature) where pair_tile holds and dx
    runs along the tile's rows (dx_step 1): walked as dx is laid out."""
    cdef bint transposed = group_staged(g, dxw)
    cdef int64_t a_step, b_step
    cdef bint a_is_dy = pair_steps(g, dyw, xw, transposed, &a_step, &b_step)
    cdef const floating *a = (dy + row_offset(dyw, ro, ri) if a_is_dy
                              else x + row_offset(xw, ro, ri))
    cdef const floating *b = (x + row_offset(xw, ro, ri) if a_is_dy
                              else dy + row_offset(dyw, ro, ri))
    cdef int64_t dx_step = dxw.row_stride if transposed else dxw.group_stride
    cdef Py_ssize_t tile_rows = n if transposed else n_rows
    cdef Py_ssize_t tile_run = n_rows if transposed else n
    if floating is float:
        cbn_input_gradient_pair_f32(a, a_step, b, b_step, dx + row_offset(dxw, ro, ri), dx_step,
                                    tile_rows, tile_run, a_is_dy, mean, coef_dy, coef_xc,
                                    offset)
    else:
        cbn_input_gradient_pair_f64(a, a_step, b, b_step, dx + row_offset(dxw, ro, ri), dx_step,
                                    tile_rows, tile_run, a_is_dy, mean, coef_dy, coef_xc,
                                    offset)


cdef void input_gradient_nogil(const Grid *g, const floating *dy, const Walk *dyw,
                               const floating *x, const Walk *xw, floating *dx, const Walk *dxw,
                               const Buffers *ws, GradientFactors *k) noexcept nogil:
    """dx from the sums already in k."""
    cdef Py_ssize_t item, f
    for f in range(g.n_features):
        gradient_factors(f, k)
    if g.planes:
        input_gradient_planes(g, dy, dyw, x, xw, dx, dxw, k, ws)
        return
    if g.n_threads == 1:
        for item in range(g.n_items):
            input_gradient_item(g, dy, dyw, x, xw, dx, dxw, k, walk_item(g, item), ws.scratch)
        return
    for item in prange(g.n_items, num_threads=g.n_threads, schedule="dynamic"):
        input_gradient_item(g, dy, dyw, x, xw, dx, dxw, k, walk_item(g, item),
                            ws.scratch + threadid() * ws.scratch_per_thread)


cdef void input_gradient_planes(const Grid *g, const floating *dy, const Walk *dyw,
                                const floating *x, const Walk *xw, floating *dx,
                                const Walk *dxw, const GradientFactors *k,
                                const Buffers *ws) noexcept nogil:
    """RI dx outer row by outer row, in memory order (see normalize_planes), by row groups."""
    cdef Py_ssize_t i
    cdef Grid e = elementwise(g)
    if g.n_threads == 1:
        for i in range(planes_items(g)):
            input_gradient_group(&e, dy, dyw, x, xw, dx, dxw, k,
                                 group_start(g, i % group_count(g)), item_features(g, i),
                                 <floating *>ws.scratch)
        return
    for i in prange(planes_items(g), num_threads=g.n_threads, schedule="dynamic"):
        input_gradient_group(&e, dy, dyw, x, xw, dx, dxw, k, group_start(g, i % group_count(g)),
                             item_features(g, i),
                             <floating *>(ws.scratch + threadid() * ws.scratch_per_thread))


cdef inline void input_gradient_image(const Grid *g, const floating *dy, const Walk *dyw,
                                      const floating *x, const Walk *xw, floating *dx,
                                      const Walk *dxw, const GradientFactors *k, Py_ssize_t ro,
                                      Py_ssize_t f0) noexcept nogil:
    """input_gradient_group's planes where they are back to back (planes_back_to_back): as
    normalize_image, through cbn_input_gradient_planes."""
    cdef Py_ssize_t count, f = f0, f_end = f0 + g.group_features
    cdef const floating *dy_run
    cdef const floating *x_run
    cdef floating *dx_run
    while f < f_end:
        count = entry_features(g, f, f_end)
        dy_run = dy + feature_offset(dyw, g, f) + row_offset(dyw, ro, 0)
        x_run = x + feature_offset(xw, g, f) + row_offset(xw, ro, 0)
        dx_run = dx + feature_offset(dxw, g, f) + row_offset(dxw, ro, 0)
        if floating is float:
            cbn_input_gradient_planes_f32(dy_run, x_run, dx_run, count, g.n_ri, k.mean + f,
                                          k.coef_dy + f, k.coef_xc + f, k.offset + f, g.stream)
        else:
            cbn_input_gradient_planes_f64(dy_run, x_run, dx_run, count, g.n_ri, k.mean + f,
                                          k.coef_dy + f, k.coef_xc + f, k.offset + f, g.stream)
        f += count


cdef inline void input_gradient_group(const Grid *g, const floating *dy, const Walk *dyw,
                                      const floating *x, const Walk *xw, floating *dx,
                                      const Walk *dxw, const GradientFactors *k,
                                      Py_ssize_t ro, Py_ssize_t f0,
                                      floating *stage) noexcept nogil:
    """dx of group_features features from f0 in the outer rows of the group from ro."""
    cdef Py_ssize_t f, segment, ri, n, n_rows = group_length(g, ro, g.n_ro)
    cdef bint stream = g.stream and not group_staged(g, dxw)
    cdef int64_t dy_step = group_step(g, dyw), x_step = group_step(g, xw)
    cdef int64_t dx_step = group_step(g, dxw)
    cdef floating *dy_stage = stage
    cdef floating *x_stage = stage + g.group_rows * g.group_run
    cdef floating *dx_stage = stage + 2 * g.group_rows * g.group_run
    cdef const floating *dy_feature
    cdef const floating *x_feature
    cdef floating *dx_feature
    cdef bint image = (planes_back_to_back(g, dyw) and planes_back_to_back(g, xw)
                       and planes_back_to_back(g, dxw))
    if k.act.fused or image:
        if k.act.fused:     # elementwise: the activated runs read every operand in place
            act_input_gradient_group(g, dy, dyw, x, xw, dx, dxw, k, ro, n_rows, f0)
        else:
            input_gradient_image(g, dy, dyw, x, xw, dx, dxw, k, ro, f0)
        if g.stream:
            cbn_store_fence()
        return
    for f in range(f0, f0 + g.group_features):
        dy_feature = dy + feature_offset(dyw, g, f)
        x_feature = x + feature_offset(xw, g, f)
        dx_feature = dx + feature_offset(dxw, g, f)
        for segment in range(ceil_div(g.n_ri, g.group_run)):
            ri = segment * g.group_run
            n = min(g.group_run, g.n_ri - ri)
            group_prefetch_next(g, dy, dyw, f, ro, ri, n_rows, False)
            group_prefetch_next(g, x, xw, f, ro, ri, n_rows, False)
            if not stream:
                group_prefetch_next(g, dx, dxw, f, ro, ri, n_rows, True)
            if pair_tile(g, dyw, xw) and dx_step == 1 and not stream and dxw.group_stride != -1:
                pair_input_gradient(g, dy_feature, dyw, x_feature, xw, dx_feature, dxw, ro, ri,
                                    n_rows, n, k.mean[f], k.coef_dy[f], k.coef_xc[f],
                                    k.offset[f])
                continue
            group_stage(g, dy_feature, dyw, ro, ri, n_rows, n, dy_stage)
            group_stage(g, x_feature, xw, ro, ri, n_rows, n, x_stage)
            input_gradient_tile(group_row(g, <floating *>dy_feature, dyw, ro, 0, ri, n,
                                          dy_stage), dy_step, group_row_step(g, dyw, n),
                                group_row(g, <floating *>x_feature, xw, ro, 0, ri, n, x_stage),
                                x_step, group_row_step(g, xw, n),
                                group_row(g, dx_feature, dxw, ro, 0, ri, n, dx_stage), dx_step,
                                group_row_step(g, dxw, n), n_rows, n, k.mean[f],
                                k.coef_dy[f], k.coef_xc[f], k.offset[f], stream)
            group_flush(g, dx_stage, dx_feature, dxw, ro, ri, n_rows, n)
    if g.stream:
        cbn_store_fence()


cdef inline void input_gradient_item(const Grid *g, const floating *dy, const Walk *dyw,
                                     const floating *x, const Walk *xw, floating *dx,
                                     const Walk *dxw, const GradientFactors *k,
                                     Py_ssize_t item, double *scratch) noexcept nogil:
    cdef RiItem it
    if g.features_inner:
        fi_input_gradient_item(g, dy, dyw, x, xw, dx, dxw, item, k, <floating *>scratch)
    else:
        ri_input_gradient_any(g, dy, dyw, x, xw, dx, dxw, ri_item(g, item), k)


cdef inline void ri_input_gradient_any(const Grid *g, const floating *dy, const Walk *dyw,
                                       const floating *x, const Walk *xw, floating *dx,
                                       const Walk *dxw, RiItem it,
                                       const GradientFactors *k) noexcept nogil:
    if k.act.fused:
        ri_input_gradient_activate_item(g, dy, dyw, x, xw, dx, dxw, it, k)
    else:
        ri_input_gradient_item(g, dy, dyw, x, xw, dx, dxw, it, k.mean[it.f], k.coef_dy[it.f],
                               k.coef_xc[it.f], k.offset[it.f])


cdef void backward_nogil(const Grid *g, const floating *dy, const Walk *dyw, const floating *x,
                         const Walk *xw, floating *dx, const Walk *dxw, const Buffers *ws,
                         GradientFactors *k) noexcept nogil:
    cdef Py_ssize_t f
    cdef Grid second = second_pass(g, 2 * g.n_bytes)
    # Row groups sum tile by tile, unlike a feature's runs in turn: the sums of every
    # backward are gradient_sums_nogil's bits, whatever dx's layout adds to the plan
    # (planes_backward_feature's too).
    if g.planes and g.group_features == 1:
        if g.n_threads == 1:
            for f in range(g.n_features):
                planes_backward_feature(g, dy, dyw, x, xw, dx, dxw, ws, k, f,
                                        <floating *>ws.scratch)
            return
        for f in prange(g.n_features, num_threads=g.n_threads, schedule="dynamic"):
            planes_backward_feature(g, dy, dyw, x, xw, dx, dxw, ws, k, f,
                                    <floating *>(ws.scratch
                                                 + threadid() * ws.scratch_per_thread))
        return
    if g.features_inner or g.n_chunks > 1 or g.row_group > 1:
        gradient_sums_nogil(g, dy, dyw, x, xw, ws, k)
        input_gradient_nogil(&second, dy, dyw, x, xw, dx, dxw, ws, k)
    elif g.n_threads == 1:
        for f in range(g.n_features):
            fused_backward_feature(g, dy, dyw, x, xw, dx, dxw, k, f)
    else:
        for f in prange(g.n_features, num_threads=g.n_threads, schedule="dynamic"):
            fused_backward_feature(g, dy, dyw, x, xw, dx, dxw, k, f)


cdef inline void fused_backward_feature(const Grid *g, const floating *dy, const Walk *dyw,
                                        const floating *x, const Walk *xw, floating *dx,
                                        const Walk *dxw, GradientFactors *k,
                                        Py_ssize_t f) noexcept nogil:
    """One chunk per feature: its input gradient follows its sums while x, dy are in cache."""
    cdef RiItem it = ri_item(g, f)
    ri_gradient_sums_any(g, dy, dyw, x, xw, it, k.mean[f], &k.sum_dy[f], &k.sum_dy_xhat[f],
                         k.act)
    scale_to_xhat(f, k)
    gradient_factors(f, k)
    ri_input_gradient_any(g, dy, dyw, x, xw, dx, dxw, it, k)


cdef void planes_backward_feature(const Grid *g, const floating *dy, const Walk *dyw,
                                  const floating *x, const Walk *xw, floating *dx,
                                  const Walk *dxw, const Buffers *ws, GradientFactors *k,
                                  Py_ssize_t f, floating *stage) noexcept nogil:
    """Row groups walked feature by feature (plan.features_outer): feature f's sums, chunk by
    chunk (each chunk's as planes_gradient_sums_chunk sums it, added in chunk order: the
    same bits as the two passes), then its dx while its data is still in L2. Two passes over
    all the features read x and dy from memory twice (NHWC (32, 56, 56, 64) x Fortran
    beside NCHW-stored: a feature is 392 KiB of each)."""
    cdef Py_ssize_t c, i, rows_per_chunk = g.chunk_length // g.n_ri
    for c in range(g.n_chunks):
        ws.chunk_a[c * g.n_features + f] = 0.0
        ws.chunk_b[c * g.n_features + f] = 0.0
        feature_chunk_sums(g, dy, dyw, x, xw, k.mean, f, c * rows_per_chunk,
                           min(g.n_ro, (c + 1) * rows_per_chunk),
                           &ws.chunk_a[c * g.n_features + f], &ws.chunk_b[c * g.n_features + f],
                           stage, k.act)
    combine_chunks(g, ws, k, f)
    gradient_factors(f, k)
    for i in range(group_count(g)):
        input_gradient_group(g, dy, dyw, x, xw, dx, dxw, k, group_start(g, i), f, stage)
