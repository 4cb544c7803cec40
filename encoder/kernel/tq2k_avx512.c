/* AVX-512 VNNI path (vpdpbusd): activation quantization and the GEMM block; the epilogues and the other
 * encoder operations are the AVX2 ones (every AVX-512 CPU has AVX2). Compiled for any x86-64 target: the
 * instructions are enabled per function by the pragma below and only run after a CPUID check
 * (tq2k_module.c). This machine's CPU has no AVX-512, so the tests of this path skip here; the encoder
 * checks a path against the reference once before it uses it (encoder/kernel/__init__.py). */
#include "tq2k.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")

#define MR 8 /* rows per micro-tile: 8 int32 group sums + 8 float sums + weights in the 32 zmm (rows x blocks
              * measured with group scales: 4x2, 4x4, 8x1, 12x1; 8x1 was fastest, 12x1 spills) */

static void quantize_avx512(const float *x, int ldx, int K, tq2k_act *a, int r0, int r1) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int m = r0; m < r1; m++) {
        const float *row = x + (size_t)m * ldx;
        int8_t *q = a->q + (size_t)m * a->kpad;
        for (int g = 0; g < a->groups; g++) {
            const int k0 = g * TQ2K_GROUP;
            const int k1 = k0 + TQ2K_GROUP < a->kpad ? k0 + TQ2K_GROUP : a->kpad;
            __m512 vmax = _mm512_setzero_ps();
            for (int k = k0; k < k1; k += 16) {
                const int left = K - k;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (left > 0 ? (__mmask16)((1u << left) - 1) : 0);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, row + k)));
            }
            const float amax = _mm512_reduce_max_ps(vmax);
            __m512i vsum = _mm512_setzero_si512();
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            for (int k = k0; k < k1; k += 16) {
                const int left = K - k;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (left > 0 ? (__mmask16)((1u << left) - 1) : 0);
                __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, row + k), inv));
                v = _mm512_max_epi32(_mm512_min_epi32(v, hi), lo);
                vsum = _mm512_add_epi32(vsum, v);
                _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(v));
            }
            a->sx[(size_t)m * a->groups + g] = amax / 127.0f;
            a->qsum[(size_t)m * a->groups + g] = _mm512_reduce_add_epi32(vsum);
        }
    }
}

/* R rows x the 16 outputs of block nb, whole K, into out[r][nb * 16 % TQ2K_CHUNK + 0..15]. */
static inline __attribute__((always_inline)) void tile(const tq2k_linear *L, const tq2k_act *A, int m0, const int R,
                                                       int nb, float *out) {
    const int kt = L->kpad / 16;
    const uint8_t *w = L->w + (size_t)nb * L->kpad * 4;
    const int8_t *q = A->q + (size_t)m0 * A->kpad;
    const __m512i three = _mm512_set1_epi8(3);
    __m512 facc[MR];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) facc[r] = _mm512_setzero_ps();
    for (int g = 0; g < L->groups; g++) {
        __m512i acc[MR];
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_si512();
        const int kc1 = (g + 1) * (TQ2K_GROUP / 16) < kt ? (g + 1) * (TQ2K_GROUP / 16) : kt;
        for (int kc = g * (TQ2K_GROUP / 16); kc < kc1; kc++) {
            const __m512i p = _mm512_loadu_si512((const void *)(w + (size_t)kc * 64));
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                /* bit pair s of each byte -> u8 in {0,1,2} = code + 1: 16 outputs x 4 inputs k..k+3 */
                const __m512i wv = _mm512_and_si512(_mm512_srli_epi16(p, 2 * s), three);
#pragma GCC unroll 8
                for (int r = 0; r < R; r++) {
                    const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(q + (size_t)r * A->kpad + kc * 16 + 4 * s));
                    acc[r] = _mm512_dpbusd_epi32(acc[r], wv, xb);
                }
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) { /* the group step (see tq2k.h) */
            const size_t gi = (size_t)(m0 + r) * A->groups + g;
            const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], _mm512_set1_epi32(A->qsum[gi])));
            facc[r] = _mm512_fmadd_ps(d, _mm512_set1_ps(A->sx[gi]), facc[r]);
        }
    }
    const int n = nb * 16, left = L->N - n;
    const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    const __m512 sc = _mm512_maskz_loadu_ps(mk, L->scale + n);
    const __m512 bi = L->bias ? _mm512_maskz_loadu_ps(mk, L->bias + n) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out + r * TQ2K_CHUNK + n % TQ2K_CHUNK, _mm512_fmadd_ps(facc[r], sc, bi));
}

static void block_avx512(const tq2k_linear *L, const tq2k_act *A, int m0, int rows, int n0, float *out) {
    const int nb1 = (n0 + TQ2K_CHUNK < L->N ? n0 + TQ2K_CHUNK : L->N + 15) / 16;
    for (int r0 = 0; r0 < rows; r0 += MR) {
        float *o = out + (size_t)r0 * TQ2K_CHUNK;
        for (int nb = n0 / 16; nb < nb1; nb++) {
            switch (rows - r0 < MR ? rows - r0 : MR) {
                case 1: tile(L, A, m0 + r0, 1, nb, o); break;
                case 2: tile(L, A, m0 + r0, 2, nb, o); break;
                case 3: tile(L, A, m0 + r0, 3, nb, o); break;
                case 4: tile(L, A, m0 + r0, 4, nb, o); break;
                case 5: tile(L, A, m0 + r0, 5, nb, o); break;
                case 6: tile(L, A, m0 + r0, 6, nb, o); break;
                case 7: tile(L, A, m0 + r0, 7, nb, o); break;
                default: tile(L, A, m0 + r0, 8, nb, o); break;
            }
        }
    }
}

const tq2k_ops tq2k_ops_avx512vnni = {quantize_avx512, block_avx512, tq2k_epilogue_avx2, tq2k_embed_avx2,
                                      tq2k_layernorm_avx2, tq2k_attention_avx2, tq2k_pool_avx2};

#pragma GCC pop_options

#else /* not x86-64: never selected (tq2k_module.c reports the path unavailable) */
const tq2k_ops tq2k_ops_avx512vnni = {0};
#endif
