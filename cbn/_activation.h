/* Activations fused into batch norm's loops (cbn/_kernels.pyx, section "Activations").
 *
 * Forward: y = act(z + residual), where z is batch norm's output rounded to the data type T,
 * the residual is added in T and the activation computed in T, so the result is bitwise what
 * applying the activation to cbn's batch-norm output gives (cbn.activation defines it):
 *   relu:       z if z > 0 or z is NaN, else +0   (np.maximum(z, 0))
 *   leaky_relu: z if z > 0, else (T)alpha * z
 *   elu:        z if z > 0, else (T)(alpha * expm1((double)z))   (the C library's expm1)
 * Backward: dz = dy * act'(z) in T, act' taken from the forward's output y (y > 0 iff z > 0
 * for all three, with or without a residual):
 *   relu: y > 0 ? dy : 0;  leaky_relu: y > 0 ? dy : (T)alpha * dy;
 *   elu:  y > 0 ? dy : dy * (y + (T)alpha)   (alpha * exp(z) = y + alpha, as TensorFlow).
 * The mask: instead of y, the backward of relu and leaky_relu can take one bit per element
 * (bit b of byte b >> 3, np.packbits' "little" bit order; the kernels address it like any
 * operand, b being the element's index in x's logical C order), which the forward writes.
 * Everything is formed in registers inside the plain kernels' loops (the same formulas, the
 * same order of sums: _simd.h's bodies), so no extra pass and the same bits. Lanes are
 * selected with bit masks (GCC vector extensions): NaN and -0 come out as the scalar
 * definitions say. The build turns off FP contraction, so vector and scalar forms agree.
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

/* 8 lanes of T, and the lane masks their comparisons give. */
typedef int32_t cbn_m8f __attribute__((vector_size(32)));
typedef int64_t cbn_m8d __attribute__((vector_size(64)));
#define CBN_VEC_f32 cbn_v8f
#define CBN_VEC_f64 cbn_v8d
#define CBN_MASK_f32 cbn_m8f
#define CBN_MASK_f64 cbn_m8d

/* A run streams its whole cache lines where _simd.h's cbn_run_streams says so (its ends with
 * ordinary stores), so every vector a streaming store writes is 32-byte aligned. */
#ifdef __AVX__
static inline void cbn_vec_stream_f32(float *p, cbn_v8f v) { _mm256_stream_ps(p, (__m256)v); }
static inline void cbn_vec_stream_f64(double *p, cbn_v8d v) {
    __m256d half[2];
    memcpy(half, &v, sizeof v);
    _mm256_stream_pd(p, half[0]);
    _mm256_stream_pd(p + 4, half[1]);
}
#else
static inline void cbn_vec_stream_f32(float *p, cbn_v8f v) { memcpy(p, &v, sizeof v); }
static inline void cbn_vec_stream_f64(double *p, cbn_v8d v) { memcpy(p, &v, sizeof v); }
#endif

/* Whether element b's bit is set. */
static inline int cbn_get_bit(const uint8_t *mask, int64_t b) { return (mask[b >> 3] >> (b & 7)) & 1; }

/* Set element b's bit where set: atomically, since a byte may hold elements of other threads'
 * work items (the mask starts zeroed). */
static inline void cbn_set_bit(uint8_t *mask, int64_t b, int set) {
    if (set) __atomic_fetch_or(mask + (b >> 3), (uint8_t)(1u << (b & 7)), __ATOMIC_RELAXED);
}

/* Set bits [b, b + n) (n <= 8) from the low bits of `bits`; bytes wholly inside [lo, hi), the
 * bits of the calling run, belong to it alone and take a plain OR. */
static inline void cbn_set_bits(uint8_t *mask, int64_t b, uint32_t bits, int n, int64_t lo,
                                int64_t hi) {
    if (n == 8 && (b & 7) == 0 && b >= lo && b + 8 <= hi) {   /* a whole byte of its own */
        mask[b >> 3] |= (uint8_t)bits;
        return;
    }
    while (n > 0) {
        int64_t byte = b >> 3;
        int shift = (int)(b & 7), take = 8 - shift < n ? 8 - shift : n;
        uint8_t part = (uint8_t)((bits & ((1u << take) - 1)) << shift);
        if (byte * 8 >= lo && byte * 8 + 8 <= hi) mask[byte] |= part;
        else if (part) __atomic_fetch_or(mask + byte, part, __ATOMIC_RELAXED);
        bits >>= take;
        b += take;
        n -= take;
    }
}

/* Set bits [b, b + n) (n <= 64) from `bits`, as cbn_set_bits; 64 bits starting a byte,
 * all the calling run's own, in one 8-byte OR, not a byte (or two half bytes, mid-byte) per
 * 8 elements. */
static inline void cbn_set_word(uint8_t *mask, int64_t b, uint64_t bits, int n, int64_t lo,
                                int64_t hi) {
    uint64_t old;
    int take;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__   /* bit k of the word lands in byte k / 8 */
    if (n == 64 && (b & 7) == 0 && b >= lo && b + 64 <= hi) {
        memcpy(&old, mask + (b >> 3), sizeof old);
        old |= bits;
        memcpy(mask + (b >> 3), &old, sizeof old);
        return;
    }
#endif
    for (; n > 0; n -= take, b += take, bits >>= take) {
        take = n < 8 ? n : 8;
        cbn_set_bits(mask, b, (uint32_t)(bits & 0xFF), take, lo, hi);
    }
}

/* Gathers bits into a word that starts at bit *at (a byte's first bit; the word's bits
 * below the first gathered one are 0): appends the n (<= 8) low bits of `signs`, stores a
 * full word (cbn_set_word, in the run [lo, hi)) and carries what did not fit. Every mask
 * writer goes through it, so that bytes are stored once, whole where the run owns them. */
static inline __attribute__((always_inline)) void cbn_gather_bits(
        uint8_t *mask, int64_t *at, uint64_t *word, int *held, uint32_t signs, int n,
        int64_t lo, int64_t hi) {
    *word |= (uint64_t)signs << *held;
    *held += n;
    if (*held >= 64) {
        cbn_set_word(mask, *at, *word, 64, lo, hi);
        *at += 64;
        *held -= 64;
        *word = *held ? (uint64_t)(signs >> (n - *held)) : 0;
    }
}

/* What a loop does with the mask's bits (a constant in the always-inlined loops): nothing
 * (no mask), store a byte per vector (adjacent bits, each vector's starting a byte that the
 * run owns), or anything else (gathered into words; or one by one). */
#define CBN_NO_BITS 0
#define CBN_ALIGNED_BITS 1
#define CBN_ANY_BITS 2

/* CALL (which names the activation K) with K each activation the kernels know, as a
 * constant: the always-inlined loops then hold that activation's code only. */
#define CBN_BY_KIND(CALL)                                                                    \
    switch (kind) {                                                                          \
    case CBN_ACT_RELU: { const int K = CBN_ACT_RELU; CALL; break; }                          \
    case CBN_ACT_LEAKY_RELU: { const int K = CBN_ACT_LEAKY_RELU; CALL; break; }              \
    default: { const int K = kind; CALL; }                                                   \
    }

/* Bits [b, b + 8) as the low byte. */
static inline uint32_t cbn_get_bits8(const uint8_t *mask, int64_t b) {
    int shift = (int)(b & 7);
    uint32_t v = mask[b >> 3] >> shift;
    if (shift) v |= (uint32_t)mask[(b >> 3) + 1] << (8 - shift);
    return v & 0xFF;
}

/* The backward prefetches the mask this many bytes (8 elements a byte) ahead of the vector
 * it reads: dz waits for its byte, and the mask's stream (1/32 of dy's bytes, a new line
 * every 512 elements) is one the hardware prefetchers may not run ahead on. (A prefetch
 * never faults: past the mask's end it does nothing.) */
#define CBN_MASK_AHEAD 256

/* The mask's 8 bits from element b on (`aligned`: b starts a byte), its stream prefetched. */
static inline uint32_t cbn_mask_bits8(const uint8_t *mask, int64_t b, int aligned) {
    __builtin_prefetch(mask + (b >> 3) + CBN_MASK_AHEAD);
    return aligned ? mask[b >> 3] : cbn_get_bits8(mask, b);
}

/* relu's dz: d where the mask's 8 bits (lane k: bit k) are set, else +0; leaky_relu's: d
 * where set, else other. With AVX-512 the byte is a mask register as it is: one masked move
 * where expanding it into lanes took 4 instructions per vector. The same values as
 * cbn_dz8's expanded selects (+0 in the cleared lanes). Elsewhere unused (the stubs let
 * cbn_dz8 and cbn_dz8w compile; CBN_MASK_REGISTERS 0 removes their calls). */
#if defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CBN_MASK_REGISTERS 1
static inline cbn_v8f cbn_keep8_f32(cbn_v8f d, uint32_t bits) {
    return (cbn_v8f)_mm256_maskz_mov_ps((__mmask8)bits, (__m256)d);
}
static inline cbn_v8d cbn_keep8_f64(cbn_v8d d, uint32_t bits) {
    return (cbn_v8d)_mm512_maskz_mov_pd((__mmask8)bits, (__m512d)d);
}
static inline cbn_v8f cbn_pick8_f32(uint32_t bits, cbn_v8f d, cbn_v8f other) {
    return (cbn_v8f)_mm256_mask_mov_ps((__m256)other, (__mmask8)bits, (__m256)d);
}
static inline cbn_v8d cbn_pick8_f64(uint32_t bits, cbn_v8d d, cbn_v8d other) {
    return (cbn_v8d)_mm512_mask_mov_pd((__m512d)other, (__mmask8)bits, (__m512d)d);
}
/* relu's dz of 8 elements at p, widened to doubles: the mask's byte selects in the
 * conversion itself (float: one instruction that loads, selects and widens, where the
 * masked load then the conversion took two). +0 in the cleared lanes, as cbn_keep8. */
static inline cbn_v8d cbn_keep8w_f32(const float *p, uint32_t bits) {
    return (cbn_v8d)_mm512_maskz_cvtps_pd((__mmask8)bits, _mm256_loadu_ps(p));
}
static inline cbn_v8d cbn_keep8w_f64(const double *p, uint32_t bits) {
    return (cbn_v8d)_mm512_maskz_loadu_pd((__mmask8)bits, p);
}
#else
#define CBN_MASK_REGISTERS 0
static inline cbn_v8f cbn_keep8_f32(cbn_v8f d, uint32_t bits) { (void)bits; return d; }
static inline cbn_v8d cbn_keep8_f64(cbn_v8d d, uint32_t bits) { (void)bits; return d; }
static inline cbn_v8f cbn_pick8_f32(uint32_t bits, cbn_v8f d, cbn_v8f other) {
    (void)bits; (void)other; return d;
}
static inline cbn_v8d cbn_pick8_f64(uint32_t bits, cbn_v8d d, cbn_v8d other) {
    (void)bits; (void)other; return d;
}
static inline cbn_v8d cbn_keep8w_f32(const float *p, uint32_t bits) {
    (void)p; (void)bits; return (cbn_v8d){0};
}
static inline cbn_v8d cbn_keep8w_f64(const double *p, uint32_t bits) {
    (void)p; (void)bits; return (cbn_v8d){0};
}
#endif

/* The lanes' bit weights, and the 8 lane signs as a byte (lane k is bit k). */
static const cbn_m8f cbn_lane_bits_f32 = {1, 2, 4, 8, 16, 32, 64, 128};
static const cbn_m8d cbn_lane_bits_f64 = {1, 2, 4, 8, 16, 32, 64, 128};
#ifdef __AVX__
static inline uint32_t cbn_signs_f32(cbn_m8f m) { return (uint32_t)_mm256_movemask_ps((__m256)m); }
static inline uint32_t cbn_signs_f64(cbn_m8d m) {
    __m256d half[2];
    memcpy(half, &m, sizeof m);
    return (uint32_t)(_mm256_movemask_pd(half[0]) | (_mm256_movemask_pd(half[1]) << 4));
}
#else
static inline uint32_t cbn_signs_f32(cbn_m8f m) {
    cbn_m8f t = m & cbn_lane_bits_f32;
    return (uint32_t)(t[0] | t[1] | t[2] | t[3] | t[4] | t[5] | t[6] | t[7]);
}
static inline uint32_t cbn_signs_f64(cbn_m8d m) {
    cbn_m8d t = m & cbn_lane_bits_f64;
    return (uint32_t)(t[0] | t[1] | t[2] | t[3] | t[4] | t[5] | t[6] | t[7]);
}
#endif

/* The mask's byte of 8 values z of batch norm (+ residual): bit k = (z[k] > 0), which is
 * (act(z)[k] > 0) for each activation (alpha >= 0; NaN: neither). Taken from z, where relu
 * compares it anyway: with AVX-512 one comparison into a mask register serves both, stored
 * as it is (from act(z), a second comparison, expanded to lanes and gathered back). */
#if CBN_MASK_REGISTERS
static inline uint32_t cbn_positive8_f32(cbn_v8f z) {
    return (uint32_t)_mm256_cmp_ps_mask((__m256)z, _mm256_setzero_ps(), _CMP_GT_OS);
}
static inline uint32_t cbn_positive8_f64(cbn_v8d z) {
    return (uint32_t)_mm512_cmp_pd_mask((__m512d)z, _mm512_setzero_pd(), _CMP_GT_OS);
}
#else
static inline uint32_t cbn_positive8_f32(cbn_v8f z) {
    const cbn_v8f zero = {0};
    return cbn_signs_f32(z > zero);
}
static inline uint32_t cbn_positive8_f64(cbn_v8d z) {
    const cbn_v8d zero = {0};
    return cbn_signs_f64(z > zero);
}
#endif

/* cbn_normalize_act_image's steps for CBN_PLANES_WALK (_simd.h). */
#define CBN_ACT_IMAGE1(S, i, p)                                                              \
    cbn_act_image1_##S(x, residual, y, i, p, mean, scale, shift, kind, alpha, mask, &at,     \
                       &word, &held, lo, hi)
#define CBN_ACT_IMAGE1_f32(T, i, p) CBN_ACT_IMAGE1(f32, i, p)
#define CBN_ACT_IMAGE1_f64(T, i, p) CBN_ACT_IMAGE1(f64, i, p)
#define CBN_ACT_IMAGE8(S, i, stream)                                                         \
    cbn_act_image8_##S(x, residual, y, i, m, s, b, kind, alpha, stream, mask, &at, &word,    \
                       &held, lo, hi)
#define CBN_ACT_IMAGE8_MIXED(S, i, p, in_plane, stream)                                      \
    cbn_act_image8_##S(x, residual, y, i, cbn_plane_factor(mean, p, in_plane),               \
                       cbn_plane_factor(scale, p, in_plane),                                 \
                       cbn_plane_factor(shift, p, in_plane), kind, alpha, stream, mask, &at, \
                       &word, &held, lo, hi)

#define CBN_DEFINE_ACTIVATION(T, S)                                                          \
static inline T cbn_act_##S(T z, int kind, double alpha) {                                   \
    if (kind == CBN_ACT_RELU) return (z > 0 || z != z) ? z : (T)0;                           \
    if (kind == CBN_ACT_LEAKY_RELU) return z > 0 ? z : (T)alpha * z;                         \
    if (kind == CBN_ACT_ELU) return z > 0 ? z : (T)(alpha * expm1((double)z));               \
    return z;                                                                                \
}                                                                                            \
static inline T cbn_act_gradient_##S(T dy, T y, int keep, int kind, double alpha) {         \
    if (kind == CBN_ACT_RELU) return keep ? dy : (T)0;                                       \
    if (kind == CBN_ACT_LEAKY_RELU) return keep ? dy : (T)alpha * dy;                        \
    return keep ? dy : dy * (y + (T)alpha);                                                  \
}                                                                                            \
/* act' at element i of a run: from y (y[i * y_step] > 0), or from the mask (bit b + i *     \
 * bit_step) when there is one. */                                                           \
static inline T cbn_dz1_##S(T dy, const T *y, int64_t y_step, const uint8_t *mask, int64_t b,\
                            int64_t bit_step, int64_t i, int kind, double alpha) {           \
    if (mask) return cbn_act_gradient_##S(dy, 0, cbn_get_bit(mask, b + i * bit_step), kind,  \
                                          alpha);                                            \
    return cbn_act_gradient_##S(dy, y[i * y_step], y[i * y_step] > 0, kind, alpha);          \
}                                                                                            \
static inline CBN_VEC_##S cbn_vec_load_##S(const T *p, int64_t step) {                       \
    CBN_VEC_##S v;                                                                           \
    int k;                                                                                   \
    if (step == 1) memcpy(&v, p, sizeof v);                                                  \
    else for (k = 0; k < 8; k++) v[k] = p[k * step];                                         \
    return v;                                                                                \
}                                                                                            \
static inline void cbn_vec_put_##S(T *p, CBN_VEC_##S v, int stream) {                        \
    if (stream) cbn_vec_stream_##S(p, v);                                                    \
    else memcpy(p, &v, sizeof v);                                                            \
}                                                                                            \
static inline CBN_VEC_##S cbn_act8_##S(CBN_VEC_##S z, int kind, double alpha) {              \
    CBN_VEC_##S zero = {0};                                                                  \
    CBN_MASK_##S keep = z > zero;                                                            \
    int k;                                                                                   \
    if (kind == CBN_ACT_RELU)   /* z > 0 or NaN: not z <= 0 (one comparison) */              \
        return (CBN_VEC_##S)((CBN_MASK_##S)z & ~(z <= zero));                                \
    if (kind == CBN_ACT_LEAKY_RELU)                                                          \
        return (CBN_VEC_##S)(((CBN_MASK_##S)z & keep)                                        \
                             | ((CBN_MASK_##S)(z * (T)alpha) & ~keep));                      \
    if (kind == CBN_ACT_ELU)                                                                 \
        for (k = 0; k < 8; k++) z[k] = cbn_act_##S(z[k], kind, alpha);                       \
    return z;                                                                                \
}                                                                                            \
/* dz of 8 elements from i on (dy y_step or 1 apart as for cbn_dz1); `aligned`: the mask's  \
 * bits b + i on are adjacent and start a byte (then one byte load fetches them). */        \
static inline __attribute__((always_inline)) CBN_VEC_##S cbn_dz8_##S(                       \
        const T *dy, int64_t dy_step, const T *y, int64_t y_step, const uint8_t *mask,       \
        int64_t b, int64_t bit_step, int64_t i, int kind, double alpha, int aligned) {       \
    CBN_VEC_##S zero = {0}, other, d, v = zero;                                              \
    CBN_MASK_##S keep;                                                                       \
    int k;                                                                                   \
    uint32_t bits;                                                                           \
    if (CBN_MASK_REGISTERS && mask && bit_step == 1 && dy_step == 1) {                       \
        bits = cbn_mask_bits8(mask, b + i, aligned);                                         \
        d = cbn_vec_load_##S(dy + i, 1);                                                     \
        if (kind == CBN_ACT_RELU) return cbn_keep8_##S(d, bits);                             \
        return cbn_pick8_##S(bits, d, d * (T)alpha);   /* leaky_relu: elu needs y */         \
    }                                                                                        \
    d = cbn_vec_load_##S(dy + i * dy_step, dy_step);                                         \
    if (mask && bit_step == 1) {                                                             \
        keep = ((CBN_MASK_##S){0} + (int32_t)cbn_mask_bits8(mask, b + i, aligned))           \
               & cbn_lane_bits_##S;                                                          \
        keep = keep != (CBN_MASK_##S){0};                                                    \
    } else if (mask) {                                                                       \
        for (k = 0; k < 8; k++) keep[k] = -cbn_get_bit(mask, b + (i + k) * bit_step);        \
    } else {                                                                                 \
        v = cbn_vec_load_##S(y + i * y_step, y_step);                                        \
        keep = v > zero;                                                                     \
    }                                                                                        \
    if (kind == CBN_ACT_RELU) return (CBN_VEC_##S)((CBN_MASK_##S)d & keep);                  \
    other = kind == CBN_ACT_LEAKY_RELU ? d * (T)alpha : d * (v + (T)alpha);                  \
    return (CBN_VEC_##S)(((CBN_MASK_##S)d & keep) | ((CBN_MASK_##S)other & ~keep));          \
}                                                                                            \
/* cbn_dz8 widened to doubles, what the sums and dx take where dz itself is not stored:      \
 * relu's from the mask in one instruction with mask registers (cbn_keep8w). */              \
static inline __attribute__((always_inline)) cbn_v8d cbn_dz8w_##S(                           \
        const T *dy, int64_t dy_step, const T *y, int64_t y_step, const uint8_t *mask,       \
        int64_t b, int64_t bit_step, int64_t i, int kind, double alpha, int aligned) {       \
    if (CBN_MASK_REGISTERS && kind == CBN_ACT_RELU && mask && bit_step == 1 && dy_step == 1) \
        return cbn_keep8w_##S(dy + i, cbn_mask_bits8(mask, b + i, aligned));                 \
    return cbn_widen_##S(cbn_dz8_##S(dy, dy_step, y, y_step, mask, b, bit_step, i, kind,     \
                                     alpha, aligned));                                       \
}                                                                                            \
/* Bits b + i = (y[i] > 0) for i in [from, to) of a run of n adjacent bits, gathered: an     \
 * atomic OR per element, next to streaming stores, drains the write-combining buffers (a    \
 * masked forward then took 1.8x the unmasked one). */                                       \
static inline void cbn_set_signs_##S(uint8_t *mask, int64_t b, const T *y, int64_t from,     \
                                     int64_t to, int64_t lo, int64_t hi) {                   \
    uint64_t word = 0;                                                                       \
    int held = (int)((b + from) & 7);                                                        \
    int64_t i, at = b + from - held;                                                         \
    for (i = from; i < to; i++)                                                              \
        cbn_gather_bits(mask, &at, &word, &held, y[i] > 0, 1, lo, hi);                       \
    if (held) cbn_set_word(mask, at, word, held, lo, hi);                                    \
}                                                                                            \
/* Bits b + f * bit_step + r = (y[r * y_row_stride + f] > 0) of n_rows rows of width        \
 * features whose rows' bits are adjacent (a channels_last or transposed view of x, the mask \
 * in x's logical C order): feature by feature, 64 bits at a time, where a bit per element  \
 * would be an atomic OR per element (10x the unmasked forward). */                         \
static void cbn_set_row_signs_##S(uint8_t *mask, int64_t b, int64_t bit_step, const T *y,    \
                                  int64_t y_row_stride, int64_t n_rows, int64_t width) {     \
    uint64_t word;                                                                           \
    int64_t f, r, first, at;                                                                 \
    int held;                                                                                \
    for (f = 0; f < width; f++) {                                                            \
        first = b + f * bit_step;                                                            \
        held = (int)(first & 7);                                                             \
        at = first - held;                                                                   \
        for (word = 0, r = 0; r < n_rows; r++)                                               \
            cbn_gather_bits(mask, &at, &word, &held, y[r * y_row_stride + f] > 0, 1, first,  \
                            first + n_rows);                                                 \
        if (held) cbn_set_word(mask, at, word, held, first, first + n_rows);                 \
    }                                                                                        \
}                                                                                            \
/* y = act((T)((x - mean) * scale + shift) + residual) along a contiguous run (residual may  \
 * be NULL; factors per element or one each, as cbn_normalize_stream). */                    \
static inline void cbn_normalize_act_one_##S(const T *x, const T *residual, T *y, int64_t i, \
                                             int64_t k, const double *mean,                  \
                                             const double *scale, const double *shift,       \
                                             int kind, double alpha, uint8_t *mask,          \
                                             int64_t b, int64_t bit_step) {                  \
    T t = (T)((x[i] - mean[k]) * scale[k] + shift[k]);                                       \
    y[i] = cbn_act_##S(residual ? (T)(t + residual[i]) : t, kind, alpha);                    \
    if (mask) cbn_set_bit(mask, b + i * bit_step, y[i] > 0);                                 \
}                                                                                            \
/* ... and with a mask, bit b + i * bit_step = (y[i] > 0), i.e. z > 0. */                    \
/* The vector part from i on; returns where it stopped. Always inlined, so that a constant  \
 * kind (cbn_normalize_act's switch) leaves one activation's code in the loop, and a        \
 * constant `bits`: CBN_NO_BITS (mask NULL), CBN_ALIGNED_BITS (adjacent bits, b + i starting \
 * a byte: each vector's 8 bits are a byte of the run's own, stored as it is) or            \
 * CBN_ANY_BITS (gathered into 64-bit words, or set one by one if not adjacent). */         \
static inline __attribute__((always_inline)) int64_t cbn_normalize_act_vectors_##S(          \
        const T *x, const T *residual, T *y, int64_t i, int64_t n, const double *mean,       \
        const double *scale, const double *shift, int per_element, int kind, double alpha,   \
        int64_t stream_end, uint8_t *mask, int64_t b, int64_t bit_step, int64_t lo,          \
        int64_t hi, int bits) {                                                              \
    uint64_t word = 0;                                                                       \
    int k, held = (int)((b + i) & 7);   /* word's bits start the byte of bit b + i */        \
    int64_t at = b + i - held;                                                               \
    CBN_VEC_##S v, zero = {0};                                                               \
    CBN_MASK_##S positive;                                                                   \
    const cbn_v8d mean_1 = cbn_one(mean, per_element), scale_1 = cbn_one(scale, per_element), \
                  shift_1 = cbn_one(shift, per_element);                                     \
    for (; i + 8 <= n; i += 8) {                                                             \
        v = __builtin_convertvector((cbn_load_##S(x + i)                                     \
                                     - cbn_factor(mean, i, per_element, mean_1))             \
                                    * cbn_factor(scale, i, per_element, scale_1)             \
                                    + cbn_factor(shift, i, per_element, shift_1),            \
                                    CBN_VEC_##S);                                            \
        if (residual) v += cbn_vec_load_##S(residual + i, 1);                                \
        if (bits == CBN_ALIGNED_BITS) mask[(b + i) >> 3] = (uint8_t)cbn_positive8_##S(v);    \
        else if (bits == CBN_ANY_BITS) positive = v > zero;                                  \
        v = cbn_act8_##S(v, kind, alpha);                                                    \
        cbn_vec_put_##S(y + i, v, i < stream_end);                                           \
        if (bits == CBN_ANY_BITS) {                                                          \
            if (bit_step == 1) {                                                             \
                cbn_gather_bits(mask, &at, &word, &held, cbn_signs_##S(positive), 8, lo, hi);\
            } else {                                                                         \
                for (k = 0; k < 8; k++)                                                      \
                    cbn_set_bit(mask, b + (i + k) * bit_step, positive[k] & 1);              \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    if (bits == CBN_ANY_BITS && bit_step == 1 && held)                                       \
        cbn_set_word(mask, at, word, held, lo, hi);                                          \
    return i;                                                                                \
}                                                                                            \
/* Always inlined: called per row of an FI tile, per_element then folds (left to GCC, it    \
 * stopped inlining it as the file grew: 1.3x the instructions on the avx2 level). The      \
 * caller owns the mask's bits [lo, hi) (at least the run's, [b, b + n), where bit_step is  \
 * 1): bytes wholly inside take plain ORs, the others atomic ones. */                        \
static inline __attribute__((always_inline)) void cbn_normalize_act_##S(                     \
        const T *x, const T *residual, T *y, int64_t n, const double *mean,                  \
        const double *scale, const double *shift, int per_element, int kind, double alpha,   \
        int stream, uint8_t *mask, int64_t b, int64_t bit_step, int64_t lo, int64_t hi) {    \
    uint8_t *scalar_mask = bit_step == 1 ? NULL : mask;                                      \
    int64_t i = 0, head;                                                                     \
    const int64_t stream_end = cbn_stream_end(                                               \
        y, sizeof(T), n, stream && cbn_run_streams(y, n * (int64_t)sizeof(T)), &head);       \
    for (; i < head; i++)                                                                    \
        cbn_normalize_act_one_##S(x, residual, y, i, per_element ? i : 0, mean, scale, shift,\
                                  kind, alpha, scalar_mask, b, bit_step);                    \
    if (mask && bit_step == 1) cbn_set_signs_##S(mask, b, y, 0, i, lo, hi);                  \
    if (!mask)                                                                               \
        CBN_BY_KIND(i = cbn_normalize_act_vectors_##S(x, residual, y, i, n, mean, scale,     \
                                                      shift, per_element, K, alpha,          \
                                                      stream_end, NULL, b, bit_step, lo, hi, \
                                                      CBN_NO_BITS))                          \
    else if (bit_step == 1 && ((b + i) & 7) == 0)                                            \
        CBN_BY_KIND(i = cbn_normalize_act_vectors_##S(x, residual, y, i, n, mean, scale,     \
                                                      shift, per_element, K, alpha,          \
                                                      stream_end, mask, b, 1, lo, hi,        \
                                                      CBN_ALIGNED_BITS))                     \
    else                                                                                     \
        CBN_BY_KIND(i = cbn_normalize_act_vectors_##S(x, residual, y, i, n, mean, scale,     \
                                                      shift, per_element, K, alpha,          \
                                                      stream_end, mask, b, bit_step, lo, hi, \
                                                      CBN_ANY_BITS))                         \
    int64_t tail = i;                                                                        \
    for (; i < n; i++)                                                                       \
        cbn_normalize_act_one_##S(x, residual, y, i, per_element ? i : 0, mean, scale, shift,\
                                  kind, alpha, scalar_mask, b, bit_step);                    \
    if (mask && bit_step == 1) cbn_set_signs_##S(mask, b, y, tail, n, lo, hi);               \
}                                                                                            \
/* An activated element i of plane p (scalar) and 8 from i on (factors m, s, c; each lane's  \
 * own plane's where a vector spans two), their bits gathered (cbn_gather_bits) in [lo, hi). */\
static inline void cbn_act_image1_##S(const T *x, const T *residual, T *y, int64_t i,        \
                                      int64_t p, const double *mean, const double *scale,    \
                                      const double *shift, int kind, double alpha,           \
                                      uint8_t *mask, int64_t *at, uint64_t *word, int *held, \
                                      int64_t lo, int64_t hi) {                              \
    cbn_normalize_act_one_##S(x, residual, y, i, p, mean, scale, shift, kind, alpha, NULL,   \
                              0, 0);                                                         \
    if (mask) cbn_gather_bits(mask, at, word, held, y[i] > 0, 1, lo, hi);                    \
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_act_image8_##S(                        \
        const T *x, const T *residual, T *y, int64_t i, cbn_v8d m, cbn_v8d s, cbn_v8d c,     \
        int kind, double alpha, int stream, uint8_t *mask, int64_t *at, uint64_t *word,      \
        int *held, int64_t lo, int64_t hi) {                                                 \
    CBN_VEC_##S v = __builtin_convertvector((cbn_load_##S(x + i) - m) * s + c, CBN_VEC_##S); \
    CBN_VEC_##S zero = {0};                                                                  \
    CBN_MASK_##S positive;                                                                   \
    if (residual) v += cbn_vec_load_##S(residual + i, 1);                                    \
    positive = v > zero;                                                                     \
    cbn_vec_put_##S(y + i, cbn_act8_##S(v, kind, alpha), stream);                            \
    if (mask) cbn_gather_bits(mask, at, word, held, cbn_signs_##S(positive), 8, lo, hi);     \
}                                                                                            \
/* cbn_normalize_act of n_planes runs of n >= 8 that follow each other in every operand, as  \
 * are their bits (from bit): one run, walked as cbn_normalize_planes walks it, its bits     \
 * gathered into words. Element for element the values of the plane-by-plane loop below. */  \
static inline __attribute__((always_inline)) void cbn_normalize_act_image_##S(               \
        const T *x, const T *residual, T *y, int64_t n_planes, int64_t n, const double *mean,\
        const double *scale, const double *shift, int kind, double alpha, int stream,        \
        uint8_t *mask, int64_t bit) {                                                        \
    uint64_t word = 0;                                                                       \
    int held = (int)(bit & 7);                                                               \
    int64_t at = bit - held;                                                                 \
    const int64_t lo = bit, hi = bit + n_planes * n;                                         \
    CBN_PLANES_WALK(T, S, y, CBN_ACT_IMAGE1_##S, CBN_PLANE_Y_FACTORS, CBN_ACT_IMAGE8,        \
                    CBN_ACT_IMAGE8_MIXED)                                                    \
    if (mask && held) cbn_set_word(mask, at, word, held, lo, hi);                            \
}                                                                                            \
/* cbn_normalize_act of n_planes runs of n (one feature each, features p = 0, 1, ... at     \
 * their factors' [p]), each operand's runs *_step elements apart (the mask's b_step bits):  \
 * the planes of an NCHW image, in memory order, as cbn_act_input_gradient_planes below.    \
 * Walked from the kernels' tables a plane at a time, the fused forward of NCHW 7 x 7 planes \
 * took 1.9x the plain forward's time in cache ((64,64,7,7) float32, one thread). Where the  \
 * planes' bits follow one another, the call owns them all: the bytes that two planes share \
 * take plain ORs, where each plane's two mid-byte ends took an atomic OR (1.45x the plain  \
 * forward, half the masked forward's time in its lock instructions). */                     \
static void cbn_normalize_act_planes_##S(                                                    \
        const T *x, int64_t x_step, const T *residual, int64_t r_step, T *y, int64_t y_step, \
        int64_t n_planes, int64_t n, const double *mean, const double *scale,                \
        const double *shift, int kind, double alpha, int stream, uint8_t *mask, int64_t b,   \
        int64_t b_step, int64_t bit_step) {                                                  \
    int64_t p, first;                                                                        \
    int joined = bit_step == 1 && b_step == n;                                               \
    if (n >= 8 && x_step == n && y_step == n && (!residual || r_step == n)                   \
            && (!mask || joined)) {                                                          \
        CBN_BY_KIND(cbn_normalize_act_image_##S(x, residual, y, n_planes, n, mean, scale,    \
                                                shift, K, alpha, stream, mask, b))           \
        return;                                                                              \
    }                                                                                        \
    for (p = 0; p < n_planes; p++) {                                                         \
        first = b + p * b_step;                                                              \
        cbn_normalize_act_##S(x + p * x_step, residual ? residual + p * r_step : NULL,       \
                              y + p * y_step, n, mean + p, scale + p, shift + p, 0, kind,    \
                              alpha, stream, mask, first, bit_step, joined ? b : first,      \
                              joined ? b + n_planes * n : first + n);                        \
    }                                                                                        \
}                                                                                            \
/* dx = (T)(coef_dy * dz + coef_xc * (x - mean) + offset) and dres = dz (if not NULL), with  \
 * dz = dy * act'(z) (from y, or from the mask if not NULL), along a contiguous run (factors  \
 * as above). */                                                                             \
static inline void cbn_act_input_gradient_one_##S(const T *dy, const T *y, const T *x, T *dx,\
                                                  T *dres, int64_t i, int64_t k,             \
                                                  const double *mean, const double *coef_dy, \
                                                  const double *coef_xc,                     \
                                                  const double *offset, int kind,            \
                                                  double alpha, const uint8_t *mask,         \
                                                  int64_t b, int64_t bit_step) {             \
    T dz = cbn_dz1_##S(dy[i], y, 1, mask, b, bit_step, i, kind, alpha);                      \
    dx[i] = (T)(coef_dy[k] * dz + coef_xc[k] * (x[i] - mean[k]) + offset[k]);                \
    if (dres) dres[i] = dz;                                                                  \
}                                                                                            \
static inline __attribute__((always_inline)) int64_t cbn_act_input_gradient_vectors_##S(   \
        const T *dy, const T *y, const T *x, T *dx, T *dres, int64_t i, int64_t n,           \
        const double *mean, const double *coef_dy, const double *coef_xc,                    \
        const double *offset, int per_element, int kind, double alpha, int64_t stream_end,   \
        const uint8_t *mask, int64_t b, int64_t bit_step, int aligned) {                     \
    CBN_VEC_##S d = {0};                                                                     \
    cbn_v8d w;                                                                               \
    const cbn_v8d mean_1 = cbn_one(mean, per_element),                                       \
                  coef_dy_1 = cbn_one(coef_dy, per_element),                                 \
                  coef_xc_1 = cbn_one(coef_xc, per_element),                                 \
                  offset_1 = cbn_one(offset, per_element);                                   \
    for (; i + 8 <= n; i += 8) {                                                             \
        if (dres) {                                                                          \
            d = cbn_dz8_##S(dy, 1, y, 1, mask, b, bit_step, i, kind, alpha, aligned);        \
            w = cbn_widen_##S(d);                                                            \
        } else {                                                                             \
            w = cbn_dz8w_##S(dy, 1, y, 1, mask, b, bit_step, i, kind, alpha, aligned);       \
        }                                                                                    \
        cbn_vec_put_##S(dx + i, cbn_narrow_##S(                                              \
            cbn_factor(coef_dy, i, per_element, coef_dy_1) * w                               \
            + cbn_factor(coef_xc, i, per_element, coef_xc_1)                                 \
              * (cbn_load_##S(x + i) - cbn_factor(mean, i, per_element, mean_1))             \
            + cbn_factor(offset, i, per_element, offset_1)), i < stream_end);                \
        if (dres) cbn_vec_put_##S(dres + i, d, i < stream_end);                              \
    }                                                                                        \
    return i;                                                                                \
}                                                                                            \
/* `adjacent`: the mask's bits are adjacent (bit_step 1); the vector loop then reads them a \
 * byte at a time where its first element starts a byte. */                                \
static inline __attribute__((always_inline)) void cbn_act_input_gradient_k_##S(           \
        const T *dy, const T *y, const T *x, T *dx, T *dres, int64_t n, const double *mean,  \
        const double *coef_dy, const double *coef_xc, const double *offset, int per_element, \
        int kind, double alpha, int stream, const uint8_t *mask, int64_t b,                  \
        int64_t bit_step, int adjacent) {                                                    \
    int64_t i = 0, head;                                                                     \
    /* dres streams beside dx where their lines start at the same offset, else neither */   \
    const int64_t stream_end = cbn_stream_end(                                               \
        dx, sizeof(T), n,                                                                    \
        stream && cbn_run_streams(dx, n * (int64_t)sizeof(T))                                \
        && (!dres || ((uintptr_t)dres & 63) == ((uintptr_t)dx & 63)), &head);                \
    for (; i < head; i++)                                                                    \
        cbn_act_input_gradient_one_##S(dy, y, x, dx, dres, i, per_element ? i : 0, mean,     \
                                       coef_dy, coef_xc, offset, kind, alpha, mask, b,       \
                                       bit_step);                                            \
    if (adjacent && ((b + i) & 7) == 0)                                                      \
        i = cbn_act_input_gradient_vectors_##S(dy, y, x, dx, dres, i, n, mean, coef_dy,      \
                                               coef_xc, offset, per_element, kind, alpha,    \
                                               stream_end, mask, b, bit_step, 1);            \
    else                                                                                     \
        i = cbn_act_input_gradient_vectors_##S(dy, y, x, dx, dres, i, n, mean, coef_dy,      \
                                               coef_xc, offset, per_element, kind, alpha,    \
                                               stream_end, mask, b, bit_step, 0);            \
    for (; i < n; i++)                                                                       \
        cbn_act_input_gradient_one_##S(dy, y, x, dx, dres, i, per_element ? i : 0, mean,     \
                                       coef_dy, coef_xc, offset, kind, alpha, mask, b,       \
                                       bit_step);                                            \
}

CBN_DEFINE_ACTIVATION(float, f32)
CBN_DEFINE_ACTIVATION(double, f64)

/* The sums of batch norm's backward with dz in place of dy: _simd.h's loop bodies, dy and
 * y (or the mask) read through these. Rows (FI): row strides, and the mask's bit step
 * between features; runs (RI): steps. (y + r * stride is only formed without a mask.) */
#define CBN_ROW_Y(r) (mask ? y : y + (r) * y_row_stride)
#define CBN_DZ(S, r, k) (                                                                    \
    cbn_dz8w_##S(dy + (r) * dy_row_stride, 1, CBN_ROW_Y(r), 1, mask,                         \
                bit0 + (r) * mask_row_stride, bit_step, (k), kind, alpha, aligned))
#define CBN_DZ1(S, r, k) cbn_dz1_##S(dy[(r) * dy_row_stride + (k)], CBN_ROW_Y(r), 1, mask,      \
                                     bit0 + (r) * mask_row_stride, bit_step, (k), kind, alpha)
#define CBN_DZ_RUN(S, i) (                                                                   \
    cbn_dz8w_##S(dy, dy_step, y, y_step, mask, bit0, bit_step, (i), kind, alpha, aligned))
#define CBN_DZ1_RUN(S, i) cbn_dz1_##S(dy[(i) * dy_step], y, y_step, mask, bit0, bit_step, (i),    \
                                      kind, alpha)

#define CBN_NEXT_DZ_ROWS (row < n_rows ? (dy = dy_base + dy_rows[row],                       \
                                           y = y ? y_base + y_rows[row] : y,                \
                                           bit0 = mask ? bit_base + bit_rows[row] : bit0,   \
                                           x = x_base + x_rows[row]) : x)

/* CALL with D the residual's gradient dres (T *), a constant NULL where there is none: the
 * vector loop then tests nothing per vector for it. */
#define CBN_WITH_DRES(T, CALL)                                                               \
    if (dres) { T *D = dres; CALL; } else { T *const D = NULL; CALL; }

/* cbn_act_input_gradient_image's steps for CBN_PLANES_WALK (_simd.h). */
#define CBN_ACT_IMAGE_DX1(S, i, p)                                                           \
    cbn_act_input_gradient_one_##S(dy, y, x, dx, dres, i, p, mean, coef_dy, coef_xc, offset, \
                                   kind, alpha, mask, bit, 1)
#define CBN_ACT_IMAGE_DX1_f32(T, i, p) CBN_ACT_IMAGE_DX1(f32, i, p)
#define CBN_ACT_IMAGE_DX1_f64(T, i, p) CBN_ACT_IMAGE_DX1(f64, i, p)
#define CBN_ACT_IMAGE_DX8(S, i, stream)                                                      \
    cbn_act_image_dx8_##S(dy, y, x, dx, dres, i, m, a, c, o, kind, alpha, stream, mask, bit)
#define CBN_ACT_IMAGE_DX8_MIXED(S, i, p, in_plane, stream)                                   \
    cbn_act_image_dx8_##S(dy, y, x, dx, dres, i, cbn_plane_factor(mean, p, in_plane),        \
                          cbn_plane_factor(coef_dy, p, in_plane),                            \
                          cbn_plane_factor(coef_xc, p, in_plane),                            \
                          cbn_plane_factor(offset, p, in_plane), kind, alpha, stream, mask,  \
                          bit)

#define CBN_DEFINE_ACTIVATION_SUMS(T, S)                                                     \
static inline __attribute__((always_inline)) void cbn_act_gradient_sums_k_##S(            \
        const T *dy, int64_t dy_row_stride, const T *y, int64_t y_row_stride, const T *x,    \
        int64_t x_row_stride, int64_t n_rows, int64_t width, const double *mean, int kind,   \
        double alpha, double *sum_dy, double *sum_dy_xc, const uint8_t *mask, int64_t bit0,  \
        int64_t mask_row_stride, int64_t bit_step, int aligned) {                            \
    CBN_GRADIENT_SUMS_BODY(T, S, CBN_DZ, CBN_DZ1)                                            \
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_act_gradient_sums_run_k_##S(        \
        const T *dy, int64_t dy_step, const T *y, int64_t y_step, const T *x, int64_t n,     \
        double mean, int kind, double alpha, double *sum_dy, double *sum_dy_xc,              \
        const uint8_t *mask, int64_t bit0, int64_t bit_step, int aligned) {                  \
    CBN_GRADIENT_RUN_BODY(T, S, CBN_DZ_RUN, CBN_DZ1_RUN)                                     \
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_act_gradient_sums_steps_k_##S(      \
        const T *dy, int64_t dy_step, const T *y, int64_t y_step, const T *x, int64_t x_step,\
        int64_t n, double mean, int kind, double alpha, double *sum_dy, double *sum_dy_xc,   \
        const uint8_t *mask, int64_t bit0, int64_t bit_step) {                               \
    const int aligned = 0, general = 1;                                                      \
    CBN_GRADIENT_STEPS_BODY(T, S, CBN_DZ_RUN, CBN_DZ1_RUN, 1, (void)0)                       \
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_act_gradient_sums_rows_k_##S(       \
        const T *dy_base, const int64_t *dy_rows, int64_t dy_step, const T *y_base,          \
        const int64_t *y_rows, int64_t y_step, const T *x_base, const int64_t *x_rows,       \
        int64_t n_rows, int64_t n, double mean, int kind, double alpha, double *sum_dy,      \
        double *sum_dy_xc, const uint8_t *mask, int64_t bit_base, const int64_t *bit_rows,   \
        int64_t bit_step, int aligned) {                                                     \
    const T *dy = dy_base + dy_rows[0], *x = x_base + x_rows[0];                             \
    const T *y = y_base ? y_base + y_rows[0] : NULL;                                         \
    int64_t bit0 = mask ? bit_base + bit_rows[0] : 0;                                        \
    CBN_GRADIENT_ROWS_BODY(T, S, CBN_DZ_RUN, CBN_DZ1_RUN, n_rows, CBN_NEXT_DZ_ROWS)          \
}                                                                                            \
/* The three above with the activation a constant in the loops (CBN_BY_KIND), and the     \
 * mask's common case, adjacent bits read along unit steps (what a training step's backward \
 * reads: its mask is laid out like x), a copy of its own with those constants: the loops  \
 * then keep no branch on the operands' kind. With _simd.h's unrolled strips, the fused     \
 * backward's instructions (avx2 level) went from 2.4x the plain backward's to 1.4x. */     \
static void cbn_act_input_gradient_##S(const T *dy, const T *y, const T *x, T *dx, T *dres,  \
                                       int64_t n, const double *mean,                        \
                                       const double *coef_dy, const double *coef_xc,         \
                                       const double *offset, int per_element, int kind,      \
                                       double alpha, int stream, const uint8_t *mask,        \
                                       int64_t b, int64_t bit_step) {                        \
    if (mask && bit_step == 1) {                                                             \
        CBN_WITH_DRES(T, CBN_BY_KIND(cbn_act_input_gradient_k_##S(                           \
            dy, NULL, x, dx, D, n, mean, coef_dy, coef_xc, offset, per_element, K, alpha,    \
            stream, mask, b, 1, 1)))                                                         \
    } else {                                                                                 \
        CBN_WITH_DRES(T, CBN_BY_KIND(cbn_act_input_gradient_k_##S(                           \
            dy, y, x, dx, D, n, mean, coef_dy, coef_xc, offset, per_element, K, alpha,       \
            stream, mask, b, bit_step, 0)))                                                  \
    }                                                                                        \
}                                                                                            \
/* dx (and dres) of 8 elements from i on (factors m, a, c, o; each lane's own plane's where  \
 * a vector spans two), their bits read from any offset, as the vector loop above computes   \
 * them; and of n_planes runs of n >= 8 that follow each other in every operand, as do their \
 * bits (from bit): one run, walked as cbn_input_gradient_planes walks it. Plane by plane,   \
 * 7 x 7 planes (most starting mid-byte) took each their call and a scalar tail. */          \
static inline __attribute__((always_inline)) void cbn_act_image_dx8_##S(                     \
        const T *dy, const T *y, const T *x, T *dx, T *dres, int64_t i, cbn_v8d m, cbn_v8d a,\
        cbn_v8d c, cbn_v8d o, int kind, double alpha, int stream, const uint8_t *mask,       \
        int64_t bit) {                                                                       \
    CBN_VEC_##S d;                                                                           \
    cbn_v8d w;                                                                               \
    if (dres) {                                                                              \
        d = cbn_dz8_##S(dy, 1, y, 1, mask, bit, 1, i, kind, alpha, 0);                       \
        w = cbn_widen_##S(d);                                                                \
        cbn_vec_put_##S(dres + i, d, stream);                                                \
    } else {                                                                                 \
        w = cbn_dz8w_##S(dy, 1, y, 1, mask, bit, 1, i, kind, alpha, 0);                      \
    }                                                                                        \
    cbn_vec_put_##S(dx + i, cbn_narrow_##S(a * w + c * (cbn_load_##S(x + i) - m) + o), stream);\
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_act_input_gradient_image_##S(          \
        const T *dy, const T *y, const T *x, T *dx, T *dres, int64_t n_planes, int64_t n,    \
        const double *mean, const double *coef_dy, const double *coef_xc,                    \
        const double *offset, int kind, double alpha, int stream, const uint8_t *mask,       \
        int64_t bit) {                                                                       \
    CBN_PLANES_WALK(T, S, dx, CBN_ACT_IMAGE_DX1_##S, CBN_PLANE_DX_FACTORS, CBN_ACT_IMAGE_DX8,\
                    CBN_ACT_IMAGE_DX8_MIXED)                                                 \
}                                                                                            \
/* cbn_act_input_gradient of n_planes runs of n (one feature each, features p = 0, 1, ...    \
 * at their factors' [p]), each operand's runs *_step elements apart (the mask's b_step     \
 * bits): the planes of an NCHW image, in memory order. The loop over them is here, its     \
 * pointers in registers. Walked from the kernels' tables a plane at a time (the tables     \
 * reloaded after each plane's call), the fused dx pass of NCHW (32, 64, 56, 56) float32    \
 * took 1.11-1.26x the plain pass' time from memory (interleaved, one thread), the same     \
 * loop per plane; this loop over the image's 64 planes took 0.93-0.99x. */                 \
static void cbn_act_input_gradient_planes_##S(                                               \
        const T *dy, int64_t dy_step, const T *y, int64_t y_step, const T *x, int64_t x_step, \
        T *dx, int64_t dx_step, T *dres, int64_t dres_step, int64_t n_planes, int64_t n,     \
        const double *mean, const double *coef_dy, const double *coef_xc,                    \
        const double *offset, int kind, double alpha, int stream, const uint8_t *mask,       \
        int64_t b, int64_t b_step, int64_t bit_step) {                                       \
    int64_t p;                                                                               \
    /* dres streams beside dx where their lines start at the same offset, else neither */   \
    int streams = stream && (!dres || ((uintptr_t)dres & 63) == ((uintptr_t)dx & 63));      \
    if (n >= 8 && dy_step == n && x_step == n && dx_step == n && (!dres || dres_step == n)   \
            && (mask ? bit_step == 1 && b_step == n : y_step == n)) {                        \
        if (mask) {                                                                          \
            CBN_WITH_DRES(T, CBN_BY_KIND(cbn_act_input_gradient_image_##S(                   \
                dy, NULL, x, dx, D, n_planes, n, mean, coef_dy, coef_xc, offset, K, alpha,   \
                streams, mask, b)))                                                          \
        } else {                                                                             \
            CBN_WITH_DRES(T, CBN_BY_KIND(cbn_act_input_gradient_image_##S(                   \
                dy, y, x, dx, D, n_planes, n, mean, coef_dy, coef_xc, offset, K, alpha,      \
                streams, NULL, 0)))                                                          \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    for (p = 0; p < n_planes; p++)                                                           \
        cbn_act_input_gradient_##S(dy + p * dy_step, y ? y + p * y_step : NULL,              \
                                   x + p * x_step, dx + p * dx_step,                         \
                                   dres ? dres + p * dres_step : NULL, n, mean + p,          \
                                   coef_dy + p, coef_xc + p, offset + p, 0, kind, alpha,     \
                                   stream, mask, b + p * b_step, bit_step);                  \
}                                                                                            \
static void cbn_act_gradient_sums_##S(const T *dy, int64_t dy_row_stride, const T *y,        \
                                      int64_t y_row_stride, const T *x, int64_t x_row_stride,\
                                      int64_t n_rows, int64_t width, const double *mean,     \
                                      int kind, double alpha, double *sum_dy,                \
                                      double *sum_dy_xc, const uint8_t *mask, int64_t bit0,  \
                                      int64_t mask_row_stride, int64_t bit_step) {           \
    if (mask && bit_step == 1 && (bit0 & 7) == 0 && (mask_row_stride & 7) == 0) {           \
        CBN_BY_KIND(cbn_act_gradient_sums_k_##S(dy, dy_row_stride, NULL, 0, x, x_row_stride, \
                                                n_rows, width, mean, K, alpha, sum_dy,       \
                                                sum_dy_xc, mask, bit0, mask_row_stride, 1,   \
                                                1))                                          \
    } else {                                                                                 \
        CBN_BY_KIND(cbn_act_gradient_sums_k_##S(dy, dy_row_stride, y, y_row_stride, x,       \
                                                x_row_stride, n_rows, width, mean, K, alpha, \
                                                sum_dy, sum_dy_xc, mask, bit0,               \
                                                mask_row_stride, bit_step, 0))               \
    }                                                                                        \
}                                                                                            \
/* n_rows runs (a planes chunk's short runs of one feature) into one set of accumulators, \
 * as cbn_gradient_sums_rows sums the composed call's dz: rows at the tables' offsets.     \
 * The mask's bytes are read whole where every row's bits start a byte. */                 \
static void cbn_act_gradient_sums_rows_##S(const T *dy_base, const int64_t *dy_rows,       \
                                           int64_t dy_step, const T *y_base,                \
                                           const int64_t *y_rows, int64_t y_step,           \
                                           const T *x_base, const int64_t *x_rows,          \
                                           int64_t n_rows, int64_t n, double mean, int kind,\
                                           double alpha, double *sum_dy, double *sum_dy_xc, \
                                           const uint8_t *mask, int64_t bit_base,           \
                                           const int64_t *bit_rows, int64_t bit_step) {     \
    int adjacent = mask && bit_step == 1 && dy_step == 1, bytes = adjacent;                  \
    for (int64_t r = 0; bytes && r < n_rows; r++)                                            \
        bytes = ((bit_base + bit_rows[r]) & 7) == 0;                                         \
    if (bytes) {                                                                             \
        CBN_BY_KIND(cbn_act_gradient_sums_rows_k_##S(dy_base, dy_rows, 1, NULL, NULL, 0,     \
                                                     x_base, x_rows, n_rows, n, mean, K,     \
                                                     alpha, sum_dy, sum_dy_xc, mask,         \
                                                     bit_base, bit_rows, 1, 1))              \
    } else if (adjacent) {     /* rows starting mid-byte (7 x 7 planes): the same constants \
                                * but for the byte loads (in the general loop, 4x the plain \
                                * sums' time) */                                            \
        CBN_BY_KIND(cbn_act_gradient_sums_rows_k_##S(dy_base, dy_rows, 1, NULL, NULL, 0,     \
                                                     x_base, x_rows, n_rows, n, mean, K,     \
                                                     alpha, sum_dy, sum_dy_xc, mask,         \
                                                     bit_base, bit_rows, 1, 0))              \
    } else if (!mask && dy_step == 1 && y_step == 1) {     /* dz from y, the same again */   \
        CBN_BY_KIND(cbn_act_gradient_sums_rows_k_##S(dy_base, dy_rows, 1, y_base, y_rows, 1, \
                                                     x_base, x_rows, n_rows, n, mean, K,     \
                                                     alpha, sum_dy, sum_dy_xc, NULL, 0,      \
                                                     NULL, 0, 0))                            \
    } else {                                                                                 \
        CBN_BY_KIND(cbn_act_gradient_sums_rows_k_##S(dy_base, dy_rows, dy_step, y_base,      \
                                                     y_rows, y_step, x_base, x_rows, n_rows, \
                                                     n, mean, K, alpha, sum_dy, sum_dy_xc,   \
                                                     mask, bit_base, bit_rows, bit_step, 0)) \
    }                                                                                        \
}                                                                                            \
static void cbn_act_gradient_sums_run_##S(const T *dy, int64_t dy_step, const T *y,          \
                                          int64_t y_step, const T *x, int64_t n,             \
                                          double mean, int kind, double alpha,               \
                                          double *sum_dy, double *sum_dy_xc,                 \
                                          const uint8_t *mask, int64_t bit0,                 \
                                          int64_t bit_step) {                                \
    if (mask && bit_step == 1 && dy_step == 1 && (bit0 & 7) == 0) {                          \
        CBN_BY_KIND(cbn_act_gradient_sums_run_k_##S(dy, 1, NULL, 0, x, n, mean, K, alpha,    \
                                                    sum_dy, sum_dy_xc, mask, bit0, 1, 1))    \
    } else if (mask && bit_step == 1 && dy_step == 1) {                                      \
        CBN_BY_KIND(cbn_act_gradient_sums_run_k_##S(dy, 1, NULL, 0, x, n, mean, K, alpha,    \
                                                    sum_dy, sum_dy_xc, mask, bit0, 1, 0))    \
    } else if (!mask && dy_step == 1 && y_step == 1) {                                       \
        CBN_BY_KIND(cbn_act_gradient_sums_run_k_##S(dy, 1, y, 1, x, n, mean, K, alpha,       \
                                                    sum_dy, sum_dy_xc, NULL, 0, 0, 0))       \
    } else {                                                                                 \
        CBN_BY_KIND(cbn_act_gradient_sums_run_k_##S(dy, dy_step, y, y_step, x, n, mean, K,   \
                                                    alpha, sum_dy, sum_dy_xc, mask, bit0,    \
                                                    bit_step, 0))                            \
    }                                                                                        \
}                                                                                            \
/* ... along runs whose dz or x steps are not 1, x gathered (_simd.h's cbn_gather). */     \
static void cbn_act_gradient_sums_steps_##S(const T *dy, int64_t dy_step, const T *y,        \
                                            int64_t y_step, const T *x, int64_t x_step,      \
                                            int64_t n, double mean, int kind, double alpha,  \
                                            double *sum_dy, double *sum_dy_xc,               \
                                            const uint8_t *mask, int64_t bit0,               \
                                            int64_t bit_step) {                              \
    CBN_BY_KIND(cbn_act_gradient_sums_steps_k_##S(dy, dy_step, y, y_step, x, x_step, n, mean,\
                                                  K, alpha, sum_dy, sum_dy_xc, mask, bit0,   \
                                                  bit_step))                                 \
}

CBN_DEFINE_ACTIVATION_SUMS(float, f32)
CBN_DEFINE_ACTIVATION_SUMS(double, f64)

/* Rows of an FI run (any width from 8 on): _simd.h's strips (CBN_STRIPS), the factors of
 * a strip of features held in registers while a few rows pass them, as the plain calls
 * write wide rows, with the residual, the activation and the mask's bits (adjacent along
 * the features: bit_step 1) formed where the plain strips store y, and dz where they load
 * dy. Row by row the factors are reloaded at every element: dense rows of 1024 features
 * (24-32 KiB of factors) then took 1.2-1.3x the plain call's time. The same formulas as the
 * runs above, so the same bits. Row r's bits are [bit0 + r * mask_row_stride, + width): its
 * own bytes take plain ORs, those shared with another item atomic ones (cbn_set_bits). */
#define CBN_PUT_cbn_stream_f32(p, v) cbn_vec_stream_f32(p, v)
#define CBN_PUT_cbn_stream_f64(p, v) cbn_vec_stream_f64(p, v)
#define CBN_PUT_cbn_store_f32(p, v) cbn_vec_put_f32(p, v, 0)
#define CBN_PUT_cbn_store_f64(p, v) cbn_vec_put_f64(p, v, 0)
#define CBN_ROW_BIT(r) (bit0 + (r) * mask_row_stride)

#define CBN_ACT_Y_STRIP(S, NV, STORE)                                                        \
    {                                                                                        \
        CBN_VEC_##S v;                                                                       \
        CBN_Y_FACTORS(NV)                                                                    \
        for (r = r0; r < r1; r++)                                                            \
            _Pragma("GCC unroll 8")                                                          \
            for (q = 0; q < NV; q++) {                                                       \
                v = __builtin_convertvector(                                                 \
                    (cbn_load_##S(x + r * x_row_stride + j + 8 * q) - m[q]) * s[q] + b[q],   \
                    CBN_VEC_##S);                                                            \
                if (CBN_EXTRA)                                                               \
                    v += cbn_vec_load_##S(residual + r * r_row_stride + j + 8 * q, 1);       \
                if (CBN_MASK_MODE == CBN_ALIGNED_BITS)                                       \
                    mask[((CBN_ROW_BIT(r) + j) >> 3) + q] = (uint8_t)cbn_positive8_##S(v);   \
                else if (CBN_MASK_MODE == CBN_ANY_BITS)                                      \
                    cbn_set_bits(mask, CBN_ROW_BIT(r) + j + 8 * q, cbn_positive8_##S(v), 8,  \
                                 CBN_ROW_BIT(r), CBN_ROW_BIT(r) + width);                    \
                v = cbn_act8_##S(v, kind, alpha);                                            \
                CBN_PUT_##STORE(y + r * y_row_stride + j + 8 * q, v);                        \
            }                                                                                \
    }

/* The features outside the streamed ones, element by element with ordinary stores, then
 * their bits gathered per row (no atomic OR per element beside streaming stores). */
#define CBN_ACT_Y_COLUMNS(S, FROM, TO)                                                       \
    for (r = r0; r < r1; r++) {                                                              \
        for (j = FROM; j < TO; j++)                                                          \
            cbn_normalize_act_one_##S(x + r * x_row_stride,                                  \
                                      CBN_EXTRA ? residual + r * r_row_stride : NULL,        \
                                      y + r * y_row_stride, j, j, mean, scale, shift, kind,  \
                                      alpha, NULL, 0, 0);                                    \
        if (CBN_MASK_MODE && (FROM) < (TO))                                                  \
            cbn_set_signs_##S(mask, CBN_ROW_BIT(r), y + r * y_row_stride, FROM, TO,          \
                              CBN_ROW_BIT(r), CBN_ROW_BIT(r) + width);                       \
    }
#define CBN_ACT_Y_COLUMNS_f32(T, FROM, TO) CBN_ACT_Y_COLUMNS(f32, FROM, TO)
#define CBN_ACT_Y_COLUMNS_f64(T, FROM, TO) CBN_ACT_Y_COLUMNS(f64, FROM, TO)

/* dz's operands of row r: y's row without a mask, else the mask. */
#define CBN_ROW_OUTPUT(r) (CBN_MASK_MODE ? NULL : y + (r) * y_row_stride)
#define CBN_ROW_MASK (CBN_MASK_MODE ? mask : NULL)

#define CBN_ACT_DX_STRIP(S, NV, STORE)                                                       \
    {                                                                                        \
        CBN_VEC_##S d = {0};                                                                 \
        cbn_v8d w;                                                                           \
        CBN_DX_FACTORS(NV)                                                                   \
        for (r = r0; r < r1; r++)                                                            \
            _Pragma("GCC unroll 4")                                                          \
            for (q = 0; q < NV; q++) {                                                       \
                if (CBN_EXTRA) {                                                             \
                    d = cbn_dz8_##S(dy + r * dy_row_stride, 1, CBN_ROW_OUTPUT(r), 1,         \
                                    CBN_ROW_MASK, CBN_ROW_BIT(r), 1, j + 8 * q, kind, alpha, \
                                    CBN_MASK_MODE == CBN_ALIGNED_BITS);                      \
                    w = cbn_widen_##S(d);                                                    \
                } else {                                                                     \
                    w = cbn_dz8w_##S(dy + r * dy_row_stride, 1, CBN_ROW_OUTPUT(r), 1,        \
                                     CBN_ROW_MASK, CBN_ROW_BIT(r), 1, j + 8 * q, kind,       \
                                     alpha, CBN_MASK_MODE == CBN_ALIGNED_BITS);              \
                }                                                                            \
                CBN_PUT_##STORE(dx + r * dx_row_stride + j + 8 * q, cbn_narrow_##S(          \
                    a[q] * w                                                                 \
                    + c[q] * (cbn_load_##S(x + r * x_row_stride + j + 8 * q) - m[q])         \
                    + o[q]));                                                                \
                if (CBN_EXTRA) CBN_PUT_##STORE(dres + r * dres_row_stride + j + 8 * q, d);   \
            }                                                                                \
    }

#define CBN_ACT_DX_COLUMNS(S, FROM, TO)                                                      \
    for (r = r0; r < r1; r++)                                                                \
        for (j = FROM; j < TO; j++)                                                          \
            cbn_act_input_gradient_one_##S(dy + r * dy_row_stride, CBN_ROW_OUTPUT(r),        \
                                           x + r * x_row_stride, dx + r * dx_row_stride,     \
                                           CBN_EXTRA ? dres + r * dres_row_stride : NULL, j, \
                                           j, mean, coef_dy, coef_xc, offset, kind, alpha,   \
                                           CBN_ROW_MASK, CBN_ROW_BIT(r), 1);
#define CBN_ACT_DX_COLUMNS_f32(T, FROM, TO) CBN_ACT_DX_COLUMNS(f32, FROM, TO)
#define CBN_ACT_DX_COLUMNS_f64(T, FROM, TO) CBN_ACT_DX_COLUMNS(f64, FROM, TO)

/* The strips with the activation a constant (CBN_BY_KIND), and the variant too: whether
 * there is a residual (forward) or dres (backward), CBN_EXTRA, and the mask's mode: none, its
 * bits of every strip starting a byte (a byte stored or loaded per vector; the row's own,
 * the strips' vectors ending within the row) or any bits (cbn_set_bits, cbn_get_bits8). Each
 * its own copy, the loops then test nothing per vector (with the tests, the fused strips ran
 * 1.6x the plain strips' instructions, avx2). With streaming stores, dres (if any) starts at
 * dx's offset in a cache line. */
#define CBN_EXTRA (variant & 1)
#define CBN_MASK_MODE (variant >> 1)

static inline int cbn_strips_variant(const void *extra, const uint8_t *mask, const void *out,
                                     int64_t itemsize, int64_t width, int stream,
                                     int64_t bit0, int64_t mask_row_stride) {
    int64_t head, body_end;
    cbn_streamed_features(out, itemsize, width, stream, &head, &body_end);
    return (extra != NULL) + 2 * (!mask ? CBN_NO_BITS
                                  : ((bit0 | mask_row_stride | head) & 7) == 0 ? CBN_ALIGNED_BITS
                                  : CBN_ANY_BITS);
}

/* CALL (naming the variant V and the activation K) with both constants. */
#define CBN_BY_VARIANT(CALL)                                                                 \
    switch (variant) {                                                                       \
    case 0: { const int V = 0; CBN_BY_KIND(CALL) break; }                                    \
    case 1: { const int V = 1; CBN_BY_KIND(CALL) break; }                                    \
    case 2: { const int V = 2; CBN_BY_KIND(CALL) break; }                                    \
    case 3: { const int V = 3; CBN_BY_KIND(CALL) break; }                                    \
    case 4: { const int V = 4; CBN_BY_KIND(CALL) break; }                                    \
    default: { const int V = 5; CBN_BY_KIND(CALL) }                                          \
    }

#define CBN_DEFINE_ACTIVATION_STRIPS(T, S)                                                   \
static inline __attribute__((always_inline)) void cbn_act_normalize_strips_k_##S(         \
        const T *x, int64_t x_row_stride, const T *residual, int64_t r_row_stride, T *y,     \
        int64_t y_row_stride, int64_t n_rows, int64_t width, const double *mean,             \
        const double *scale, const double *shift, int kind, double alpha, int stream,        \
        uint8_t *mask, int64_t bit0, int64_t mask_row_stride, int variant) {                 \
    CBN_STRIPS(CBN_ACT_Y_STRIP, CBN_Y_VECTORS, CBN_Y_STRIP_ROWS, CBN_ACT_Y_COLUMNS_##S, y,   \
               T, S)                                                                         \
}                                                                                            \
static void cbn_act_normalize_strips_##S(const T *x, int64_t x_row_stride, const T *residual,\
                                         int64_t r_row_stride, T *y, int64_t y_row_stride,   \
                                         int64_t n_rows, int64_t width, const double *mean,  \
                                         const double *scale, const double *shift, int kind, \
                                         double alpha, int stream, uint8_t *mask,            \
                                         int64_t bit0, int64_t mask_row_stride) {            \
    int variant = cbn_strips_variant(residual, mask, y, sizeof(T), width, stream, bit0,      \
                                     mask_row_stride);                                       \
    CBN_BY_VARIANT(cbn_act_normalize_strips_k_##S(x, x_row_stride, residual, r_row_stride, y,\
                                                  y_row_stride, n_rows, width, mean, scale,  \
                                                  shift, K, alpha, stream, mask, bit0,       \
                                                  mask_row_stride, V))                       \
}                                                                                            \
static inline __attribute__((always_inline)) void cbn_act_input_gradient_strips_k_##S(    \
        const T *dy, int64_t dy_row_stride, const T *y, int64_t y_row_stride, const T *x,    \
        int64_t x_row_stride, T *dx, int64_t dx_row_stride, T *dres, int64_t dres_row_stride,\
        int64_t n_rows, int64_t width, const double *mean, const double *coef_dy,            \
        const double *coef_xc, const double *offset, int kind, double alpha, int stream,     \
        const uint8_t *mask, int64_t bit0, int64_t mask_row_stride, int variant) {           \
    CBN_STRIPS(CBN_ACT_DX_STRIP, CBN_DX_VECTORS, CBN_DX_STRIP_ROWS, CBN_ACT_DX_COLUMNS_##S,  \
               dx, T, S)                                                                     \
}                                                                                            \
static void cbn_act_input_gradient_strips_##S(                                               \
        const T *dy, int64_t dy_row_stride, const T *y, int64_t y_row_stride, const T *x,    \
        int64_t x_row_stride, T *dx, int64_t dx_row_stride, T *dres, int64_t dres_row_stride,\
        int64_t n_rows, int64_t width, const double *mean, const double *coef_dy,            \
        const double *coef_xc, const double *offset, int kind, double alpha, int stream,     \
        const uint8_t *mask, int64_t bit0, int64_t mask_row_stride) {                        \
    int variant = cbn_strips_variant(dres, mask, dx, sizeof(T), width, stream, bit0,         \
                                     mask_row_stride);                                       \
    CBN_BY_VARIANT(cbn_act_input_gradient_strips_k_##S(                                      \
        dy, dy_row_stride, y, y_row_stride, x, x_row_stride, dx, dx_row_stride, dres,        \
        dres_row_stride, n_rows, width, mean, coef_dy, coef_xc, offset, K, alpha, stream,    \
        mask, bit0, mask_row_stride, V))                                                     \
}

CBN_DEFINE_ACTIVATION_STRIPS(float, f32)
CBN_DEFINE_ACTIVATION_STRIPS(double, f64)

#endif
