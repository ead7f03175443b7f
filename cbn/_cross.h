/* Elementwise passes (normalize, dx), and the backward's gradient sums, over FI tiles (or
 * one outer row's segment of a tile: an image of NHWC data stored as NCHW) whose operands
 * are laid out crosswise:
 * each one either a row of adjacent features ("by rows": feature stride 1, a C-ordered
 * dense x, or -1, its features reversed) or a feature of adjacent rows ("by features": row
 * stride 1 or -1, a Fortran-ordered or transposed out=), at least one of each. The tile goes in 8x8 blocks straight from the
 * inputs to the output: each block loaded in its operand's own order, transposed in
 * registers to rows of features where it is by features, computed with each feature's
 * factors as a vector, and transposed back where the output is by features. Through a
 * stage instead (stage_rows, unstage_rows: a run normalized into a buffer, then transposed
 * out of it, or the other way round) the copies in cache cost as much as the arithmetic
 * (dense (8192, 1024) float32 inference, x C beside a Fortran out=: 2.6x the slower
 * matched call).
 *
 * The output is written two blocks at a time, the two that together make whole cache lines
 * of it (16 rows of each feature, or 16 features of each row), each line by two consecutive
 * stores: with stream set, streaming stores over the lines that lie wholly in the tile
 * (outputs from the LLC's size on: the matched calls stream too), the rows or features
 * beyond them in ordinary stores. Elementwise: every value rounded as normalize_run and
 * input_gradient_run round it, the same bits in any order. Float32 with AVX only
 * (CBN_CROSS); elsewhere the stage serves. */
#ifndef CBN_CROSS_H
#define CBN_CROSS_H

#include "_simd.h"

#ifdef __AVX__
#define CBN_CROSS 1

/* Whether an operand holds a row of adjacent features (its feature step +1 or -1: a
 * reversed view's lanes are reversed in the register), else a feature of adjacent rows. */
static inline int cbn_cross_by_rows(int64_t feature_stride) {
    return feature_stride == 1 || feature_stride == -1;
}

/* 8 adjacent elements from p on, stepping +1 or -1 (then read from p - 7, lanes reversed). */
static inline __m256 cbn_cross_run(const float *p, int64_t step) {
    if (step == 1) return _mm256_loadu_ps(p);
    return (__m256)cbn_reverse_v8f((cbn_v8f)_mm256_loadu_ps(p - 7));
}

/* Block (r, j) of an operand (elements r .. r + 8 of rows, j .. j + 8 of features) as 8
 * rows of 8 features. */
static inline void cbn_cross_load(const float *p, int64_t row_stride, int64_t feature_stride,
                                  int64_t r, int64_t j, __m256 v[8]) {
    int q;
    if (cbn_cross_by_rows(feature_stride)) {
        for (q = 0; q < 8; q++)
            v[q] = cbn_cross_run(p + (r + q) * row_stride + j * feature_stride, feature_stride);
        return;
    }
    for (q = 0; q < 8; q++)
        v[q] = cbn_cross_run(p + (j + q) * feature_stride + r * row_stride, row_stride);
    cbn_transpose_regs_f32(v);
}

/* 8 elements stored from p on, stepping +1 or -1 as cbn_cross_run reads them; streamed
 * only where the walk allows it (forward steps, cbn_cross_plan). */
static inline void cbn_cross_put(float *p, int64_t step, __m256 v, int stream) {
    if (step != 1) {
        _mm256_storeu_ps(p - 7, (__m256)cbn_reverse_v8f((cbn_v8f)v));
    } else if (stream) {
        _mm256_stream_ps(p, v);
    } else {
        _mm256_storeu_ps(p, v);
    }
}

/* Blocks a (r, j) and b, rows of features, stored: b is (r + 8, j) where the output is by
 * features, else (r, j + 8), so that each of its lines gets two consecutive stores. */
static inline void cbn_cross_store(float *p, int64_t row_stride, int64_t feature_stride,
                                   int64_t r, int64_t j, __m256 a[8], __m256 b[8],
                                   int stream) {
    int q, by_rows = cbn_cross_by_rows(feature_stride);
    int64_t step = by_rows ? feature_stride : row_stride;
    float *first;
    if (!by_rows) {
        cbn_transpose_regs_f32(a);
        cbn_transpose_regs_f32(b);
    }
    for (q = 0; q < 8; q++) {
        first = by_rows ? p + (r + q) * row_stride + j * feature_stride
                        : p + (j + q) * feature_stride + r * row_stride;
        cbn_cross_put(first, step, a[q], stream);
        cbn_cross_put(first + 8 * step, step, b[q], stream);
    }
}

/* The tile's layout for the walk below: the output's lines run along the rows (by
 * features) or the features; [r_body, r_end) x [j_body, j_end) is covered by pairs of
 * blocks, starting where the output's lines start when streaming. */
typedef struct {
    int by_features;                    /* the output's rows are adjacent */
    int stream;
    int64_t r_body, r_end, j_body, j_end;
} cbn_cross_walk;

static inline cbn_cross_walk cbn_cross_plan(const float *out, int64_t row_stride,
                                            int64_t feature_stride, int64_t n_rows,
                                            int64_t width, int stream) {
    cbn_cross_walk w;
    int by_rows = cbn_cross_by_rows(feature_stride);
    int64_t head = 0, along = by_rows ? row_stride : feature_stride;
    int64_t n_along = by_rows ? width : n_rows;
    int64_t n_across = by_rows ? n_rows : width;
    w.by_features = !by_rows;
    /* Streaming where every line of the output's pieces starts alike (pieces a whole
     * number of lines apart), from its first line start, and its pieces step forwards. */
    w.stream = stream && (by_rows ? feature_stride : row_stride) == 1
               && (along * (int64_t)sizeof(float)) % 64 == 0
               && ((uintptr_t)out) % sizeof(float) == 0;
    if (w.stream) {
        head = (int64_t)(((64 - ((uintptr_t)out & 63)) & 63) / sizeof(float));
        if (head > n_along) head = n_along;
    }
    int64_t body_end = head + (n_along - head) / 16 * 16;
    int64_t across_end = n_across - n_across % 8;
    if (w.by_features) {
        w.r_body = head; w.r_end = body_end; w.j_body = 0; w.j_end = across_end;
    } else {
        w.j_body = head; w.j_end = body_end; w.r_body = 0; w.r_end = across_end;
    }
    return w;
}


/* BLOCK(r, j, a, b, dr, dj) computes the pair of blocks at (r, j) and (r + dr, j + dj) into
 * a and b (rows of features) and stores them; SCALAR(r, j) one element. Where an input is
 * by features (INPUTS_BY_ROWS false) the pairs walk the tile feature by feature (8 or 16 at
 * a time) down all its rows, so that input's pieces are read one after another (walking
 * the rows first, 16 pieces of a Fortran dy far apart at each step, took up to twice as
 * long). Where every input is by rows and the output by features (x C beside a Fortran
 * out=) they walk 16 rows at a time across all the features: the inputs' rows are read in
 * order, and the output's lines, each whole from its two stores, need no order (dense
 * inference: 2.4x the slower matched call to 1.8x, against the walk down the rows, whose
 * every step read a line of 128 rows 4 KiB apart). Then the elements outside the blocks,
 * one at a time. */
#define CBN_CROSS_WALK(OUT, OUT_ROW_STRIDE, OUT_FEATURE_STRIDE, INPUTS_BY_ROWS, BLOCK,        \
                       SCALAR)                                                               \
    cbn_cross_walk w = cbn_cross_plan(OUT, OUT_ROW_STRIDE, OUT_FEATURE_STRIDE, n_rows, width, \
                                      stream);                                               \
    int64_t r, j, dr = w.by_features ? 8 : 0, dj = 8 - dr;                                   \
    __m256 a[8], b[8];                                                                       \
    if (w.by_features && (INPUTS_BY_ROWS)) {                                                 \
        for (r = w.r_body; r < w.r_end; r += 16)                                             \
            for (j = w.j_body; j < w.j_end; j += 8) BLOCK(r, j, a, b, dr, dj)                \
    } else {                                                                                 \
        for (j = w.j_body; j < w.j_end; j += 8 + dj)                                         \
            for (r = w.r_body; r < w.r_end; r += 8 + dr) BLOCK(r, j, a, b, dr, dj)           \
    }                                                                                        \
    for (r = 0; r < n_rows; r++) {                                                           \
        int inside = r >= w.r_body && r < w.r_end;                                           \
        for (j = 0; j < (inside ? w.j_body : width); j++) SCALAR(r, j)                       \
        for (j = inside ? w.j_end : width; j < width; j++) SCALAR(r, j)                      \
    }                                                                                        \
    if (w.stream) _mm_sfence();

/* Rows of 8 features of a block, normalized with the factors of features j .. j + 8. */
static inline void cbn_cross_normalize(__m256 v[8], const double *mean, const double *scale,
                                       const double *shift, int64_t j) {
    cbn_v8d m = cbn_load_f64(mean + j), s = cbn_load_f64(scale + j);
    cbn_v8d c = cbn_load_f64(shift + j);
    for (int q = 0; q < 8; q++)
        v[q] = (__m256)cbn_narrow_f32((cbn_widen_f32((cbn_v8f)v[q]) - m) * s + c);
}

#define CBN_CROSS_Y_BLOCK(R, J, A, B, DR, DJ)                                                \
    {                                                                                        \
        cbn_cross_load(x, x_row_stride, x_feature_stride, R, J, A);                          \
        cbn_cross_load(x, x_row_stride, x_feature_stride, R + DR, J + DJ, B);                \
        cbn_cross_normalize(A, mean, scale, shift, J);                                       \
        cbn_cross_normalize(B, mean, scale, shift, J + DJ);                                  \
        cbn_cross_store(y, y_row_stride, y_feature_stride, R, J, A, B, w.stream);            \
    }
#define CBN_CROSS_Y_SCALAR(R, J)                                                             \
    y[(R) * y_row_stride + (J) * y_feature_stride] =                                         \
        (float)((x[(R) * x_row_stride + (J) * x_feature_stride] - mean[J]) * scale[J]        \
                + shift[J]);

/* y = (x - mean) * scale + shift over a tile of n_rows x width. */
static void cbn_normalize_cross_f32(const float *x, int64_t x_row_stride,
                                    int64_t x_feature_stride, float *y, int64_t y_row_stride,
                                    int64_t y_feature_stride, int64_t n_rows, int64_t width,
                                    const double *mean, const double *scale,
                                    const double *shift, int stream) {
    CBN_CROSS_WALK(y, y_row_stride, y_feature_stride, cbn_cross_by_rows(x_feature_stride),
                   CBN_CROSS_Y_BLOCK,
                   CBN_CROSS_Y_SCALAR)
}

/* Rows of a block's dx from dy's and x's (d, v: rows of features), features j .. j + 8. */
static inline void cbn_cross_gradient(__m256 d[8], __m256 v[8], const double *mean,
                                      const double *coef_dy, const double *coef_xc,
                                      const double *offset, int64_t j) {
    cbn_v8d m = cbn_load_f64(mean + j), k_dy = cbn_load_f64(coef_dy + j);
    cbn_v8d k_xc = cbn_load_f64(coef_xc + j), o = cbn_load_f64(offset + j);
    for (int q = 0; q < 8; q++)
        d[q] = (__m256)cbn_narrow_f32(k_dy * cbn_widen_f32((cbn_v8f)d[q])
                                      + k_xc * (cbn_widen_f32((cbn_v8f)v[q]) - m) + o);
}

#define CBN_CROSS_DX_BLOCK(R, J, A, B, DR, DJ)                                               \
    {                                                                                        \
        __m256 v[8];                                                                         \
        cbn_cross_load(dy, dy_row_stride, dy_feature_stride, R, J, A);                       \
        cbn_cross_load(x, x_row_stride, x_feature_stride, R, J, v);                          \
        cbn_cross_gradient(A, v, mean, coef_dy, coef_xc, offset, J);                         \
        cbn_cross_load(dy, dy_row_stride, dy_feature_stride, R + DR, J + DJ, B);             \
        cbn_cross_load(x, x_row_stride, x_feature_stride, R + DR, J + DJ, v);                \
        cbn_cross_gradient(B, v, mean, coef_dy, coef_xc, offset, J + DJ);                    \
        cbn_cross_store(dx, dx_row_stride, dx_feature_stride, R, J, A, B, w.stream);         \
    }
#define CBN_CROSS_DX_SCALAR(R, J)                                                            \
    dx[(R) * dx_row_stride + (J) * dx_feature_stride] =                                      \
        (float)(coef_dy[J] * dy[(R) * dy_row_stride + (J) * dy_feature_stride]               \
                + coef_xc[J] * (x[(R) * x_row_stride + (J) * x_feature_stride] - mean[J])    \
                + offset[J]);

/* dx = coef_dy * dy + coef_xc * (x - mean) + offset over a tile of n_rows x width. */
static void cbn_input_gradient_cross_f32(const float *dy, int64_t dy_row_stride,
                                         int64_t dy_feature_stride, const float *x,
                                         int64_t x_row_stride, int64_t x_feature_stride,
                                         float *dx, int64_t dx_row_stride,
                                         int64_t dx_feature_stride, int64_t n_rows,
                                         int64_t width, const double *mean,
                                         const double *coef_dy, const double *coef_xc,
                                         const double *offset, int stream) {
    CBN_CROSS_WALK(dx, dx_row_stride, dx_feature_stride,
                   cbn_cross_by_rows(dy_feature_stride) && cbn_cross_by_rows(x_feature_stride),
                   CBN_CROSS_DX_BLOCK,
                   CBN_CROSS_DX_SCALAR)
}

/* sum_dy[j] += Σ dy and sum_dy_xc[j] += Σ dy·(x − mean[j]) over a tile of n_rows x width,
 * run by run (runs of run_rows rows from the first): each run's sums of each feature taken
 * from zero over its rows in order, then added, as cbn_gradient_sums takes them over each
 * run staged as rows of features; the same additions, hence the same bits, without the
 * stage. Each 8 features' runs are walked in turn, so an input by features is read down its
 * rows, its pieces one after another. */
static void cbn_gradient_sums_cross_f32(const float *dy, int64_t dy_row_stride,
                                        int64_t dy_feature_stride, const float *x,
                                        int64_t x_row_stride, int64_t x_feature_stride,
                                        int64_t n_rows, int64_t width, int64_t run_rows,
                                        const double *mean, double *sum_dy,
                                        double *sum_dy_xc) {
    int64_t j, r, r0, r1, w8 = width - width % 8;
    int q;
    __m256 d[8], v[8];
    float g[8], e[8];
    for (j = 0; j < w8; j += 8) {
        cbn_v8d c = cbn_load_f64(mean + j), u;
        for (r0 = 0; r0 < n_rows; r0 = r1) {
            cbn_acc a, b;
            cbn_acc_zero(&a, 1);
            cbn_acc_zero(&b, 1);
            r1 = r0 + run_rows < n_rows ? r0 + run_rows : n_rows;
            for (r = r0; r + 8 <= r1; r += 8) {
                cbn_cross_load(dy, dy_row_stride, dy_feature_stride, r, j, d);
                cbn_cross_load(x, x_row_stride, x_feature_stride, r, j, v);
                for (q = 0; q < 8; q++) {
                    u = cbn_widen_f32((cbn_v8f)d[q]);
                    cbn_acc_add(&a, u);
                    cbn_acc_add(&b, u * (cbn_widen_f32((cbn_v8f)v[q]) - c));
                }
            }
            for (; r < r1; r++) {      /* the run's rows beyond its blocks */
                for (q = 0; q < 8; q++) {
                    g[q] = dy[r * dy_row_stride + (j + q) * dy_feature_stride];
                    e[q] = x[r * x_row_stride + (j + q) * x_feature_stride];
                }
                u = cbn_load_f32(g);
                cbn_acc_add(&a, u);
                cbn_acc_add(&b, u * (cbn_load_f32(e) - c));
            }
            cbn_add_to(sum_dy + j, &a);
            cbn_add_to(sum_dy_xc + j, &b);
        }
    }
    for (; j < width; j++)      /* features beyond the blocks: cbn_gradient_sums' tail */
        for (r0 = 0; r0 < n_rows; r0 = r1) {
            double sum = 0.0, sum_xc = 0.0, h;
            r1 = r0 + run_rows < n_rows ? r0 + run_rows : n_rows;
            for (r = r0; r < r1; r++) {
                h = dy[r * dy_row_stride + j * dy_feature_stride];
                sum += h;
                sum_xc += h * (x[r * x_row_stride + j * x_feature_stride] - mean[j]);
            }
            sum_dy[j] += sum;
            sum_dy_xc[j] += sum_xc;
        }
}

#else
#define CBN_CROSS 0     /* never called then: the kernels check CBN_CROSS first */
#define cbn_normalize_cross_f32(...) abort()
#define cbn_input_gradient_cross_f32(...) abort()
#define cbn_gradient_sums_cross_f32(...) abort()
#endif

#endif
