# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Batch-norm kernels: loops only. Inputs are validated and laid out by cbn.api/_layout.

Files: this one holds the tunables and the entry points and includes the rest, so that
everything compiles as one module per SIMD level and the loops inline across files:
_kernels_walk.pxi (work items, runs of rows), _kernels_loops.pxi (inner loops over rows
and runs), _kernels_moments.pxi (statistics), _kernels_normalize.pxi (forward and
inference), _kernels_backward.pxi, _kernels_fused.pxi (activations and a residual), and
_kernels_extern.pxi (the C loops of _simd.h and _activation.h).

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

include "_kernels_extern.pxi"

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
    # RI runs that are short (NCHW 7x7 planes): the statistics and the gradient sums take a
    # feature's runs of up to SUM_ROWS outer rows, SUM_RUNS_ELEMENTS elements at most, in one
    # set of accumulators, reduced once (a run of 49 values was reduced per plane: more work
    # than summing it); SUM_ROWS rows of dy and x are 16 streams, what the prefetchers follow.
    SUM_ROWS = 8
    SUM_RUNS_ELEMENTS = 256
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
# FI second passes walk their items last to first (walk's second_pass) where the first pass
# read at most this many bytes:
cdef Py_ssize_t descend_max_bytes = 0
# Float32 elementwise outputs by rows beside an input by features (a C-ordered y beside a
# Fortran x) that do not stream go crosswise (_cross.h) where set, else through the stage
# (see cross_rows_pay):
cdef bint cross_rows_out = False
# The backward's crosswise passes take an item's rows in segments whose two input tiles
# take about this many bytes (cross_segment):
cdef Py_ssize_t cross_block_bytes = 1 << 62


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


def set_descend_max_bytes(Py_ssize_t n_bytes):
    """Set the most bytes a first pass may have read for the FI second pass after it to walk
    its items last to first; returns the old one."""
    global descend_max_bytes
    old, descend_max_bytes = descend_max_bytes, n_bytes
    return old


def set_cross_block_bytes(Py_ssize_t n_bytes):
    """Set the bytes of the two input tiles of a segment of the backward's crosswise
    passes; returns the old setting."""
    global cross_block_bytes
    old, cross_block_bytes = cross_block_bytes, n_bytes
    return old


def set_cross_rows_out(bint crosswise):
    """Set whether elementwise outputs by rows beside an input by features go crosswise
    rather than through the stage; returns the old setting."""
    global cross_rows_out
    old, cross_rows_out = cross_rows_out, crosswise
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


include "_kernels_walk.pxi"
include "_kernels_loops.pxi"
include "_kernels_moments.pxi"
include "_kernels_normalize.pxi"
include "_kernels_backward.pxi"
include "_kernels_fused.pxi"


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
