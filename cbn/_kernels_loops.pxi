# ---------------------------------------------------------------------------------------
# Inner loops
# ---------------------------------------------------------------------------------------
# Part of cbn/_kernels.pyx, which includes it: one module, so the loops inline across files.

cdef inline void transpose(const floating *src, int64_t src_stride, Py_ssize_t n_r,
                           Py_ssize_t n_c, floating *dst, int64_t dst_stride,
                           const double *affine=NULL) noexcept nogil:
    """dst[c * dst_stride + r] = src[r * src_stride + c] (_simd.h: 8x8 blocks in registers);
    with affine (mean, scale, shift), normalized on the way."""
    if floating is float:
        cbn_transpose_f32(src, src_stride, n_r, n_c, dst, dst_stride, affine)
    else:
        cbn_transpose_f64(src, src_stride, n_r, n_c, dst, dst_stride, affine)


cdef inline void reverse_rows(const floating *src, int64_t src_stride, Py_ssize_t n_rows,
                              Py_ssize_t width, floating *dst, int64_t dst_stride) noexcept nogil:
    """dst[r * dst_stride + j] = src[r * src_stride + width - 1 - j] (_simd.h)."""
    if floating is float:
        cbn_reverse_rows_f32(src, src_stride, n_rows, width, dst, dst_stride)
    else:
        cbn_reverse_rows_f64(src, src_stride, n_rows, width, dst, dst_stride)


# FI tiles of an operand whose features are not adjacent (a Fortran-ordered or transposed x
# beside a C-ordered dy, a stepped view) are copied one run of rows at a time into a
# per-thread stage of rows of adjacent features, and outputs written there are copied back:
# the SIMD loops then serve every operand, and the copy, a blocked transpose within the
# caches, reads and writes whole cache lines of the operand in its own order.
cdef inline const floating *stage_rows(const floating *p, int64_t *row_stride, int64_t step,
                                       Py_ssize_t n_rows, Py_ssize_t width,
                                       floating *stage) noexcept nogil:
    """n_rows x width elements of p as rows of adjacent features: p itself if its features
    are adjacent, else their copy in stage (then *row_stride becomes the stage's pitch)."""
    cdef Py_ssize_t r, j, pitch = stage_pitch(width, sizeof(floating))
    if step == 1:
        return p
    if row_stride[0] == 1:
        transpose(p, step, width, n_rows, stage, pitch)
    elif step == -1:    # features reversed: each row a contiguous run read from its end
        reverse_rows(p - (width - 1), row_stride[0], n_rows, width, stage, pitch)
    else:
        for r in range(n_rows):
            for j in range(width):
                stage[r * pitch + j] = p[r * row_stride[0] + j * step]
    row_stride[0] = pitch
    return stage


cdef inline const floating *rows_of(const Grid *g, const floating *tile, const Walk *w,
                                    const Runs *runs, Py_ssize_t n, Py_ssize_t width,
                                    int64_t *row_stride, floating *stage) noexcept nogil:
    """The run's rows of a tile as rows of adjacent features (staged if need be)."""
    prefetch_next_run(g, runs[0], n, tile, w, width, False)
    row_stride[0] = w.row_stride
    return stage_rows(tile + row_offset(w, runs.ro, runs.ri), row_stride, w.feature_stride, n,
                      width, stage)


# FI passes (normalize, dx, the gradient sums) of float32 tiles whose operands each hold a
# row of adjacent features or a feature of adjacent rows, not all alike (dense x C-ordered
# beside a Fortran-ordered or transposed dy or out=, and the other way round; NHWC x
# stored as NCHW beside a C-ordered dy, image by image), with each item taken one outer
# row's segment of rows at a time: _cross.h's loops take the segment straight from the
# inputs to the output or the sums in 8x8 blocks transposed in registers, where the stage
# copied every odd operand's run through a buffer (its copies cost as much as the
# arithmetic). The same bits: the elementwise passes in any order, the sums in the stage's
# runs (which end where outer rows do).
cdef inline bint by_rows(const Walk *w) noexcept nogil:
    """A row of adjacent features, stepping either way (_cross.h: a reversed view)."""
    return w.feature_stride == 1 or w.feature_stride == -1


cdef inline bint by_rows_or_features(const Walk *w) noexcept nogil:
    return by_rows(w) or w.row_stride == 1 or w.row_stride == -1


cdef inline bint crosswise(const Grid *g, const Walk *a, const Walk *b,
                           const Walk *out) noexcept nogil:
    """Whether an FI pass over inputs a and b (NULL: none) into out (NULL: the gradient
    sums) takes its tiles crosswise (_cross.h): with outer rows, only where each is at least
    the stage's run long (NHWC (32,56,56,64) x C beside an NCHW-stored out=, images of 3136
    rows: inference 1.8-2.2x the slower matched call to 1.4x, backward out= 1.6-1.9x to
    1.15x); shorter ones each cost the loops' set-up and tails, where the stage joins runs
    that continue one another into long pieces (x Fortran beside a C-ordered dy, runs of 32
    images: backward 1.9x staged, 2.5-2.8x crosswise). An elementwise output by rows beside
    an input by features only where cross_rows_pay."""
    if not CBN_CROSS or (g.n_ro > 1 and g.n_ri < g.rows_per_run):
        return False
    if out != NULL and by_rows(out) and not cross_rows_pay(g, out):
        return False
    if not (by_rows_or_features(a) and (b == NULL or by_rows_or_features(b))
            and (out == NULL or by_rows_or_features(out))):
        return False
    return (not by_rows(a) or (b != NULL and not by_rows(b))
            or (out != NULL and not by_rows(out)))


cdef inline bint cross_rows_pay(const Grid *g, const Walk *out) noexcept nogil:
    """Whether an elementwise output by rows beside an input by features goes crosswise,
    which writes it 16 features a pass down the tile's rows, rather than through the stage,
    which writes it row after row and reads the input in pieces of a run of rows.

    From memory (the output streams): crosswise, unless the output's tile is one sequential
    run and the stage's pieces are at least 16 cache lines. Float32 from memory on the
    Intel Xeon (1.2 GB arrays), inference out=, staged / crosswise / matched: dense
    (307200, 1024) x Fortran beside C, pieces of 32 rows, 354 / 215 / 198 ms; NHWC
    (1568,56,56,64) x Fortran beside C, the output's rows an image apart, 1013 / 701 / 225;
    NCHW (1568,64,56,56) x C beside an NHWC-stored out=, one run per image, pieces of 512
    rows, 300 / 775 / 267. In cache the two are within 15 % either way and which wins
    differs between machines (dense (8192, 1024) inference, x Fortran beside C: Intel Xeon
    1.95x the matched call staged, 2.25x crosswise; AMD EPYC 2.5x staged, 1.8-2.0x
    crosswise), so there python -m cbn calibrate chooses (cross_rows_out)."""
    if not g.stream:
        return cross_rows_out
    return not (g.n_tiles == 1 and (out.row_stride == g.tile_width
                                    or out.row_stride == -g.tile_width)
                and g.rows_per_run * <Py_ssize_t>sizeof(float) >= 1024)


cdef inline Py_ssize_t cross_bound(const Grid *g, Py_ssize_t r, const floating *out,
                                    const Walk *w) noexcept nogil:
    """Where an item bound at row r moves (cross_rows): on to the output's next line start,
    where the output streams and each of its features is rows of whole lines apart."""
    cdef Py_ssize_t head = 0, ro = r // g.n_ri
    if r == 0 or r >= g.n_rows:
        return min(r, g.n_rows)
    if (g.stream and w.row_stride == 1 and w.feature_stride != 1
            and (w.feature_stride * <int64_t>sizeof(floating)) % 64 == 0):
        head = ((64 - <Py_ssize_t>((<uintptr_t>(out + row_offset(w, ro, r - ro * g.n_ri)))
                                   % 64)) % 64) // sizeof(floating)
    return min(r + head, (ro + 1) * g.n_ri)


cdef inline Runs cross_rows(const Grid *g, const FiItem *it, const floating *out,
                            const Walk *w, Py_ssize_t segment) noexcept nogil:
    """The rows an item takes crosswise, out its output's tile (row 0), as runs of at most
    segment rows that end where outer rows do (a call of the crosswise loops each: their
    operands step evenly only within an outer row): its own, each bound moved on to the
    output's next line start within its outer row (the same for both items that share it),
    so that every line of a streaming output is one item's, streamed whole: where the
    bounds fell within lines (NumPy's arrays start 16 bytes into one) two lines of every
    feature in each item took ordinary stores (dense inference beside a Fortran out=: 12.6
    ms against 5.5 in a C test of the loops)."""
    return make_runs(g, cross_bound(g, it.r_begin, out, w), cross_bound(g, it.r_end, out, w),
                     segment)


cdef inline Py_ssize_t cross_segment(const Grid *g, Py_ssize_t quantum) noexcept nogil:
    """Rows a call of the backward's crosswise loops takes: whole quanta (16 rows, whole
    lines of an output by features that streams; the stage's runs for the gradient sums,
    whose bits they keep) whose two input tiles take at most cross_block_bytes (the L2),
    one quantum at least. Walked 8 or 16 features at a time down all the rows of an item,
    an input by rows gave each pass a line of every row, and the next pass found those
    lines gone from the L2. From memory (dense (307200, 1024) float32 backward out=, x C
    beside a Fortran dy and out=, one thread, interleaved in one process): 1380-1946 ms in
    whole items, 986-1372 in segments of 256 rows (1 MiB of each input); 128 and 512 rows
    were slower than 256. The normalizing pass is left whole: its one input by features
    in segments (x Fortran beside a C-ordered out=) made inference slower, 194 to 237 ms
    (with the next segment prefetched)."""
    cdef Py_ssize_t rows = cross_block_bytes // (2 * g.tile_width * <Py_ssize_t>sizeof(float))
    return max(quantum, rows // quantum * quantum)


# Runs of rows that continue one another in an operand staged by transposing (NHWC x in
# Fortran order beside a C-ordered dy: a run is 32 images, the next run the next row, 128
# bytes further in each feature) are staged together, as many as the stage holds: each
# feature is then one long piece (2 KiB of 16 runs) where it was 16 pieces of 128 bytes,
# each next to pieces of all the other features, and each run's loops read or write their
# rows in the stage. Copies only: the runs and their order, hence the bits, are unchanged.
cdef struct Block:
    Py_ssize_t begin, end       # rows [begin, end) of the item are in the stage
    int64_t offset              # where row begin lies in the operand (from its tile)


cdef inline bint blocked(const Walk *w) noexcept nogil:
    """Whether an operand is staged a block of runs at a time (by transposing)."""
    return w.feature_stride != 1 and w.row_stride == 1


cdef inline floating *block_of(const Grid *g, const Walk *w, const Runs *runs,
                               Py_ssize_t width, floating *stage, Block *block) noexcept nogil:
    """Where the run's rows lie in the stage of a blocked operand, starting a block (rows
    from runs.r that lie evenly spaced in w, up to the stage's rows_per_run) if the run is
    not in the current one; the caller fills a new block (block.begin == runs.r)."""
    cdef Runs ahead = runs[0]
    cdef Py_ssize_t m = 0, n
    if runs.r < block.begin or runs.r >= block.end:
        block.offset = row_offset(w, runs.ro, runs.ri)
        while ahead.r < ahead.end:
            n = run_length(g, &ahead)
            if (m + n > g.rows_per_run
                    or row_offset(w, ahead.ro, ahead.ri) != block.offset + m * w.row_stride):
                break
            m += n
            advance(g, &ahead, n)
        block.begin, block.end = runs.r, runs.r + m
    return stage + (runs.r - block.begin) * stage_pitch(width, sizeof(floating))


cdef inline const floating *block_rows(const Grid *g, const floating *tile, const Walk *w,
                                       const Runs *runs, Py_ssize_t n, Py_ssize_t width,
                                       int64_t *row_stride, floating *stage,
                                       Block *block) noexcept nogil:
    """The run's rows of a tile as rows of adjacent features: in place, staged (per run),
    or in the stage of its block (blocked operands)."""
    cdef floating *rows
    if not blocked(w):
        return rows_of(g, tile, w, runs, n, width, row_stride, stage)
    rows = block_of(g, w, runs, width, stage, block)
    row_stride[0] = stage_pitch(width, sizeof(floating))
    if block.begin == runs.r:
        transpose(tile + block.offset, w.feature_stride, width, block.end - block.begin,
                  stage, row_stride[0])
    return rows


cdef inline floating *block_output(const Grid *g, floating *tile, const Walk *w,
                                   const Runs *runs, Py_ssize_t n, Py_ssize_t width,
                                   int64_t *row_stride, floating *stage,
                                   Block *block) noexcept nogil:
    """Where to write the run's rows of a tile (rows of adjacent features): in place, or in
    a stage that flush_rows copies back, per run or per block (blocked operands)."""
    if blocked(w):
        row_stride[0] = stage_pitch(width, sizeof(floating))
        return block_of(g, w, runs, width, stage, block)
    row_stride[0] = w.row_stride
    return output_rows(tile + row_offset(w, runs.ro, runs.ri), row_stride, w.feature_stride,
                       width, stage)


cdef inline void flush_rows(const Grid *g, const floating *rows, floating *tile, const Walk *w,
                            const Runs *runs, Py_ssize_t n, Py_ssize_t width,
                            const floating *stage, const Block *block,
                            bint stream) noexcept nogil:
    """block_output's rows written: copied to the operand if staged, per run, or once the
    block's last run is written."""
    if w.feature_stride == 1:
        return
    if not blocked(w):
        unstage_rows(rows, n, width, tile + row_offset(w, runs.ro, runs.ri), w.row_stride,
                     w.feature_stride, stream)
    elif runs.r + n == block.end:
        unstage_rows(stage, block.end - block.begin, width, tile + block.offset, 1,
                     w.feature_stride, stream)


cdef inline floating *output_rows(floating *p, int64_t *row_stride, int64_t step,
                                  Py_ssize_t width, floating *stage) noexcept nogil:
    """Where to write rows of adjacent features bound for p: p, or stage (then copied back
    with unstage_rows, and *row_stride becomes the stage's pitch)."""
    if step == 1:
        return p
    row_stride[0] = stage_pitch(width, sizeof(floating))
    return stage


cdef inline void unstage_rows(const floating *stage, Py_ssize_t n_rows, Py_ssize_t width,
                              floating *p, int64_t row_stride, int64_t step,
                              bint stream=False) noexcept nogil:
    """Copy rows of adjacent features from stage to p's own layout (stage_rows' inverse);
    with stream, p's features along its rows in whole lines take streaming stores."""
    cdef Py_ssize_t r, j, pitch = stage_pitch(width, sizeof(floating))
    if row_stride == 1:
        if floating is float:
            cbn_transpose_out_f32(stage, pitch, n_rows, width, p, step, stream)
        else:
            cbn_transpose_out_f64(stage, pitch, n_rows, width, p, step, stream)
        return
    if step == -1:
        reverse_rows(stage, pitch, n_rows, width, p - (width - 1), row_stride)
        return
    for r in range(n_rows):
        for j in range(width):
            p[r * row_stride + j * step] = stage[r * pitch + j]


cdef inline void add_shifted_rows(const floating *p, int64_t row_stride, int64_t step,
                                  Py_ssize_t n_rows, Py_ssize_t width, const double *shift,
                                  double *s1, double *s2, floating *stage) noexcept nogil:
    """s1 += Σ (x − shift), s2 += Σ (x − shift)² over n_rows rows of width features."""
    p = stage_rows(p, &row_stride, step, n_rows, width, stage)
    if floating is float:
        cbn_shifted_sums_f32(p, row_stride, n_rows, width, shift, s1, s2)
    else:
        cbn_shifted_sums_f64(p, row_stride, n_rows, width, shift, s1, s2)


cdef inline void shifted_sums_rows(const floating *p, const int64_t *rows, Py_ssize_t n_rows,
                                   Py_ssize_t n, double shift, double *s1,
                                   double *s2) noexcept nogil:
    """shifted_sums_run over n_rows runs of n contiguous elements at p + rows[r], in one
    set of accumulators."""
    if floating is float:
        cbn_shifted_sums_rows_f32(p, rows, n_rows, n, shift, s1, s2)
    else:
        cbn_shifted_sums_rows_f64(p, rows, n_rows, n, shift, s1, s2)


cdef inline void shifted_sums_run(const floating *p, int64_t step, Py_ssize_t n, double shift,
                                  double *s1, double *s2) noexcept nogil:
    """s1 = Σ (x − shift), s2 = Σ (x − shift)² over a run."""
    if step == 1:
        if floating is float:
            cbn_shifted_sums_run_f32(p, n, shift, s1, s2)
        else:
            cbn_shifted_sums_run_f64(p, n, shift, s1, s2)
    elif floating is float:
        cbn_shifted_sums_steps_f32(p, step, n, shift, s1, s2)
    else:
        cbn_shifted_sums_steps_f64(p, step, n, shift, s1, s2)


cdef inline void normalize_row(const floating *x, floating *y, Py_ssize_t n, const double *mean,
                               const double *scale, const double *shift,
                               bint stream) noexcept nogil:
    cdef Py_ssize_t j
    if stream:
        if floating is float:
            cbn_normalize_stream_f32(x, y, n, mean, scale, shift, 1)
        else:
            cbn_normalize_stream_f64(x, y, n, mean, scale, shift, 1)
        return
    for j in range(n):
        y[j] = <floating>((x[j] - mean[j]) * scale[j] + shift[j])


cdef inline bint back_to_back(Py_ssize_t width, int64_t a, int64_t b, int64_t c) noexcept nogil:
    """Whether rows of width features with these row strides form single contiguous runs
    (then whole runs are streamed, not row by row)."""
    return 8 <= width <= CBN_MAX_WIDTH and a == width and b == width and c == width


cdef inline bint wide_rows(Py_ssize_t width, int n_factors) noexcept nogil:
    """Whether rows of width features are written strip by strip (_simd.h's strips): where
    their n_factors per-feature factor arrays take more than half the L1d."""
    return width * n_factors * <Py_ssize_t>sizeof(double) > strip_min_bytes


cdef inline bint lines_apart(const floating *out, int64_t row_stride) noexcept nogil:
    """Whether an output's rows are whole cache lines apart: then each row streams the same
    features, and the strips stream (the lines beyond them take ordinary stores)."""
    return ((row_stride * <int64_t>sizeof(floating)) % 64 == 0
            and (<uintptr_t>out) % sizeof(floating) == 0)


cdef inline void normalize_rows(const floating *x, int64_t x_row_stride, floating *y,
                                int64_t y_row_stride, Py_ssize_t n_rows, Py_ssize_t width,
                                const double *mean, const double *scale, const double *shift,
                                bint stream) noexcept nogil:
    cdef Py_ssize_t r
    if wide_rows(width, 3) and stream and back_to_back(width, x_row_stride, y_row_stride, width):
        if floating is float:
            cbn_normalize_flat_strips_f32(x, y, n_rows, width, mean, scale, shift)
        else:
            cbn_normalize_flat_strips_f64(x, y, n_rows, width, mean, scale, shift)
        return
    if wide_rows(width, 3) and (not stream or lines_apart(y, y_row_stride)):
        if floating is float:
            cbn_normalize_strips_f32(x, x_row_stride, y, y_row_stride, n_rows, width, mean,
                                     scale, shift, stream)
        else:
            cbn_normalize_strips_f64(x, x_row_stride, y, y_row_stride, n_rows, width, mean,
                                     scale, shift, stream)
        return
    if stream and back_to_back(width, x_row_stride, y_row_stride, width):
        if floating is float:
            cbn_normalize_rows_stream_f32(x, y, n_rows, width, mean, scale, shift)
        else:
            cbn_normalize_rows_stream_f64(x, y, n_rows, width, mean, scale, shift)
        return
    for r in range(n_rows):
        normalize_row(x + r * x_row_stride, y + r * y_row_stride, width, mean, scale, shift,
                      stream)


cdef inline void normalize_forwards(const floating *x, floating *y, Py_ssize_t n, double mean,
                                    double scale, double shift, bint stream) noexcept nogil:
    cdef Py_ssize_t i
    if stream:
        if floating is float:
            cbn_normalize_stream_f32(x, y, n, &mean, &scale, &shift, 0)
        else:
            cbn_normalize_stream_f64(x, y, n, &mean, &scale, &shift, 0)
        return
    for i in range(n):
        y[i] = <floating>((x[i] - mean) * scale + shift)


cdef inline void normalize_tile(const floating *x, int64_t x_step, int64_t x_row_step,
                                floating *y, int64_t y_step, int64_t y_row_step,
                                Py_ssize_t n_rows, Py_ssize_t n, double mean, double scale,
                                double shift, bint stream) noexcept nogil:
    """normalize_run over n_rows runs, each operand's *_row_step apart."""
    if x_step == -1 and y_step == -1:
        # Both along a reversed axis (NCHW with W walked backwards): the same runs read
        # forwards, so the SIMD loops serve them (each value is the same in either order).
        x, y, x_step, y_step = x - (n - 1), y - (n - 1), 1, 1
    if x_step == 1 and y_step == 1 and n_rows == 1:
        normalize_forwards(x, y, n, mean, scale, shift, stream)
    elif floating is float:
        cbn_normalize_steps_f32(x, x_step, x_row_step, y, y_step, y_row_step, n_rows, n, mean,
                                scale, shift, stream)
    else:
        cbn_normalize_steps_f64(x, x_step, x_row_step, y, y_step, y_row_step, n_rows, n, mean,
                                scale, shift, stream)


cdef inline void normalize_run(const floating *x, int64_t x_step, floating *y, int64_t y_step,
                               Py_ssize_t n, double mean, double scale,
                               double shift, bint stream) noexcept nogil:
    normalize_tile(x, x_step, 0, y, y_step, 0, 1, n, mean, scale, shift, stream)


cdef inline void add_gradient_rows(const floating *dy, int64_t dy_row_stride,
                                   const floating *x, int64_t x_row_stride,
                                   Py_ssize_t n_rows, Py_ssize_t width, const double *mean,
                                   double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """sum_dy += Σ dy, sum_dy_xc += Σ dy·(x − mean) over n_rows rows of width adjacent
    features (block_rows stages those that are not)."""
    if floating is float:
        cbn_gradient_sums_f32(dy, dy_row_stride, x, x_row_stride, n_rows, width, mean,
                              sum_dy, sum_dy_xc)
    else:
        cbn_gradient_sums_f64(dy, dy_row_stride, x, x_row_stride, n_rows, width, mean,
                              sum_dy, sum_dy_xc)


cdef inline void gradient_run(const floating *dy, int64_t dy_step, const floating *x,
                              int64_t x_step, Py_ssize_t n, double mean,
                              double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """sum_dy += Σ dy, sum_dy_xc += Σ dy·(x − mean) over a run (any steps: the same order)."""
    tile_gradient_sums(dy, dy_step, 0, x, x_step, 0, 1, n, mean, sum_dy, sum_dy_xc)


cdef inline void tile_gradient_sums(const floating *dy, int64_t dy_step, int64_t dy_row_step,
                                    const floating *x, int64_t x_step, int64_t x_row_step,
                                    Py_ssize_t n_rows, Py_ssize_t n, double mean,
                                    double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """gradient_run over n_rows runs, *_row_step apart, into one set of accumulators,
    reduced once."""
    if floating is float:
        cbn_gradient_sums_steps_f32(dy, dy_step, dy_row_step, x, x_step, x_row_step, n_rows, n,
                                    mean, sum_dy, sum_dy_xc)
    else:
        cbn_gradient_sums_steps_f64(dy, dy_step, dy_row_step, x, x_step, x_row_step, n_rows, n,
                                    mean, sum_dy, sum_dy_xc)


cdef inline void rows_gradient_sums(const floating *dy, const int64_t *dy_rows,
                                    const floating *x, const int64_t *x_rows, Py_ssize_t n_rows,
                                    Py_ssize_t n, double mean, double *sum_dy,
                                    double *sum_dy_xc) noexcept nogil:
    """tile_gradient_sums of runs at dy + dy_rows[r] and x + x_rows[r] (offset tables)."""
    if floating is float:
        cbn_gradient_sums_rows_f32(dy, dy_rows, x, x_rows, n_rows, n, mean, sum_dy, sum_dy_xc)
    else:
        cbn_gradient_sums_rows_f64(dy, dy_rows, x, x_rows, n_rows, n, mean, sum_dy, sum_dy_xc)


# dx = coef_dy * dy + coef_xc * (x - mean) + offset: the training-mode gradient, with the
# per-feature factors computed once in gradient_factors.
cdef inline void input_gradient_row(const floating *dy, const floating *x, floating *dx,
                                    Py_ssize_t n, const double *mean, const double *coef_dy,
                                    const double *coef_xc, const double *offset,
                                    bint stream) noexcept nogil:
    cdef Py_ssize_t j
    if stream:
        if floating is float:
            cbn_input_gradient_stream_f32(dy, x, dx, n, mean, coef_dy, coef_xc, offset, 1)
        else:
            cbn_input_gradient_stream_f64(dy, x, dx, n, mean, coef_dy, coef_xc, offset, 1)
        return
    for j in range(n):
        dx[j] = <floating>(coef_dy[j] * dy[j] + coef_xc[j] * (x[j] - mean[j]) + offset[j])


cdef inline void input_gradient_rows(const floating *dy, int64_t dy_row_stride,
                                     const floating *x, int64_t x_row_stride, floating *dx,
                                     int64_t dx_row_stride, Py_ssize_t n_rows,
                                     Py_ssize_t width, const double *mean,
                                     const double *coef_dy, const double *coef_xc,
                                     const double *offset, bint stream) noexcept nogil:
    cdef Py_ssize_t r
    if wide_rows(width, 4) and stream and back_to_back(width, dy_row_stride, x_row_stride,
                                                       dx_row_stride):
        if floating is float:
            cbn_input_gradient_flat_strips_f32(dy, x, dx, n_rows, width, mean, coef_dy, coef_xc,
                                               offset)
        else:
            cbn_input_gradient_flat_strips_f64(dy, x, dx, n_rows, width, mean, coef_dy, coef_xc,
                                               offset)
        return
    if wide_rows(width, 4) and (not stream or lines_apart(dx, dx_row_stride)):
        if floating is float:
            cbn_input_gradient_strips_f32(dy, dy_row_stride, x, x_row_stride, dx, dx_row_stride,
                                          n_rows, width, mean, coef_dy, coef_xc, offset, stream)
        else:
            cbn_input_gradient_strips_f64(dy, dy_row_stride, x, x_row_stride, dx, dx_row_stride,
                                          n_rows, width, mean, coef_dy, coef_xc, offset, stream)
        return
    if stream and back_to_back(width, dy_row_stride, x_row_stride, dx_row_stride):
        if floating is float:
            cbn_input_gradient_rows_stream_f32(dy, x, dx, n_rows, width, mean, coef_dy,
                                               coef_xc, offset)
        else:
            cbn_input_gradient_rows_stream_f64(dy, x, dx, n_rows, width, mean, coef_dy,
                                               coef_xc, offset)
        return
    for r in range(n_rows):
        input_gradient_row(dy + r * dy_row_stride, x + r * x_row_stride, dx + r * dx_row_stride,
                           width, mean, coef_dy, coef_xc, offset, stream)


cdef inline void input_gradient_forwards(const floating *dy, const floating *x, floating *dx,
                                         Py_ssize_t n, double mean, double coef_dy,
                                         double coef_xc, double offset,
                                         bint stream) noexcept nogil:
    cdef Py_ssize_t i
    if stream:
        if floating is float:
            cbn_input_gradient_stream_f32(dy, x, dx, n, &mean, &coef_dy, &coef_xc, &offset, 0)
        else:
            cbn_input_gradient_stream_f64(dy, x, dx, n, &mean, &coef_dy, &coef_xc, &offset, 0)
        return
    for i in range(n):
        dx[i] = <floating>(coef_dy * dy[i] + coef_xc * (x[i] - mean) + offset)


cdef inline void input_gradient_tile(const floating *dy, int64_t dy_step, int64_t dy_row_step,
                                     const floating *x, int64_t x_step, int64_t x_row_step,
                                     floating *dx, int64_t dx_step, int64_t dx_row_step,
                                     Py_ssize_t n_rows, Py_ssize_t n, double mean,
                                     double coef_dy, double coef_xc, double offset,
                                     bint stream) noexcept nogil:
    """input_gradient_run over n_rows runs, each operand's *_row_step apart."""
    if dy_step == -1 and x_step == -1 and dx_step == -1:    # read forwards, as normalize_tile
        dy, x, dx, dy_step, x_step, dx_step = dy - (n - 1), x - (n - 1), dx - (n - 1), 1, 1, 1
    if dy_step == 1 and x_step == 1 and dx_step == 1 and n_rows == 1:
        input_gradient_forwards(dy, x, dx, n, mean, coef_dy, coef_xc, offset, stream)
    elif floating is float:
        cbn_input_gradient_steps_f32(dy, dy_step, dy_row_step, x, x_step, x_row_step, dx,
                                     dx_step, dx_row_step, n_rows, n, mean, coef_dy, coef_xc,
                                     offset, stream)
    else:
        cbn_input_gradient_steps_f64(dy, dy_step, dy_row_step, x, x_step, x_row_step, dx,
                                     dx_step, dx_row_step, n_rows, n, mean, coef_dy, coef_xc,
                                     offset, stream)


cdef inline void input_gradient_run(const floating *dy, int64_t dy_step, const floating *x,
                                    int64_t x_step, floating *dx, int64_t dx_step, Py_ssize_t n,
                                    double mean, double coef_dy, double coef_xc,
                                    double offset, bint stream) noexcept nogil:
    input_gradient_tile(dy, dy_step, 0, x, x_step, 0, dx, dx_step, 0, 1, n, mean, coef_dy,
                        coef_xc, offset, stream)


# Chan, Golub & LeVeque (1979): fold a block's (n_b, mean_b, M2_b) into a running
# (n_a, mean_a, M2_a) without cancellation; weight_b = n_b / n, cross = n_a * n_b / n.
cdef inline void chan_update(double *mean, double *m2, double mean_b, double m2_b,
                             double weight_b, double cross) noexcept nogil:
    cdef double delta = mean_b - mean[0]
    mean[0] += delta * weight_b
    m2[0] += m2_b + delta * delta * cross


# A block's moments from its shifted sums: mean = K + S1/n, M2 = S2 − S1·(S1/n). The shift
# K is the running mean of the item (the block's first values for its first block), so S1
# is small and the subtraction loses nothing that matters; M2 >= 0 is restored if rounding
# took it below. S1·(S1/n) <= S2 overflows only where S2 does (S1² alone can, and the
# clamp would turn the -inf into a finite, wrong 0).
cdef inline void shifted_to_moments(double shift, double s1, double s2, Py_ssize_t n,
                                    double *mean, double *m2) noexcept nogil:
    mean[0] = shift + s1 / n
    m2[0] = s2 - s1 * (s1 / n)
    if m2[0] < 0.0:
        m2[0] = 0.0
