# ---------------------------------------------------------------------------------------
# Activations (and a residual) fused into the loops
# ---------------------------------------------------------------------------------------
# Part of cbn/_kernels.pyx, which includes it: one module, so the loops inline across files.
# Forward: the normalization of a row or run, plus the residual, plus the activation, in
# registers before the one store of y (cbn/_activation.h). Backward: dz = dy·act'(z) is
# formed in registers where the plain loops load dy, in their sums and in the dx loop,
# which also stores dz as the residual's gradient. Work split, runs and summation order
# are the plain kernels' own, so the results are bitwise batch norm composed with the
# activation. Operands whose features are not adjacent are staged as in the plain loops.

cdef inline floating *activation_slot(const Grid *g, floating *stage, int k) noexcept nogil:
    """FI backward: slot k (0 or 1), a stage's elements, after the three stages (y's and
    the residual gradient's rows)."""
    return stage + 3 * g.stage_elements + k * g.stage_elements


cdef inline floating act_scalar(floating z, const Activation *act) noexcept nogil:
    if floating is float:
        return cbn_act_f32(z, act.kind, act.alpha)
    else:
        return cbn_act_f64(z, act.kind, act.alpha)


cdef inline floating dz_at(floating dy, const floating *y, int64_t y_step, int64_t b,
                          int64_t bit_step, Py_ssize_t i, const Activation *act) noexcept nogil:
    """dz of element i of a run: act' from y[i * y_step], or from bit b + i * bit_step."""
    if floating is float:
        return cbn_dz1_f32(dy, y, y_step, act.mask, b, bit_step, i, act.kind, act.alpha)
    else:
        return cbn_dz1_f64(dy, y, y_step, act.mask, b, bit_step, i, act.kind, act.alpha)


cdef inline int64_t mask_bit(const Activation *act, const Grid *g, Py_ssize_t f, Py_ssize_t ro,
                             Py_ssize_t ri) noexcept nogil:
    """The mask bit of feature f's element (ro, ri); 0 without a mask."""
    if act.mask == NULL:
        return 0
    return feature_offset(act.mask_walk, g, f) + row_offset(act.mask_walk, ro, ri)


cdef inline void normalize_act(const floating *x, const floating *residual, floating *y,
                               Py_ssize_t n, const double *mean, const double *scale,
                               const double *shift, bint per_element, const Activation *act,
                               bint stream, int64_t b, int64_t bit_step) noexcept nogil:
    if floating is float:
        cbn_normalize_act_f32(x, residual, y, n, mean, scale, shift, per_element, act.kind,
                              act.alpha, stream, act.mask, b, bit_step, b, b + n)
    else:
        cbn_normalize_act_f64(x, residual, y, n, mean, scale, shift, per_element, act.kind,
                              act.alpha, stream, act.mask, b, bit_step, b, b + n)


cdef inline void set_row_signs(unsigned char *mask, int64_t b, int64_t bit_step,
                               const floating *y, int64_t y_row_stride, Py_ssize_t n_rows,
                               Py_ssize_t width) noexcept nogil:
    if floating is float:
        cbn_set_row_signs_f32(mask, b, bit_step, y, y_row_stride, n_rows, width)
    else:
        cbn_set_row_signs_f64(mask, b, bit_step, y, y_row_stride, n_rows, width)


cdef inline void act_input_gradient(const floating *dy, const floating *y, const floating *x,
                                    floating *dx, floating *dres, Py_ssize_t n,
                                    const double *mean, const double *coef_dy,
                                    const double *coef_xc, const double *offset,
                                    bint per_element, const Activation *act, bint stream,
                                    int64_t b, int64_t bit_step) noexcept nogil:
    if floating is float:
        cbn_act_input_gradient_f32(dy, y, x, dx, dres, n, mean, coef_dy, coef_xc, offset,
                                   per_element, act.kind, act.alpha, stream, act.mask, b,
                                   bit_step)
    else:
        cbn_act_input_gradient_f64(dy, y, x, dx, dres, n, mean, coef_dy, coef_xc, offset,
                                   per_element, act.kind, act.alpha, stream, act.mask, b,
                                   bit_step)


# Rows of an FI run: strip by strip (_simd.h's strips, the factors in registers) at any
# width from one vector on, not only where the plain loops take strips (wide_rows): row by
# row, the activation's loop paid a call, its head and tail and the factors' loads per row
# (NHWC, rows of 64 features: the fused forward took 1.8x the plain one's instructions
# without the mask, 2.3x with it, avx2 level; now 1.07x and 1.32x). Streaming where every
# streamed output's rows are whole lines apart at one offset in a line; else row by row, each
# row streaming as a run does (_simd.h's cbn_run_streams). A mask's
# bits are set by the strips where a row's features have adjacent bits (bit_step 1).
cdef inline void normalize_act_rows(const floating *x, int64_t x_row_stride,
                                    const floating *residual, int64_t r_row_stride,
                                    floating *y, int64_t y_row_stride, Py_ssize_t n_rows,
                                    Py_ssize_t width, const double *mean, const double *scale,
                                    const double *shift, const Activation *act, bint stream,
                                    int64_t b, int64_t bit_row_stride,
                                    int64_t bit_step) noexcept nogil:
    cdef Py_ssize_t r
    if (width >= 8 and (act.mask == NULL or bit_step == 1)
            and (not stream or lines_apart(y, y_row_stride))):
        if floating is float:
            cbn_act_normalize_strips_f32(x, x_row_stride, residual, r_row_stride, y,
                                         y_row_stride, n_rows, width, mean, scale, shift,
                                         act.kind, act.alpha, stream, act.mask, b,
                                         bit_row_stride)
        else:
            cbn_act_normalize_strips_f64(x, x_row_stride, residual, r_row_stride, y,
                                         y_row_stride, n_rows, width, mean, scale, shift,
                                         act.kind, act.alpha, stream, act.mask, b,
                                         bit_row_stride)
        return
    for r in range(n_rows):
        normalize_act(x + r * x_row_stride,
                      NULL if residual == NULL else residual + r * r_row_stride,
                      y + r * y_row_stride, width, mean, scale, shift, True, act, stream,
                      b + r * bit_row_stride, bit_step)


cdef inline bint same_lines(const floating *dx, int64_t dx_row_stride, const floating *dres,
                            int64_t dres_row_stride) noexcept nogil:
    """Whether dx's rows, and dres's if any, are whole lines apart at one offset in a line."""
    return lines_apart(dx, dx_row_stride) and (
        dres == NULL or (lines_apart(dres, dres_row_stride)
                         and (<uintptr_t>dres) % 64 == (<uintptr_t>dx) % 64))


cdef inline void act_input_gradient_rows(const floating *dy, int64_t dy_row_stride,
                                         const floating *y, int64_t y_row_stride,
                                         const floating *x, int64_t x_row_stride, floating *dx,
                                         int64_t dx_row_stride, floating *dres,
                                         int64_t dres_row_stride, Py_ssize_t n_rows,
                                         Py_ssize_t width, const double *mean,
                                         const double *coef_dy, const double *coef_xc,
                                         const double *offset, const Activation *act,
                                         bint stream, int64_t b, int64_t bit_row_stride,
                                         int64_t bit_step) noexcept nogil:
    cdef Py_ssize_t r
    if (width >= 8 and (act.mask == NULL or bit_step == 1)
            and (not stream or same_lines(dx, dx_row_stride, dres, dres_row_stride))):
        if floating is float:
            cbn_act_input_gradient_strips_f32(dy, dy_row_stride, y, y_row_stride, x,
                                              x_row_stride, dx, dx_row_stride, dres,
                                              dres_row_stride, n_rows, width, mean, coef_dy,
                                              coef_xc, offset, act.kind, act.alpha, stream,
                                              act.mask, b, bit_row_stride)
        else:
            cbn_act_input_gradient_strips_f64(dy, dy_row_stride, y, y_row_stride, x,
                                              x_row_stride, dx, dx_row_stride, dres,
                                              dres_row_stride, n_rows, width, mean, coef_dy,
                                              coef_xc, offset, act.kind, act.alpha, stream,
                                              act.mask, b, bit_row_stride)
        return
    for r in range(n_rows):
        act_input_gradient(dy + r * dy_row_stride, NULL if y == NULL else y + r * y_row_stride,
                           x + r * x_row_stride, dx + r * dx_row_stride,
                           NULL if dres == NULL else dres + r * dres_row_stride, width, mean,
                           coef_dy, coef_xc, offset, True, act, stream,
                           b + r * bit_row_stride, bit_step)


cdef inline const floating *tile_of(const floating *base, const Walk *w,
                                    const FiItem *it) noexcept nogil:
    return base + w.feature_offsets[it.fo] + it.fi0 * w.feature_stride


cdef void ri_normalize_activate_item(const Grid *g, const floating *x, const Walk *xw,
                                     floating *y, const Walk *yw, RiItem it, double mean,
                                     double scale, double shift,
                                     const Activation *act) noexcept nogil:
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef floating *y_feature = y + feature_offset(yw, g, it.f)
    cdef const floating *r_feature = NULL
    cdef const floating *x_run
    cdef const floating *r_run = NULL
    cdef floating *y_run
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n, i
    cdef int64_t xs = xw.row_stride, ys = yw.row_stride, rs = 1, b
    cdef int64_t bit_step = 0 if act.mask == NULL else act.mask_walk.row_stride
    cdef floating z
    if act.residual != NULL:
        r_feature = <const floating *>act.residual + feature_offset(act.residual_walk, g, it.f)
        rs = act.residual_walk.row_stride
    while runs.r < runs.end:
        n = run_length(g, &runs)
        x_run = x_feature + row_offset(xw, runs.ro, runs.ri)
        y_run = y_feature + row_offset(yw, runs.ro, runs.ri)
        if r_feature != NULL:
            r_run = r_feature + row_offset(act.residual_walk, runs.ro, runs.ri)
        b = mask_bit(act, g, it.f, runs.ro, runs.ri)
        if xs == 1 and ys == 1 and rs == 1:
            normalize_act(x_run, r_run, y_run, n, &mean, &scale, &shift, False, act, g.stream,
                          b, bit_step)
        else:
            for i in range(n):
                z = <floating>((x_run[i * xs] - mean) * scale + shift)
                if r_run != NULL:
                    z = <floating>(z + r_run[i * rs])
                z = act_scalar(z, act)
                y_run[i * ys] = z
                if act.mask != NULL:
                    cbn_set_bit(act.mask, b + i * bit_step, z > 0)
        advance(g, &runs, n)
    if g.stream:
        cbn_store_fence()


cdef void act_normalize_group(const Grid *g, const floating *x, const Walk *xw, floating *y,
                              const Walk *yw, Py_ssize_t ro, Py_ssize_t n_rows, Py_ssize_t f0,
                              const double *mean, const double *scale, const double *shift,
                              const Activation *act) noexcept nogil:
    """normalize_group's activated planes (features f0 .. f0 + group_features of outer rows
    ro .. ro + n_rows). Where every operand's runs step by one, the planes of one outer
    row's features of one feature_offsets entry go to the planes loop in C in one call
    (cbn_normalize_act_planes, whose comment has the figures); else plane by plane, as
    ri_normalize_activate_item walks any layout."""
    cdef const Walk *rw = act.residual_walk
    cdef const Walk *bw = act.mask_walk
    cdef Py_ssize_t f, t, count, f_end = f0 + g.group_features
    cdef RiItem plane
    cdef const floating *residual = NULL
    cdef int64_t r_step = 0, b_step = 0, bit_step = 0
    if not (xw.row_stride == 1 and yw.row_stride == 1
            and (act.residual == NULL or rw.row_stride == 1)):
        for f in range(f0, f_end):
            plane.f = f
            for t in range(n_rows):
                plane.r_begin, plane.r_end = (ro + t) * g.n_ri, (ro + t + 1) * g.n_ri
                ri_normalize_activate_item(g, x, xw, y, yw, plane, mean[f], scale[f],
                                           shift[f], act)
        return
    if act.mask != NULL:
        b_step, bit_step = bw.feature_stride, bw.row_stride
    if act.residual != NULL:
        r_step = rw.feature_stride
    for t in range(n_rows):
        f = f0
        while f < f_end:     # the features of one feature_offsets entry at a time
            count = entry_features(g, f, f_end)
            if act.residual != NULL:
                residual = (<const floating *>act.residual + feature_offset(rw, g, f)
                            + row_offset(rw, ro + t, 0))
            if floating is float:
                cbn_normalize_act_planes_f32(
                    x + feature_offset(xw, g, f) + row_offset(xw, ro + t, 0), xw.feature_stride,
                    residual, r_step, y + feature_offset(yw, g, f) + row_offset(yw, ro + t, 0),
                    yw.feature_stride, count, g.n_ri, mean + f, scale + f, shift + f, act.kind,
                    act.alpha, g.stream, act.mask, mask_bit(act, g, f, ro + t, 0), b_step,
                    bit_step)
            else:
                cbn_normalize_act_planes_f64(
                    x + feature_offset(xw, g, f) + row_offset(xw, ro + t, 0), xw.feature_stride,
                    residual, r_step, y + feature_offset(yw, g, f) + row_offset(yw, ro + t, 0),
                    yw.feature_stride, count, g.n_ri, mean + f, scale + f, shift + f, act.kind,
                    act.alpha, g.stream, act.mask, mask_bit(act, g, f, ro + t, 0), b_step,
                    bit_step)
            f += count


cdef void fi_gradient_sums_activate_item(const Grid *g, const floating *dy, const Walk *dyw,
                                         const floating *x, const Walk *xw, Py_ssize_t item,
                                         const double *mean, double *scratch,
                                         double *chunk_dy, double *chunk_dy_xc,
                                         const Activation *act) noexcept nogil:
    cdef FiItem it = fi_item(g, item)
    cdef double *acc_dy = scratch
    cdef double *acc_dy_xc = scratch + g.tile_width
    cdef floating *stage = <floating *>(scratch + 2 * g.tile_width)
    cdef const floating *dy_tile = tile_of(dy, dyw, &it)
    cdef const floating *x_tile = tile_of(x, xw, &it)
    cdef const floating *o_tile = NULL
    cdef const floating *dy_rows
    cdef const floating *x_rows
    cdef const floating *o_rows = NULL
    cdef int64_t dy_row_stride, x_row_stride, o_row_stride = 0, bit_row_stride = 0, bit_step = 0
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, g.rows_per_run)
    cdef Py_ssize_t j, n
    if act.mask != NULL:
        bit_row_stride, bit_step = act.mask_walk.row_stride, act.mask_walk.feature_stride
    else:
        o_tile = tile_of(<const floating *>act.output, act.output_walk, &it)
    for j in range(it.width):
        acc_dy[j] = 0.0
        acc_dy_xc[j] = 0.0
    while runs.r < runs.end:
        n = run_length(g, &runs)
        dy_rows = rows_of(g, dy_tile, dyw, &runs, n, it.width, &dy_row_stride, stage)
        x_rows = rows_of(g, x_tile, xw, &runs, n, it.width, &x_row_stride,
                         stage + g.stage_elements)
        if o_tile != NULL:
            o_rows = rows_of(g, o_tile, act.output_walk, &runs, n, it.width, &o_row_stride,
                             stage + 2 * g.stage_elements)
        if floating is float:
            cbn_act_gradient_sums_f32(dy_rows, dy_row_stride, o_rows, o_row_stride, x_rows,
                                      x_row_stride, n, it.width, mean + it.f0, act.kind,
                                      act.alpha, acc_dy, acc_dy_xc, act.mask,
                                      mask_bit(act, g, it.f0, runs.ro, runs.ri),
                                      bit_row_stride, bit_step)
        else:
            cbn_act_gradient_sums_f64(dy_rows, dy_row_stride, o_rows, o_row_stride, x_rows,
                                      x_row_stride, n, it.width, mean + it.f0, act.kind,
                                      act.alpha, acc_dy, acc_dy_xc, act.mask,
                                      mask_bit(act, g, it.f0, runs.ro, runs.ri),
                                      bit_row_stride, bit_step)
        advance(g, &runs, n)
    for j in range(it.width):
        chunk_dy[it.chunk * g.n_features + it.f0 + j] = acc_dy[j]
        chunk_dy_xc[it.chunk * g.n_features + it.f0 + j] = acc_dy_xc[j]


cdef void rows_gradient_sums_activate(const Grid *g, const floating *dy, const Walk *dyw,
                                      const floating *x, const Walk *xw, Py_ssize_t f,
                                      Py_ssize_t ro, Py_ssize_t n_rows, double mean,
                                      double *sum_dy, double *sum_dy_xc,
                                      const Activation *act) noexcept nogil:
    """Feature f's whole runs in outer rows ro .. ro + n_rows in one set of accumulators,
    as ri_gradient_sums sums the composed call's dz there (rows_gradient_sums; its dz and
    x step by one)."""
    cdef const floating *y = NULL
    cdef const int64_t *y_rows = NULL
    cdef const int64_t *bit_rows = NULL
    cdef int64_t y_step = 0, bit_base = 0, bit_step = 0
    if act.mask != NULL:
        bit_base = feature_offset(act.mask_walk, g, f)
        bit_rows = act.mask_walk.row_offsets + ro
        bit_step = act.mask_walk.row_stride
    else:
        y = <const floating *>act.output + feature_offset(act.output_walk, g, f)
        y_rows = act.output_walk.row_offsets + ro
        y_step = act.output_walk.row_stride
    if floating is float:
        cbn_act_gradient_sums_rows_f32(dy + feature_offset(dyw, g, f), dyw.row_offsets + ro,
                                       dyw.row_stride, y, y_rows, y_step,
                                       x + feature_offset(xw, g, f), xw.row_offsets + ro,
                                       n_rows, g.n_ri, mean, act.kind, act.alpha, sum_dy,
                                       sum_dy_xc, act.mask, bit_base, bit_rows, bit_step)
    else:
        cbn_act_gradient_sums_rows_f64(dy + feature_offset(dyw, g, f), dyw.row_offsets + ro,
                                       dyw.row_stride, y, y_rows, y_step,
                                       x + feature_offset(xw, g, f), xw.row_offsets + ro,
                                       n_rows, g.n_ri, mean, act.kind, act.alpha, sum_dy,
                                       sum_dy_xc, act.mask, bit_base, bit_rows, bit_step)


cdef void ri_gradient_sums_activate(const Grid *g, const floating *dy, const Walk *dyw,
                                    const floating *x, const Walk *xw, RiItem it, double mean,
                                    double *sum_dy, double *sum_dy_xc,
                                    const Activation *act) noexcept nogil:
    """ri_gradient_sums of dz: the same runs, dz formed where dy is loaded, and the same
    loops as the composed call's on its dz (gradient_run's, in the same order)."""
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, it.f)
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef const floating *o_run = NULL
    cdef const floating *dy_run
    cdef const floating *x_run
    cdef int64_t dys = dyw.row_stride, xs = xw.row_stride, os = 0, b, bit_step = 0
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n, n_runs
    if act.mask != NULL:
        bit_step = act.mask_walk.row_stride
    else:
        os = act.output_walk.row_stride
    while runs.r < runs.end:
        n_runs = whole_runs(g, &runs)
        if n_runs > 1 and act.unit_dz_step and xs == 1:
            rows_gradient_sums_activate(g, dy, dyw, x, xw, it.f, runs.ro, n_runs, mean,
                                        sum_dy, sum_dy_xc, act)
            skip_runs(g, &runs, n_runs)
            continue
        n = run_length(g, &runs)
        dy_run = dy_feature + row_offset(dyw, runs.ro, runs.ri)
        x_run = x_feature + row_offset(xw, runs.ro, runs.ri)
        if act.mask == NULL:
            o_run = (<const floating *>act.output + feature_offset(act.output_walk, g, it.f)
                     + row_offset(act.output_walk, runs.ro, runs.ri))
        b = mask_bit(act, g, it.f, runs.ro, runs.ri)
        if act.unit_dz_step and xs == 1:
            if floating is float:
                cbn_act_gradient_sums_run_f32(dy_run, dys, o_run, os, x_run, n, mean, act.kind,
                                              act.alpha, sum_dy, sum_dy_xc, act.mask, b,
                                              bit_step)
            else:
                cbn_act_gradient_sums_run_f64(dy_run, dys, o_run, os, x_run, n, mean, act.kind,
                                              act.alpha, sum_dy, sum_dy_xc, act.mask, b,
                                              bit_step)
        elif floating is float:
            cbn_act_gradient_sums_steps_f32(dy_run, dys, o_run, os, x_run, xs, n, mean,
                                            act.kind, act.alpha, sum_dy, sum_dy_xc, act.mask,
                                            b, bit_step)
        else:
            cbn_act_gradient_sums_steps_f64(dy_run, dys, o_run, os, x_run, xs, n, mean,
                                            act.kind, act.alpha, sum_dy, sum_dy_xc, act.mask,
                                            b, bit_step)
        advance(g, &runs, n)


cdef void ri_input_gradient_activate_item(const Grid *g, const floating *dy, const Walk *dyw,
                                          const floating *x, const Walk *xw, floating *dx,
                                          const Walk *dxw, RiItem it,
                                          const GradientFactors *k) noexcept nogil:
    cdef const Activation *act = k.act
    cdef const Walk *ow = act.output_walk
    cdef const Walk *rw = act.residual_gradient_walk
    cdef const floating *dy_run = dy + feature_offset(dyw, g, it.f)
    cdef const floating *x_run = x + feature_offset(xw, g, it.f)
    cdef const floating *o_run = NULL
    cdef floating *dx_run = dx + feature_offset(dxw, g, it.f)
    cdef floating *r_run = NULL
    cdef int64_t dys = dyw.row_stride, xs = xw.row_stride, os = 1
    cdef int64_t dxs = dxw.row_stride, rs = 1, b, bit_step = 0
    cdef double mean = k.mean[it.f], coef_dy = k.coef_dy[it.f], coef_xc = k.coef_xc[it.f]
    cdef double offset = k.offset[it.f]
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n, i, at
    cdef floating dz
    if act.residual_gradient != NULL:
        r_run = <floating *>act.residual_gradient + feature_offset(rw, g, it.f)
        rs = rw.row_stride
    if act.mask != NULL:
        bit_step = act.mask_walk.row_stride
    else:
        o_run = <const floating *>act.output + feature_offset(ow, g, it.f)
        os = ow.row_stride
    while runs.r < runs.end:
        n = run_length(g, &runs)
        b = mask_bit(act, g, it.f, runs.ro, runs.ri)
        if dys == 1 and xs == 1 and os == 1 and dxs == 1 and rs == 1:
            act_input_gradient(dy_run + row_offset(dyw, runs.ro, runs.ri),
                               NULL if o_run == NULL else o_run + row_offset(ow, runs.ro, runs.ri),
                               x_run + row_offset(xw, runs.ro, runs.ri),
                               dx_run + row_offset(dxw, runs.ro, runs.ri),
                               NULL if r_run == NULL else r_run + row_offset(rw, runs.ro, runs.ri),
                               n, &mean, &coef_dy, &coef_xc, &offset, False, act, g.stream, b,
                               bit_step)
        else:
            for i in range(n):
                at = runs.ri + i
                dz = dz_at(dy_run[row_offset(dyw, runs.ro, at)],
                           NULL if o_run == NULL else o_run + row_offset(ow, runs.ro, at), 0,
                           b, bit_step, i, act)
                dx_run[row_offset(dxw, runs.ro, at)] = <floating>(
                    coef_dy * dz + coef_xc * (x_run[row_offset(xw, runs.ro, at)] - mean)
                    + offset)
                if r_run != NULL:
                    r_run[row_offset(rw, runs.ro, at)] = dz
        advance(g, &runs, n)
    if g.stream:
        cbn_store_fence()


cdef void act_input_gradient_group(const Grid *g, const floating *dy, const Walk *dyw,
                                   const floating *x, const Walk *xw, floating *dx,
                                   const Walk *dxw, const GradientFactors *k, Py_ssize_t ro,
                                   Py_ssize_t n_rows, Py_ssize_t f0) noexcept nogil:
    """input_gradient_group's activated planes (features f0 .. f0 + group_features of outer
    rows ro .. ro + n_rows). Where every operand's runs step by one, the planes of one outer
    row's features of one feature_offsets entry (their planes a stride apart) go to the
    planes loop in C in one call (cbn_act_input_gradient_planes, whose comment has the
    figures); else plane by plane, as ri_input_gradient_activate_item walks any layout."""
    cdef const Activation *act = k.act
    cdef const Walk *ow = act.output_walk
    cdef const Walk *rw = act.residual_gradient_walk
    cdef Py_ssize_t f, t, count, f_end = f0 + g.group_features
    cdef RiItem plane
    cdef const floating *y = NULL
    cdef floating *dres = NULL
    cdef int64_t y_step = 0, dres_step = 0, b_step = 0, bit_step = 0
    if not (dyw.row_stride == 1 and xw.row_stride == 1 and dxw.row_stride == 1
            and (act.mask != NULL or ow.row_stride == 1)
            and (act.residual_gradient == NULL or rw.row_stride == 1)):
        for f in range(f0, f_end):
            plane.f = f
            for t in range(n_rows):
                plane.r_begin, plane.r_end = (ro + t) * g.n_ri, (ro + t + 1) * g.n_ri
                ri_input_gradient_activate_item(g, dy, dyw, x, xw, dx, dxw, plane, k)
        return
    if act.mask != NULL:
        b_step, bit_step = act.mask_walk.feature_stride, act.mask_walk.row_stride
    else:
        y_step = ow.feature_stride
    if act.residual_gradient != NULL:
        dres_step = rw.feature_stride
    for t in range(n_rows):
        f = f0
        while f < f_end:     # the features of one feature_offsets entry at a time
            count = entry_features(g, f, f_end)
            if act.mask == NULL:
                y = (<const floating *>act.output + feature_offset(ow, g, f)
                     + row_offset(ow, ro + t, 0))
            if act.residual_gradient != NULL:
                dres = (<floating *>act.residual_gradient + feature_offset(rw, g, f)
                        + row_offset(rw, ro + t, 0))
            if floating is float:
                cbn_act_input_gradient_planes_f32(
                    dy + feature_offset(dyw, g, f) + row_offset(dyw, ro + t, 0),
                    dyw.feature_stride, y, y_step,
                    x + feature_offset(xw, g, f) + row_offset(xw, ro + t, 0), xw.feature_stride,
                    dx + feature_offset(dxw, g, f) + row_offset(dxw, ro + t, 0),
                    dxw.feature_stride, dres, dres_step, count, g.n_ri, k.mean + f,
                    k.coef_dy + f, k.coef_xc + f, k.offset + f, act.kind, act.alpha, g.stream,
                    act.mask, mask_bit(act, g, f, ro + t, 0), b_step, bit_step)
            else:
                cbn_act_input_gradient_planes_f64(
                    dy + feature_offset(dyw, g, f) + row_offset(dyw, ro + t, 0),
                    dyw.feature_stride, y, y_step,
                    x + feature_offset(xw, g, f) + row_offset(xw, ro + t, 0), xw.feature_stride,
                    dx + feature_offset(dxw, g, f) + row_offset(dxw, ro + t, 0),
                    dxw.feature_stride, dres, dres_step, count, g.n_ri, k.mean + f,
                    k.coef_dy + f, k.coef_xc + f, k.offset + f, act.kind, act.alpha, g.stream,
                    act.mask, mask_bit(act, g, f, ro + t, 0), b_step, bit_step)
            f += count
