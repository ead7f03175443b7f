/* Elementwise passes (normalize, dx) over FI tiles whose operands are laid out crosswise:
 * each one either a row of adjacent features ("by rows": feature stride 1, a C-ordered
 * dense x) or a feature of adjacent rows ("by features": row stride 1, a Fortran-ordered
 * or transposed out=), at least one of each. The tile goes in 8x8 blocks straight from the
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

/* Block (r, j) of an operand (elements r .. r + 8 of rows, j .. j + 8 of features) as 8
 * rows of 8 features. */
static inline void cbn_cross_load(const float *p, int64_t row_stride, int64_t feature_stride,
                                  int64_t r, int64_t j, __m256 v[8]) {
    int q;
    if (feature_stride == 1) {
        for (q = 0; q < 8; q++) v[q] = _mm256_loadu_ps(p + (r + q) * row_stride + j);
        return;
    }
    for (q = 0; q < 8; q++) v[q] = _mm256_loadu_ps(p + (j + q) * feature_stride + r);
    cbn_transpose_regs_f32(v);
}

/* Blocks a (r, j) and b, rows of features, stored: b is (r + 8, j) where the output is by
 * features, else (r, j + 8), so that each of its lines gets two consecutive stores. */
static inline void cbn_cross_store(float *p, int64_t row_stride, int64_t feature_stride,
                                   int64_t r, int64_t j, __m256 a[8], __m256 b[8],
                                   int stream) {
    int q;
    float *first, *second;
    if (feature_stride != 1) {
        cbn_transpose_regs_f32(a);
        cbn_transpose_regs_f32(b);
    }
    for (q = 0; q < 8; q++) {
        first = feature_stride == 1 ? p + (r + q) * row_stride + j
                                    : p + (j + q) * feature_stride + r;
        second = first + 8;
        if (stream) {
            _mm256_stream_ps(first, a[q]);
            _mm256_stream_ps(second, b[q]);
        } else {
            _mm256_storeu_ps(first, a[q]);
            _mm256_storeu_ps(second, b[q]);
        }
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
    int64_t head = 0, along = feature_stride == 1 ? row_stride : feature_stride;
    int64_t n_along = feature_stride == 1 ? width : n_rows;
    int64_t n_across = feature_stride == 1 ? n_rows : width;
    w.by_features = feature_stride != 1;
    /* Streaming where every line of the output's pieces starts alike (pieces a whole
     * number of lines apart), from its first line start. */
    w.stream = stream && (along * (int64_t)sizeof(float)) % 64 == 0
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
 * a and b (rows of features) and stores them; SCALAR(r, j) one element. The pairs walk
 * the tile feature by feature (8 or 16 at a time) down all its rows: the output's lines,
 * and those of the inputs laid out like it, in order (each input line laid out the other way
 * read by two pairs in a row), where walking the features first took up to twice as long
 * (16 pieces of a Fortran dy or dx far apart at each step). Then the elements outside the
 * blocks, one at a time. */
#define CBN_CROSS_WALK(OUT, OUT_ROW_STRIDE, OUT_FEATURE_STRIDE, BLOCK, SCALAR)               \
    cbn_cross_walk w = cbn_cross_plan(OUT, OUT_ROW_STRIDE, OUT_FEATURE_STRIDE, n_rows, width, \
                                      stream);                                               \
    int64_t r, j, dr = w.by_features ? 8 : 0, dj = 8 - dr;                                   \
    __m256 a[8], b[8];                                                                       \
    for (j = w.j_body; j < w.j_end; j += 8 + dj)                                             \
        for (r = w.r_body; r < w.r_end; r += 8 + dr) BLOCK(r, j, a, b, dr, dj)               \
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
    CBN_CROSS_WALK(y, y_row_stride, y_feature_stride, CBN_CROSS_Y_BLOCK, CBN_CROSS_Y_SCALAR)
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
    CBN_CROSS_WALK(dx, dx_row_stride, dx_feature_stride, CBN_CROSS_DX_BLOCK,
                   CBN_CROSS_DX_SCALAR)
}

#else
#define CBN_CROSS 0
static void cbn_normalize_cross_f32(const float *x, int64_t x_row_stride,
                                    int64_t x_feature_stride, float *y, int64_t y_row_stride,
                                    int64_t y_feature_stride, int64_t n_rows, int64_t width,
                                    const double *mean, const double *scale,
                                    const double *shift, int stream) {
    abort();    /* never called: CBN_CROSS is 0 */
}
static void cbn_input_gradient_cross_f32(const float *dy, int64_t dy_row_stride,
                                         int64_t dy_feature_stride, const float *x,
                                         int64_t x_row_stride, int64_t x_feature_stride,
                                         float *dx, int64_t dx_row_stride,
                                         int64_t dx_feature_stride, int64_t n_rows,
                                         int64_t width, const double *mean,
                                         const double *coef_dy, const double *coef_xc,
                                         const double *offset, int stream) {
    abort();
}
#endif

#endif
