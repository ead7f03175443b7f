# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------
# Part of cbn/_kernels.pyx, which includes it: one module, so the loops inline across files.

cdef void fi_moments_item(const Grid *g, const floating *x, const Walk *xw, Py_ssize_t item,
                          double *scratch, double *chunk_mean, double *chunk_m2) noexcept nogil:
    """One pass per block of rows: shifted sums, then a Chan update per feature."""
    cdef FiItem it = fi_item(g, item)
    cdef double *acc_mean = scratch
    cdef double *acc_m2 = scratch + g.tile_width
    cdef double *s1 = scratch + 2 * g.tile_width
    cdef double *s2 = scratch + 3 * g.tile_width
    cdef const floating *tile = x + xw.feature_offsets[it.fo] + it.fi0 * xw.feature_stride
    cdef Py_ssize_t block, r0, j, n, n_acc = 0, n_block
    cdef int64_t first_row = row_offset(xw, it.r_begin // g.n_ri, it.r_begin % g.n_ri)
    cdef double weight, cross, block_mean, block_m2
    cdef Runs runs
    for j in range(it.width):   # first shift: the item's first row
        acc_mean[j] = tile[first_row + j * xw.feature_stride]
        acc_m2[j] = 0.0
    for block in range(ceil_div(it.r_end - it.r_begin, g.rows_per_block)):
        r0 = it.r_begin + block * g.rows_per_block
        runs = make_runs(g, r0, min(r0 + g.rows_per_block, it.r_end), g.rows_per_run)
        n_block = runs.end - runs.r
        for j in range(it.width):
            s1[j] = 0.0
            s2[j] = 0.0
        while runs.r < runs.end:
            n = run_length(g, &runs)
            prefetch_next_run(g, runs, n, tile, xw, it.width, False)
            add_shifted_rows(tile + row_offset(xw, runs.ro, runs.ri), xw.row_stride,
                             xw.feature_stride, n, it.width, acc_mean, s1, s2,
                             <floating *>(scratch + 4 * g.tile_width))
            advance(g, &runs, n)
        weight = n_block / <double>(n_acc + n_block)
        cross = n_acc * weight
        for j in range(it.width):
            shifted_to_moments(acc_mean[j], s1[j], s2[j], n_block, &block_mean, &block_m2)
            chan_update(&acc_mean[j], &acc_m2[j], block_mean, block_m2, weight, cross)
        n_acc += n_block
    for j in range(it.width):
        chunk_mean[it.chunk * g.n_features + it.f0 + j] = acc_mean[j]
        chunk_m2[it.chunk * g.n_features + it.f0 + j] = acc_m2[j]


cdef void ri_moments(const Grid *g, const floating *x, const Walk *xw, RiItem it,
                     double *mean_out, double *m2_out) noexcept nogil:
    cdef const floating *feature = x + feature_offset(xw, g, it.f)
    mean_out[0] = feature[row_offset(xw, it.r_begin // g.n_ri, it.r_begin % g.n_ri)]
    m2_out[0] = 0.0
    fold_runs(g, feature, xw, it.r_begin, it.r_end, 0, mean_out, m2_out)


cdef inline void fold_runs(const Grid *g, const floating *feature, const Walk *xw,
                           Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_acc,
                           double *acc_mean, double *acc_m2) noexcept nogil:
    """Fold a feature's reduced elements [begin, end) into the moments of the n_acc
    before them, one run (at most BLOCK_ELEMENTS) at a time, or whole short runs several at
    a time (sum_rows), each shifted by the mean so far."""
    cdef Runs runs = make_runs(g, begin, end, BLOCK_ELEMENTS)
    cdef Py_ssize_t n, n_runs
    cdef double s1, s2, block_mean, block_m2, weight
    while runs.r < runs.end:
        n_runs = whole_runs(g, &runs)
        if n_runs > 1 and xw.row_stride == 1:
            n = n_runs * g.n_ri
            shifted_sums_rows(feature, xw.row_offsets + runs.ro, n_runs, g.n_ri, acc_mean[0],
                              &s1, &s2)
            skip_runs(g, &runs, n_runs)
        else:
            n = run_length(g, &runs)
            shifted_sums_run(feature + row_offset(xw, runs.ro, runs.ri), xw.row_stride, n,
                             acc_mean[0], &s1, &s2)
            advance(g, &runs, n)
        shifted_to_moments(acc_mean[0], s1, s2, n, &block_mean, &block_m2)
        weight = n / <double>(n_acc + n)
        chan_update(acc_mean, acc_m2, block_mean, block_m2, weight, n_acc * weight)
        n_acc += n


cdef void planes_moments_chunk(const Grid *g, const floating *x, const Walk *xw,
                               Py_ssize_t c, double *chunk_mean, double *chunk_m2) noexcept nogil:
    """Chunk c of a planes grid in memory order, outer row by outer row: for every feature
    the same runs and updates as ri_moments over the chunk, so the same bits."""
    cdef Py_ssize_t rows_per_chunk = g.chunk_length // g.n_ri
    cdef Py_ssize_t ro0 = c * rows_per_chunk, ro, f
    cdef Py_ssize_t ro1 = min(g.n_ro, ro0 + rows_per_chunk)
    cdef double *mean = chunk_mean + c * g.n_features
    cdef double *m2 = chunk_m2 + c * g.n_features
    cdef const floating *feature
    cdef Py_ssize_t n_rows
    ro = ro0
    while ro < ro1:     # an outer row at a time, or short runs sum_rows rows at a time
        n_rows = sums_length(g, ro, ro1)
        for f in range(g.n_features):
            feature = x + feature_offset(xw, g, f)
            if ro == ro0:
                mean[f] = feature[row_offset(xw, ro0, 0)]
                m2[f] = 0.0
            fold_runs(g, feature, xw, ro * g.n_ri, (ro + n_rows) * g.n_ri,
                      (ro - ro0) * g.n_ri, &mean[f], &m2[f])
        ro += n_rows


cdef void moments_items(const Grid *g, const floating *x, const Walk *xw, double *scratch,
                        Py_ssize_t scratch_per_thread, double *chunk_mean,
                        double *chunk_m2) noexcept nogil:
    cdef Py_ssize_t item
    if g.planes:
        if g.n_threads == 1:
            for item in range(g.n_chunks):
                planes_moments_chunk(g, x, xw, item, chunk_mean, chunk_m2)
            return
        for item in prange(g.n_chunks, num_threads=g.n_threads, schedule="dynamic"):
            planes_moments_chunk(g, x, xw, item, chunk_mean, chunk_m2)
        return
    if g.n_threads == 1:   # no OpenMP region: its start-up dominates small calls
        for item in range(g.n_items):
            moments_item(g, x, xw, item, scratch, chunk_mean, chunk_m2)
        return
    for item in prange(g.n_items, num_threads=g.n_threads, schedule="dynamic"):
        moments_item(g, x, xw, item, scratch + threadid() * scratch_per_thread, chunk_mean,
                     chunk_m2)


cdef inline void moments_item(const Grid *g, const floating *x, const Walk *xw,
                              Py_ssize_t item, double *scratch, double *chunk_mean,
                              double *chunk_m2) noexcept nogil:
    cdef RiItem it
    if g.features_inner:
        fi_moments_item(g, x, xw, item, scratch, chunk_mean, chunk_m2)
    else:
        it = ri_item(g, item)
        ri_moments(g, x, xw, it, &chunk_mean[it.chunk * g.n_features + it.f],
                   &chunk_m2[it.chunk * g.n_features + it.f])


cdef void merge_chunk_moments(const Grid *g, const double *chunk_mean, const double *chunk_m2,
                              double *mean_out, double *var_out) noexcept nogil:
    """Fold the chunks in chunk order (fixed, whatever the thread count); M2 becomes var.

    Chunks are the outer loop so the update vectorizes across features and its weights,
    which depend on the chunk sizes only, are computed once per chunk.
    """
    cdef Py_ssize_t f, c, n_acc = chunk_count(g, 0), n_chunk
    cdef double weight, cross
    for f in range(g.n_features):
        mean_out[f] = chunk_mean[f]
        var_out[f] = chunk_m2[f]
    for c in range(1, g.n_chunks):
        n_chunk = chunk_count(g, c)
        weight = n_chunk / <double>(n_acc + n_chunk)
        cross = n_acc * weight
        for f in range(g.n_features):
            chan_update(&mean_out[f], &var_out[f], chunk_mean[c * g.n_features + f],
                        chunk_m2[c * g.n_features + f], weight, cross)
        n_acc += n_chunk
    for f in range(g.n_features):
        var_out[f] /= g.n_rows


cdef struct Buffers:
    double *scratch             # per thread: scratch_per_thread doubles (FI items)
    Py_ssize_t scratch_per_thread
    double *chunk_a             # n_chunks x n_features partial results
    double *chunk_b
    double *per_feature         # a few n_features arrays of per-feature factors


cdef int allocate(Buffers *b, const Grid *g, Py_ssize_t tile_arrays,
                  Py_ssize_t feature_arrays, bint activated) noexcept nogil:
    """One malloc for a call's buffers (freed with free(b.scratch)); -1 if out of memory."""
    # FI: the tile's accumulators, then up to three stages (stage_rows) of any element type,
    # then, for a backward with an activation, the two slots of activation_slot.
    cdef Py_ssize_t per_thread = (tile_arrays * g.tile_width + 3 * g.stage_elements
                                  if g.features_inner else 0)
    if g.row_group > 1:     # RI row groups: up to three tiles (group_stage, group_row)
        per_thread = 3 * g.group_rows * g.group_run
    if activated and g.features_inner:
        per_thread += 2 * g.stage_elements
    cdef Py_ssize_t partials = g.n_chunks * g.n_features
    b.scratch = <double *>malloc(sizeof(double) * (g.n_threads * per_thread + 2 * partials
                                                   + feature_arrays * g.n_features + 1))
    if b.scratch == NULL:
        return -1
    b.scratch_per_thread = per_thread
    b.chunk_a = b.scratch + g.n_threads * per_thread
    b.chunk_b = b.chunk_a + partials
    b.per_feature = b.chunk_b + partials
    return 0


cdef void compute_moments(const Grid *g, const floating *x, const Walk *xw, const Buffers *ws,
                          double *mean_out, double *var_out) noexcept nogil:
    cdef Py_ssize_t f
    moments_items(g, x, xw, ws.scratch, ws.scratch_per_thread, ws.chunk_a, ws.chunk_b)
    merge_chunk_moments(g, ws.chunk_a, ws.chunk_b, mean_out, var_out)
    for f in range(g.n_features):
        settle_moments(g, x, xw, f, &mean_out[f], &var_out[f])


# Non-finite statistics. The fast passes can overflow on finite float64 data (x − K, S2
# and the Chan updates for |x| near 1e308), and once a feature holds inf, shifting by a
# running mean of inf turns it into NaN on some block sizes and not others. Any of these
# leaves the feature's mean or variance non-finite, so that is the (cheap) test; such a
# feature is recomputed from its data by careful_moments, which decides the result the
# way cbn.reference does: power-of-two scaling (no overflow but a variance beyond float64,
# which is inf), and IEEE semantics for NaN and inf.
cdef inline void settle_moments(const Grid *g, const floating *x, const Walk *xw,
                                Py_ssize_t f, double *mean, double *var) noexcept nogil:
    if not (isfinite(mean[0]) and isfinite(var[0])):
        careful_moments(g, x, xw, f, mean, var)


cdef void careful_moments(const Grid *g, const floating *x, const Walk *xw, Py_ssize_t f,
                          double *mean_out, double *var_out) noexcept nogil:
    """Mean and variance of feature f in three serial passes (rare inputs only).

    1: NaN, ±inf and the largest finite |x|; 2: the mean of x·2^-e, with 2^e > max|x|;
    3: the corrected two-pass sums of d = x·2^-e − mean (Chan, Golub & LeVeque, 1983).
    """
    cdef const floating *feature = x + feature_offset(xw, g, f)
    cdef Py_ssize_t ro, ri
    cdef int exponent
    cdef bint plus_inf = False, minus_inf = False
    cdef double v, d, peak = 0.0, total = 0.0, s1 = 0.0, s2 = 0.0, mean
    for ro in range(g.n_ro):
        for ri in range(g.n_ri):
            v = feature[row_offset(xw, ro, ri)]
            if v != v:
                mean_out[0] = var_out[0] = NAN
                return
            plus_inf = plus_inf or v == INFINITY
            minus_inf = minus_inf or v == -INFINITY
            if isfinite(v) and fabs(v) > peak:
                peak = fabs(v)
    if plus_inf or minus_inf:   # inf − inf in every deviation: no variance
        mean_out[0] = NAN if plus_inf and minus_inf else (INFINITY if plus_inf else -INFINITY)
        var_out[0] = NAN
        return
    frexp(peak, &exponent)
    for ro in range(g.n_ro):
        for ri in range(g.n_ri):
            total += ldexp(feature[row_offset(xw, ro, ri)], -exponent)
    mean = total / g.n_rows
    for ro in range(g.n_ro):
        for ri in range(g.n_ri):
            d = ldexp(feature[row_offset(xw, ro, ri)], -exponent) - mean
            s1 += d
            s2 += d * d
    mean_out[0] = ldexp(mean + s1 / g.n_rows, exponent)
    var_out[0] = ldexp(max(0.0, (s2 - s1 * (s1 / g.n_rows)) / g.n_rows), 2 * exponent)
