/* AVX-512 VNNI path. Compiled for any x86-64 target: the instructions are enabled per function by the
 * pragma below and only run after a CPUID check (tq2k_module.c). */
#include "tq2k.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

#define RMAX 8 /* rows per micro-tile: 8 int32 group sums + 8 float sums + weights in the 32 zmm */
#define JMAX 1 /* 16-output blocks per micro-tile: one unpacked weight vector feeds 8 rows (rows x blocks
                * measured with group scales: 4x2, 4x4, 8x1, 12x1; 8x1 was fastest, 12x1 spills) */
#define ROW_BLOCK 64 /* rows per parallel work item: its int8 activations stay in L1/L2 */

void tq2k_quantize_avx512(const tq2k_args *a, int r0, int r1) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int m = r0; m < r1; m++) {
        const float *x = a->x + (size_t)m * a->K;
        int8_t *q = a->q + (size_t)m * a->kpad;
        float corr = 0.0f;
        for (int g = 0; g < a->groups; g++) {
            const int k0 = g * TQ2K_GROUP;
            const int k1 = k0 + TQ2K_GROUP < a->kpad ? k0 + TQ2K_GROUP : a->kpad;
            __m512 vmax = _mm512_setzero_ps();
            for (int k = k0; k < k1; k += 16) {
                const int left = a->K - k;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (left > 0 ? (__mmask16)((1u << left) - 1) : 0);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, x + k)));
            }
            const float amax = _mm512_reduce_max_ps(vmax);
            __m512i vsum = _mm512_setzero_si512();
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            for (int k = k0; k < k1; k += 16) {
                const int left = a->K - k;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (left > 0 ? (__mmask16)((1u << left) - 1) : 0);
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + k), inv));
                v = _mm512_max_epi32(_mm512_min_epi32(v, hi), lo);
                vsum = _mm512_add_epi32(vsum, v);
                _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
            }
            const float sx = amax / 127.0f;
            a->sx[(size_t)m * a->groups + g] = sx;
            corr += sx * (float)_mm512_reduce_add_epi32(vsum);
        }
        a->corr[m] = corr;
    }
}

/* One micro-tile: R rows x J output blocks (16 outputs each), whole K. R and J are compile-time
 * constants at every call site, so the loops unroll and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const tq2k_args *a, const int R, const int J, int m0, int nb0) {
    const int kt = a->kpad / 16;
    const size_t ldw = (size_t)a->kpad * 4; /* bytes per output block */
    const uint8_t *w = a->w + (size_t)nb0 * ldw;
    const int8_t *q = a->q + (size_t)m0 * a->kpad;
    const float *sx = a->sx + (size_t)m0 * a->groups;
    const __m512i three = _mm512_set1_epi8(3);
    __m512 facc[RMAX][JMAX];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int j = 0; j < J; j++) facc[r][j] = _mm512_setzero_ps();

    for (int g = 0; g < a->groups; g++) {
        __m512i acc[RMAX][JMAX];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_si512();
        const int kc1 = (g + 1) * (TQ2K_GROUP / 16) < kt ? (g + 1) * (TQ2K_GROUP / 16) : kt;
        for (int kc = g * (TQ2K_GROUP / 16); kc < kc1; kc++) {
            __m512i p[JMAX];
#pragma GCC unroll 4
            for (int j = 0; j < J; j++) p[j] = _mm512_loadu_si512((const void *)(w + j * ldw + (size_t)kc * 64));
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                __m512i wv[JMAX];
                /* bit pair s of each byte -> u8 in {0,1,2} = code + 1: 16 outputs x 4 inputs k..k+3 */
#pragma GCC unroll 4
                for (int j = 0; j < J; j++) wv[j] = _mm512_and_si512(_mm512_srli_epi16(p[j], 2 * s), three);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    __m512i xb = _mm512_set1_epi32(*(const int32_t *)(q + (size_t)r * a->kpad + kc * 16 + 4 * s));
#pragma GCC unroll 4
                    for (int j = 0; j < J; j++) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], wv[j], xb);
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512 s = _mm512_set1_ps(sx[(size_t)r * a->groups + g]);
#pragma GCC unroll 4
            for (int j = 0; j < J; j++) facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), s, facc[r][j]);
        }
    }

#pragma GCC unroll 4
    for (int j = 0; j < J; j++) {
        const int n = (nb0 + j) * 16;
        const int left = a->N - n;
        const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 sc = _mm512_maskz_loadu_ps(mk, a->scale + n);
        const __m512 bi = a->bias ? _mm512_maskz_loadu_ps(mk, a->bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const int m = m0 + r;
            const __m512 v = _mm512_sub_ps(facc[r][j], _mm512_set1_ps(a->corr[m]));
            _mm512_mask_storeu_ps(a->y + (size_t)m * a->N + n, mk, _mm512_fmadd_ps(v, sc, bi));
        }
    }
}

#define TILE_CASE(R, J) \
    case (R) * 16 + (J): tile(a, R, J, m0, nb0); break;

static void tile_any(const tq2k_args *a, int R, int J, int m0, int nb0) {
    switch (R * 16 + J) {
        TILE_CASE(1, 1) TILE_CASE(2, 1) TILE_CASE(3, 1) TILE_CASE(4, 1)
        TILE_CASE(5, 1) TILE_CASE(6, 1) TILE_CASE(7, 1) TILE_CASE(8, 1)
    }
}

typedef struct {
    const tq2k_args *a;
    int nb, ngroups;
} plan;

static void quant_item(const void *ctx, int i) {
    const tq2k_args *a = (const tq2k_args *)ctx;
    const int r0 = i * TQ2K_QUANT_ROWS, r1 = r0 + TQ2K_QUANT_ROWS < a->rows ? r0 + TQ2K_QUANT_ROWS : a->rows;
    tq2k_quantize_avx512(a, r0, r1);
}

static void gemm_item(const void *ctx, int i) {
    const plan *p = (const plan *)ctx;
    const tq2k_args *a = p->a;
    const int rb = i / p->ngroups, nb0 = (i % p->ngroups) * JMAX;
    const int J = p->nb - nb0 < JMAX ? p->nb - nb0 : JMAX;
    const int mend = (rb + 1) * ROW_BLOCK < a->rows ? (rb + 1) * ROW_BLOCK : a->rows;
    for (int m0 = rb * ROW_BLOCK; m0 < mend; m0 += RMAX) tile_any(a, mend - m0 < RMAX ? mend - m0 : RMAX, J, m0, nb0);
}

void tq2k_gemm_avx512vnni(const tq2k_args *a) {
    tq2k_parallel((a->rows + TQ2K_QUANT_ROWS - 1) / TQ2K_QUANT_ROWS, a->threads, quant_item, a);
    plan p = {a, (a->N + 15) / 16, 0};
    p.ngroups = (p.nb + JMAX - 1) / JMAX;
    tq2k_parallel((a->rows + ROW_BLOCK - 1) / ROW_BLOCK * p.ngroups, a->threads, gemm_item, &p);
}

#pragma GCC pop_options

#else /* not x86-64: never selected (tq2k_module.c reports the path unavailable) */
void tq2k_quantize_avx512(const tq2k_args *a, int r0, int r1) { tq2k_quantize_ref(a, r0, r1); }
void tq2k_gemm_avx512vnni(const tq2k_args *a) { tq2k_gemm_ref(a); }
#endif
