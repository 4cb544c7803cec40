/* AVX-512F path with float activations (no activation quantization): the "kept float" alternative.
 * Each weight becomes a float lane, so it does 16 multiply-adds per instruction where VNNI does 64; it is
 * kept as a forced-only path (never chosen automatically) for its accuracy and as the measured
 * comparison (bench/kernel.py). Uses the same trick as the int8 paths: weights are code + 1 in {0,1,2},
 * and sum(x) is subtracted once per row. */
#include "tq2k.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")

#define RMAX 4
#define JMAX 2
#define ROW_BLOCK 64

typedef struct {
    const float *x;
    int rows, K, N, kpad;
    const uint8_t *w;
    const float *scale, *bias;
    float *y;
} f32_args;

static inline __attribute__((always_inline)) void tile(const f32_args *a, const int R, const int J, int m0, int nb0) {
    const int kt = a->kpad / 16;
    const size_t ldw = (size_t)a->kpad * 4;
    const uint8_t *w = a->w + (size_t)nb0 * ldw;
    const __m512i three = _mm512_set1_epi32(3);
    __m512 acc[RMAX][JMAX];
    float xsum[RMAX];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        xsum[r] = 0.0f;
        for (int k = 0; k < a->K; k++) xsum[r] += a->x[(size_t)(m0 + r) * a->K + k];
#pragma GCC unroll 2
        for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_ps();
    }
    for (int kc = 0; kc < kt; kc++) {
        __m512i p[JMAX];
#pragma GCC unroll 2
        for (int j = 0; j < J; j++) p[j] = _mm512_loadu_si512((const void *)(w + j * ldw + (size_t)kc * 64));
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) { /* input k = kc*16 + t: bit pair t/4 of byte t%4 of each lane */
            const int k = kc * 16 + t;
            if (k >= a->K) break;
            __m512 wf[JMAX];
#pragma GCC unroll 2
            for (int j = 0; j < J; j++)
                wf[j] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(p[j], 2 * (t / 4) + 8 * (t % 4)), three));
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512 xb = _mm512_set1_ps(a->x[(size_t)(m0 + r) * a->K + k]);
#pragma GCC unroll 2
                for (int j = 0; j < J; j++) acc[r][j] = _mm512_fmadd_ps(wf[j], xb, acc[r][j]);
            }
        }
    }
#pragma GCC unroll 2
    for (int j = 0; j < J; j++) {
        const int n = (nb0 + j) * 16;
        const int left = a->N - n;
        const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 sc = _mm512_maskz_loadu_ps(mk, a->scale + n);
        const __m512 bi = a->bias ? _mm512_maskz_loadu_ps(mk, a->bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m512 v = _mm512_sub_ps(acc[r][j], _mm512_set1_ps(xsum[r]));
            _mm512_mask_storeu_ps(a->y + (size_t)(m0 + r) * a->N + n, mk, _mm512_fmadd_ps(v, sc, bi));
        }
    }
}

static void tile_any(const f32_args *a, int R, int J, int m0, int nb0) {
    switch (R * 4 + J) {
        case 5: tile(a, 1, 1, m0, nb0); break;
        case 6: tile(a, 1, 2, m0, nb0); break;
        case 9: tile(a, 2, 1, m0, nb0); break;
        case 10: tile(a, 2, 2, m0, nb0); break;
        case 13: tile(a, 3, 1, m0, nb0); break;
        case 14: tile(a, 3, 2, m0, nb0); break;
        case 17: tile(a, 4, 1, m0, nb0); break;
        default: tile(a, 4, 2, m0, nb0); break;
    }
}

static void gemm_item(const void *ctx, int i) {
    const f32_args *a = (const f32_args *)ctx;
    const int nb = (a->N + 15) / 16, ngroups = (nb + JMAX - 1) / JMAX;
    const int rb = i / ngroups, nb0 = (i % ngroups) * JMAX;
    const int J = nb - nb0 < JMAX ? nb - nb0 : JMAX;
    const int mend = (rb + 1) * ROW_BLOCK < a->rows ? (rb + 1) * ROW_BLOCK : a->rows;
    for (int m0 = rb * ROW_BLOCK; m0 < mend; m0 += RMAX) tile_any(a, mend - m0 < RMAX ? mend - m0 : RMAX, J, m0, nb0);
}

void tq2k_gemm_avx512f32(const float *x, int rows, const tq2k_linear *L, float *y, int threads) {
    const f32_args a = {x, rows, L->K, L->N, L->kpad, L->w, L->scale, L->bias, y};
    const int nb = (a.N + 15) / 16;
    tq2k_parallel((a.rows + ROW_BLOCK - 1) / ROW_BLOCK * ((nb + JMAX - 1) / JMAX), threads, gemm_item, &a);
}

#pragma GCC pop_options

#else /* not x86-64: never selected (tq2k_module.c reports the path unavailable) */
void tq2k_gemm_avx512f32(const float *x, int rows, const tq2k_linear *L, float *y, int threads) {
    (void)x; (void)rows; (void)L; (void)y; (void)threads;
}
#endif
