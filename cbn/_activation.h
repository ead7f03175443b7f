/* Activations fused into batch norm's write loops (cbn/_kernels.pyx, section "Activations").
 *
 * Forward: out = act(z + residual), where z is batch norm's output already rounded to the data
 * type T, the residual is added in T and the activation computed in T, so the result is bitwise
 * what applying the activation to cbn's batch-norm output gives (cbn.activation defines it):
 *   relu:       z if z > 0 or z is NaN, else +0   (np.maximum(z, 0))
 *   leaky_relu: z if z > 0, else (T)alpha * z
 *   elu:        z if z > 0, else (T)(alpha * expm1((double)z))   (the C library's expm1)
 * Backward: dz = dy * act'(z) in T, act' taken from the forward's output y (y > 0 iff z > 0
 * for all three, with or without a residual):
 *   relu: y > 0 ? dy : 0;  leaky_relu: y > 0 ? dy : (T)alpha * dy;
 *   elu:  y > 0 ? dy : dy * (y + (T)alpha)   (alpha * exp(z) = y + alpha, as TensorFlow).
 * Lanes are selected with bit masks (GCC vector extensions), so NaN and -0 come out exactly as
 * the scalar definitions say.
 */
#ifndef CBN_ACTIVATION_H
#define CBN_ACTIVATION_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h"

#define CBN_ACT_NONE 0
#define CBN_ACT_RELU 1
#define CBN_ACT_LEAKY_RELU 2
#define CBN_ACT_ELU 3

typedef float cbn_act_vf32 __attribute__((vector_size(32)));
typedef int32_t cbn_act_mf32 __attribute__((vector_size(32)));
typedef double cbn_act_vf64 __attribute__((vector_size(32)));
typedef int64_t cbn_act_mf64 __attribute__((vector_size(32)));

#ifdef __AVX__
#include <immintrin.h>
static inline void cbn_act_stream_f32(float *p, cbn_act_vf32 v) { _mm256_stream_ps(p, (__m256)v); }
static inline void cbn_act_stream_f64(double *p, cbn_act_vf64 v) { _mm256_stream_pd(p, (__m256d)v); }
#define CBN_ACT_ALIGNED(p) (((uintptr_t)(p) & 63) == 0)
#else
static inline void cbn_act_stream_f32(float *p, cbn_act_vf32 v) { memcpy(p, &v, sizeof v); }
static inline void cbn_act_stream_f64(double *p, cbn_act_vf64 v) { memcpy(p, &v, sizeof v); }
#define CBN_ACT_ALIGNED(p) 1
#endif

#define CBN_DEFINE_ACTIVATION(T, S, L)                                                       \
static inline T cbn_act_##S(T z, int kind, double alpha) {                                   \
    if (kind == CBN_ACT_RELU) return (z > 0 || z != z) ? z : (T)0;                           \
    if (kind == CBN_ACT_LEAKY_RELU) return z > 0 ? z : (T)alpha * z;                         \
    if (kind == CBN_ACT_ELU) return z > 0 ? z : (T)(alpha * expm1((double)z));               \
    return z;                                                                                \
}                                                                                            \
static inline T cbn_act_gradient_##S(T dy, T y, int kind, double alpha) {                    \
    if (kind == CBN_ACT_RELU) return y > 0 ? dy : (T)0;                                      \
    if (kind == CBN_ACT_LEAKY_RELU) return y > 0 ? dy : (T)alpha * dy;                       \
    return y > 0 ? dy : dy * (y + (T)alpha);                                                 \
}                                                                                            \
/* relu and leaky_relu on L lanes; elu lane by lane (expm1 has no vector form here). */      \
static inline cbn_act_v##S cbn_act_vector_##S(cbn_act_v##S z, int kind, double alpha) {      \
    cbn_act_v##S zero = {0};                                                                 \
    cbn_act_m##S keep = z > zero;                                                            \
    int q;                                                                                   \
    if (kind == CBN_ACT_NONE) return z;                                                      \
    if (kind == CBN_ACT_RELU)                                                                \
        return (cbn_act_v##S)((cbn_act_m##S)z & (keep | (z != z)));                          \
    if (kind == CBN_ACT_LEAKY_RELU)                                                          \
        return (cbn_act_v##S)(((cbn_act_m##S)z & keep)                                       \
                              | ((cbn_act_m##S)(z * (T)alpha) & ~keep));                     \
    for (q = 0; q < L; q++) z[q] = cbn_act_##S(z[q], kind, alpha);                           \
    return z;                                                                                \
}                                                                                            \
/* out[i] = act(z[i] + residual[i]) for a contiguous run (residual may be NULL); streaming   \
 * stores where out's cache lines are whole. */                                              \
static void cbn_activate_##S(const T *z, const T *residual, T *out, int64_t n, int kind,     \
                             double alpha, int stream) {                                     \
    int64_t i = 0;                                                                           \
    cbn_act_v##S v, r;                                                                       \
    if (stream)                                                                              \
        for (; i < n && !CBN_ACT_ALIGNED(out + i); i++)                                      \
            out[i] = cbn_act_##S(residual ? (T)(z[i] + residual[i]) : z[i], kind, alpha);    \
    for (; i + L <= n; i += L) {                                                             \
        memcpy(&v, z + i, sizeof v);                                                         \
        if (residual) {                                                                      \
            memcpy(&r, residual + i, sizeof r);                                              \
            v += r;                                                                          \
        }                                                                                    \
        v = cbn_act_vector_##S(v, kind, alpha);                                              \
        if (stream) cbn_act_stream_##S(out + i, v);                                          \
        else memcpy(out + i, &v, sizeof v);                                                  \
    }                                                                                        \
    for (; i < n; i++)                                                                       \
        out[i] = cbn_act_##S(residual ? (T)(z[i] + residual[i]) : z[i], kind, alpha);        \
}                                                                                            \
/* dz = dy * act'(z) over n_rows rows of width elements (dz's rows contiguous). */          \
static void cbn_act_gradient_rows_##S(const T *dy, int64_t dy_row_stride, const T *y,        \
                                      int64_t y_row_stride, T *dz, int64_t n_rows,           \
                                      int64_t width, int kind, double alpha) {               \
    int64_t r, j;                                                                            \
    for (r = 0; r < n_rows; r++) {                                                           \
        const T *g = dy + r * dy_row_stride, *o = y + r * y_row_stride;                      \
        T *d = dz + r * width;                                                               \
        for (j = 0; j < width; j++) d[j] = cbn_act_gradient_##S(g[j], o[j], kind, alpha);    \
    }                                                                                        \
}                                                                                            \
/* sum_dy += Σ dz, sum_dy_xc += Σ dz·(x − mean) along a run of one feature (x contiguous,  \
 * dy and y dy_step and y_step apart), with dz = dy * act'(z) formed in T in registers: the   \
 * same blocks and order as cbn_gradient_sums_run (_simd.h) on a contiguous array of dz, so   \
 * the sums are bitwise those. */                                                            \
static void cbn_act_gradient_sums_run_##S(const T *dy, int64_t dy_step, const T *y,          \
                                          int64_t y_step, const T *x, int64_t n,             \
                                          double mean, int kind, double alpha,               \
                                          double *sum_dy, double *sum_dy_xc) {               \
    cbn_v8d m = {0}, a[4] = {0}, b[4] = {0}, v;                                              \
    T dz[8];                                                                                 \
    int64_t i = 0, q, k;                                                                     \
    double ta = 0.0, tb = 0.0, g;                                                            \
    m += mean;                                                                               \
    for (; i + 32 <= n; i += 32)                                                             \
        for (q = 0; q < 4; q++) {                                                            \
            for (k = 0; k < 8; k++)                                                          \
                dz[k] = cbn_act_gradient_##S(dy[(i + 8 * q + k) * dy_step],                  \
                                             y[(i + 8 * q + k) * y_step], kind, alpha);      \
            v = cbn_load_##S(dz);                                                            \
            a[q] += v;                                                                       \
            b[q] += v * (cbn_load_##S(x + i + 8 * q) - m);                                   \
        }                                                                                    \
    for (; i < n; i++) {                                                                     \
        g = cbn_act_gradient_##S(dy[i * dy_step], y[i * y_step], kind, alpha);               \
        ta += g;                                                                             \
        tb += g * (x[i] - mean);                                                             \
    }                                                                                        \
    *sum_dy += cbn_reduce(a) + ta;                                                           \
    *sum_dy_xc += cbn_reduce(b) + tb;                                                        \
}

CBN_DEFINE_ACTIVATION(float, f32, 8)
CBN_DEFINE_ACTIVATION(double, f64, 4)

#endif
