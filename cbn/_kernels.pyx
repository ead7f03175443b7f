# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Batch-norm kernels: loops only. Inputs are validated and laid out by cbn.api/_layout.

Design
------
Every operand is walked through the four indices of a cbn._layout.Plan (outer/inner
feature, outer/inner reduced element), in one of two loop orders:

* features inner ("FI", e.g. NHWC or (batch, features)): a work item is a fixed chunk of
  rows times a tile of up to TILE_FEATURES features; reductions hold strips of features in
  vector registers while L1-sized runs of rows stream past (cbn/_simd.h).
* rows inner ("RI", e.g. NCHW or a transposed (features, batch) view): a work item is one
  feature times a fixed chunk of its reduced elements; the inner loop is a reduction into
  independent vector accumulators (cbn/_simd.h).

Statistics are computed per block of about BLOCK_ELEMENTS elements in one pass of shifted
sums, S1 = sum(x - K) and S2 = sum(x - K)^2, with K the running mean of the item (so S1 is
small and S2 - S1^2/n does not cancel), and blocks, then chunks, are combined with Chan et
al.'s pairwise update. So x is read once, the variance never cancels as E[x^2] - E[x]^2
does, and everything accumulates in double whatever the data type.

Operands laid out differently from each other (a Fortran-ordered or transposed x beside a
C-ordered dy) get the FI order from the plan, with each one's fastest axis innermost; the
tiles of those whose features are not adjacent are transposed in cache (stage_rows).

Outputs of stream_min_bytes or more that lie in long contiguous runs are written with
streaming (non-temporal) stores, which skip reading each line before writing it.

The work decomposition (tiles, blocks, chunks) depends on the shape only. Threads take
whole work items and chunk results are combined in chunk order, so results are bitwise
identical for every thread count. When a RI feature fits in one chunk, the statistics
and the normalization of that feature run back to back while its data is in cache. RI
data of many outer rows (NCHW with 8 images or more) is walked in memory order instead,
outer row by outer row, in chunks of whole outer rows (normalize_planes); so are operands
whose fastest axes are two different reduced axes (x NCHW, out= Fortran), in groups of
outer rows that cover whole cache lines of each (row groups, group_staged).
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport INFINITY, NAN, fabs, frexp, isfinite, ldexp, sqrt
from libc.stdint cimport int64_t, uintptr_t
from libc.stdlib cimport free, malloc

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "_simd.h":
    void cbn_shifted_sums_f32(const float *p, int64_t row_stride, int64_t n_rows,
                              int64_t width, const double *shift, double *s1,
                              double *s2) noexcept nogil
    void cbn_shifted_sums_f64(const double *p, int64_t row_stride, int64_t n_rows,
                              int64_t width, const double *shift, double *s1,
                              double *s2) noexcept nogil
    void cbn_gradient_sums_f32(const float *dy, int64_t dy_row_stride, const float *x,
                               int64_t x_row_stride, int64_t n_rows, int64_t width,
                               const double *mean, double *sum_dy,
                               double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_f64(const double *dy, int64_t dy_row_stride, const double *x,
                               int64_t x_row_stride, int64_t n_rows, int64_t width,
                               const double *mean, double *sum_dy,
                               double *sum_dy_xc) noexcept nogil

    void cbn_shifted_sums_run_f32(const float *p, int64_t n, double shift, double *s1,
                                  double *s2) noexcept nogil
    void cbn_shifted_sums_run_f64(const double *p, int64_t n, double shift, double *s1,
                                  double *s2) noexcept nogil
    void cbn_gradient_sums_run_f32(const float *dy, const float *x, int64_t n, double mean,
                                   double *sum_dy, double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_run_f64(const double *dy, const double *x, int64_t n, double mean,
                                   double *sum_dy, double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_tile_f32(const float *dy, int64_t dy_row_step, const float *x,
                                    int64_t x_row_step, int64_t n_rows, int64_t n, double mean,
                                    double *sum_dy, double *sum_dy_xc) noexcept nogil
    void cbn_gradient_sums_tile_f64(const double *dy, int64_t dy_row_step, const double *x,
                                    int64_t x_row_step, int64_t n_rows, int64_t n, double mean,
                                    double *sum_dy, double *sum_dy_xc) noexcept nogil

    void cbn_normalize_stream_f32(const float *x, float *y, int64_t n, const double *mean,
                                  const double *scale, const double *shift,
                                  int per_element) noexcept nogil
    void cbn_normalize_stream_f64(const double *x, double *y, int64_t n, const double *mean,
                                  const double *scale, const double *shift,
                                  int per_element) noexcept nogil
    void cbn_input_gradient_stream_f32(const float *dy, const float *x, float *dx, int64_t n,
                                       const double *mean, const double *coef_dy,
                                       const double *coef_xc, const double *offset,
                                       int per_element) noexcept nogil
    void cbn_input_gradient_stream_f64(const double *dy, const double *x, double *dx,
                                       int64_t n, const double *mean, const double *coef_dy,
                                       const double *coef_xc, const double *offset,
                                       int per_element) noexcept nogil
    void cbn_store_fence() noexcept nogil
    void cbn_normalize_rows_stream_f32(const float *x, float *y, int64_t n_rows, int64_t width,
                                       const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_normalize_rows_stream_f64(const double *x, double *y, int64_t n_rows,
                                       int64_t width, const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_input_gradient_rows_stream_f32(const float *dy, const float *x, float *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    void cbn_input_gradient_rows_stream_f64(const double *dy, const double *x, double *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    void cbn_transpose_f32(const float *src, int64_t src_stride, int64_t n_r, int64_t n_c,
                           float *dst, int64_t dst_stride, const double *affine) noexcept nogil
    void cbn_transpose_f64(const double *src, int64_t src_stride, int64_t n_r, int64_t n_c,
                           double *dst, int64_t dst_stride, const double *affine) noexcept nogil
    void cbn_prefetch_tile(const char *p, int64_t row_stride, int64_t step, int64_t n_rows,
                           int64_t width, int64_t itemsize, int for_writing) noexcept nogil
    void cbn_normalize_strips_f32(const float *x, int64_t x_row_stride, float *y,
                                  int64_t y_row_stride, int64_t n_rows, int64_t width,
                                  const double *mean, const double *scale, const double *shift,
                                  int stream) noexcept nogil
    void cbn_normalize_strips_f64(const double *x, int64_t x_row_stride, double *y,
                                  int64_t y_row_stride, int64_t n_rows, int64_t width,
                                  const double *mean, const double *scale, const double *shift,
                                  int stream) noexcept nogil
    void cbn_input_gradient_strips_f32(const float *dy, int64_t dy_row_stride, const float *x,
                                       int64_t x_row_stride, float *dx, int64_t dx_row_stride,
                                       int64_t n_rows, int64_t width, const double *mean,
                                       const double *coef_dy, const double *coef_xc,
                                       const double *offset, int stream) noexcept nogil
    void cbn_input_gradient_strips_f64(const double *dy, int64_t dy_row_stride,
                                       const double *x, int64_t x_row_stride, double *dx,
                                       int64_t dx_row_stride, int64_t n_rows, int64_t width,
                                       const double *mean, const double *coef_dy,
                                       const double *coef_xc, const double *offset,
                                       int stream) noexcept nogil
    void cbn_normalize_flat_strips_f32(const float *x, float *y, int64_t n_rows, int64_t width,
                                       const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_normalize_flat_strips_f64(const double *x, double *y, int64_t n_rows,
                                       int64_t width, const double *mean, const double *scale,
                                       const double *shift) noexcept nogil
    void cbn_input_gradient_flat_strips_f32(const float *dy, const float *x, float *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    void cbn_input_gradient_flat_strips_f64(const double *dy, const double *x, double *dx,
                                            int64_t n_rows, int64_t width, const double *mean,
                                            const double *coef_dy, const double *coef_xc,
                                            const double *offset) noexcept nogil
    int CBN_MAX_WIDTH

cdef extern from "_activation.h":
    enum:
        CBN_ACT_NONE
        CBN_ACT_RELU
        CBN_ACT_LEAKY_RELU
        CBN_ACT_ELU
    float cbn_act_f32(float z, int kind, double alpha) noexcept nogil
    double cbn_act_f64(double z, int kind, double alpha) noexcept nogil
    float cbn_dz1_f32(float dy, const float *y, int64_t y_step, const unsigned char *mask,
                      int64_t b, int64_t bit_step, int64_t i, int kind,
                      double alpha) noexcept nogil
    double cbn_dz1_f64(double dy, const double *y, int64_t y_step, const unsigned char *mask,
                       int64_t b, int64_t bit_step, int64_t i, int kind,
                       double alpha) noexcept nogil
    void cbn_set_bit(unsigned char *mask, int64_t b, int value) noexcept nogil
    void cbn_set_row_signs_f32(unsigned char *mask, int64_t b, int64_t bit_step, const float *y,
                               int64_t y_row_stride, int64_t n_rows, int64_t width) noexcept nogil
    void cbn_set_row_signs_f64(unsigned char *mask, int64_t b, int64_t bit_step,
                               const double *y, int64_t y_row_stride, int64_t n_rows,
                               int64_t width) noexcept nogil
    void cbn_normalize_act_f32(const float *x, const float *residual, float *y, int64_t n,
                               const double *mean, const double *scale, const double *shift,
                               int per_element, int kind, double alpha, int stream,
                               unsigned char *mask, int64_t b, int64_t bit_step) noexcept nogil
    void cbn_normalize_act_f64(const double *x, const double *residual, double *y, int64_t n,
                               const double *mean, const double *scale, const double *shift,
                               int per_element, int kind, double alpha, int stream,
                               unsigned char *mask, int64_t b, int64_t bit_step) noexcept nogil
    void cbn_act_input_gradient_f32(const float *dy, const float *y, const float *x, float *dx,
                                    float *dres, int64_t n, const double *mean,
                                    const double *coef_dy, const double *coef_xc,
                                    const double *offset, int per_element, int kind,
                                    double alpha, int stream, const unsigned char *mask,
                                    int64_t b, int64_t bit_step) noexcept nogil
    void cbn_act_input_gradient_f64(const double *dy, const double *y, const double *x,
                                    double *dx, double *dres, int64_t n, const double *mean,
                                    const double *coef_dy, const double *coef_xc,
                                    const double *offset, int per_element, int kind,
                                    double alpha, int stream, const unsigned char *mask,
                                    int64_t b, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_f32(const float *dy, int64_t dy_row_stride, const float *y,
                                   int64_t y_row_stride, const float *x, int64_t x_row_stride,
                                   int64_t n_rows, int64_t width, const double *mean, int kind,
                                   double alpha, double *sum_dy, double *sum_dy_xc,
                                   const unsigned char *mask, int64_t b,
                                   int64_t mask_row_stride, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_f64(const double *dy, int64_t dy_row_stride, const double *y,
                                   int64_t y_row_stride, const double *x, int64_t x_row_stride,
                                   int64_t n_rows, int64_t width, const double *mean, int kind,
                                   double alpha, double *sum_dy, double *sum_dy_xc,
                                   const unsigned char *mask, int64_t b,
                                   int64_t mask_row_stride, int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_run_f32(const float *dy, int64_t dy_step, const float *y,
                                       int64_t y_step, const float *x, int64_t n, double mean,
                                       int kind, double alpha, double *sum_dy,
                                       double *sum_dy_xc, const unsigned char *mask, int64_t b,
                                       int64_t bit_step) noexcept nogil
    void cbn_act_gradient_sums_run_f64(const double *dy, int64_t dy_step, const double *y,
                                       int64_t y_step, const double *x, int64_t n,
                                       double mean, int kind, double alpha, double *sum_dy,
                                       double *sum_dy_xc, const unsigned char *mask, int64_t b,
                                       int64_t bit_step) noexcept nogil

cdef extern from "_platform.h":
    int cbn_openmp_enabled() noexcept nogil
    int cbn_max_threads() noexcept nogil
    const char *cbn_simd_flags() noexcept


cdef enum:
    TILE_FEATURES = 1024        # features per FI work item: its accumulators stay in L1
    BLOCK_ELEMENTS = 65536      # elements per block of shifted sums folded into the moments
    RUN_ELEMENTS = 8192         # FI: rows per register-blocked pass stay in L1 (_simd.h)
    STAGE_ELEMENTS = 32768      # FI, staged plans: long runs, long segments of odd operands
    MAX_CHUNKS = 64             # FI chunks of rows, i.e. partial results per feature
    MIN_FI_CHUNK_ELEMENTS = 65536  # FI: fewer, larger chunks for small arrays
    CHUNK_BUDGET = 1 << 20      # FI: at most this many partial results per statistic
    TARGET_ITEMS = 64           # RI: split features into chunks until this many items
    MIN_CHUNK_ELEMENTS = 16384  # RI: ... but keep chunks at least this long
    # RI with many outer rows (NCHW: images), walked in memory order (see normalize_planes):
    PLANE_ORDER_MIN_OUTER = 8   # outer rows from which the planes order applies
    PLANE_CHUNKS = 16           # chunks of whole outer rows, i.e. partial results per feature
    MIN_PLANE_CHUNK_ELEMENTS = 65536  # ... fewer for small arrays
    # Row groups (planes grids whose plan has row_group > 1, see group_staged):
    GROUP_ROWS = 64             # outer rows per group at most: long runs of the odd operand
    GROUP_TILE_BYTES = 16384    # a tile (group rows x inner elements) stays in L1


# Machine-dependent thresholds, set by cbn._machine from the caches the OS reports (and a
# recorded calibration) when cbn.api is imported; settable so that benchmarks and tests can
# take both sides in one process. Neither changes a result's bits, only its speed.
# Outputs at least this large bypass the caches (streaming stores):
cdef Py_ssize_t stream_min_bytes = 1 << 62
# Operands smaller than this stay on the calling thread (OpenMP dispatch would cost more):
cdef Py_ssize_t parallel_min_bytes = 1 << 17
# FI rows whose per-feature factors (3 doubles a feature for y, 4 for dx) take at least this
# many bytes are normalized strip by strip, the factors held in registers (_simd.h's strips):
cdef Py_ssize_t strip_min_bytes = 1 << 62


def set_stream_min_bytes(Py_ssize_t n_bytes):
    """Set the output size from which stores stream past the caches; returns the old one."""
    global stream_min_bytes
    old, stream_min_bytes = stream_min_bytes, n_bytes
    return old


def set_parallel_min_bytes(Py_ssize_t n_bytes):
    """Set the operand size below which calls stay serial; returns the old one."""
    global parallel_min_bytes
    old, parallel_min_bytes = parallel_min_bytes, n_bytes
    return old


def set_strip_min_bytes(Py_ssize_t n_bytes):
    """Set the size of a row's factor arrays from which rows are normalized strip by strip;
    returns the old one."""
    global strip_min_bytes
    old, strip_min_bytes = strip_min_bytes, n_bytes
    return old


# A child of fork() inherits libgomp's record of the parent's worker threads but not the
# threads, so its next parallel region would wait for them forever: cbn._fork calls
# run_serially() in every such child. Results stay the same, the work split being the shape's.
cdef bint serial_only = False


def run_serially():
    """Never start an OpenMP region again in this process."""
    global serial_only
    serial_only = True


def openmp_enabled():
    return bool(cbn_openmp_enabled())


def max_threads():
    return cbn_max_threads()


def simd_flags():
    return cbn_simd_flags().decode().split()


# ---------------------------------------------------------------------------------------
# Work decomposition
# ---------------------------------------------------------------------------------------

cdef struct Grid:
    Py_ssize_t n_fo, n_fi, n_ro, n_ri, n_rows, n_features
    bint features_inner
    bint planes         # RI, chunks of whole outer rows walked outer row by outer row
    Py_ssize_t row_group    # planes: the plan's row_group (1: walked one outer row at a time)
    Py_ssize_t group_rows, group_run    # row groups: outer rows, and inner elements per tile
    Py_ssize_t group_features   # planes: features per item, every one or one (features_outer)
    Py_ssize_t n_bytes                               # of one operand
    bint stream                                      # streaming stores for the output
    bint rows_contiguous        # FI, and every operand's rows follow each other in memory
    Py_ssize_t tile_width, n_tiles, rows_per_block, rows_per_run   # FI only
    # FI with an operand whose features are not adjacent (Fortran, transposed, stepped):
    # elements of one run of rows staged in a contiguous per-thread tile, else 0.
    Py_ssize_t stage_elements
    Py_ssize_t n_chunks, chunk_length                # rows (FI) or reduced elements (RI)
    Py_ssize_t n_items
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
    g.row_group = g.group_rows = g.group_run = 1
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
            g.stage_elements = g.rows_per_run * g.tile_width
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


cdef inline bint whole_lines(const floating *row, Py_ssize_t n) noexcept nogil:
    """Whether n elements from row fill whole 64-byte cache lines: then streaming stores
    never share a line with ordinary ones (cbn.api allocates outputs line-aligned)."""
    return (<uintptr_t>row) % 64 == 0 and (n * sizeof(floating)) % 64 == 0


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


# ---------------------------------------------------------------------------------------
# Inner loops
# ---------------------------------------------------------------------------------------

cdef inline void transpose(const floating *src, int64_t src_stride, Py_ssize_t n_r,
                           Py_ssize_t n_c, floating *dst, int64_t dst_stride,
                           const double *affine=NULL) noexcept nogil:
    """dst[c * dst_stride + r] = src[r * src_stride + c] (_simd.h: 8x8 blocks in registers);
    with affine (mean, scale, shift), normalized on the way."""
    if floating is float:
        cbn_transpose_f32(src, src_stride, n_r, n_c, dst, dst_stride, affine)
    else:
        cbn_transpose_f64(src, src_stride, n_r, n_c, dst, dst_stride, affine)


# FI tiles of an operand whose features are not adjacent (a Fortran-ordered or transposed x
# beside a C-ordered dy, a stepped view) are copied one run of rows at a time into a
# per-thread stage of rows of adjacent features, and outputs written there are copied back:
# the SIMD loops then serve every operand, and the copy, a blocked transpose within the
# caches, reads and writes whole cache lines of the operand in its own order.
cdef inline const floating *stage_rows(const floating *p, int64_t *row_stride, int64_t step,
                                       Py_ssize_t n_rows, Py_ssize_t width,
                                       floating *stage) noexcept nogil:
    """n_rows x width elements of p as rows of adjacent features: p itself if its features
    are adjacent, else their copy in stage (then *row_stride becomes width)."""
    cdef Py_ssize_t r, j
    if step == 1:
        return p
    if row_stride[0] == 1:
        transpose(p, step, width, n_rows, stage, width)
    else:
        for r in range(n_rows):
            for j in range(width):
                stage[r * width + j] = p[r * row_stride[0] + j * step]
    row_stride[0] = width
    return stage


cdef inline floating *output_rows(floating *p, int64_t *row_stride, int64_t step,
                                  Py_ssize_t width, floating *stage) noexcept nogil:
    """Where to write rows of adjacent features bound for p: p, or stage (then copied back
    with unstage_rows, and *row_stride becomes width)."""
    if step == 1:
        return p
    row_stride[0] = width
    return stage


cdef inline void unstage_rows(const floating *stage, Py_ssize_t n_rows, Py_ssize_t width,
                              floating *p, int64_t row_stride, int64_t step) noexcept nogil:
    """Copy rows of adjacent features from stage to p's own layout (stage_rows' inverse)."""
    cdef Py_ssize_t r, j
    if row_stride == 1:
        transpose(stage, width, n_rows, width, p, step)
        return
    for r in range(n_rows):
        for j in range(width):
            p[r * row_stride + j * step] = stage[r * width + j]


cdef inline void add_shifted_rows(const floating *p, int64_t row_stride, int64_t step,
                                  Py_ssize_t n_rows, Py_ssize_t width, const double *shift,
                                  double *s1, double *s2, floating *stage) noexcept nogil:
    """s1 += Σ (x − shift), s2 += Σ (x − shift)² over n_rows rows of width features."""
    p = stage_rows(p, &row_stride, step, n_rows, width, stage)
    if floating is float:
        cbn_shifted_sums_f32(p, row_stride, n_rows, width, shift, s1, s2)
    else:
        cbn_shifted_sums_f64(p, row_stride, n_rows, width, shift, s1, s2)


cdef inline void shifted_sums_run(const floating *p, int64_t step, Py_ssize_t n, double shift,
                                  double *s1, double *s2) noexcept nogil:
    """s1 = Σ (x − shift), s2 = Σ (x − shift)² over a run."""
    cdef Py_ssize_t i
    cdef double d
    if step == 1:
        if floating is float:
            cbn_shifted_sums_run_f32(p, n, shift, s1, s2)
        else:
            cbn_shifted_sums_run_f64(p, n, shift, s1, s2)
        return
    s1[0] = 0.0
    s2[0] = 0.0
    for i in range(n):
        d = p[i * step] - shift
        s1[0] += d
        s2[0] += d * d


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
                      stream and whole_lines(y + r * y_row_stride, width))


cdef inline void normalize_run(const floating *x, int64_t x_step, floating *y, int64_t y_step,
                               Py_ssize_t n, double mean, double scale,
                               double shift, bint stream) noexcept nogil:
    cdef Py_ssize_t i
    if x_step == 1 and y_step == 1:
        if stream:
            if floating is float:
                cbn_normalize_stream_f32(x, y, n, &mean, &scale, &shift, 0)
            else:
                cbn_normalize_stream_f64(x, y, n, &mean, &scale, &shift, 0)
            return
        for i in range(n):
            y[i] = <floating>((x[i] - mean) * scale + shift)
    else:
        for i in range(n):
            y[i * y_step] = <floating>((x[i * x_step] - mean) * scale + shift)


cdef inline void add_gradient_rows(const floating *dy, int64_t dy_row_stride, int64_t dy_step,
                                   const floating *x, int64_t x_row_stride, int64_t x_step,
                                   Py_ssize_t n_rows, Py_ssize_t width, const double *mean,
                                   double *sum_dy, double *sum_dy_xc, floating *dy_stage,
                                   floating *x_stage) noexcept nogil:
    """sum_dy += Σ dy, sum_dy_xc += Σ dy·(x − mean) over n_rows rows of width features."""
    dy = stage_rows(dy, &dy_row_stride, dy_step, n_rows, width, dy_stage)
    x = stage_rows(x, &x_row_stride, x_step, n_rows, width, x_stage)
    if floating is float:
        cbn_gradient_sums_f32(dy, dy_row_stride, x, x_row_stride, n_rows, width, mean,
                              sum_dy, sum_dy_xc)
    else:
        cbn_gradient_sums_f64(dy, dy_row_stride, x, x_row_stride, n_rows, width, mean,
                              sum_dy, sum_dy_xc)


cdef inline void gradient_run(const floating *dy, int64_t dy_step, const floating *x,
                              int64_t x_step, Py_ssize_t n, double mean,
                              double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """sum_dy += Σ dy, sum_dy_xc += Σ dy·(x − mean) over a run."""
    cdef Py_ssize_t i
    cdef double g
    if dy_step == 1 and x_step == 1:
        if floating is float:
            cbn_gradient_sums_run_f32(dy, x, n, mean, sum_dy, sum_dy_xc)
        else:
            cbn_gradient_sums_run_f64(dy, x, n, mean, sum_dy, sum_dy_xc)
        return
    for i in range(n):
        g = dy[i * dy_step]
        sum_dy[0] += g
        sum_dy_xc[0] += g * (x[i * x_step] - mean)


cdef inline void tile_gradient_sums(const floating *dy, int64_t dy_row_step,
                                    const floating *x, int64_t x_row_step, Py_ssize_t n_rows,
                                    Py_ssize_t n, double mean, double *sum_dy,
                                    double *sum_dy_xc) noexcept nogil:
    """gradient_run over n_rows runs of n contiguous elements, *_row_step apart, reduced once."""
    if floating is float:
        cbn_gradient_sums_tile_f32(dy, dy_row_step, x, x_row_step, n_rows, n, mean, sum_dy,
                                   sum_dy_xc)
    else:
        cbn_gradient_sums_tile_f64(dy, dy_row_step, x, x_row_step, n_rows, n, mean, sum_dy,
                                   sum_dy_xc)


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
                           width, mean, coef_dy, coef_xc, offset,
                           stream and whole_lines(dx + r * dx_row_stride, width))


cdef inline void input_gradient_run(const floating *dy, int64_t dy_step, const floating *x,
                                    int64_t x_step, floating *dx, int64_t dx_step, Py_ssize_t n,
                                    double mean, double coef_dy, double coef_xc,
                                    double offset, bint stream) noexcept nogil:
    cdef Py_ssize_t i
    if dy_step == 1 and x_step == 1 and dx_step == 1:
        if stream:
            if floating is float:
                cbn_input_gradient_stream_f32(dy, x, dx, n, &mean, &coef_dy, &coef_xc, &offset,
                                              0)
            else:
                cbn_input_gradient_stream_f64(dy, x, dx, n, &mean, &coef_dy, &coef_xc, &offset,
                                              0)
            return
        for i in range(n):
            dx[i] = <floating>(coef_dy * dy[i] + coef_xc * (x[i] - mean) + offset)
    else:
        for i in range(n):
            dx[i * dx_step] = <floating>(coef_dy * dy[i * dy_step]
                                         + coef_xc * (x[i * x_step] - mean) + offset)


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


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------

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
    before them, one run (at most BLOCK_ELEMENTS) at a time, each shifted by the mean so far."""
    cdef Runs runs = make_runs(g, begin, end, BLOCK_ELEMENTS)
    cdef Py_ssize_t n
    cdef double s1, s2, block_mean, block_m2, weight
    while runs.r < runs.end:
        n = run_length(g, &runs)
        shifted_sums_run(feature + row_offset(xw, runs.ro, runs.ri), xw.row_stride, n,
                         acc_mean[0], &s1, &s2)
        shifted_to_moments(acc_mean[0], s1, s2, n, &block_mean, &block_m2)
        weight = n / <double>(n_acc + n)
        chan_update(acc_mean, acc_m2, block_mean, block_m2, weight, n_acc * weight)
        n_acc += n
        advance(g, &runs, n)


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
    for ro in range(ro0, ro1):
        for f in range(g.n_features):
            feature = x + feature_offset(xw, g, f)
            if ro == ro0:
                mean[f] = feature[row_offset(xw, ro0, 0)]
                m2[f] = 0.0
            fold_runs(g, feature, xw, ro * g.n_ri, (ro + 1) * g.n_ri, (ro - ro0) * g.n_ri,
                      &mean[f], &m2[f])


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
        per_thread += 2 * g.rows_per_run * g.tile_width
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


# ---------------------------------------------------------------------------------------
# Normalization (training forward and inference)
# ---------------------------------------------------------------------------------------

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
    cdef Py_ssize_t n, r
    cdef int64_t x_row_stride, y_row_stride, r_row_stride = 0
    cdef const floating *x_rows
    cdef const floating *r_rows = NULL
    cdef floating *y_rows
    cdef bint y_staged = yw.feature_stride != 1
    cdef bint stream = g.stream and not y_staged
    cdef int64_t b, bit_row_stride = 0, bit_step = 0
    cdef Activation row_act = act[0]
    cdef bint bits_by_rows = False
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
    if stream and g.rows_contiguous and not act.fused:   # the whole chunk is one run
        normalize_rows(x_tile + it.r_begin * xw.row_stride, xw.row_stride,
                       y_tile + it.r_begin * yw.row_stride, yw.row_stride,
                       it.r_end - it.r_begin, it.width, mean + it.f0, scale + it.f0,
                       shift + it.f0, True)
        cbn_store_fence()
        return
    while runs.r < runs.end:
        n = run_length(g, &runs)
        x_rows = rows_of(g, x_tile, xw, &runs, n, it.width, &x_row_stride, stage)
        if r_tile != NULL:
            r_rows = rows_of(g, r_tile, act.residual_walk, &runs, n, it.width, &r_row_stride,
                             stage + 2 * g.stage_elements)
        if not g.stream:
            prefetch_next_run(g, runs, n, y_tile, yw, it.width, True)
        y_row_stride = yw.row_stride
        y_rows = output_rows(y_tile + row_offset(yw, runs.ro, runs.ri), &y_row_stride,
                             yw.feature_stride, it.width, stage + g.stage_elements)
        if act.fused:
            b = mask_bit(act, g, it.f0, runs.ro, runs.ri)
            for r in range(n):
                normalize_act(x_rows + r * x_row_stride,
                              NULL if r_rows == NULL else r_rows + r * r_row_stride,
                              y_rows + r * y_row_stride, it.width, mean + it.f0,
                              scale + it.f0, shift + it.f0, True, &row_act,
                              stream and whole_lines(y_rows + r * y_row_stride, it.width),
                              b + r * bit_row_stride, bit_step)
            if bits_by_rows:
                set_row_signs(act.mask, b, bit_step, y_rows, y_row_stride, n, it.width)
        else:
            normalize_rows(x_rows, x_row_stride, y_rows, y_row_stride, n, it.width,
                           mean + it.f0, scale + it.f0, shift + it.f0, stream)
        if y_staged:
            unstage_rows(y_rows, n, it.width, y_tile + row_offset(yw, runs.ro, runs.ri),
                         yw.row_stride, yw.feature_stride)
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
            normalize_item(g, x, xw, y, yw, item, mean, scale, shift, ws.scratch, act)
        return
    for item in prange(g.n_items, num_threads=g.n_threads, schedule="dynamic"):
        normalize_item(g, x, xw, y, yw, item, mean, scale, shift,
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
    if g.n_threads == 1:
        for i in range(planes_items(g)):
            normalize_group(g, x, xw, y, yw, group_start(g, i % group_count(g)),
                            item_features(g, i), mean, scale, shift, <floating *>ws.scratch,
                            act)
        return
    for i in prange(planes_items(g), num_threads=g.n_threads, schedule="dynamic"):
        normalize_group(g, x, xw, y, yw, group_start(g, i % group_count(g)),
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
    to outer row of a group, not along the rows."""
    return g.row_group > 1 and w.group_stride == 1 and w.row_stride != 1


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
    if group_staged(g, w):
        transpose(p + row_offset(w, ro, ri), w.row_stride, n, n_rows, stage, n)


cdef inline void group_flush(const Grid *g, const floating *stage, floating *p, const Walk *w,
                             Py_ssize_t ro, Py_ssize_t ri, Py_ssize_t n_rows,
                             Py_ssize_t n) noexcept nogil:
    """group_stage's inverse, for an output."""
    if group_staged(g, w):
        transpose(stage, n, n_rows, n, p + row_offset(w, ro, ri), w.row_stride)


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
    cbn_prefetch_tile(<const char *>(p + feature_offset(w, g, f) + row_offset(w, ro, ri)),
                      w.group_stride, w.row_stride, n_rows, min(g.group_run, g.n_ri - ri),
                      sizeof(floating), for_writing)


cdef inline void normalize_transposed(const Grid *g, const floating *x, const Walk *xw,
                                      floating *y, const Walk *yw, Py_ssize_t ro,
                                      Py_ssize_t ri, Py_ssize_t n_rows, Py_ssize_t n,
                                      double mean, double scale, double shift) noexcept nogil:
    """A tile of y from x's (features at x, y) where exactly one of them is staged: one
    transpose that normalizes on the way, no buffer."""
    cdef double affine[3]
    affine[0], affine[1], affine[2] = mean, scale, shift
    if group_staged(g, yw):     # x in place, rows of n: y's rows are x's columns
        transpose(x + row_offset(xw, ro, ri), xw.group_stride, n_rows, n,
                  y + row_offset(yw, ro, ri), yw.row_stride, affine)
    else:                       # x staged: its rows (along the tile's rows) become y's
        transpose(x + row_offset(xw, ro, ri), xw.row_stride, n, n_rows,
                  y + row_offset(yw, ro, ri), yw.group_stride, affine)


cdef void normalize_group(const Grid *g, const floating *x, const Walk *xw, floating *y,
                          const Walk *yw, Py_ssize_t ro, Py_ssize_t f0, const double *mean,
                          const double *scale, const double *shift, floating *stage,
                          const Activation *act) noexcept nogil:
    """The runs of group_features features from f0 in the outer rows of the group from ro."""
    cdef Py_ssize_t f, t, segment, ri, n, n_rows = group_length(g, ro, g.n_ro)
    cdef bint stream = g.stream and not group_staged(g, yw)
    cdef int64_t x_step = group_step(g, xw), y_step = group_step(g, yw)
    cdef floating *x_stage = stage
    cdef floating *y_stage = stage + g.group_rows * g.group_run
    cdef const floating *x_feature
    cdef floating *y_feature
    cdef RiItem plane
    for f in range(f0, f0 + g.group_features):
        if act.fused:
            plane.f = f
            for t in range(n_rows):
                plane.r_begin, plane.r_end = (ro + t) * g.n_ri, (ro + t + 1) * g.n_ri
                ri_normalize_activate_item(g, x, xw, y, yw, plane, mean[f], scale[f],
                                           shift[f], act)
            continue
        x_feature = x + feature_offset(xw, g, f)
        y_feature = y + feature_offset(yw, g, f)
        for segment in range(ceil_div(g.n_ri, g.group_run)):
            ri = segment * g.group_run
            n = min(g.group_run, g.n_ri - ri)
            group_prefetch_next(g, x, xw, f, ro, ri, n_rows, False)
            if not stream:
                group_prefetch_next(g, y, yw, f, ro, ri, n_rows, True)
            if group_staged(g, xw) != group_staged(g, yw) and x_step == 1 and y_step == 1:
                normalize_transposed(g, x_feature, xw, y_feature, yw, ro, ri, n_rows, n,
                                     mean[f], scale[f], shift[f])
                continue
            group_stage(g, x_feature, xw, ro, ri, n_rows, n, x_stage)
            for t in range(n_rows):
                normalize_run(group_row(g, <floating *>x_feature, xw, ro, t, ri, n, x_stage),
                              x_step, group_row(g, y_feature, yw, ro, t, ri, n, y_stage),
                              y_step, n, mean[f], scale[f], shift[f], stream)
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
    if not g.features_inner and g.n_chunks == 1:
        fused_forward(g, x, xw, y, yw, gamma, shift, epsilon, mean, var, scale, act)
        return
    compute_moments(g, x, xw, ws, mean, var)
    for f in range(g.n_features):
        normalization_factors(f, var, gamma, epsilon, scale)
    normalize_items(g, x, xw, y, yw, mean, scale, shift, ws, act)


# ---------------------------------------------------------------------------------------
# Backward (training mode)
# ---------------------------------------------------------------------------------------

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
    for j in range(it.width):
        acc_dy[j] = 0.0
        acc_dy_xc[j] = 0.0
    while runs.r < runs.end:
        n = run_length(g, &runs)
        prefetch_next_run(g, runs, n, dy_tile, dyw, it.width, False)
        prefetch_next_run(g, runs, n, x_tile, xw, it.width, False)
        add_gradient_rows(dy_tile + row_offset(dyw, runs.ro, runs.ri), dyw.row_stride,
                          dyw.feature_stride, x_tile + row_offset(xw, runs.ro, runs.ri),
                          xw.row_stride, xw.feature_stride, n, it.width, mean + it.f0,
                          acc_dy, acc_dy_xc, stage, stage + g.stage_elements)
        advance(g, &runs, n)
    for j in range(it.width):
        chunk_dy[it.chunk * g.n_features + it.f0 + j] = acc_dy[j]
        chunk_dy_xc[it.chunk * g.n_features + it.f0 + j] = acc_dy_xc[j]


cdef void ri_gradient_sums(const Grid *g, const floating *dy, const Walk *dyw,
                           const floating *x, const Walk *xw, RiItem it, double mean,
                           double *sum_dy, double *sum_dy_xc) noexcept nogil:
    """sum_dy += Σ dy, sum_dy_xc += Σ dy·(x − mean) over the item, run by run."""
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, it.f)
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n
    while runs.r < runs.end:
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
    cdef Py_ssize_t n, r
    cdef int64_t dy_row_stride, x_row_stride, o_row_stride = 0, dx_row_stride, r_row_stride = 0
    cdef const floating *dy_rows
    cdef const floating *x_rows
    cdef const floating *o_rows = NULL
    cdef floating *dx_rows
    cdef int64_t b, bit_row_stride = 0, bit_step = 0
    cdef bint dx_staged = dxw.feature_stride != 1
    cdef bint r_staged = False
    cdef bint stream
    if act.residual_gradient != NULL:
        r_tile = (<floating *>act.residual_gradient + rw.feature_offsets[it.fo]
                  + it.fi0 * rw.feature_stride)
        r_staged = rw.feature_stride != 1
    stream = g.stream and not dx_staged and not r_staged
    if act.mask != NULL:
        bit_row_stride, bit_step = act.mask_walk.row_stride, act.mask_walk.feature_stride
    elif act.fused:
        o_tile = tile_of(<const floating *>act.output, act.output_walk, &it)
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
        dy_rows = rows_of(g, dy_tile, dyw, &runs, n, it.width, &dy_row_stride, stage)
        x_rows = rows_of(g, x_tile, xw, &runs, n, it.width, &x_row_stride,
                         stage + g.stage_elements)
        if o_tile != NULL:
            o_rows = rows_of(g, o_tile, act.output_walk, &runs, n, it.width, &o_row_stride,
                             activation_slot(g, stage, 0))
        if not g.stream:
            prefetch_next_run(g, runs, n, dx_tile, dxw, it.width, True)
        dx_row_stride = dxw.row_stride
        dx_rows = output_rows(dx_tile + row_offset(dxw, runs.ro, runs.ri), &dx_row_stride,
                              dxw.feature_stride, it.width, stage + 2 * g.stage_elements)
        if r_tile != NULL:
            r_row_stride = rw.row_stride
            r_rows = output_rows(r_tile + row_offset(rw, runs.ro, runs.ri), &r_row_stride,
                                 rw.feature_stride, it.width, activation_slot(g, stage, 1))
        if act.fused:
            b = mask_bit(act, g, it.f0, runs.ro, runs.ri)
            for r in range(n):
                act_input_gradient(dy_rows + r * dy_row_stride,
                                   NULL if o_rows == NULL else o_rows + r * o_row_stride,
                                   x_rows + r * x_row_stride, dx_rows + r * dx_row_stride,
                                   NULL if r_rows == NULL else r_rows + r * r_row_stride,
                                   it.width, k.mean + it.f0, k.coef_dy + it.f0,
                                   k.coef_xc + it.f0, k.offset + it.f0, True, act,
                                   stream and whole_lines(dx_rows + r * dx_row_stride, it.width)
                                   and (r_rows == NULL
                                        or whole_lines(r_rows + r * r_row_stride, it.width)),
                                   b + r * bit_row_stride, bit_step)
        else:
            input_gradient_rows(dy_rows, dy_row_stride, x_rows, x_row_stride, dx_rows,
                                dx_row_stride, n, it.width, k.mean + it.f0, k.coef_dy + it.f0,
                                k.coef_xc + it.f0, k.offset + it.f0, stream)
        if dx_staged:
            unstage_rows(dx_rows, n, it.width, dx_tile + row_offset(dxw, runs.ro, runs.ri),
                         dxw.row_stride, dxw.feature_stride)
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
    cdef Py_ssize_t item, f, c
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
        k.sum_dy[f] = 0.0
        k.sum_dy_xhat[f] = 0.0
    for c in range(g.n_chunks):     # chunk order, vectorized across features
        for f in range(g.n_features):
            k.sum_dy[f] += ws.chunk_a[c * g.n_features + f]
            k.sum_dy_xhat[f] += ws.chunk_b[c * g.n_features + f]
    for f in range(g.n_features):
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
            ro = ro0
            while ro < ro1:
                n_rows = group_length(g, ro, ro1)
                group_gradient_sums(g, dy, dyw, x, xw, mean, f, ro, n_rows, &sum_dy[f],
                                    &sum_dy_xc[f], stage, act)
                ro += n_rows
        return
    ro = ro0
    while ro < ro1:     # a row group at a time (one row unless grouped)
        n_rows = group_length(g, ro, ro1)
        for f in range(g.n_features):
            group_gradient_sums(g, dy, dyw, x, xw, mean, f, ro, n_rows, &sum_dy[f],
                                &sum_dy_xc[f], stage, act)
        ro += n_rows


cdef inline void group_gradient_sums(const Grid *g, const floating *dy, const Walk *dyw,
                                     const floating *x, const Walk *xw, const double *mean,
                                     Py_ssize_t f, Py_ssize_t ro, Py_ssize_t n_rows,
                                     double *sum_dy, double *sum_dy_xc, floating *stage,
                                     const Activation *act) noexcept nogil:
    """Feature f's sums over the group of n_rows outer rows from ro, tile by tile (the
    tile's runs reduced once: 62M instructions to 50M for NHWC x Fortran, dy stored NCHW)."""
    cdef Py_ssize_t t, segment, ri, n
    cdef int64_t dy_step = group_step(g, dyw), x_step = group_step(g, xw)
    cdef floating *dy_stage = stage
    cdef floating *x_stage = stage + g.group_rows * g.group_run
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, f)
    cdef const floating *x_feature = x + feature_offset(xw, g, f)
    cdef RiItem plane
    if act.fused:
        for t in range(ro, ro + n_rows):
            plane.f, plane.r_begin, plane.r_end = f, t * g.n_ri, (t + 1) * g.n_ri
            ri_gradient_sums_activate(g, dy, dyw, x, xw, plane, mean[f], sum_dy, sum_dy_xc,
                                      act)
        return
    for segment in range(ceil_div(g.n_ri, g.group_run)):
        ri = segment * g.group_run
        n = min(g.group_run, g.n_ri - ri)
        group_prefetch_next(g, dy, dyw, f, ro, ri, n_rows, False)
        group_prefetch_next(g, x, xw, f, ro, ri, n_rows, False)
        group_stage(g, dy_feature, dyw, ro, ri, n_rows, n, dy_stage)
        group_stage(g, x_feature, xw, ro, ri, n_rows, n, x_stage)
        if dy_step == 1 and x_step == 1:    # the tile's runs into one set of accumulators
            tile_gradient_sums(group_row(g, <floating *>dy_feature, dyw, ro, 0, ri, n, dy_stage),
                               group_row_step(g, dyw, n),
                               group_row(g, <floating *>x_feature, xw, ro, 0, ri, n, x_stage),
                               group_row_step(g, xw, n), n_rows, n, mean[f], sum_dy, sum_dy_xc)
            continue
        for t in range(n_rows):
            gradient_run(group_row(g, <floating *>dy_feature, dyw, ro, t, ri, n, dy_stage),
                         dy_step, group_row(g, <floating *>x_feature, xw, ro, t, ri, n, x_stage),
                         x_step, n, mean[f], sum_dy, sum_dy_xc)


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
            input_gradient_item(g, dy, dyw, x, xw, dx, dxw, k, item, ws.scratch)
        return
    for item in prange(g.n_items, num_threads=g.n_threads, schedule="dynamic"):
        input_gradient_item(g, dy, dyw, x, xw, dx, dxw, k, item,
                            ws.scratch + threadid() * ws.scratch_per_thread)


cdef void input_gradient_planes(const Grid *g, const floating *dy, const Walk *dyw,
                                const floating *x, const Walk *xw, floating *dx,
                                const Walk *dxw, const GradientFactors *k,
                                const Buffers *ws) noexcept nogil:
    """RI dx outer row by outer row, in memory order (see normalize_planes), by row groups."""
    cdef Py_ssize_t i
    if g.n_threads == 1:
        for i in range(planes_items(g)):
            input_gradient_group(g, dy, dyw, x, xw, dx, dxw, k, group_start(g, i % group_count(g)),
                                 item_features(g, i), <floating *>ws.scratch)
        return
    for i in prange(planes_items(g), num_threads=g.n_threads, schedule="dynamic"):
        input_gradient_group(g, dy, dyw, x, xw, dx, dxw, k, group_start(g, i % group_count(g)),
                             item_features(g, i),
                             <floating *>(ws.scratch + threadid() * ws.scratch_per_thread))


cdef inline void input_gradient_group(const Grid *g, const floating *dy, const Walk *dyw,
                                      const floating *x, const Walk *xw, floating *dx,
                                      const Walk *dxw, const GradientFactors *k,
                                      Py_ssize_t ro, Py_ssize_t f0,
                                      floating *stage) noexcept nogil:
    """dx of group_features features from f0 in the outer rows of the group from ro."""
    cdef Py_ssize_t f, t, segment, ri, n, n_rows = group_length(g, ro, g.n_ro)
    cdef bint stream = g.stream and not group_staged(g, dxw)
    cdef int64_t dy_step = group_step(g, dyw), x_step = group_step(g, xw)
    cdef int64_t dx_step = group_step(g, dxw)
    cdef floating *dy_stage = stage
    cdef floating *x_stage = stage + g.group_rows * g.group_run
    cdef floating *dx_stage = stage + 2 * g.group_rows * g.group_run
    cdef const floating *dy_feature
    cdef const floating *x_feature
    cdef floating *dx_feature
    cdef RiItem plane
    for f in range(f0, f0 + g.group_features):
        if k.act.fused:     # elementwise: the activated runs read every operand in place
            plane.f = f
            for t in range(n_rows):
                plane.r_begin, plane.r_end = (ro + t) * g.n_ri, (ro + t + 1) * g.n_ri
                ri_input_gradient_activate_item(g, dy, dyw, x, xw, dx, dxw, plane, k)
            continue
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
            group_stage(g, dy_feature, dyw, ro, ri, n_rows, n, dy_stage)
            group_stage(g, x_feature, xw, ro, ri, n_rows, n, x_stage)
            for t in range(n_rows):
                input_gradient_run(group_row(g, <floating *>dy_feature, dyw, ro, t, ri, n,
                                             dy_stage), dy_step,
                                   group_row(g, <floating *>x_feature, xw, ro, t, ri, n,
                                             x_stage), x_step,
                                   group_row(g, dx_feature, dxw, ro, t, ri, n, dx_stage),
                                   dx_step, n, k.mean[f], k.coef_dy[f], k.coef_xc[f],
                                   k.offset[f], stream)
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
    if g.features_inner or g.n_chunks > 1:
        gradient_sums_nogil(g, dy, dyw, x, xw, ws, k)
        input_gradient_nogil(g, dy, dyw, x, xw, dx, dxw, ws, k)
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


# ---------------------------------------------------------------------------------------
# Activations (and a residual) fused into the loops
# ---------------------------------------------------------------------------------------
# Forward: the normalization of a row or run, plus the residual, plus the activation, in
# registers before the one store of y (cbn/_activation.h). Backward: dz = dy·act'(z) is
# formed in registers where the plain loops load dy, in their sums and in the dx loop,
# which also stores dz as the residual's gradient. Work split, runs and summation order
# are the plain kernels' own, so the results are bitwise batch norm composed with the
# activation. Operands whose features are not adjacent are staged as in the plain loops.

cdef inline floating *activation_slot(const Grid *g, floating *stage, int k) noexcept nogil:
    """FI backward: slot k (0 or 1) of rows_per_run x tile_width elements after the three
    stages (y's and the residual gradient's rows)."""
    return stage + 3 * g.stage_elements + k * g.rows_per_run * g.tile_width


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
                              act.alpha, stream, act.mask, b, bit_step)
    else:
        cbn_normalize_act_f64(x, residual, y, n, mean, scale, shift, per_element, act.kind,
                              act.alpha, stream, act.mask, b, bit_step)


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


cdef inline const floating *tile_of(const floating *base, const Walk *w,
                                    const FiItem *it) noexcept nogil:
    return base + w.feature_offsets[it.fo] + it.fi0 * w.feature_stride


cdef inline const floating *rows_of(const Grid *g, const floating *tile, const Walk *w,
                                    const Runs *runs, Py_ssize_t n, Py_ssize_t width,
                                    int64_t *row_stride, floating *stage) noexcept nogil:
    """The run's rows of a tile as rows of adjacent features (staged if need be)."""
    prefetch_next_run(g, runs[0], n, tile, w, width, False)
    row_stride[0] = w.row_stride
    return stage_rows(tile + row_offset(w, runs.ro, runs.ri), row_stride, w.feature_stride, n,
                      width, stage)


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


cdef void ri_gradient_sums_activate(const Grid *g, const floating *dy, const Walk *dyw,
                                    const floating *x, const Walk *xw, RiItem it, double mean,
                                    double *sum_dy, double *sum_dy_xc,
                                    const Activation *act) noexcept nogil:
    """ri_gradient_sums of dz: the same runs, dz formed where dy is loaded, and the same
    loop as the composed call's on its dz (gradient_run: the SIMD one for unit steps)."""
    cdef const floating *dy_feature = dy + feature_offset(dyw, g, it.f)
    cdef const floating *x_feature = x + feature_offset(xw, g, it.f)
    cdef const floating *o_run = NULL
    cdef const floating *dy_run
    cdef const floating *x_run
    cdef int64_t dys = dyw.row_stride, xs = xw.row_stride, os = 0, b, bit_step = 0
    cdef Runs runs = make_runs(g, it.r_begin, it.r_end, it.r_end)
    cdef Py_ssize_t n, i
    cdef double dz
    if act.mask != NULL:
        bit_step = act.mask_walk.row_stride
    else:
        os = act.output_walk.row_stride
    while runs.r < runs.end:
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
        else:
            for i in range(n):
                dz = dz_at(dy_run[i * dys], o_run, os, b, bit_step, i, act)
                sum_dy[0] += dz
                sum_dy_xc[0] += dz * (x_run[i * xs] - mean)
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


# ---------------------------------------------------------------------------------------
# Entry points: unpack arrays once, then run without the GIL
# ---------------------------------------------------------------------------------------

cdef class KernelPlan:
    """A cbn._layout.Plan unpacked into C structs; built once per layout and cached."""
    cdef Grid grid
    cdef Walk walks[5]
    cdef readonly object layout     # the Plan; also keeps the offset tables alive

    def __cinit__(self, layout, Py_ssize_t itemsize):
        self.layout = layout
        self.grid = make_grid(layout, itemsize)
        for k, operand in enumerate(layout.operands):
            self.walks[k] = make_walk(operand)

    def second_pass_in_cache(self):
        """Whether each feature's second pass (normalize, dx) follows its first while the
        feature is in cache: RI with one chunk per feature (fused_forward, fused_backward)."""
        return not self.grid.features_inner and self.grid.n_chunks == 1

    cdef Grid call_grid(self):
        cdef Grid g = self.grid
        g.n_threads = thread_count(&g)
        g.stream = g.n_bytes >= stream_min_bytes
        return g


def batch_stats(KernelPlan plan, cnp.ndarray x, cnp.ndarray mean_out, cnp.ndarray var_out):
    cdef Grid g = plan.call_grid()
    cdef Buffers b
    cdef void *x_data = cnp.PyArray_DATA(x)
    cdef double *mean = <double *>cnp.PyArray_DATA(mean_out)
    cdef double *var = <double *>cnp.PyArray_DATA(var_out)
    cdef bint single = is_single(x)
    if allocate(&b, &g, 4, 0, False):
        raise MemoryError("cbn: no memory for the statistics' work buffers")
    with nogil:
        if single:
            compute_moments(&g, <const float *>x_data, &plan.walks[0], &b, mean, var)
        else:
            compute_moments(&g, <const double *>x_data, &plan.walks[0], &b, mean, var)
        free(b.scratch)


cdef inline void copy_or_zero(double *target, const double *source, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t f
    for f in range(n):
        target[f] = 0.0 if source == NULL else source[f]


# A forward or inference call unpacked; scale and shift (γ/σ and β) live in its buffers.
cdef struct Normalization:
    Grid grid
    Buffers buffers
    void *x_data
    void *y_data
    const double *gamma
    double *scale
    double *shift
    bint single
    Activation act


cdef int unpack_normalization(Normalization *n, KernelPlan plan, cnp.ndarray x, cnp.ndarray y,
                              gamma, beta, Py_ssize_t tile_arrays, int activation, double alpha,
                              residual, mask) except -1:
    """Operands of plan: x, y, then the residual and the mask (uint8, zeroed) if not None.
    gamma and beta may be None. Free n.buffers.scratch after."""
    n.grid = plan.call_grid()
    n.act = NO_ACTIVATION
    n.act.kind = activation
    n.act.alpha = alpha
    n.act.fused = activation != CBN_ACT_NONE or residual is not None
    if residual is not None:
        n.act.residual = cnp.PyArray_DATA(residual)
        n.act.residual_walk = &plan.walks[2]
    if mask is not None:
        n.act.mask = <unsigned char *>cnp.PyArray_DATA(mask)
        n.act.mask_walk = &plan.walks[2 if residual is None else 3]
    if allocate(&n.buffers, &n.grid, tile_arrays, 2, False):
        raise MemoryError("cbn: no memory for the normalization's work buffers")
    n.x_data = cnp.PyArray_DATA(x)
    n.y_data = cnp.PyArray_DATA(y)
    n.gamma = data_or_null(gamma)
    n.single = is_single(x)
    n.scale = n.buffers.per_feature
    n.shift = n.buffers.per_feature + n.grid.n_features
    copy_or_zero(n.shift, data_or_null(beta), n.grid.n_features)
    return 0


def batch_norm_forward(KernelPlan plan, cnp.ndarray x, cnp.ndarray y, gamma, beta,
                       double epsilon, cnp.ndarray mean_out, cnp.ndarray var_out,
                       int activation=CBN_ACT_NONE, double alpha=0.0, residual=None,
                       mask=None):
    cdef Normalization n
    cdef double *mean = <double *>cnp.PyArray_DATA(mean_out)
    cdef double *var = <double *>cnp.PyArray_DATA(var_out)
    unpack_normalization(&n, plan, x, y, gamma, beta, 4, activation, alpha, residual, mask)
    with nogil:
        if n.single:
            forward_nogil(&n.grid, <const float *>n.x_data, &plan.walks[0], <float *>n.y_data,
                          &plan.walks[1], &n.buffers, n.gamma, n.shift, epsilon, mean, var,
                          n.scale, &n.act)
        else:
            forward_nogil(&n.grid, <const double *>n.x_data, &plan.walks[0],
                          <double *>n.y_data, &plan.walks[1], &n.buffers, n.gamma, n.shift,
                          epsilon, mean, var, n.scale, &n.act)
        free(n.buffers.scratch)


def batch_norm_inference(KernelPlan plan, cnp.ndarray x, cnp.ndarray y, cnp.ndarray mean,
                         cnp.ndarray var, gamma, beta, double epsilon,
                         int activation=CBN_ACT_NONE, double alpha=0.0, residual=None,
                         mask=None):
    cdef Normalization n
    cdef double *mean_data = <double *>cnp.PyArray_DATA(mean)
    cdef double *var_data = <double *>cnp.PyArray_DATA(var)
    cdef Py_ssize_t f
    unpack_normalization(&n, plan, x, y, gamma, beta, 0, activation, alpha, residual, mask)
    with nogil:
        for f in range(n.grid.n_features):
            normalization_factors(f, var_data, n.gamma, epsilon, n.scale)
        if n.single:
            normalize_items(&n.grid, <const float *>n.x_data, &plan.walks[0],
                            <float *>n.y_data, &plan.walks[1], mean_data, n.scale, n.shift,
                            &n.buffers, &n.act)
        else:
            normalize_items(&n.grid, <const double *>n.x_data, &plan.walks[0],
                            <double *>n.y_data, &plan.walks[1], mean_data, n.scale, n.shift,
                            &n.buffers, &n.act)
        free(n.buffers.scratch)


cdef class Gradient:
    """The arguments of a backward call, unpacked for the nogil code.

    Operands of the plan: dy, x, and dx (absent when only the sums are wanted); with an
    activation, the forward's output y or else its mask (uint8), then, if not None, the
    residual's gradient.
    """
    cdef Grid grid
    cdef KernelPlan plan
    cdef Buffers buffers
    cdef GradientFactors factors
    cdef Activation act
    cdef object keep_alive
    cdef void *dy_data
    cdef void *x_data
    cdef void *dx_data
    cdef bint single

    def __cinit__(self, KernelPlan plan, cnp.ndarray dy, cnp.ndarray x, dx, cnp.ndarray mean,
                  cnp.ndarray var, gamma, double epsilon, cnp.ndarray sum_dy_xhat,
                  cnp.ndarray sum_dy, Py_ssize_t count, int activation=CBN_ACT_NONE,
                  double alpha=0.0, output=None, residual_gradient=None,
                  bint unit_dz_step=True, mask=None):
        self.buffers.scratch = NULL
        self.plan = plan
        self.grid = plan.call_grid()
        self.act = NO_ACTIVATION
        self.act.kind = activation
        self.act.alpha = alpha
        self.act.fused = activation != CBN_ACT_NONE
        self.act.unit_dz_step = unit_dz_step
        if mask is not None:
            self.act.mask = <unsigned char *>cnp.PyArray_DATA(mask)
            self.act.mask_walk = &self.plan.walks[3]
        elif self.act.fused:
            self.act.output = cnp.PyArray_DATA(output)
            self.act.output_walk = &self.plan.walks[3]
        if residual_gradient is not None:
            self.act.residual_gradient = cnp.PyArray_DATA(residual_gradient)
            self.act.residual_gradient_walk = &self.plan.walks[4]
        self.factors.act = &self.act
        if allocate(&self.buffers, &self.grid, 2, 3, self.act.fused):
            raise MemoryError("cbn: no memory for the backward pass' work buffers")
        # The nogil code holds raw pointers: keep every array they point into alive.
        self.keep_alive = (dy, x, dx, mean, var, gamma, sum_dy_xhat, sum_dy, output,
                           residual_gradient, mask)
        self.dy_data = cnp.PyArray_DATA(dy)
        self.x_data = cnp.PyArray_DATA(x)
        self.dx_data = NULL if dx is None else cnp.PyArray_DATA(dx)
        self.single = is_single(x)
        self.factors.mean = <double *>cnp.PyArray_DATA(mean)
        self.factors.var = <double *>cnp.PyArray_DATA(var)
        self.factors.gamma = data_or_null(gamma)
        self.factors.epsilon = epsilon
        self.factors.count = count
        self.factors.sum_dy = <double *>cnp.PyArray_DATA(sum_dy)
        self.factors.sum_dy_xhat = <double *>cnp.PyArray_DATA(sum_dy_xhat)
        self.factors.coef_dy = self.buffers.per_feature
        self.factors.coef_xc = self.factors.coef_dy + self.grid.n_features
        self.factors.offset = self.factors.coef_xc + self.grid.n_features

    def __dealloc__(self):
        free(self.buffers.scratch)

    def set_count(self, Py_ssize_t count):
        self.factors.count = count

    def backward(self):
        cdef const Walk *walks = self.plan.walks
        with nogil:
            if self.single:
                backward_nogil(&self.grid, <const float *>self.dy_data, &walks[0],
                               <const float *>self.x_data, &walks[1], <float *>self.dx_data,
                               &walks[2], &self.buffers, &self.factors)
            else:
                backward_nogil(&self.grid, <const double *>self.dy_data, &walks[0],
                               <const double *>self.x_data, &walks[1], <double *>self.dx_data,
                               &walks[2], &self.buffers, &self.factors)

    def sums(self):
        cdef const Walk *walks = self.plan.walks
        with nogil:
            if self.single:
                gradient_sums_nogil(&self.grid, <const float *>self.dy_data, &walks[0],
                                    <const float *>self.x_data, &walks[1], &self.buffers,
                                    &self.factors)
            else:
                gradient_sums_nogil(&self.grid, <const double *>self.dy_data, &walks[0],
                                    <const double *>self.x_data, &walks[1], &self.buffers,
                                    &self.factors)

    def input_gradient(self):
        cdef const Walk *walks = self.plan.walks
        with nogil:
            if self.single:
                input_gradient_nogil(&self.grid, <const float *>self.dy_data, &walks[0],
                                     <const float *>self.x_data, &walks[1],
                                     <float *>self.dx_data, &walks[2], &self.buffers,
                                     &self.factors)
            else:
                input_gradient_nogil(&self.grid, <const double *>self.dy_data, &walks[0],
                                     <const double *>self.x_data, &walks[1],
                                     <double *>self.dx_data, &walks[2], &self.buffers,
                                     &self.factors)


# ---------------------------------------------------------------------------------------
# Memory bandwidth: STREAM-style copy, triad and read (cbn.bandwidth's speed of light)
# ---------------------------------------------------------------------------------------

cdef extern from "_stream.h":
    void cbn_bw_copy(const float *a, float *b, int64_t n, int nontemporal) noexcept nogil
    void cbn_bw_triad(const float *b, const float *c, float *a, int64_t n, float s,
                      int nontemporal) noexcept nogil
    double cbn_bw_read(const float *a, int64_t n) noexcept nogil


cdef inline float *float_data(cnp.ndarray a):
    return NULL if a is None else <float *>cnp.PyArray_DATA(a)


def bandwidth_kernel(str kind, cnp.ndarray a, cnp.ndarray b=None, cnp.ndarray c=None,
                     bint nontemporal=False):
    """One STREAM-style pass over contiguous float32 arrays of one size, split into one
    contiguous share per thread: "copy" b = a, "triad" a = b + 3 c, "read" sum(a)."""
    cdef int n_threads = 1 if serial_only else cbn_max_threads()
    cdef int64_t n = a.size, share = ceil_div(a.size, n_threads), begin, t
    cdef float *pa = float_data(a)
    cdef float *pb = float_data(b)
    cdef float *pc = float_data(c)
    cdef int which = {"copy": 0, "triad": 1, "read": 2}[kind]
    cdef double[::1] sums = np.zeros(n_threads)   # read's results, so it is not optimized away
    with nogil:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            begin = t * share
            if begin < n:
                if which == 0:
                    cbn_bw_copy(pa + begin, pb + begin, min(share, n - begin),
                                nontemporal)
                elif which == 1:
                    cbn_bw_triad(pb + begin, pc + begin, pa + begin,
                                 min(share, n - begin), 3.0, nontemporal)
                else:
                    sums[t] = cbn_bw_read(pa + begin, min(share, n - begin))
