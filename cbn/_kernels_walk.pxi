# ---------------------------------------------------------------------------------------
# Work decomposition
# ---------------------------------------------------------------------------------------
# Part of cbn/_kernels.pyx, which includes it: one module, so the loops inline across files.

cdef struct Grid:
    Py_ssize_t n_fo, n_fi, n_ro, n_ri, n_rows, n_features
    bint features_inner
    bint planes         # RI, chunks of whole outer rows walked outer row by outer row
    Py_ssize_t row_group    # planes: the plan's row_group (1: walked one outer row at a time)
    Py_ssize_t group_rows, group_run    # row groups: outer rows, and inner elements per tile
    Py_ssize_t group_features   # planes: features per item, every one or one (features_outer)
    bint backwards_staged   # row groups, elementwise passes: see group_staged
    Py_ssize_t sum_rows     # RI: whole runs of a feature (in consecutive outer rows) the
                            # statistics (and without row groups the gradient sums) reduce
                            # at once; row groups' gradient sums take a tile at once
    Py_ssize_t n_bytes                               # of one operand
    bint stream                                      # streaming stores for the output
    bint rows_contiguous        # FI, and every operand's rows follow each other in memory
    Py_ssize_t tile_width, n_tiles, rows_per_block, rows_per_run   # FI only
    # FI with an operand whose features are not adjacent (Fortran, transposed, stepped):
    # elements of one run of rows staged in a contiguous per-thread tile, else 0.
    Py_ssize_t stage_elements
    Py_ssize_t n_chunks, chunk_length                # rows (FI) or reduced elements (RI)
    Py_ssize_t n_items
    bint descending     # FI items taken last to first (a second pass: see second_pass)
    int n_threads


cdef struct Walk:
    const int64_t *feature_offsets
    int64_t feature_stride
    const int64_t *row_offsets
    int64_t row_stride
    int64_t group_stride        # between consecutive outer rows of a row group


# What follows batch norm in the same pass (section "Activations"). Forward: y = act(BN(x) +
# residual); backward: BN's gradient of dz = dy·act'(z), act' from the forward's output,
# and dz itself as the residual's gradient. Operands beyond a plan's first three are the
# residual (forward), or the forward's output and the residual's gradient (backward).
cdef struct Activation:
    int kind                        # CBN_ACT_*
    double alpha
    bint fused                      # anything to do: an activation or a residual
    const void *residual            # forward: added before the activation, or NULL
    const Walk *residual_walk
    const void *output              # backward: the forward's y
    const Walk *output_walk
    void *residual_gradient         # backward: receives dz, or NULL
    const Walk *residual_gradient_walk
    # One bit per element (z > 0), addressed in bits by its walk: written by the forward
    # (zeroed before), read by the backward instead of y (output NULL then); or NULL.
    unsigned char *mask
    const Walk *mask_walk
    bint unit_dz_step   # backward: the composed call's dz steps by 1 along reduced runs


cdef Activation NO_ACTIVATION     # zeros: CBN_ACT_NONE, no residual; the plain kernels'


cdef inline Py_ssize_t ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t stage_pitch(Py_ssize_t width, Py_ssize_t itemsize) noexcept nogil:
    """Elements from a stage's row to the next (stage_rows): width, one cache line more
    where rows of width would be a multiple of 1 KiB apart. Such rows share the L1's sets
    (dense rows of 1024 floats: all 32 rows of a run in one set per line), so the 8x8
    transposes into or out of the stage, which walk 8 of its columns down all the rows,
    evicted the stage's own lines before their other columns were read."""
    if (width * itemsize) % 1024 == 0:
        return width + 64 // itemsize
    return width


cdef Grid make_grid(plan, Py_ssize_t itemsize):
    cdef Grid g
    cdef Py_ssize_t n_blocks, wanted
    g.n_fo = plan.n_feature_outer
    g.n_fi = plan.n_feature_inner
    g.n_ro = plan.n_row_outer
    g.n_ri = plan.n_row_inner
    g.n_rows = g.n_ro * g.n_ri
    g.n_features = g.n_fo * g.n_fi
    g.features_inner = plan.features_inner
    g.planes = False
    g.row_group = g.group_rows = g.group_run = g.sum_rows = 1
    g.backwards_staged = False
    g.group_features = g.n_fo * g.n_fi
    g.n_bytes = g.n_rows * g.n_features * itemsize
    g.stream = False
    # Whole rows back to back in every operand: a chunk of rows is one contiguous run.
    g.rows_contiguous = (g.features_inner and g.n_fo == 1 and g.n_ro == 1
                         and 8 <= g.n_fi <= CBN_MAX_WIDTH
                         and all(o.feature_stride == 1 and o.row_stride == g.n_fi
                                 for o in plan.operands))
    g.n_threads = 1
    g.stage_elements = 0
    g.descending = False
    if g.n_rows == 0 or g.n_features == 0:   # nothing to compute: an empty grid
        g.tile_width = g.n_tiles = g.rows_per_block = g.rows_per_run = 1
        g.n_chunks = g.chunk_length = 1
        g.n_items = 0
        return g
    if g.features_inner:
        g.tile_width = min(g.n_fi, <Py_ssize_t>TILE_FEATURES)
        g.n_tiles = ceil_div(g.n_fi, g.tile_width)
        g.rows_per_block = max(1, BLOCK_ELEMENTS // g.tile_width)
        g.rows_per_run = max(1, RUN_ELEMENTS // g.tile_width)
        n_blocks = ceil_div(g.n_rows, g.rows_per_block)
        g.n_chunks = min(n_blocks, <Py_ssize_t>MAX_CHUNKS,
                         max(1, CHUNK_BUDGET // g.n_features),
                         max(1, g.n_rows * g.n_features // MIN_FI_CHUNK_ELEMENTS))
        g.chunk_length = ceil_div(n_blocks, g.n_chunks) * g.rows_per_block
        g.n_items = g.n_fo * g.n_tiles
        if any(o.feature_stride != 1 for o in plan.operands):
            g.rows_per_run = min(g.rows_per_block, max(1, STAGE_ELEMENTS // g.tile_width))
            g.stage_elements = g.rows_per_run * stage_pitch(g.tile_width, itemsize)
    else:
        g.tile_width = 1
        g.n_tiles = 1
        g.rows_per_block = g.rows_per_run = 0
        # Only where every operand runs along the inner rows: an operand that steps fastest
        # along another axis (x NCHW, out= Fortran) would be walked across its cache lines
        # the whole array apart, never reused from cache (15-30x slower than matched).
        g.row_group = plan.row_group
        if plan.features_outer:
            g.group_features = 1
        g.group_rows = min(g.row_group, <Py_ssize_t>GROUP_ROWS)
        g.group_run = (min(g.n_ri, max(8, GROUP_TILE_BYTES // itemsize // g.group_rows))
                       if g.row_group > 1 else g.n_ri)
        g.planes = (plan.agree and g.n_ro >= PLANE_ORDER_MIN_OUTER) or g.row_group > 1
        g.sum_rows = max(1, min(<Py_ssize_t>SUM_ROWS, SUM_RUNS_ELEMENTS // g.n_ri))
        if g.planes:
            g.n_chunks = max(1, min(<Py_ssize_t>PLANE_CHUNKS, g.n_ro,
                                    g.n_rows * g.n_features // MIN_PLANE_CHUNK_ELEMENTS))
            g.chunk_length = ceil_div(g.n_ro, g.n_chunks) * g.n_ri
        else:
            wanted = ceil_div(TARGET_ITEMS, g.n_features)
            g.n_chunks = max(1, min(wanted, g.n_rows // MIN_CHUNK_ELEMENTS))
            g.chunk_length = ceil_div(g.n_rows, g.n_chunks)
        g.n_items = g.n_features
    g.n_chunks = ceil_div(g.n_rows, g.chunk_length)
    g.n_items *= g.n_chunks
    return g


cdef inline int thread_count(const Grid *g) noexcept nogil:
    """Read at every call, so OMP_NUM_THREADS and threadpoolctl limits apply."""
    if serial_only or g.n_bytes < parallel_min_bytes:
        return 1
    return <int>max(1, min(<Py_ssize_t>cbn_max_threads(), g.n_items))


cdef Walk make_walk(layout):
    cdef Walk w
    cdef cnp.ndarray feature_offsets = layout.feature_offsets
    cdef cnp.ndarray row_offsets = layout.row_offsets
    w.feature_offsets = <const int64_t *>cnp.PyArray_DATA(feature_offsets)
    w.feature_stride = layout.feature_stride
    w.row_offsets = <const int64_t *>cnp.PyArray_DATA(row_offsets)
    w.row_stride = layout.row_stride
    w.group_stride = row_offsets[1] - row_offsets[0] if len(row_offsets) > 1 else 0
    return w


cdef inline double *data_or_null(object array):
    return NULL if array is None else <double *>cnp.PyArray_DATA(array)


cdef inline bint is_single(cnp.ndarray x):
    return cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT


cdef inline Py_ssize_t chunk_count(const Grid *g, Py_ssize_t c) noexcept nogil:
    return min(g.chunk_length, g.n_rows - c * g.chunk_length)


# An FI item: rows [r_begin, r_end) of features f0 .. f0 + width (fo, fi0 .. fi0 + width).
cdef struct FiItem:
    Py_ssize_t chunk, fo, fi0, f0, width, r_begin, r_end


cdef inline FiItem fi_item(const Grid *g, Py_ssize_t item) noexcept nogil:
    cdef FiItem it
    cdef Py_ssize_t tile_index = item // g.n_chunks
    it.chunk = item - tile_index * g.n_chunks
    it.fo = tile_index // g.n_tiles
    it.fi0 = (tile_index - it.fo * g.n_tiles) * g.tile_width
    it.width = min(g.tile_width, g.n_fi - it.fi0)
    it.f0 = it.fo * g.n_fi + it.fi0
    it.r_begin = it.chunk * g.chunk_length
    it.r_end = min(it.r_begin + g.chunk_length, g.n_rows)
    return it


# Second passes. The training forward's normalizing pass and the backward's input-gradient
# pass read the data their first pass (statistics, sums) has just read, in the same item
# order. An FI item is a chunk of rows (512 KiB of a dense (32, 56, 56, 64) float32), so
# walking the items last to first starts on what the first pass read last, still in L2 and
# the LLC, and reuses it before it is evicted. Elementwise passes: no sum's order changes,
# so the bits are the same in either direction and for any thread count. It pays while a
# good part of what the first pass read is still cached: up to descend_max_bytes
# (cbn._machine: twice the LLC the OS reports). On the 25.7 MB NHWC forward a simulated
# 32 MiB LLC (cachegrind) missed a third less; timed on a loaded 2-core EPYC (one thread,
# passes bound more by arithmetic and stores than by memory there) the kernels gained about
# 1 %, cbn.torch's channels_last layer about 3 %, and 4x the LLC nothing either way.
cdef inline Grid second_pass(const Grid *g, Py_ssize_t first_pass_bytes) noexcept nogil:
    """g for the pass over the data a first pass (which read first_pass_bytes) just walked."""
    cdef Grid second = g[0]
    second.descending = g.features_inner and first_pass_bytes <= descend_max_bytes
    return second


cdef inline Py_ssize_t walk_item(const Grid *g, Py_ssize_t i) noexcept nogil:
    """The item taken i-th."""
    return g.n_items - 1 - i if g.descending else i


# A RI item: reduced elements [r_begin, r_end) of feature f = (fo, fi).
cdef struct RiItem:
    Py_ssize_t chunk, f, r_begin, r_end


cdef inline RiItem ri_item(const Grid *g, Py_ssize_t item) noexcept nogil:
    cdef RiItem it
    it.f = item // g.n_chunks
    it.chunk = item - it.f * g.n_chunks
    it.r_begin = it.chunk * g.chunk_length
    it.r_end = min(it.r_begin + g.chunk_length, g.n_rows)
    return it


cdef inline int64_t feature_offset(const Walk *w, const Grid *g, Py_ssize_t f) noexcept nogil:
    cdef Py_ssize_t fo = f // g.n_fi
    return w.feature_offsets[fo] + (f - fo * g.n_fi) * w.feature_stride


cdef inline int64_t row_offset(const Walk *w, Py_ssize_t ro, Py_ssize_t ri) noexcept nogil:
    return w.row_offsets[ro] + ri * w.row_stride


cdef inline bint planes_back_to_back(const Grid *g, const Walk *w) noexcept nogil:
    """Whether an operand's planes (a planes walk's runs, one outer row of one feature each)
    follow each other in memory, those of one feature_offsets entry one run: NCHW in C order.
    Runs shorter than a vector are left to the run loops."""
    return (g.row_group == 1 and g.n_ri >= 8 and w.row_stride == 1
            and (w.feature_stride == g.n_ri or g.n_fi == 1))


cdef inline Py_ssize_t entry_features(const Grid *g, Py_ssize_t f, Py_ssize_t f_end) noexcept nogil:
    """Features from f before f_end in f's feature_offsets entry (a stride apart)."""
    return min((f // g.n_fi + 1) * g.n_fi, f_end) - f


# Reduced elements [begin, end) of one item, walked as runs along the inner reduced
# dimension: within a run consecutive elements (rows, in FI) are a constant stride apart.
cdef struct Runs:
    Py_ssize_t r, end, ro, ri, cap


cdef inline Runs make_runs(const Grid *g, Py_ssize_t begin, Py_ssize_t end,
                           Py_ssize_t cap) noexcept nogil:
    cdef Runs runs
    runs.r, runs.end, runs.cap = begin, end, cap
    runs.ro = begin // g.n_ri
    runs.ri = begin - runs.ro * g.n_ri
    return runs


cdef inline Py_ssize_t run_length(const Grid *g, const Runs *runs) noexcept nogil:
    return min(g.n_ri - runs.ri, runs.end - runs.r, runs.cap)


cdef inline void advance(const Grid *g, Runs *runs, Py_ssize_t n) noexcept nogil:
    runs.r += n
    runs.ri += n
    if runs.ri == g.n_ri:
        runs.ri, runs.ro = 0, runs.ro + 1


cdef inline Py_ssize_t whole_runs(const Grid *g, const Runs *runs) noexcept nogil:
    """Whole runs from here that the statistics and gradient sums take at once (sum_rows at
    most): none where the item starts or ends within a run, whose part is summed on its own."""
    if runs.ri != 0:
        return 0
    return min(g.sum_rows, (runs.end - runs.r) // g.n_ri)


cdef inline void skip_runs(const Grid *g, Runs *runs, Py_ssize_t n_runs) noexcept nogil:
    """advance past n_runs whole runs."""
    runs.r += n_runs * g.n_ri
    runs.ro += n_runs


cdef inline void prefetch_next_run(const Grid *g, Runs runs, Py_ssize_t n,
                                   const floating *tile, const Walk *w, Py_ssize_t width,
                                   bint for_writing) noexcept nogil:
    """Prefetch an operand's tile of the run after the current one (of n rows) where that
    run jumps to other outer rows: staged plans only, whose odd operand is then many short
    segments far apart that the hardware prefetchers do not follow. A run that continues
    where this one ends is left to them."""
    if g.stage_elements == 0 or runs.ri + n < g.n_ri:
        return
    advance(g, &runs, n)
    if runs.r < runs.end:
        cbn_prefetch_tile(<const char *>(tile + row_offset(w, runs.ro, runs.ri)), w.row_stride,
                          w.feature_stride, run_length(g, &runs), width, sizeof(floating),
                          for_writing)
