/* Register-blocked reductions over rows of contiguous features (the FI loop order).
 *
 * A plain loop `acc[j] += x[r][j]` reloads and stores every accumulator for every row, so
 * short rows (64 channels of NHWC) are bound by stores. Here strips of up to 64 features
 * keep their double accumulators in vector registers across all rows of a block, and the
 * rows stream past them. GCC/Clang vector extensions of 8 doubles: one AVX-512 register
 * where the build has them, with accumulators held as register-wide parts elsewhere
 * (cbn_acc), the same arithmetic everywhere.
 */
#ifndef CBN_SIMD_H
#define CBN_SIMD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef double cbn_v8d __attribute__((vector_size(64)));

typedef float cbn_v8f __attribute__((vector_size(32)));

/* Sums carried from one loop iteration to the next. GCC keeps a loop-carried vector wider
 * than the target's registers (a cbn_v8d on AVX2 or SSE) in memory, moved in 16-byte pieces
 * through general registers at every addition: the statistics ran 3-6x slower on the avx2
 * level than on avx512. So an accumulator is held as register-wide parts, each adding its own
 * lanes: the same additions, hence the same bits, on every level. */
#if defined(__AVX512F__)
#define CBN_REGISTER_BYTES 64
#elif defined(__AVX__)
#define CBN_REGISTER_BYTES 32
#else
#define CBN_REGISTER_BYTES 16
#endif
#define CBN_PARTS (64 / CBN_REGISTER_BYTES)
typedef double cbn_vreg __attribute__((vector_size(CBN_REGISTER_BYTES)));
typedef struct { cbn_vreg part[CBN_PARTS]; } cbn_acc;

static inline void cbn_acc_zero(cbn_acc *a, int n) {
    const cbn_vreg zero = {0};
    for (int q = 0; q < n; q++)
        for (int k = 0; k < CBN_PARTS; k++) a[q].part[k] = zero;
}

static inline void cbn_acc_add(cbn_acc *a, cbn_v8d v) {
    cbn_vreg p[CBN_PARTS];
    memcpy(p, &v, sizeof v);
    for (int k = 0; k < CBN_PARTS; k++) a->part[k] += p[k];
}

/* Features per register-held strip: 64 (8 vectors of 8 doubles) covers a whole NHWC row of
 * 64 channels, so rows stream by in order; two sums and the shift take 24 of AVX-512's 32
 * registers. AVX2 has 16 registers of half the width: some sums then live in L1, which cost
 * less than 16-feature strips that walk each block of rows four times (NHWC statistics at the
 * avx2 level: 1.1-1.15x the avx512 time against 2.3x). SSE has a quarter of the width, and
 * 8-feature strips. A feature's sum runs over the rows in the same order whatever the strip. */
#if defined(__AVX__)
#define CBN_VECTORS 8
#else
#define CBN_VECTORS 1
#endif
#define CBN_STRIP (8 * CBN_VECTORS)

/* Eight floats widened to doubles and back. With AVX-512 each is one instruction; GCC
 * splits __builtin_convertvector into halves and shuffles (5 instructions instead of 1 per
 * 8 elements, in loops bound by instruction throughput). The same values either way. */
#ifdef __AVX512F__
#include <immintrin.h>
static inline cbn_v8d cbn_load_f32(const float *p) {
    return (cbn_v8d)_mm512_cvtps_pd(_mm256_loadu_ps(p));
}
static inline cbn_v8f cbn_narrow(cbn_v8d v) { return (cbn_v8f)_mm512_cvtpd_ps((__m512d)v); }
#else
static inline cbn_v8d cbn_load_f32(const float *p) {
    cbn_v8f v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, cbn_v8d);
}
static inline cbn_v8f cbn_narrow(cbn_v8d v) { return __builtin_convertvector(v, cbn_v8f); }
#endif

static inline void cbn_store_f32(float *p, cbn_v8d v) {
    cbn_v8f f = cbn_narrow(v);
    memcpy(p, &f, sizeof f);
}

static inline cbn_v8d cbn_load_f64(const double *p) {
    cbn_v8d v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void cbn_store_f64(double *p, cbn_v8d v) {
    memcpy(p, &v, sizeof v);
}

/* Eight values of T as doubles, and back (for double: themselves), one instruction each
 * with AVX-512 as above. */
#ifdef __AVX512F__
static inline cbn_v8d cbn_widen_f32(cbn_v8f v) { return (cbn_v8d)_mm512_cvtps_pd((__m256)v); }
#else
static inline cbn_v8d cbn_widen_f32(cbn_v8f v) { return __builtin_convertvector(v, cbn_v8d); }
#endif
static inline cbn_v8f cbn_narrow_f32(cbn_v8d v) { return cbn_narrow(v); }
static inline cbn_v8d cbn_widen_f64(cbn_v8d v) { return v; }
static inline cbn_v8d cbn_narrow_f64(cbn_v8d v) { return v; }

static inline void cbn_add_to(double *target, const cbn_acc *a) {
    for (int k = 0; k < CBN_PARTS; k++) {
        cbn_vreg t;
        memcpy(&t, target + k * (CBN_REGISTER_BYTES / 8), sizeof t);
        t += a->part[k];
        memcpy(target + k * (CBN_REGISTER_BYTES / 8), &t, sizeof t);
    }
}

/* The strips run at the register width, then at 32 features where that is narrower than the
 * full strip (AVX-512: rows of 32-63 channels), then at 8: each strip reads the rows once,
 * so a row narrower than the widest strip is not streamed once per 8 features. */
#define CBN_HALF_STRIP (CBN_VECTORS > 4)

/* One strip of NV vectors of features (j to j + 8 NV) over all the rows r: a[q] += u and
 * b[q] += u * (V), where u is U, both 8 values of row r from feature j + 8 q on (q the
 * vector; c[q] holds CONSTANT's 8 values there), added to OUT_A and OUT_B at the end. The
 * loop over the vectors is unrolled on purpose: with _activation.h's dz as U, GCC left it
 * rolled and kept the accumulators in memory (the fused NHWC sums took 1.7x the plain ones). */
#define CBN_STRIP_SUMS(NV, CONSTANT, U, V, OUT_A, OUT_B)                                     \
    {                                                                                        \
        cbn_v8d c[NV];                                                                       \
        cbn_acc a[NV], b[NV];                                                                \
        cbn_acc_zero(a, NV);                                                                 \
        cbn_acc_zero(b, NV);                                                                 \
        for (q = 0; q < NV; q++) c[q] = cbn_load_f64(CONSTANT + j + 8 * q);                  \
        for (r = 0; r < n_rows; r++)                                                         \
            _Pragma("GCC unroll 8")                                                          \
            for (q = 0; q < NV; q++) {                                                       \
                cbn_v8d u = U;                                                               \
                cbn_acc_add(&a[q], u);                                                       \
                cbn_acc_add(&b[q], u * (V));                                                 \
            }                                                                                \
        for (q = 0; q < NV; q++) {                                                           \
            cbn_add_to(OUT_A + j + 8 * q, &a[q]);                                            \
            cbn_add_to(OUT_B + j + 8 * q, &b[q]);                                            \
        }                                                                                    \
    }

/* The statistics' strip: u = x - shift, V = u. */
#define CBN_SHIFTED_STRIP(S, NV)                                                             \
    CBN_STRIP_SUMS(NV, shift, cbn_load_##S(p + r * row_stride + j + 8 * q) - c[q], u,        \
                   s1, s2)

/* s1[j] += sum_r (x[r][j] - shift[j]) and s2[j] += sum_r (x[r][j] - shift[j])^2, rows
 * r < n_rows at p + r * row_stride (in elements), features j < width contiguous. */
#define CBN_DEFINE_SHIFTED_SUMS(T, S)                                                        \
static void cbn_shifted_sums_##S(const T *p, int64_t row_stride, int64_t n_rows,             \
                                 int64_t width, const double *shift, double *s1,             \
                                 double *s2) {                                               \
    int64_t j = 0, r, q;                                                                     \
    for (; j + CBN_STRIP <= width; j += CBN_STRIP) CBN_SHIFTED_STRIP(S, CBN_VECTORS)         \
    for (; CBN_HALF_STRIP && j + 32 <= width; j += 32) CBN_SHIFTED_STRIP(S, 4)               \
    for (; j + 8 <= width; j += 8) CBN_SHIFTED_STRIP(S, 1)                                   \
    for (; j < width; j++) {                                                                 \
        double a = 0.0, b = 0.0, d;                                                          \
        for (r = 0; r < n_rows; r++) {                                                       \
            d = p[r * row_stride + j] - shift[j];                                            \
            a += d;                                                                          \
            b += d * d;                                                                      \
        }                                                                                    \
        s1[j] += a;                                                                          \
        s2[j] += b;                                                                          \
    }                                                                                        \
}

/* sum_dy[j] += sum_r dy[r][j] and sum_dy_xc[j] += sum_r dy[r][j] * (x[r][j] - mean[j]).
 * The body reads dy only through DY(S, r, k) (8 values of row r from feature k on, as
 * doubles) and DY1(S, r, k) (one), so that _activation.h sums dz = dy * act'(z) formed in
 * registers with the same loops, hence bitwise alike. */
#define CBN_GRADIENT_STRIP(S, DY, NV)                                                        \
    CBN_STRIP_SUMS(NV, mean, DY(S, r, j + 8 * q),                                            \
                   cbn_load_##S(x + r * x_row_stride + j + 8 * q) - c[q], sum_dy, sum_dy_xc)

#define CBN_GRADIENT_SUMS_BODY(T, S, DY, DY1)                                                \
    int64_t j = 0, r, q;                                                                     \
    for (; j + CBN_STRIP <= width; j += CBN_STRIP) CBN_GRADIENT_STRIP(S, DY, CBN_VECTORS)    \
    for (; CBN_HALF_STRIP && j + 32 <= width; j += 32) CBN_GRADIENT_STRIP(S, DY, 4)          \
    for (; j + 8 <= width; j += 8) CBN_GRADIENT_STRIP(S, DY, 1)                              \
    for (; j < width; j++) {                                                                 \
        double a = 0.0, b = 0.0, g;                                                          \
        for (r = 0; r < n_rows; r++) {                                                       \
            g = DY1(S, r, j);                                                                \
            a += g;                                                                          \
            b += g * (x[r * x_row_stride + j] - mean[j]);                                    \
        }                                                                                    \
        sum_dy[j] += a;                                                                      \
        sum_dy_xc[j] += b;                                                                   \
    }

#define CBN_DY(S, r, k) cbn_load_##S(dy + (r) * dy_row_stride + (k))
#define CBN_DY1(S, r, k) dy[(r) * dy_row_stride + (k)]
#define CBN_DEFINE_GRADIENT_SUMS(T, S)                                                       \
static void cbn_gradient_sums_##S(const T *dy, int64_t dy_row_stride, const T *x,            \
                                  int64_t x_row_stride, int64_t n_rows, int64_t width,       \
                                  const double *mean, double *sum_dy, double *sum_dy_xc) {   \
    CBN_GRADIENT_SUMS_BODY(T, S, CBN_DY, CBN_DY1)                                            \
}

/* The same two reductions along one contiguous run of n values of a single feature (the RI
 * loop order), or along n_rows such runs in turn (NEXT_ROW moves the pointers to the next;
 * a row group's tile): A OP sum_i u and B OP sum_i u * (V), u being U (8 values from i on)
 * or U1 (the value at i) and V or V1 beside it (c holds CONSTANT in every lane). Four vector
 * accumulators per sum keep the additions independent; a tile's rows share them, so that
 * they are reduced once per tile, not once per short row. A run's last 8-31 values go
 * through the vectors too, each 8 into its own accumulator: NCHW's short planes (7x7 is 32
 * + 17) spent most of their time in the scalar chain of that remainder. */
#define CBN_ROWS_SUMS(N_ROWS, NEXT_ROW, CONSTANT, U, V, U1, V1, A, B, OP)                    \
    cbn_v8d c = {0};                                                                         \
    cbn_acc a[4], b[4];                                                                      \
    int64_t i, q, row;                                                                       \
    double ta = 0.0, tb = 0.0;                                                               \
    cbn_acc_zero(a, 4);                                                                      \
    cbn_acc_zero(b, 4);                                                                      \
    c += CONSTANT;                                                                           \
    for (row = 0; row < (N_ROWS); row++, NEXT_ROW) {                                         \
        for (i = 0; i + 32 <= n; i += 32)                                                    \
            _Pragma("GCC unroll 4")                                                          \
            for (q = 0; q < 4; q++) {                                                        \
                cbn_v8d u = U;                                                               \
                cbn_acc_add(&a[q], u);                                                       \
                cbn_acc_add(&b[q], u * (V));                                                 \
            }                                                                                \
        for (q = 0; i + 8 * q + 8 <= n; q++) {                                               \
            cbn_v8d u = U;                                                                   \
            cbn_acc_add(&a[q], u);                                                           \
            cbn_acc_add(&b[q], u * (V));                                                     \
        }                                                                                    \
        for (i += 8 * q; i < n; i++) {                                                       \
            double u = U1;                                                                   \
            ta += u;                                                                         \
            tb += u * (V1);                                                                  \
        }                                                                                    \
    }                                                                                        \
    *(A) OP cbn_reduce(a) + ta;                                                              \
    *(B) OP cbn_reduce(b) + tb;
#define CBN_RUN_SUMS(CONSTANT, U, V, U1, V1, A, B, OP)                                       \
    CBN_ROWS_SUMS(1, (void)0, CONSTANT, U, V, U1, V1, A, B, OP)

/* The gradient sums along a run (or n_rows runs): dy is read through DY(S, i) and
 * DY1(S, i), as in CBN_GRADIENT_SUMS_BODY. */
#define CBN_GRADIENT_ROWS_BODY(T, S, DY, DY1, N_ROWS, NEXT_ROW)                              \
    CBN_ROWS_SUMS(N_ROWS, NEXT_ROW, mean, DY(S, i + 8 * q), cbn_load_##S(x + i + 8 * q) - c, \
                  DY1(S, i), x[i] - mean, sum_dy, sum_dy_xc, +=)
#define CBN_GRADIENT_RUN_BODY(T, S, DY, DY1) CBN_GRADIENT_ROWS_BODY(T, S, DY, DY1, 1, (void)0)

#define CBN_DY_RUN(S, i) cbn_load_##S(dy + (i))
#define CBN_DY1_RUN(S, i) dy[i]
/* The tiles of runs whose starts are given by offset tables (rows of any layout, row r
 * at base + rows[r]); the next row's pointers are only formed while there is one. */
#define CBN_NEXT_ROWS (row < n_rows ? (dy = dy_base + dy_rows[row], x = x_base + x_rows[row]) : x)
/* A reversed run (step -1: a reversed axis beside a forward one) is loaded as the 8
 * elements below p and its lanes reversed, one permute: gathered an element at a time, the
 * backward of NCHW float32 with x's W reversed beside a C-ordered dy spent a third of its
 * time in the sums' gathers. The lanes hold the same values either way. */
typedef int32_t cbn_v8i32 __attribute__((vector_size(32)));
typedef int64_t cbn_v8i __attribute__((vector_size(64)));
#ifdef __clang__
#define CBN_REVERSE8(v, INDEX) __builtin_shufflevector(v, v, 7, 6, 5, 4, 3, 2, 1, 0)
#else
#define CBN_REVERSE8(v, INDEX) __builtin_shuffle(v, (INDEX){7, 6, 5, 4, 3, 2, 1, 0})
#endif
static inline cbn_v8f cbn_reverse_v8f(cbn_v8f v) { return CBN_REVERSE8(v, cbn_v8i32); }
static inline cbn_v8d cbn_reverse_v8d(cbn_v8d v) { return CBN_REVERSE8(v, cbn_v8i); }
static inline cbn_v8d cbn_reversed_f32(const float *p) {
    cbn_v8f v;
    memcpy(&v, p, sizeof v);
    return cbn_widen_f32(cbn_reverse_v8f(v));
}
static inline cbn_v8d cbn_reversed_f64(const double *p) {
    return cbn_reverse_v8d(cbn_load_f64(p));
}
/* Runs whose elements are step apart (not 1: every other column, a reversed axis beside a
 * forward one): the same vector loops, each vector's 8 elements gathered (cbn_gather), so
 * the same order as a contiguous run's. Summed element by element instead, each sum waited
 * on the last (4 cycles an add): NCHW (32,64,56,56) float32 with every other W, one thread,
 * took 5.5x the C-ordered statistics and 6.9x its backward. */
/* cbn_stepped: the 8 elements from p, step apart, by a load where step is 1, a load and a
 * permute where it is -1, else gathered. Its callers are specialized (CBN_BY_STEPS) so that
 * the steps are constants in the loops, or general (the gather alone): with the tests on
 * the steps inside the loop GCC kept the sums' accumulators in memory. A contiguous run's
 * sums are the steps 1, 1 case: the same loop. */
#define CBN_DEFINE_GATHER(T, S)                                                              \
static inline cbn_v8d cbn_gather_##S(const T *p, int64_t step) {                             \
    cbn_v8d v;                                                                               \
    for (int k = 0; k < 8; k++) v[k] = p[k * step];                                          \
    return v;                                                                                \
}                                                                                            \
static inline __attribute__((always_inline)) cbn_v8d cbn_stepped_##S(const T *p, int64_t step, \
                                                                    int general) {           \
    if (!general && step == 1) return cbn_load_##S(p);                                       \
    if (!general && step == -1) return cbn_reversed_##S(p - 7);                              \
    return cbn_gather_##S(p, step);                                                          \
}
CBN_DEFINE_GATHER(float, f32)
CBN_DEFINE_GATHER(double, f64)
/* CALL(steps..., general) with each of the given steps (of runs of adjacent elements, ±1,
 * not all 1) a constant, or the general case. */
#define CBN_UNIT(a) ((a) == 1 || (a) == -1)
#define CBN_BY_STEPS2(CALL, A, B)                                                            \
    if ((A) == 1 && (B) == -1) CALL(1, -1, 0);                                               \
    else if ((A) == -1 && (B) == 1) CALL(-1, 1, 0);                                          \
    else if ((A) == 1 && (B) == 1) CALL(1, 1, 0);                                            \
    else CALL(A, B, 1);
#define CBN_BY_STEPS3(CALL, A, B, C)                                                         \
    if (CBN_UNIT(A) && CBN_UNIT(B) && CBN_UNIT(C)) {                                         \
        if ((A) == 1) { CBN_BY_STEPS3_REST(CALL, 1, B, C) }                                  \
        else { CBN_BY_STEPS3_REST(CALL, -1, B, C) }                                          \
    } else CALL(A, B, C, 1);
#define CBN_BY_STEPS3_REST(CALL, A, B, C)                                                    \
    if ((B) == 1 && (C) == 1) CALL(A, 1, 1, 0);                                              \
    else if ((B) == 1) CALL(A, 1, -1, 0);                                                    \
    else if ((C) == 1) CALL(A, -1, 1, 0);                                                    \
    else CALL(A, -1, -1, 0);
#define CBN_GRADIENT_STEPS_BODY(T, S, DY, DY1, N_ROWS, NEXT_ROW)                             \
    CBN_ROWS_SUMS(N_ROWS, NEXT_ROW, mean, DY(S, i + 8 * q),                                  \
                  cbn_stepped_##S(x + (i + 8 * q) * x_step, x_step, general) - c, DY1(S, i), \
                  x[(i) * x_step] - mean, sum_dy, sum_dy_xc, +=)
#define CBN_DY_STEPS(S, i) cbn_stepped_##S(dy + (i) * dy_step, dy_step, general)
#define CBN_DY1_STEPS(S, i) dy[(i) * dy_step]
#define CBN_SUMS_STEPS_f32(A, B, G) cbn_gradient_sums_steps_k_f32(dy, A, dy_row_step, x, B,    \
    x_row_step, n_rows, n, mean, sum_dy, sum_dy_xc, G)
#define CBN_SUMS_STEPS_f64(A, B, G) cbn_gradient_sums_steps_k_f64(dy, A, dy_row_step, x, B,    \
    x_row_step, n_rows, n, mean, sum_dy, sum_dy_xc, G)
#define CBN_DEFINE_RUN_SUMS(T, S)                                                            \
static void cbn_shifted_sums_run_##S(const T *p, int64_t n, double shift, double *s1,        \
                                     double *s2) {                                           \
    CBN_RUN_SUMS(shift, cbn_load_##S(p + i + 8 * q) - c, u, p[i] - shift, u, s1, s2, =)      \
}                                                                                           \
static void cbn_shifted_sums_steps_##S(const T *p, int64_t step, int64_t n, double shift,    \
                                       double *s1, double *s2) {                             \
    CBN_RUN_SUMS(shift, cbn_gather_##S(p + (i + 8 * q) * step, step) - c, u,                 \
                 p[i * step] - shift, u, s1, s2, =)                                          \
}                                                                                           \
static inline __attribute__((always_inline)) void cbn_gradient_sums_steps_k_##S(             \
        const T *dy, int64_t dy_step, int64_t dy_row_step, const T *x, int64_t x_step,       \
        int64_t x_row_step, int64_t n_rows, int64_t n, double mean, double *sum_dy,          \
        double *sum_dy_xc, int general) {                                                    \
    CBN_GRADIENT_STEPS_BODY(T, S, CBN_DY_STEPS, CBN_DY1_STEPS, n_rows,                       \
                            (dy += dy_row_step, x += x_row_step))                            \
}                                                                                           \
/* n_rows runs (dy_row_step and x_row_step apart) of n elements dy_step and x_step apart,   \
 * into one set of accumulators, reduced once (a tile's runs, or one run). */              \
static void cbn_gradient_sums_steps_##S(const T *dy, int64_t dy_step, int64_t dy_row_step,   \
                                        const T *x, int64_t x_step, int64_t x_row_step,      \
                                        int64_t n_rows, int64_t n, double mean,              \
                                        double *sum_dy, double *sum_dy_xc) {                 \
    CBN_BY_STEPS2(CBN_SUMS_STEPS_##S, dy_step, x_step)                                       \
}                                                                                           \
static void cbn_shifted_sums_rows_##S(const T *base, const int64_t *rows, int64_t n_rows,    \
                                      int64_t n, double shift, double *s1, double *s2) {     \
    const T *p = base + rows[0];                                                             \
    CBN_ROWS_SUMS(n_rows, (row < n_rows ? (p = base + rows[row]) : p), shift,                \
                  cbn_load_##S(p + i + 8 * q) - c, u, p[i] - shift, u, s1, s2, =)            \
}                                                                                           \
static void cbn_gradient_sums_rows_##S(const T *dy_base, const int64_t *dy_rows,            \
                                       const T *x_base, const int64_t *x_rows,              \
                                       int64_t n_rows, int64_t n, double mean,              \
                                       double *sum_dy, double *sum_dy_xc) {                 \
    const T *dy = dy_base + dy_rows[0], *x = x_base + x_rows[0];                             \
    CBN_GRADIENT_ROWS_BODY(T, S, CBN_DY_RUN, CBN_DY1_RUN, n_rows, CBN_NEXT_ROWS)             \
}

/* Sum of four vectors' lanes in a fixed order. */
static inline double cbn_reduce(const cbn_acc *v) {
    double t[8];
    for (int k = 0; k < CBN_PARTS; k++) {
        cbn_vreg part = (v[0].part[k] + v[1].part[k]) + (v[2].part[k] + v[3].part[k]);
        memcpy(t + k * (CBN_REGISTER_BYTES / 8), &part, sizeof part);
    }
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

CBN_DEFINE_RUN_SUMS(float, f32)
CBN_DEFINE_RUN_SUMS(double, f64)
CBN_DEFINE_SHIFTED_SUMS(float, f32)
CBN_DEFINE_SHIFTED_SUMS(double, f64)
CBN_DEFINE_GRADIENT_SUMS(float, f32)
CBN_DEFINE_GRADIENT_SUMS(double, f64)

/* Streaming (non-temporal) stores for outputs much larger than the caches: the output is not
 * read back soon, so fetching each line into the cache before writing it (what an ordinary
 * store does) only costs memory bandwidth; oneDNN does the same for large tensors. A thread
 * calls cbn_store_fence() after its streaming stores. Without SSE2: ordinary stores. */
#ifdef __AVX__
#include <immintrin.h>
#define CBN_LINE_ALIGNED(p) (((uintptr_t)(p) & 63) == 0)
static inline void cbn_stream_f32(float *p, cbn_v8d v) {
    _mm256_stream_ps(p, (__m256)cbn_narrow(v));
}
static inline void cbn_stream_f64(double *p, cbn_v8d v) {
    __m256d half[2];
    memcpy(half, &v, sizeof v);
    _mm256_stream_pd(p, half[0]);
    _mm256_stream_pd(p + 4, half[1]);
}
static inline void cbn_store_fence(void) { _mm_sfence(); }
#elif defined(__SSE2__)     /* x86-64 without AVX: the baseline level */
#include <emmintrin.h>
#define CBN_LINE_ALIGNED(p) (((uintptr_t)(p) & 63) == 0)
static inline void cbn_stream_f32(float *p, cbn_v8d v) {
    __m128 quarter[2];
    cbn_v8f f = __builtin_convertvector(v, cbn_v8f);
    memcpy(quarter, &f, sizeof f);
    _mm_stream_ps(p, quarter[0]);
    _mm_stream_ps(p + 4, quarter[1]);
}
static inline void cbn_stream_f64(double *p, cbn_v8d v) {
    __m128d quarter[4];
    memcpy(quarter, &v, sizeof v);
    for (int q = 0; q < 4; q++) _mm_stream_pd(p + 2 * q, quarter[q]);
}
static inline void cbn_store_fence(void) { _mm_sfence(); }
#else
#define CBN_LINE_ALIGNED(p) 1
static inline void cbn_stream_f32(float *p, cbn_v8d v) { cbn_store_f32(p, v); }
static inline void cbn_stream_f64(double *p, cbn_v8d v) { cbn_store_f64(p, v); }
static inline void cbn_store_fence(void) {}
#endif

/* Where streaming stores write. A streamed vector that shares its cache line with ordinary
 * stores (a run's last half line, the next run's head) leaves the line's write-combining
 * buffer partly filled, and the core then writes it out piecemeal; a run's unaligned ends
 * take element by element. NCHW (10240,64,7,7) float32 from memory, one thread, each
 * 196-byte plane streamed on its own: the forward into out= took 166 ms against 19.2 ms
 * with no streaming; with only each plane's whole lines streamed, inference still took
 * 1.45x as long as with none (14 x 14 planes, 12 lines: 1.7x), while 55 x 55 planes (189
 * lines) gained 1.27x and dense columns of 8192 float32 (512 lines, 16 bytes into a line as
 * NumPy's large arrays are) gained too. So a run streams if it is whole lines
 * (cbn_whole_lines) or at least CBN_STREAM_RUN_BYTES long, its two shared lines then at
 * most 1/32 of it (cbn_run_streams); it and any span of many lines (a chunk of back-to-back
 * rows, an image's back-to-back planes) stream their whole lines, their ends take ordinary
 * stores ([*head, *body_end) of n elements). */
#define CBN_STREAM_RUN_BYTES (64 * 64)
static inline int cbn_whole_lines(const void *out, int64_t bytes) {
    return ((uintptr_t)out & 63) == 0 && bytes % 64 == 0;
}

static inline int cbn_run_streams(const void *out, int64_t bytes) {
    return cbn_whole_lines(out, bytes) || bytes >= CBN_STREAM_RUN_BYTES;
}

static inline void cbn_streamed_features(const void *out, int64_t itemsize, int64_t n,
                                         int stream, int64_t *head, int64_t *body_end) {
    int64_t line = 64 / itemsize;
    if (!stream) {
        *head = 0;
        *body_end = n;
        return;
    }
    *head = ((64 - (int64_t)((uintptr_t)out & 63)) & 63) / itemsize;
    if (*head > n) *head = n;
    *body_end = *head + (n - *head) / line * line;
}

/* Where a run or span of n outputs from out that streams (stream: the caller's decision)
 * takes its streaming stores: from *head (its first line start) up to the returned end, its
 * last whole line; 0 where it does not stream. */
static inline int64_t cbn_stream_end(const void *out, int64_t itemsize, int64_t n, int stream,
                                     int64_t *head) {
    int64_t body_end;
    cbn_streamed_features(out, itemsize, n, stream, head, &body_end);
    return stream ? body_end : 0;
}

static inline void cbn_put_f32(float *p, cbn_v8d v, int stream) {
    if (stream) cbn_stream_f32(p, v);
    else cbn_store_f32(p, v);
}
static inline void cbn_put_f64(double *p, cbn_v8d v, int stream) {
    if (stream) cbn_stream_f64(p, v);
    else cbn_store_f64(p, v);
}

/* dst[c * dst_stride + r] = src[r * src_stride + c] for r < n_r, c < n_c: a tile of an
 * operand laid out the other way round from its neighbours, copied within the caches
 * (cbn_kernels' stage_rows). With AVX, blocks of 8x8 floats or 4x4 doubles are transposed
 * in registers, so both sides move whole vectors. */
#ifdef __AVX__
static inline void cbn_transpose_regs_f32(__m256 r[8]) {
    __m256 t[8], u[8];
    int q;
    for (q = 0; q < 8; q += 2) {
        t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
        t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
    }
    for (q = 0; q < 8; q += 4) {
        u[q] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (q = 0; q < 4; q++) {
        r[q] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x20);
        r[q + 4] = _mm256_permute2f128_ps(u[q], u[q + 4], 0x31);
    }
}
static inline void cbn_transpose_store_f32(__m256 r[8], float *dst, int64_t dst_stride) {
    cbn_transpose_regs_f32(r);
    for (int q = 0; q < 8; q++) _mm256_storeu_ps(dst + q * dst_stride, r[q]);
}
static inline void cbn_transpose_block_f32(const float *src, int64_t src_stride, float *dst,
                                           int64_t dst_stride, const cbn_v8d *affine) {
    __m256 r[8];
    int q;
    for (q = 0; q < 8; q++)
        r[q] = affine == NULL ? _mm256_loadu_ps(src + q * src_stride)
               : (__m256)cbn_narrow((cbn_load_f32(src + q * src_stride) - affine[0])
                                    * affine[1] + affine[2]);
    cbn_transpose_store_f32(r, dst, dst_stride);
}
static inline void cbn_transpose_regs_f64(__m256d r[4]) {
    __m256d t[4];
    int q;
    for (q = 0; q < 4; q += 2) {
        t[q] = _mm256_unpacklo_pd(r[q], r[q + 1]);
        t[q + 1] = _mm256_unpackhi_pd(r[q], r[q + 1]);
    }
    for (q = 0; q < 2; q++) {
        r[q] = _mm256_permute2f128_pd(t[q], t[q + 2], 0x20);
        r[q + 2] = _mm256_permute2f128_pd(t[q], t[q + 2], 0x31);
    }
}
static inline void cbn_transpose_block_f64(const double *src, int64_t src_stride, double *dst,
                                           int64_t dst_stride, const cbn_v8d *affine) {
    __m256d r[4];
    int q;
    for (q = 0; q < 4; q++) {
        r[q] = _mm256_loadu_pd(src + q * src_stride);
        if (affine != NULL)
            r[q] = (r[q] - _mm256_set1_pd(affine[0][0])) * _mm256_set1_pd(affine[1][0])
                   + _mm256_set1_pd(affine[2][0]);
    }
    cbn_transpose_regs_f64(r);
    for (q = 0; q < 4; q++) _mm256_storeu_pd(dst + q * dst_stride, r[q]);
}
#define CBN_TRANSPOSE_BLOCKS(S, B)                                                           \
    n_rb = n_r - n_r % B;                                                                    \
    n_cb = n_c - n_c % B;                                                                    \
    int64_t r0, c0;                                                                          \
    if (llabs(dst_stride) > llabs(src_stride)) {                                             \
        for (c0 = 0; c0 < n_cb; c0 += B)                                                     \
            for (r0 = 0; r0 < n_rb; r0 += B)                                                 \
                cbn_transpose_block_##S(src + r0 * src_stride + c0, src_stride,              \
                                        dst + c0 * dst_stride + r0, dst_stride, av);         \
    } else {                                                                                 \
        for (r0 = 0; r0 < n_rb; r0 += B)                                                     \
            for (c0 = 0; c0 < n_cb; c0 += B)                                                 \
                cbn_transpose_block_##S(src + r0 * src_stride + c0, src_stride,              \
                                        dst + c0 * dst_stride + r0, dst_stride, av);         \
    }
#else
#define CBN_TRANSPOSE_BLOCKS(S, B)
#endif

/* The blocks run along the side whose rows are far apart (a whole array apart, often a
 * multiple of 4 KiB, so that they share the L1's sets): B of its rows at a time, each
 * finished before the next B, since more than the L1's 8 ways of such rows would evict
 * each other's lines between the blocks that fill them. With affine (the mean, scale and
 * shift of one feature, broadcast), the values are normalized on the way, each
 * rounded as normalize_run rounds it: a row group's tile goes from one operand to the other
 * in one pass instead of through a buffer. */
#define CBN_DEFINE_TRANSPOSE(T, S, B)                                                        \
static void cbn_transpose_##S(const T *src, int64_t src_stride, int64_t n_r, int64_t n_c,    \
                              T *dst, int64_t dst_stride, const double *affine) {            \
    int64_t n_rb = 0, n_cb = 0, r, c;                                                        \
    cbn_v8d broadcast[3];                                                                    \
    const cbn_v8d *av = affine == NULL ? NULL : broadcast;                                   \
    for (r = 0; r < 3 && affine != NULL; r++) broadcast[r] = (cbn_v8d){0} + affine[r];       \
    (void)av;                                                                                \
    CBN_TRANSPOSE_BLOCKS(S, B)                                                               \
    for (r = 0; r < n_r; r++)                                                                \
        for (c = r < n_rb ? n_cb : 0; c < n_c; c++)                                          \
            dst[c * dst_stride + r] = affine == NULL ? src[r * src_stride + c]               \
                : (T)((src[r * src_stride + c] - affine[0]) * affine[1] + affine[2]);        \
}

CBN_DEFINE_TRANSPOSE(float, f32, 8)
CBN_DEFINE_TRANSPOSE(double, f64, 4)

/* cbn_transpose without affine, into an output: where stream is set and each of dst's rows
 * (a feature of a staged output beside rows of adjacent features: dense x beside a
 * Fortran-ordered out=) is whole 64-byte lines, the lines are written with streaming
 * stores, each one whole by two consecutive stores (two 8x8 float or 4x4 double blocks
 * transposed in registers: 16 or 8 rows of 8 or 4 features), so that no line is read
 * first and none waits in a write-combining buffer for its other half; features beyond
 * the blocks take ordinary stores (lines of their own). Ordinary stores read every line
 * of such a tile first, each a separate miss: a run's pieces are far apart, too many for
 * the prefetchers to follow. */
#ifdef __AVX__
#define CBN_DEFINE_TRANSPOSE_OUT(T, S, B, LOAD, STREAM, REGS, V)                             \
static void cbn_transpose_out_##S(const T *src, int64_t src_stride, int64_t n_r,            \
                                  int64_t n_c, T *dst, int64_t dst_stride, int stream) {     \
    int64_t r0, c0, q;                                                                       \
    V a[B], b[B];                                                                            \
    if (!stream || !CBN_LINE_ALIGNED(dst) || (dst_stride * sizeof(T)) % 64 != 0             \
        || (n_r * sizeof(T)) % 64 != 0) {                                                    \
        cbn_transpose_##S(src, src_stride, n_r, n_c, dst, dst_stride, NULL);                 \
        return;                                                                              \
    }                                                                                        \
    for (c0 = 0; c0 + B <= n_c; c0 += B)                                                     \
        for (r0 = 0; r0 < n_r; r0 += 2 * B) {                                                \
            for (q = 0; q < B; q++) {                                                        \
                a[q] = LOAD(src + (r0 + q) * src_stride + c0);                               \
                b[q] = LOAD(src + (r0 + B + q) * src_stride + c0);                           \
            }                                                                                \
            REGS(a);                                                                         \
            REGS(b);                                                                         \
            for (q = 0; q < B; q++) {                                                        \
                STREAM(dst + (c0 + q) * dst_stride + r0, a[q]);                              \
                STREAM(dst + (c0 + q) * dst_stride + r0 + B, b[q]);                          \
            }                                                                                \
        }                                                                                    \
    if (c0 < n_c)                                                                            \
        cbn_transpose_##S(src + c0, src_stride, n_r, n_c - c0, dst + c0 * dst_stride,       \
                          dst_stride, NULL);                                                 \
}
CBN_DEFINE_TRANSPOSE_OUT(float, f32, 8, _mm256_loadu_ps, _mm256_stream_ps,
                         cbn_transpose_regs_f32, __m256)
CBN_DEFINE_TRANSPOSE_OUT(double, f64, 4, _mm256_loadu_pd, _mm256_stream_pd,
                         cbn_transpose_regs_f64, __m256d)
#else
static void cbn_transpose_out_f32(const float *src, int64_t src_stride, int64_t n_r,
                                  int64_t n_c, float *dst, int64_t dst_stride, int stream) {
    (void)stream;
    cbn_transpose_f32(src, src_stride, n_r, n_c, dst, dst_stride, NULL);
}
static void cbn_transpose_out_f64(const double *src, int64_t src_stride, int64_t n_r,
                                  int64_t n_c, double *dst, int64_t dst_stride, int stream) {
    (void)stream;
    cbn_transpose_f64(src, src_stride, n_r, n_c, dst, dst_stride, NULL);
}
#endif

/* dst[r * dst_stride + j] = src[r * src_stride + width - 1 - j] for r < n_rows, j < width:
 * rows of features walked backwards (a reversed feature axis, step -1) copied to rows of
 * adjacent features and back (cbn_kernels' stage_rows, unstage_rows). A reversed row is a
 * contiguous run read from its end: with AVX, a vector load and one permute per 8 floats
 * or 4 doubles, where an element at a time took 5x the C-ordered call (NHWC). */
#define CBN_DEFINE_REVERSE_ROWS(T, S, N, REVERSE)                                            \
static void cbn_reverse_rows_##S(const T *src, int64_t src_stride, int64_t n_rows,          \
                                 int64_t width, T *dst, int64_t dst_stride) {                \
    int64_t r, j;                                                                            \
    for (r = 0; r < n_rows; r++) {                                                           \
        const T *end = src + r * src_stride + width; /* the row read backwards from here */ \
        T *row = dst + r * dst_stride;                                                       \
        j = 0;                                                                               \
        REVERSE                                                                              \
        for (; j < width; j++) row[j] = end[-1 - j];                                         \
    }                                                                                        \
}
#ifdef __AVX2__
CBN_DEFINE_REVERSE_ROWS(float, f32, 8,
    for (; j + 8 <= width; j += 8)
        _mm256_storeu_ps(row + j, _mm256_permutevar8x32_ps(
            _mm256_loadu_ps(end - j - 8), _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)));)
CBN_DEFINE_REVERSE_ROWS(double, f64, 4,
    for (; j + 4 <= width; j += 4)
        _mm256_storeu_pd(row + j, _mm256_permute4x64_pd(_mm256_loadu_pd(end - j - 4),
                                                        _MM_SHUFFLE(0, 1, 2, 3)));)
#else
CBN_DEFINE_REVERSE_ROWS(float, f32, 8, )
CBN_DEFINE_REVERSE_ROWS(double, f64, 4, )
#endif

/* Row groups whose two inputs are laid out the other way round from each other (NHWC: x
 * in Fortran order beside a dy stored as NCHW): element (t, i) of a tile is
 * a[t * a_step + i] and b[i * b_step + t]. Each 8x8 block of b is transposed in registers
 * into 64 values on the stack (cbn_block_S, read back at once, from L1) and met there with
 * a's rows; before, b's whole tile went through a buffer and was read again, and runs of
 * fewer than 32 finished one element at a time (3x the matched call's instructions). */
#ifdef __AVX__
static inline void cbn_block_f32(const float *b, int64_t step, float *block) {
    cbn_transpose_block_f32(b, step, block, 8, NULL);
}
static inline void cbn_block_f64(const double *b, int64_t step, double *block) {
    for (int q = 0; q < 4; q++)     /* the four 4x4 blocks */
        cbn_transpose_block_f64(b + 4 * (q / 2) * step + 4 * (q % 2), step,
                                block + 4 * (q % 2) * 8 + 4 * (q / 2), 8, NULL);
}
#else
#define CBN_BLOCK(T, S)                                                                      \
static inline void cbn_block_##S(const T *b, int64_t step, T *block) {                       \
    for (int q = 0; q < 8; q++)                                                              \
        for (int k = 0; k < 8; k++) block[q * 8 + k] = b[k * step + q];                      \
}
CBN_BLOCK(float, f32)
CBN_BLOCK(double, f64)
#endif

/* The tile's whole 8x8 blocks, B their body (t0, i0: the block's first element; dy and x
 * point to row t0 + q of each, 8 values from i0), run along the side whose rows are farther
 * apart, 8 of its rows at a time (as CBN_TRANSPOSE_BLOCKS); then the elements beyond them,
 * one at a time in rows, ONE their body (g and v: dy's and x's value). The block order is
 * the shape's, so the sums' bits are too. dy is a where a_is_dy, else b. */
#define CBN_PAIR_TILE(T, S, B, ONE)                                                          \
    int64_t n_tb = n_rows - n_rows % 8, n_ib = n - n % 8, t0, i0, t, i;                      \
    T block[64];                                                                             \
    int q;                                                                                   \
    if (llabs(b_step) > llabs(a_step)) {                                                     \
        for (i0 = 0; i0 < n_ib; i0 += 8)                                                     \
            for (t0 = 0; t0 < n_tb; t0 += 8) CBN_PAIR_BLOCK(S, B)                            \
    } else {                                                                                 \
        for (t0 = 0; t0 < n_tb; t0 += 8)                                                     \
            for (i0 = 0; i0 < n_ib; i0 += 8) CBN_PAIR_BLOCK(S, B)                            \
    }                                                                                        \
    for (t = 0; t < n_rows; t++)                                                             \
        for (i = t < n_tb ? n_ib : 0; i < n; i++) {                                          \
            double g = a_is_dy ? a[t * a_step + i] : b[i * b_step + t];                      \
            double v = a_is_dy ? b[i * b_step + t] : a[t * a_step + i];                      \
            ONE                                                                              \
        }
#define CBN_PAIR_BLOCK(S, B)                                                                 \
    {                                                                                        \
        cbn_block_##S(b + i0 * b_step + t0, b_step, block);                                  \
        _Pragma("GCC unroll 8")                                                              \
        for (q = 0; q < 8; q++) {                                                            \
            const void *a_row = a + (t0 + q) * a_step + i0, *b_row = block + 8 * q;          \
            const void *dy = a_is_dy ? a_row : b_row, *x = a_is_dy ? b_row : a_row;          \
            B                                                                                \
        }                                                                                    \
    }

/* sum_dy += Σ dy and sum_dy_xc += Σ dy·(x − mean) over the tile, in two vector sums each
 * (a block's rows alternating), reduced once. */
#define CBN_DEFINE_PAIR_SUMS(T, S)                                                           \
static void cbn_gradient_sums_pair_##S(const T *a, int64_t a_step, const T *b,               \
                                       int64_t b_step, int64_t n_rows, int64_t n,            \
                                       int a_is_dy, double mean, double *sum_dy,             \
                                       double *sum_dy_xc) {                                  \
    cbn_acc acc_dy[4], acc_dy_xc[4];                                                         \
    cbn_v8d c = (cbn_v8d){0} + mean;                                                         \
    double tail_dy = 0.0, tail_dy_xc = 0.0;                                                  \
    cbn_acc_zero(acc_dy, 4);                                                                 \
    cbn_acc_zero(acc_dy_xc, 4);                                                              \
    CBN_PAIR_TILE(T, S,                                                                      \
        cbn_v8d u = cbn_load_##S((const T *)dy);                                             \
        cbn_acc_add(&acc_dy[q & 1], u);                                                      \
        cbn_acc_add(&acc_dy_xc[q & 1], u * (cbn_load_##S((const T *)x) - c));,               \
        tail_dy += g;                                                                        \
        tail_dy_xc += g * (v - mean);)                                                       \
    *sum_dy += cbn_reduce(acc_dy) + tail_dy;                                                 \
    *sum_dy_xc += cbn_reduce(acc_dy_xc) + tail_dy_xc;                                        \
}

/* dx = coef_dy·dy + coef_xc·(x − mean) + offset over the tile, dx laid out like a
 * (dx[t * dx_step + i]), each value rounded as input_gradient_run rounds it. */
#define CBN_DEFINE_PAIR_GRADIENT(T, S)                                                       \
static void cbn_input_gradient_pair_##S(const T *a, int64_t a_step, const T *b,              \
                                        int64_t b_step, T *dx, int64_t dx_step,              \
                                        int64_t n_rows, int64_t n, int a_is_dy, double mean, \
                                        double coef_dy, double coef_xc, double offset) {     \
    cbn_v8d m = (cbn_v8d){0} + mean, k_dy = (cbn_v8d){0} + coef_dy;                          \
    cbn_v8d k_xc = (cbn_v8d){0} + coef_xc, k_offset = (cbn_v8d){0} + offset;                 \
    CBN_PAIR_TILE(T, S,                                                                      \
        cbn_store_##S(dx + (t0 + q) * dx_step + i0,                                          \
                      k_dy * cbn_load_##S((const T *)dy)                                     \
                      + k_xc * (cbn_load_##S((const T *)x) - m) + k_offset);,                \
        dx[t * dx_step + i] = (T)(coef_dy * g + coef_xc * (v - mean) + offset);)             \
}

CBN_DEFINE_PAIR_SUMS(float, f32)
CBN_DEFINE_PAIR_SUMS(double, f64)
CBN_DEFINE_PAIR_GRADIENT(float, f32)
CBN_DEFINE_PAIR_GRADIENT(double, f64)

/* Ask for the cache lines of a tile of n_rows x width elements (row_stride, step apart)
 * before it is needed: tiles of operands laid out the other way round are many short
 * segments far apart, which the hardware prefetchers do not follow. */
static void cbn_prefetch_tile(const char *p, int64_t row_stride, int64_t step, int64_t n_rows,
                              int64_t width, int64_t itemsize, int for_writing) {
    int64_t outer, n_outer, n_inner, k;
    const char *q, *last;
    if (step == 1) { outer = row_stride; n_outer = n_rows; n_inner = width; }
    else if (row_stride == 1) { outer = step; n_outer = width; n_inner = n_rows; }
    else return;
    for (k = 0; k < n_outer; k++) {     /* each line of each contiguous piece once */
        q = p + k * outer * itemsize;
        last = q + (n_inner - 1) * itemsize;
        for (q = (const char *)((uintptr_t)q & ~(uintptr_t)63); q <= last; q += 64) {
            if (for_writing) __builtin_prefetch(q, 1, 3);
            else __builtin_prefetch(q, 0, 3);
        }
    }
}

/* A run's per-feature factor as a vector: loaded at i from an array indexed like the run
 * (per_element = 1, a row of features), or one feature's value broadcast once before the
 * loop (cbn_one) and reused. Broadcast inside the loop, a streaming loop's factors were
 * loaded and broadcast again for each 8 elements (the compiler cannot tell the streaming
 * stores from writes to them): 6 more instructions per vector to normalize (8 for dx),
 * which made NCHW inference from memory with streaming stores slower than with ordinary
 * ones at one thread (C, 129 MiB: 17.5 ms against 11.4 with the factors hoisted, a
 * streaming copy 14.4). */
static inline cbn_v8d cbn_one(const double *p, int per_element) {
    cbn_v8d v = {0};
    return per_element ? v : v + p[0];
}

static inline cbn_v8d cbn_factor(const double *p, int64_t i, int per_element, cbn_v8d one) {
    return per_element ? cbn_load_f64(p + i) : one;
}

/* Along a contiguous run of n outputs whose per-feature factors are arrays indexed like the
 * run (per_element = 1, a row of features) or one value each (per_element = 0, one
 * feature): y = (x - mean) * scale + shift, and dx = coef_dy * dy + coef_xc * (x - mean)
 * + offset; its whole lines with streaming stores where the run streams (cbn_run_streams). */
#define CBN_NORMALIZED(S, i)                                                                 \
    ((cbn_load_##S(x + (i)) - cbn_factor(mean, (i), per_element, mean_1))                    \
     * cbn_factor(scale, (i), per_element, scale_1) + cbn_factor(shift, (i), per_element, shift_1))
#define CBN_INPUT_GRADIENT(S, i)                                                             \
    (cbn_factor(coef_dy, (i), per_element, coef_dy_1) * cbn_load_##S(dy + (i))               \
     + cbn_factor(coef_xc, (i), per_element, coef_xc_1)                                      \
       * (cbn_load_##S(x + (i)) - cbn_factor(mean, (i), per_element, mean_1))                \
     + cbn_factor(offset, (i), per_element, offset_1))
#define CBN_NORMALIZED1(T, i, k) y[i] = (T)((x[i] - mean[k]) * scale[k] + shift[k])
#define CBN_INPUT_GRADIENT1(T, i, k)                                                         \
    dx[i] = (T)(coef_dy[k] * dy[i] + coef_xc[k] * (x[i] - mean[k]) + offset[k])
/* A run of n outputs from OUT: ONE(T, i, k) element by element before its first streamed
 * line and after its last vector, FACTORS then PUT(S, i, streamed) 8 at a time, streamed
 * while i < stream_end (none where the run does not stream). */
#define CBN_RUN_WALK(T, S, OUT, ONE, FACTORS, PUT)                                           \
    int64_t i = 0, head;                                                                     \
    const int64_t stream_end = cbn_stream_end(                                               \
        OUT, sizeof(T), n, cbn_run_streams(OUT, n * (int64_t)sizeof(T)), &head);             \
    for (; i < head; i++) ONE(T, i, per_element ? i : 0);                                    \
    FACTORS                                                                                  \
    for (; i + 8 <= n; i += 8) PUT(S, i, i < stream_end);                                    \
    for (; i < n; i++) ONE(T, i, per_element ? i : 0);
#define CBN_Y_RUN_FACTORS                                                                    \
    const cbn_v8d mean_1 = cbn_one(mean, per_element), scale_1 = cbn_one(scale, per_element), \
                  shift_1 = cbn_one(shift, per_element);
#define CBN_DX_RUN_FACTORS                                                                   \
    const cbn_v8d mean_1 = cbn_one(mean, per_element),                                       \
                  coef_dy_1 = cbn_one(coef_dy, per_element),                                 \
                  coef_xc_1 = cbn_one(coef_xc, per_element),                                 \
                  offset_1 = cbn_one(offset, per_element);
#define CBN_Y_PUT(S, i, streamed) cbn_put_##S(y + (i), CBN_NORMALIZED(S, i), streamed)
#define CBN_DX_PUT(S, i, streamed) cbn_put_##S(dx + (i), CBN_INPUT_GRADIENT(S, i), streamed)
#define CBN_DEFINE_STREAMING(T, S)                                                           \
static void cbn_normalize_stream_##S(const T *x, T *y, int64_t n, const double *mean,        \
                                     const double *scale, const double *shift,               \
                                     int per_element) {                                      \
    CBN_RUN_WALK(T, S, y, CBN_NORMALIZED1, CBN_Y_RUN_FACTORS, CBN_Y_PUT)                     \
}                                                                                            \
static void cbn_input_gradient_stream_##S(const T *dy, const T *x, T *dx, int64_t n,         \
                                          const double *mean, const double *coef_dy,         \
                                          const double *coef_xc, const double *offset,       \
                                          int per_element) {                                 \
    CBN_RUN_WALK(T, S, dx, CBN_INPUT_GRADIENT1, CBN_DX_RUN_FACTORS, CBN_DX_PUT)              \
}

CBN_DEFINE_STREAMING(float, f32)
CBN_DEFINE_STREAMING(double, f64)

/* The same over n_rows runs (each operand's *_row_step apart) of n elements whose steps are
 * any (one element apart, each ±1, or further): vectors loaded through cbn_stepped (a
 * reversed run: one load and a permute) and stored the same way, the rest element by
 * element. An output stepping forwards streams (where the caller asks) a run's whole lines
 * by the run rule (cbn_run_streams), or, rows back to back, the whole span's, where no
 * vector straddles two rows. Before, a run stepping both ways was reversed piece by piece
 * through buffers on the stack, each 64-byte load of a piece waiting for its two 32-byte
 * stores to retire (no store forwarding): NCHW (32,64,56,56) float32 inference from x with
 * W reversed into a C-ordered out=, one thread, half its time there. */
#define CBN_DEFINE_SCATTER(T, S)                                                             \
static inline __attribute__((always_inline)) void cbn_scatter_##S(T *p, int64_t step,        \
                                                                 cbn_v8d v, int streamed,    \
                                                                 int general) {              \
    if (!general && step == 1) {                                                             \
        cbn_put_##S(p, v, streamed);                                                         \
    } else if (!general && step == -1) {                                                     \
        cbn_store_##S(p - 7, cbn_reverse_v8d(v));                                            \
    } else {                                                                                 \
        for (int k = 0; k < 8; k++) p[k * step] = (T)v[k];                                   \
    }                                                                                        \
}
CBN_DEFINE_SCATTER(float, f32)
CBN_DEFINE_SCATTER(double, f64)
/* [head, stream_end) of the tile's elements, counted row after row, take streaming stores. */
static inline int64_t cbn_tile_stream_end(const void *out, int64_t itemsize, int64_t step,
                                          int64_t row_step, int64_t n_rows, int64_t n,
                                          int stream, int64_t *head) {
    int64_t end;
    *head = 0;
    if (!stream || step != 1 || (n_rows > 1 && (row_step != n || n % 8)))
        return 0;
    end = cbn_stream_end(out, itemsize, n_rows * n,
                         cbn_run_streams(out, n_rows * n * itemsize), head);
    if (n_rows > 1 && *head % 8) {      /* a vector would straddle two rows */
        *head = 0;
        return 0;
    }
    return end;
}
#define CBN_STEPS_WALK(T, S, OUT, ONE, VECTOR, NEXT_ROW)                                     \
    int64_t r, i, e, head;                                                                   \
    const int64_t stream_end = cbn_tile_stream_end(OUT, sizeof(T), OUT##_step,               \
                                                   OUT##_row_step, n_rows, n, stream, &head); \
    for (r = 0, e = 0; r < n_rows; r++, e += n, NEXT_ROW) {                                  \
        for (i = 0; n_rows == 1 && i < head; i++) ONE(T, i);                                 \
        for (; i + 8 <= n; i += 8)                                                           \
            cbn_scatter_##S(OUT + i * OUT##_step, OUT##_step, VECTOR(S, i),                  \
                            e + i >= head && e + i < stream_end, general);                   \
        for (; i < n; i++) ONE(T, i);                                                        \
    }
#define CBN_NORMALIZED_STEPS1(T, i)                                                          \
    y[(i) * y_step] = (T)((x[(i) * x_step] - mean) * scale + shift)
#define CBN_NORMALIZED_STEPS(S, i)                                                           \
    ((cbn_stepped_##S(x + (i) * x_step, x_step, general) - m) * s + b)
#define CBN_INPUT_GRADIENT_STEPS1(T, i)                                                      \
    dx[(i) * dx_step] = (T)(coef_dy * dy[(i) * dy_step] + coef_xc * (x[(i) * x_step] - mean) \
                            + offset)
#define CBN_INPUT_GRADIENT_STEPS(S, i)                                                       \
    (a * cbn_stepped_##S(dy + (i) * dy_step, dy_step, general)                               \
     + c * (cbn_stepped_##S(x + (i) * x_step, x_step, general) - m) + o)
#define CBN_NORMALIZE_STEPS_f32(A, B, G) cbn_normalize_steps_k_f32(x, A, x_row_step, y, B,   \
    y_row_step, n_rows, n, mean, scale, shift, stream, G)
#define CBN_NORMALIZE_STEPS_f64(A, B, G) cbn_normalize_steps_k_f64(x, A, x_row_step, y, B,   \
    y_row_step, n_rows, n, mean, scale, shift, stream, G)
#define CBN_INPUT_GRADIENT_STEPS_f32(A, B, C, G) cbn_input_gradient_steps_k_f32(dy, A,       \
    dy_row_step, x, B, x_row_step, dx, C, dx_row_step, n_rows, n, mean, coef_dy, coef_xc,   \
    offset, stream, G)
#define CBN_INPUT_GRADIENT_STEPS_f64(A, B, C, G) cbn_input_gradient_steps_k_f64(dy, A,       \
    dy_row_step, x, B, x_row_step, dx, C, dx_row_step, n_rows, n, mean, coef_dy, coef_xc,   \
    offset, stream, G)
#define CBN_DEFINE_STEPS_ELEMENTWISE(T, S)                                                   \
static inline __attribute__((always_inline)) void cbn_normalize_steps_k_##S(                 \
        const T *x, int64_t x_step, int64_t x_row_step, T *y, int64_t y_step,                \
        int64_t y_row_step, int64_t n_rows, int64_t n, double mean, double scale,            \
        double shift, int stream, int general) {                                             \
    const cbn_v8d m = (cbn_v8d){0} + mean, s = (cbn_v8d){0} + scale,                         \
                  b = (cbn_v8d){0} + shift;                                                  \
    CBN_STEPS_WALK(T, S, y, CBN_NORMALIZED_STEPS1, CBN_NORMALIZED_STEPS,                     \
                   (x += x_row_step, y += y_row_step))                                       \
}                                                                                            \
static void cbn_normalize_steps_##S(const T *x, int64_t x_step, int64_t x_row_step, T *y,    \
                                    int64_t y_step, int64_t y_row_step, int64_t n_rows,      \
                                    int64_t n, double mean, double scale, double shift,      \
                                    int stream) {                                            \
    CBN_BY_STEPS2(CBN_NORMALIZE_STEPS_##S, x_step, y_step)                                   \
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_input_gradient_steps_k_##S(            \
        const T *dy, int64_t dy_step, int64_t dy_row_step, const T *x, int64_t x_step,       \
        int64_t x_row_step, T *dx, int64_t dx_step, int64_t dx_row_step, int64_t n_rows,     \
        int64_t n, double mean, double coef_dy, double coef_xc, double offset, int stream,   \
        int general) {                                                                       \
    const cbn_v8d m = (cbn_v8d){0} + mean, a = (cbn_v8d){0} + coef_dy,                       \
                  c = (cbn_v8d){0} + coef_xc, o = (cbn_v8d){0} + offset;                     \
    CBN_STEPS_WALK(T, S, dx, CBN_INPUT_GRADIENT_STEPS1, CBN_INPUT_GRADIENT_STEPS,            \
                   (dy += dy_row_step, x += x_row_step, dx += dx_row_step))                  \
}                                                                                            \
static void cbn_input_gradient_steps_##S(const T *dy, int64_t dy_step, int64_t dy_row_step,  \
                                         const T *x, int64_t x_step, int64_t x_row_step,     \
                                         T *dx, int64_t dx_step, int64_t dx_row_step,        \
                                         int64_t n_rows, int64_t n, double mean,             \
                                         double coef_dy, double coef_xc, double offset,      \
                                         int stream) {                                       \
    CBN_BY_STEPS3(CBN_INPUT_GRADIENT_STEPS_##S, dy_step, x_step, dx_step)                    \
}
CBN_DEFINE_STEPS_ELEMENTWISE(float, f32)
CBN_DEFINE_STEPS_ELEMENTWISE(double, f64)

/* The same over n_planes runs of n >= 8 elements that follow each other in memory, one
 * feature each (features p = 0, 1, ... at their factors' [p]): the planes of an NCHW image,
 * written as one run whose whole lines stream. Plane by plane, planes that are not whole
 * lines (7 x 7 float32: 196 bytes) took ordinary stores and their unaligned ends element by
 * element: NCHW (10699,64,7,7) float32 from memory, one thread, inference into out= took
 * 12.5 ms; as one run 8.7 ms (14 x 14: 10.0 -> 7.1 ms, 56 x 56 the same 6.0). A vector that
 * spans two planes takes each lane's factors from its own plane (cbn_plane_factor): the same
 * values as the loops above, element for element. */
static inline cbn_v8d cbn_plane_factor(const double *factor, int64_t p, int64_t in_plane) {
    const cbn_v8i lanes = {0, 1, 2, 3, 4, 5, 6, 7};
    const cbn_v8i first = lanes < in_plane;
    return (cbn_v8d)(((cbn_v8i)((cbn_v8d){0} + factor[p]) & first)
                     | ((cbn_v8i)((cbn_v8d){0} + factor[p + 1]) & ~first));
}

/* Walks the planes' elements, plane p at a time (its factors in registers: FACTORS(p)):
 * SCALAR(T, i, p) one at a time before the first whole line and after the last vector,
 * VECTOR(S, i, stream) 8 at a time within the plane, MIXED(S, i, p, in_plane, stream) for a
 * vector whose first in_plane elements are p's and the rest p + 1's. */
#define CBN_PLANES_WALK(T, S, OUT, SCALAR, FACTORS, VECTOR, MIXED)                            \
    int64_t total = n_planes * n, i = 0, p, end, head;                                       \
    const int64_t stream_end = cbn_stream_end(OUT, sizeof(*OUT), total, stream, &head);      \
    for (p = 0, end = n; p < n_planes; p++, end += n) {                                      \
        FACTORS(p)                                                                           \
        for (; i < end && i < head; i++) SCALAR(T, i, p);                                    \
        for (; i + 8 <= end; i += 8) VECTOR(S, i, i < stream_end);                           \
        if (i < end && i + 8 <= total) {                                                     \
            MIXED(S, i, p, end - i, i < stream_end);                                         \
            i += 8;                                                                          \
        }                                                                                    \
        for (; i < end; i++) SCALAR(T, i, p);                                                \
    }

#define CBN_PLANE_Y_FACTORS(p)                                                               \
    const cbn_v8d m = (cbn_v8d){0} + mean[p], s = (cbn_v8d){0} + scale[p],                   \
                  b = (cbn_v8d){0} + shift[p];
#define CBN_PLANE_Y8(S, i, stream) cbn_put_##S(y + (i), (cbn_load_##S(x + (i)) - m) * s + b, stream)
#define CBN_PLANE_Y8_MIXED(S, i, p, in_plane, stream)                                        \
    cbn_put_##S(y + (i), (cbn_load_##S(x + (i)) - cbn_plane_factor(mean, p, in_plane))       \
                         * cbn_plane_factor(scale, p, in_plane)                              \
                         + cbn_plane_factor(shift, p, in_plane), stream)
#define CBN_PLANE_DX_FACTORS(p)                                                              \
    const cbn_v8d m = (cbn_v8d){0} + mean[p], a = (cbn_v8d){0} + coef_dy[p],                 \
                  c = (cbn_v8d){0} + coef_xc[p], o = (cbn_v8d){0} + offset[p];
#define CBN_PLANE_DX8(S, i, stream)                                                          \
    cbn_put_##S(dx + (i), a * cbn_load_##S(dy + (i)) + c * (cbn_load_##S(x + (i)) - m) + o, stream)
#define CBN_PLANE_DX8_MIXED(S, i, p, in_plane, stream)                                       \
    cbn_put_##S(dx + (i), cbn_plane_factor(coef_dy, p, in_plane) * cbn_load_##S(dy + (i))    \
                          + cbn_plane_factor(coef_xc, p, in_plane)                           \
                            * (cbn_load_##S(x + (i)) - cbn_plane_factor(mean, p, in_plane))  \
                          + cbn_plane_factor(offset, p, in_plane), stream)
#define CBN_DEFINE_PLANES(T, S)                                                              \
static void cbn_normalize_planes_##S(const T *x, T *y, int64_t n_planes, int64_t n,          \
                                     const double *mean, const double *scale,                \
                                     const double *shift, int stream) {                      \
    CBN_PLANES_WALK(T, S, y, CBN_NORMALIZED1, CBN_PLANE_Y_FACTORS, CBN_PLANE_Y8,             \
                    CBN_PLANE_Y8_MIXED)                                                      \
}                                                                                            \
static void cbn_input_gradient_planes_##S(const T *dy, const T *x, T *dx, int64_t n_planes,  \
                                          int64_t n, const double *mean,                     \
                                          const double *coef_dy, const double *coef_xc,      \
                                          const double *offset, int stream) {                \
    CBN_PLANES_WALK(T, S, dx, CBN_INPUT_GRADIENT1, CBN_PLANE_DX_FACTORS, CBN_PLANE_DX8,      \
                    CBN_PLANE_DX8_MIXED)                                                     \
}

CBN_DEFINE_PLANES(float, f32)
CBN_DEFINE_PLANES(double, f64)

/* The same over n_rows whole rows of width (8 .. CBN_MAX_WIDTH) features that follow each
 * other in memory: one long run, so the streaming stores cover whole cache lines. Each factor
 * is copied with its first 8 entries repeated after its end, so a vector of 8 features can
 * start at any feature j < width. */
#define CBN_MAX_WIDTH 1024
static inline void cbn_wrapped(double *target, const double *source, int64_t width,
                               int64_t from, int64_t n) {
    int64_t j, k = from % width;
    for (j = 0; j < n; j++, k = k + 1 == width ? 0 : k + 1) target[j] = source[k];
}

#define CBN_DEFINE_ROW_STREAMING(T, S)                                                       \
static void cbn_normalize_rows_stream_##S(const T *x, T *y, int64_t n_rows, int64_t width,   \
                                          const double *mean, const double *scale,           \
                                          const double *shift) {                             \
    double m[CBN_MAX_WIDTH + 8], s[CBN_MAX_WIDTH + 8], b[CBN_MAX_WIDTH + 8];                 \
    int64_t n = n_rows * width, i = 0, j = 0, head, stream_end;                                \
    cbn_wrapped(m, mean, width, 0, width + 8);                                               \
    cbn_wrapped(s, scale, width, 0, width + 8);                                              \
    cbn_wrapped(b, shift, width, 0, width + 8);                                              \
    stream_end = cbn_stream_end(y, sizeof(T), n, 1, &head);                                  \
    for (; i < head; i++, j = j + 1 == width ? 0 : j + 1)                                    \
        y[i] = (T)((x[i] - m[j]) * s[j] + b[j]);                                             \
    for (; i + 8 <= n; i += 8, j = j + 8 >= width ? j + 8 - width : j + 8)                   \
        cbn_put_##S(y + i, (cbn_load_##S(x + i) - cbn_load_f64(m + j)) * cbn_load_f64(s + j)  \
                           + cbn_load_f64(b + j), i < stream_end);                           \
    for (; i < n; i++, j = j + 1 == width ? 0 : j + 1)                                       \
        y[i] = (T)((x[i] - m[j]) * s[j] + b[j]);                                             \
}                                                                                            \
static void cbn_input_gradient_rows_stream_##S(const T *dy, const T *x, T *dx,               \
                                               int64_t n_rows, int64_t width,                \
                                               const double *mean, const double *coef_dy,    \
                                               const double *coef_xc,                        \
                                               const double *offset) {                       \
    double m[CBN_MAX_WIDTH + 8], a[CBN_MAX_WIDTH + 8], c[CBN_MAX_WIDTH + 8];                 \
    double o[CBN_MAX_WIDTH + 8];                                                             \
    int64_t n = n_rows * width, i = 0, j = 0, head, stream_end;                                \
    cbn_wrapped(m, mean, width, 0, width + 8);                                               \
    cbn_wrapped(a, coef_dy, width, 0, width + 8);                                            \
    cbn_wrapped(c, coef_xc, width, 0, width + 8);                                            \
    cbn_wrapped(o, offset, width, 0, width + 8);                                             \
    stream_end = cbn_stream_end(dx, sizeof(T), n, 1, &head);                                 \
    for (; i < head; i++, j = j + 1 == width ? 0 : j + 1)                                    \
        dx[i] = (T)(a[j] * dy[i] + c[j] * (x[i] - m[j]) + o[j]);                             \
    for (; i + 8 <= n; i += 8, j = j + 8 >= width ? j + 8 - width : j + 8)                   \
        cbn_put_##S(dx + i, cbn_load_f64(a + j) * cbn_load_##S(dy + i)                       \
                            + cbn_load_f64(c + j) * (cbn_load_##S(x + i) - cbn_load_f64(m + j)) \
                            + cbn_load_f64(o + j), i < stream_end);                          \
    for (; i < n; i++, j = j + 1 == width ? 0 : j + 1)                                       \
        dx[i] = (T)(a[j] * dy[i] + c[j] * (x[i] - m[j]) + o[j]);                             \
}

CBN_DEFINE_ROW_STREAMING(float, f32)
CBN_DEFINE_ROW_STREAMING(double, f64)

/* The same over rows of contiguous features at any row strides, strip by strip: a strip's
 * per-feature factors are loaded into registers once and a few rows pass them.
 * Loading them at every element instead (cbn_normalize_rows_stream above) reads 3-4 doubles
 * per element from arrays of 3-4 x 8 bytes per feature: for dense rows of 1024 features that
 * is 24-32 KiB, most of the L1d; with data from memory the input's lines then no longer
 * stayed in the L1d until used (inference on 128 MiB at one thread took twice as long per
 * byte as on rows of 64 features, whose factors take 1.5 KiB). AVX-512 holds 3 x 8
 * (normalize) or 4 x 4 (gradient) vectors of 8 doubles in its 32 registers; AVX2 and SSE, a
 * quarter and an eighth the width, proportionally narrower strips. Elementwise: the same
 * values as the other loops, in any order.
 *
 * With streaming stores (stream != 0; the caller has checked that the output's rows are a
 * whole number of cache lines apart) the strips cover the features [head, body_end) whose
 * lines lie wholly within a row, the same for every row; the features before and after, in
 * lines shared by the end of one row and the start of the next, are written with ordinary
 * stores, so no line is written both ways. */
#if CBN_REGISTER_BYTES == 64
#define CBN_Y_VECTORS 8
#define CBN_DX_VECTORS 4
#elif CBN_REGISTER_BYTES == 32
#define CBN_Y_VECTORS 2
#define CBN_DX_VECTORS 1
#else
#define CBN_Y_VECTORS 1
#define CBN_DX_VECTORS 1
#endif
/* Rows a strip walks before the next strip: 8 rows of the input (4 of each of the gradient's
 * two), in as many pages at once; with more the prefetchers lost track (dense rows of 1024
 * float32, from memory: the gradient's strips took 1.3x as long with 8 rows as with 4). */
#define CBN_Y_STRIP_ROWS 8
#define CBN_DX_STRIP_ROWS 4

/* A strip's factors from feature j on, NV vectors of each, into registers: y's (m, s, b)
 * and dx's (m, a, c, o). */
#define CBN_Y_FACTORS(NV)                                                                    \
    cbn_v8d m[NV], s[NV], b[NV];                                                             \
    for (q = 0; q < NV; q++) {                                                               \
        m[q] = cbn_load_f64(mean + j + 8 * q);                                               \
        s[q] = cbn_load_f64(scale + j + 8 * q);                                              \
        b[q] = cbn_load_f64(shift + j + 8 * q);                                              \
    }
#define CBN_DX_FACTORS(NV)                                                                   \
    cbn_v8d m[NV], a[NV], c[NV], o[NV];                                                      \
    for (q = 0; q < NV; q++) {                                                               \
        m[q] = cbn_load_f64(mean + j + 8 * q);                                               \
        a[q] = cbn_load_f64(coef_dy + j + 8 * q);                                            \
        c[q] = cbn_load_f64(coef_xc + j + 8 * q);                                            \
        o[q] = cbn_load_f64(offset + j + 8 * q);                                             \
    }

#define CBN_Y_STRIP(S, NV, STORE)                                                            \
    {                                                                                        \
        CBN_Y_FACTORS(NV)                                                                    \
        for (r = r0; r < r1; r++)                                                            \
            _Pragma("GCC unroll 8")                                                          \
            for (q = 0; q < NV; q++)                                                         \
                STORE(y + r * y_row_stride + j + 8 * q,                                      \
                      (cbn_load_##S(x + r * x_row_stride + j + 8 * q) - m[q]) * s[q]         \
                      + b[q]);                                                               \
    }

#define CBN_Y_COLUMNS(T, FROM, TO)                                                           \
    for (j = FROM; j < TO; j++)                                                              \
        for (r = r0; r < r1; r++)                                                            \
            y[r * y_row_stride + j] =                                                        \
                (T)((x[r * x_row_stride + j] - mean[j]) * scale[j] + shift[j]);

#define CBN_DX_STRIP(S, NV, STORE)                                                           \
    {                                                                                        \
        CBN_DX_FACTORS(NV)                                                                   \
        for (r = r0; r < r1; r++)                                                            \
            _Pragma("GCC unroll 4")                                                          \
            for (q = 0; q < NV; q++)                                                         \
                STORE(dx + r * dx_row_stride + j + 8 * q,                                    \
                      a[q] * cbn_load_##S(dy + r * dy_row_stride + j + 8 * q)                \
                      + c[q] * (cbn_load_##S(x + r * x_row_stride + j + 8 * q) - m[q])       \
                      + o[q]);                                                               \
    }

#define CBN_DX_COLUMNS(T, FROM, TO)                                                          \
    for (j = FROM; j < TO; j++)                                                              \
        for (r = r0; r < r1; r++)                                                            \
            dx[r * dx_row_stride + j] =                                                      \
                (T)(coef_dy[j] * dy[r * dy_row_stride + j]                                   \
                    + coef_xc[j] * (x[r * x_row_stride + j] - mean[j]) + offset[j]);

/* Vectors of 8 elements in a cache line's worth of T, the narrowest strip that streams: a
 * strip of half lines would leave each line half written for several rows, and the
 * write-combining buffers would flush it in pieces. */
#define CBN_LINE_VECTORS_f32 2
#define CBN_LINE_VECTORS_f64 1
#define CBN_AT_LEAST(a, b) ((a) > (b) ? (a) : (b))

/* STRIP over the features [head, body_end) of every ROWS rows, NV vectors at a
 * time (at least a line's), then a line's (so streamed lines are whole), then one (ordinary
 * stores only: the streamed features are whole lines); COLUMNS over the features outside,
 * with ordinary stores. OUT: the output. */
#define CBN_STRIPS(STRIP, NV, ROWS, COLUMNS, OUT, T, S)                                      \
    int64_t r0, r1, r, j, q, head, body_end, body;                                           \
    cbn_streamed_features(OUT, sizeof(T), width, stream, &head, &body_end);                  \
    for (r0 = 0; r0 < n_rows; r0 = r1) {                                                     \
        r1 = r0 + ROWS < n_rows ? r0 + ROWS : n_rows;                                        \
        j = head;                                                                            \
        if (stream) {                                                                        \
            for (; j + 8 * CBN_AT_LEAST(NV, CBN_LINE_VECTORS_##S) <= body_end;               \
                 j += 8 * CBN_AT_LEAST(NV, CBN_LINE_VECTORS_##S))                            \
                STRIP(S, CBN_AT_LEAST(NV, CBN_LINE_VECTORS_##S), cbn_stream_##S)             \
            for (; j + 8 * CBN_LINE_VECTORS_##S <= body_end; j += 8 * CBN_LINE_VECTORS_##S)  \
                STRIP(S, CBN_LINE_VECTORS_##S, cbn_stream_##S)                               \
        } else {                                                                             \
            for (; j + 8 * NV <= body_end; j += 8 * NV) STRIP(S, NV, cbn_store_##S)          \
        }                                                                                    \
        for (; j + 8 <= body_end; j += 8) STRIP(S, 1, cbn_store_##S)                         \
        body = j;                                                                            \
        COLUMNS(T, 0, head)                                                                  \
        COLUMNS(T, body, width)                                                              \
    }

#define CBN_DEFINE_STRIPS(T, S)                                                              \
static void cbn_normalize_strips_##S(const T *x, int64_t x_row_stride, T *y,                 \
                                     int64_t y_row_stride, int64_t n_rows, int64_t width,    \
                                     const double *mean, const double *scale,                \
                                     const double *shift, int stream) {                      \
    CBN_STRIPS(CBN_Y_STRIP, CBN_Y_VECTORS, CBN_Y_STRIP_ROWS, CBN_Y_COLUMNS, y, T, S)         \
}                                                                                            \
static void cbn_input_gradient_strips_##S(const T *dy, int64_t dy_row_stride, const T *x,    \
                                          int64_t x_row_stride, T *dx,                       \
                                          int64_t dx_row_stride, int64_t n_rows,             \
                                          int64_t width, const double *mean,                 \
                                          const double *coef_dy, const double *coef_xc,      \
                                          const double *offset, int stream) {                \
    CBN_STRIPS(CBN_DX_STRIP, CBN_DX_VECTORS, CBN_DX_STRIP_ROWS, CBN_DX_COLUMNS, dx, T, S)    \
}

CBN_DEFINE_STRIPS(float, f32)
CBN_DEFINE_STRIPS(double, f64)

/* Rows back to back in every operand (one run, as for cbn_normalize_rows_stream), streamed
 * strip by strip. Where the output does not start on a cache line its lines straddle rows,
 * and strips of whole rows would leave a line a row to be written with ordinary stores
 * (with data from memory, the strips then took 1.4-1.6x as long). So the strips walk rows
 * shifted to start on the first whole line, head elements in, over factors rotated to match
 * (FACTORS copies each one so), one row fewer: only the run's first and last lines are then
 * written with ordinary stores, by SCALAR(i, j) for element i, feature j. Rows that are not a whole number
 * of lines long have lines straddling rows anywhere: they go to the run loop (FALLBACK). */
#define CBN_FLAT_STRIPS(T, OUT, FACTORS, STRIPS, SCALAR, FALLBACK)                           \
    int64_t head, body_end, shifted_rows, i, n = n_rows * width;                             \
    if ((width * (int64_t)sizeof(T)) % 64 != 0) {                                            \
        FALLBACK;                                                                            \
        return;                                                                              \
    }                                                                                        \
    cbn_streamed_features(OUT, sizeof(T), width, 1, &head, &body_end);                       \
    shifted_rows = head ? n_rows - 1 : n_rows;                                               \
    FACTORS                                                                                  \
    for (i = 0; i < head; i++) SCALAR(i, i)                                                  \
    STRIPS;                                                                                  \
    for (i = head ? n - width + head : n; i < n; i++) SCALAR(i, i - (n - width))

#define CBN_Y_SCALAR(T, i, j) y[i] = (T)((x[i] - mean[j]) * scale[j] + shift[j]);
#define CBN_DX_SCALAR(T, i, j)                                                               \
    dx[i] = (T)(coef_dy[j] * dy[i] + coef_xc[j] * (x[i] - mean[j]) + offset[j]);

#define CBN_DEFINE_FLAT_STRIPS(T, S)                                                         \
static void cbn_normalize_flat_strips_##S(const T *x, T *y, int64_t n_rows, int64_t width,   \
                                          const double *mean, const double *scale,           \
                                          const double *shift) {                             \
    double m[CBN_MAX_WIDTH], s[CBN_MAX_WIDTH], b[CBN_MAX_WIDTH];                             \
    CBN_FLAT_STRIPS(T, y,                                                                    \
                    cbn_wrapped(m, mean, width, head, width);                                \
                    cbn_wrapped(s, scale, width, head, width);                               \
                    cbn_wrapped(b, shift, width, head, width);,                              \
                    cbn_normalize_strips_##S(x + head, width, y + head, width, shifted_rows, \
                                             width, m, s, b, 1),                             \
                    CBN_Y_SCALAR_##S,                                                        \
                    cbn_normalize_rows_stream_##S(x, y, n_rows, width, mean, scale, shift))  \
}                                                                                            \
static void cbn_input_gradient_flat_strips_##S(const T *dy, const T *x, T *dx,               \
                                               int64_t n_rows, int64_t width,                \
                                               const double *mean, const double *coef_dy,    \
                                               const double *coef_xc,                        \
                                               const double *offset) {                       \
    double m[CBN_MAX_WIDTH], a[CBN_MAX_WIDTH], c[CBN_MAX_WIDTH], o[CBN_MAX_WIDTH];           \
    CBN_FLAT_STRIPS(T, dx,                                                                   \
                    cbn_wrapped(m, mean, width, head, width);                                \
                    cbn_wrapped(a, coef_dy, width, head, width);                             \
                    cbn_wrapped(c, coef_xc, width, head, width);                             \
                    cbn_wrapped(o, offset, width, head, width);,                             \
                    cbn_input_gradient_strips_##S(dy + head, width, x + head, width,         \
                                                  dx + head, width, shifted_rows, width, m,  \
                                                  a, c, o, 1),                               \
                    CBN_DX_SCALAR_##S,                                                       \
                    cbn_input_gradient_rows_stream_##S(dy, x, dx, n_rows, width, mean,       \
                                                       coef_dy, coef_xc, offset))            \
}

#define CBN_Y_SCALAR_f32(i, j) CBN_Y_SCALAR(float, i, j)
#define CBN_Y_SCALAR_f64(i, j) CBN_Y_SCALAR(double, i, j)
#define CBN_DX_SCALAR_f32(i, j) CBN_DX_SCALAR(float, i, j)
#define CBN_DX_SCALAR_f64(i, j) CBN_DX_SCALAR(double, i, j)
CBN_DEFINE_FLAT_STRIPS(float, f32)
CBN_DEFINE_FLAT_STRIPS(double, f64)

#endif
