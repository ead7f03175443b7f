/* STREAM-style kernels (after McCalpin's STREAM): the memory bandwidth that
 * `python -m cbn bench --cold` measures the batch-norm kernels against, in the same process
 * and with the same OpenMP threads. Each call handles one thread's contiguous share; the
 * stores are ordinary or non-temporal, so both kinds of the machine's bandwidth are known. */
#ifndef CBN_STREAM_H
#define CBN_STREAM_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float cbn_bw_v8f __attribute__((vector_size(32)));

static inline cbn_bw_v8f cbn_bw_load(const float *p) {
    cbn_bw_v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Eight floats at p, 32-byte aligned when nontemporal (the loops below see to it). */
static inline void cbn_bw_store(float *p, cbn_bw_v8f v, int nontemporal) {
#ifdef __AVX__
    if (nontemporal) {
        _mm256_stream_ps(p, (__m256)v);
        return;
    }
#endif
    memcpy(p, &v, sizeof v);
}

/* Elements before p + i is 32-byte aligned (so the vector loop's stores can stream). */
static inline int64_t cbn_bw_head(const float *p, int64_t n) {
    int64_t head = (int64_t)(((32 - ((uintptr_t)p & 31)) & 31) / sizeof(float));
    return head < n ? head : n;
}

/* b = a */
static void cbn_bw_copy(const float *a, float *b, int64_t n, int nontemporal) {
    int64_t i, head = cbn_bw_head(b, n);
    for (i = 0; i < head; i++) b[i] = a[i];
    for (; i + 8 <= n; i += 8) cbn_bw_store(b + i, cbn_bw_load(a + i), nontemporal);
    for (; i < n; i++) b[i] = a[i];
#ifdef __AVX__
    if (nontemporal) _mm_sfence();
#endif
}

/* a = b + s * c */
static void cbn_bw_triad(const float *b, const float *c, float *a, int64_t n, float s,
                         int nontemporal) {
    int64_t i, head = cbn_bw_head(a, n);
    for (i = 0; i < head; i++) a[i] = b[i] + s * c[i];
    for (; i + 8 <= n; i += 8)
        cbn_bw_store(a + i, cbn_bw_load(b + i) + s * cbn_bw_load(c + i), nontemporal);
    for (; i < n; i++) a[i] = b[i] + s * c[i];
#ifdef __AVX__
    if (nontemporal) _mm_sfence();
#endif
}

/* The sum of a, in four independent vector accumulators (so it is bound by the reads). */
static double cbn_bw_read(const float *a, int64_t n) {
    cbn_bw_v8f acc[4] = {{0}};
    float total = 0.0f;
    int64_t i = 0, q;
    for (; i + 32 <= n; i += 32)
        for (q = 0; q < 4; q++) acc[q] += cbn_bw_load(a + i + 8 * q);
    for (; i < n; i++) total += a[i];
    for (q = 0; q < 8; q++) total += acc[0][q] + acc[1][q] + acc[2][q] + acc[3][q];
    return total;
}

#endif
