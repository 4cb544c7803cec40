/* The int8 multiply-add peak this CPU reaches with the instruction the AVX2 GEMM is built on: a loop of 6
 * independent `acc += vpmaddubsw(w, x)` (32 multiply-adds each), no memory operands, spread over the pool's
 * threads. bench.kernel reports GEMM and encoder efficiency against it. */
#include <time.h>

#include "tq2k.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#define PEAK_ITEMS 64 /* many short items: a helper that starts late still takes its share */

static volatile int peak_sink;

static void peak_item(const void *ctx, int item) {
    (void)item;
    const long iters = *(const long *)ctx;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256i w0 = _mm256_set1_epi8(1), w1 = _mm256_set1_epi8(2), w2 = _mm256_set1_epi8(1), w3 = _mm256_set1_epi8(2),
            w4 = _mm256_set1_epi8(1), w5 = _mm256_set1_epi8(2);
    __m256i x = _mm256_set1_epi8(3);
    /* opaque weights: the compiler can neither fold nor merge the products (13 of the 16 registers) */
    __asm__ volatile("" : "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3), "+x"(w4), "+x"(w5));
    for (long i = 0; i < iters; i++) {
        __asm__ volatile("" : "+x"(x)); /* x may change: every product is recomputed each trip */
        a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(w0, x));
        a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(w1, x));
        a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(w2, x));
        a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(w3, x));
        a4 = _mm256_add_epi16(a4, _mm256_maddubs_epi16(w4, x));
        a5 = _mm256_add_epi16(a5, _mm256_maddubs_epi16(w5, x));
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5));
    }
    const __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(a0, a1), _mm256_add_epi16(a2, a3)),
                                       _mm256_add_epi16(a4, a5));
    peak_sink = _mm256_extract_epi16(s, 0);
}

double tq2k_peak_avx2(long iterations, int threads) {
    const long per_item = iterations / PEAK_ITEMS > 0 ? iterations / PEAK_ITEMS : 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    tq2k_parallel(PEAK_ITEMS, threads, peak_item, &per_item);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return (double)per_item * PEAK_ITEMS * 6 * 32 / seconds;
}

#pragma GCC pop_options
#else
double tq2k_peak_avx2(long iterations, int threads) {
    (void)iterations; (void)threads;
    return 0.0;
}
#endif
