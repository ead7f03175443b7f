/* What the compiler gave this build: OpenMP or not, and which SIMD instruction sets.
 * Kept in C so a build without OpenMP still compiles and links (serially). */
#ifndef CBN_PLATFORM_H
#define CBN_PLATFORM_H

#ifdef _OPENMP
#include <omp.h>
static int cbn_openmp_enabled(void) { return 1; }
static int cbn_max_threads(void) { return omp_get_max_threads(); }
#else
static int cbn_openmp_enabled(void) { return 0; }
static int cbn_max_threads(void) { return 1; }
#endif

static const char *cbn_simd_flags(void) {
    return ""
#ifdef __AVX512F__
        "AVX512F "
#endif
#ifdef __AVX2__
        "AVX2 "
#endif
#ifdef __FMA__
        "FMA "
#endif
#ifdef __AVX__
        "AVX "
#endif
#ifdef __SSE2__
        "SSE2 "
#endif
#ifdef __ARM_NEON
        "NEON "
#endif
        ;
}

#endif
