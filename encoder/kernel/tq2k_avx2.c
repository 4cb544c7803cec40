/* AVX2 path of the GEMM: activation quantization, the block (vpmaddubsw micro-kernel) and the epilogues.
 *
 * A work item unpacks each 16-output block of its chunk once to u8 code + 1 (16 x kpad bytes, in L1/L2) and
 * runs all its rows over it, so the inner loop has no unpacking: per step of 4 inputs, two weight loads, and
 * for each of 4 rows one broadcast of its 4 int8 activations and two vpmaddubsw + vpaddw into 8 int16
 * accumulators (4 rows x 16 outputs). vpmaddubsw needs the one vector multiplier (one per cycle on Zen 2);
 * measured, this loop runs at ~86% of that peak, the per-group epilogue brings the GEMM to ~73%.
 * Within a group of 64 inputs the pair sums are added as int16 (no saturation: a pair sum is at most
 * 2 * 2 * 127 = 508 and a group adds 16 of them, 8128) and widened to int32 once per group. */
#include <stdlib.h>

#include "tq2k.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "tq2k_avx2_math.h"

#define MR 4

void tq2k_quantize_avx2(const float *x, int ldx, int K, tq2k_act *a, int r0, int r1) {
    for (int m = r0; m < r1; m++) {
        for (int g = 0; g < a->groups; g++) {
            const int k0 = g * TQ2K_GROUP;
            const int n = K - k0 < TQ2K_GROUP ? (K > k0 ? K - k0 : 0) : TQ2K_GROUP;
            const int width = a->kpad - k0 < TQ2K_GROUP ? a->kpad - k0 : TQ2K_GROUP;
            tq2k_quantize_group_avx2(x + (size_t)m * ldx + k0, n, width, a->q + (size_t)m * a->kpad + k0,
                                     a->sx + (size_t)m * a->groups + g, a->qsum + (size_t)m * a->groups + g);
        }
    }
}

/* int16 pair sums -> int32 per output (the two int16 halves of each 32-bit lane added; vpmaddwd measured
 * faster here than the shift-and-add that would leave the multiplier free) */
TQ2K_INLINE __m256i widen_pairs(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

/* Output block nb (16 outputs) unpacked to u8 code + 1: for tile kc and bit pair s, 64 bytes = the two
 * 32-byte vectors (8 outputs x 4 inputs each) the micro-kernel multiplies. */
static void unpack_block(const tq2k_linear *L, int nb, uint8_t *wu) {
    const int kt = L->kpad / 16;
    const uint8_t *w = L->w + (size_t)nb * L->kpad * 4;
    const __m256i three = _mm256_set1_epi8(3);
    for (int kc = 0; kc < kt; kc++) {
        const __m256i p0 = _mm256_loadu_si256((const __m256i *)(w + (size_t)kc * 64));
        const __m256i p1 = _mm256_loadu_si256((const __m256i *)(w + (size_t)kc * 64 + 32));
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            _mm256_store_si256((__m256i *)(wu + ((size_t)kc * 4 + s) * 64), _mm256_and_si256(_mm256_srli_epi16(p0, 2 * s), three));
            _mm256_store_si256((__m256i *)(wu + ((size_t)kc * 4 + s) * 64 + 32), _mm256_and_si256(_mm256_srli_epi16(p1, 2 * s), three));
        }
    }
}

/* One whole group (16 steps of 4 inputs) for 4 rows, in assembly: GCC, left to itself, reassociates the int16
 * sums through the stack or shuffles registers, and runs this loop at ~75% of the vpmaddubsw peak. Step s
 * reads the two unpacked weight vectors at wu + 64 s and each row's 4 activations at q_r + 4 s. */
#define TQ2K_STEP4(S)                                                                                             \
    "vmovdqa " #S "*64(%[w]), %%ymm12\n\t"                                                                      \
    "vmovdqa " #S "*64+32(%[w]), %%ymm13\n\t"                                                                   \
    "vpbroadcastd " #S "*4(%[q0]), %%ymm14\n\t"                                                                 \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a0], %[a0]\n\t"                                                                          \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a1], %[a1]\n\t"                                                                          \
    "vpbroadcastd " #S "*4(%[q1]), %%ymm14\n\t"                                                                 \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a2], %[a2]\n\t"                                                                          \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a3], %[a3]\n\t"                                                                          \
    "vpbroadcastd " #S "*4(%[q2]), %%ymm14\n\t"                                                                 \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a4], %[a4]\n\t"                                                                          \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a5], %[a5]\n\t"                                                                          \
    "vpbroadcastd " #S "*4(%[q3]), %%ymm14\n\t"                                                                 \
    "vpmaddubsw %%ymm14, %%ymm12, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a6], %[a6]\n\t"                                                                          \
    "vpmaddubsw %%ymm14, %%ymm13, %%ymm15\n\t"                                                                  \
    "vpaddw %%ymm15, %[a7], %[a7]\n\t"

TQ2K_INLINE void group4_asm(const uint8_t *wu, const int8_t *q, size_t ldq, __m256i acc[][2]) {
    __asm__(TQ2K_STEP4(0) TQ2K_STEP4(1) TQ2K_STEP4(2) TQ2K_STEP4(3) TQ2K_STEP4(4) TQ2K_STEP4(5) TQ2K_STEP4(6)
            TQ2K_STEP4(7) TQ2K_STEP4(8) TQ2K_STEP4(9) TQ2K_STEP4(10) TQ2K_STEP4(11) TQ2K_STEP4(12) TQ2K_STEP4(13)
            TQ2K_STEP4(14) TQ2K_STEP4(15)
            : [a0] "+x"(acc[0][0]), [a1] "+x"(acc[0][1]), [a2] "+x"(acc[1][0]), [a3] "+x"(acc[1][1]),
              [a4] "+x"(acc[2][0]), [a5] "+x"(acc[2][1]), [a6] "+x"(acc[3][0]), [a7] "+x"(acc[3][1])
            : [w] "r"(wu), [q0] "r"(q), [q1] "r"(q + ldq), [q2] "r"(q + 2 * ldq), [q3] "r"(q + 3 * ldq), "m"(*(const char(*)[1024])wu),
              "m"(*(const char(*)[64])q), "m"(*(const char(*)[64])(q + ldq)), "m"(*(const char(*)[64])(q + 2 * ldq)),
              "m"(*(const char(*)[64])(q + 3 * ldq))
            : "xmm12", "xmm13", "xmm14", "xmm15");
}

/* R rows x the 16 outputs of an unpacked block, whole K, into out[r][col + 0..15] (row stride TQ2K_CHUNK). */
TQ2K_INLINE void micro(const tq2k_linear *L, const uint8_t *wu, const tq2k_act *A, int m0, const int R, int col,
                       const float *sc, const float *bi, float *out) {
    const int kt = L->kpad / 16;
    const int8_t *q = A->q + (size_t)m0 * A->kpad;
    const size_t ldq = (size_t)A->kpad;
    float facc[MR][16] __attribute__((aligned(32)));
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        _mm256_store_ps(facc[r], _mm256_setzero_ps());
        _mm256_store_ps(facc[r] + 8, _mm256_setzero_ps());
    }
    for (int g = 0; g < L->groups; g++) {
        __m256i acc[MR][2];
#pragma GCC unroll 4
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        const int kc0 = g * (TQ2K_GROUP / 16), kc1 = kc0 + TQ2K_GROUP / 16 < kt ? kc0 + TQ2K_GROUP / 16 : kt;
        if (R == 4 && kc1 - kc0 == TQ2K_GROUP / 16) {
            group4_asm(wu + (size_t)kc0 * 256, q + kc0 * 16, ldq, acc);
        } else
        for (int kc = kc0; kc < kc1; kc++) {
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                const __m256i w0 = _mm256_load_si256((const __m256i *)(wu + ((size_t)kc * 4 + s) * 64));
                const __m256i w1 = _mm256_load_si256((const __m256i *)(wu + ((size_t)kc * 4 + s) * 64 + 32));
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256i xb = _mm256_set1_epi32(*(const int32_t *)(q + r * ldq + kc * 16 + 4 * s));
                    acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(w0, xb));
                    acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(w1, xb));
                }
                /* keep the accumulators in registers: without this GCC reassociates the int16 sums into a
                 * tree through the stack (measured ~25% slower) */
                __asm__("" : "+x"(acc[0][0]), "+x"(acc[0][1]), "+x"(acc[1][0]), "+x"(acc[1][1]), "+x"(acc[2][0]),
                        "+x"(acc[2][1]));
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            /* the group step: exact ternary dot product (minus the code + 1 offset) times the activation scale;
             * a per-group weight scale would multiply sx here, one vector per 8 outputs */
            const size_t gi = (size_t)(m0 + r) * A->groups + g;
            const __m256i qs = _mm256_set1_epi32(A->qsum[gi]);
            const __m256 s = _mm256_set1_ps(A->sx[gi]);
            const __m256 d0 = _mm256_cvtepi32_ps(_mm256_sub_epi32(widen_pairs(acc[r][0]), qs));
            const __m256 d1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(widen_pairs(acc[r][1]), qs));
            _mm256_store_ps(facc[r], _mm256_fmadd_ps(d0, s, _mm256_load_ps(facc[r])));
            _mm256_store_ps(facc[r] + 8, _mm256_fmadd_ps(d1, s, _mm256_load_ps(facc[r] + 8)));
        }
    }
    float *o = out + col;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(o + r * TQ2K_CHUNK, _mm256_fmadd_ps(_mm256_load_ps(facc[r]), _mm256_load_ps(sc),
                                                             _mm256_load_ps(bi)));
        _mm256_storeu_ps(o + r * TQ2K_CHUNK + 8, _mm256_fmadd_ps(_mm256_load_ps(facc[r] + 8), _mm256_load_ps(sc + 8),
                                                                 _mm256_load_ps(bi + 8)));
    }
}

/* Per 16-output block: unpack its weights once (16 x kpad bytes, in L1 for K = 384 and L2 for 1536), then
 * run every row of the work item over them. */
static void block_avx2(const tq2k_linear *L, const tq2k_act *A, int m0, int rows, int n0, float *out) {
    const int nb1 = (n0 + TQ2K_CHUNK < L->N ? n0 + TQ2K_CHUNK : L->N + 15) / 16;
    uint8_t *wu = (uint8_t *)aligned_alloc(64, (size_t)L->kpad * 16);
    if (!wu) abort(); /* 6 KB for K = 384 */
    for (int nb = n0 / 16; nb < nb1; nb++) {
        unpack_block(L, nb, wu);
        const int n = nb * 16, left = L->N - n;
        float sc[16] __attribute__((aligned(32))) = {0}, bi[16] __attribute__((aligned(32))) = {0};
        memcpy(sc, L->scale + n, (size_t)(left < 16 ? left : 16) * sizeof(float));
        if (L->bias) memcpy(bi, L->bias + n, (size_t)(left < 16 ? left : 16) * sizeof(float));
        for (int r0 = 0; r0 < rows; r0 += MR) {
            float *o = out + (size_t)r0 * TQ2K_CHUNK;
            switch (rows - r0 < MR ? rows - r0 : MR) {
                case 1: micro(L, wu, A, m0 + r0, 1, n - n0, sc, bi, o); break;
                case 2: micro(L, wu, A, m0 + r0, 2, n - n0, sc, bi, o); break;
                case 3: micro(L, wu, A, m0 + r0, 3, n - n0, sc, bi, o); break;
                default: micro(L, wu, A, m0 + r0, MR, n - n0, sc, bi, o); break;
            }
        }
    }
    free(wu);
}

void tq2k_epilogue_avx2(const tq2k_gemm_job *g, int m0, int R, int n0, float *out) {
    const int nw = g->lin->N - n0 < TQ2K_CHUNK ? g->lin->N - n0 : TQ2K_CHUNK;
    const int nv = nw / 8 * 8;
    for (int r = 0; r < R; r++) {
        float *v = out + r * TQ2K_CHUNK;
        const int m = m0 + r;
        if (g->epilogue == TQ2K_EPI_ACT_QUANT) {
            tq2k_act *a = g->out;
            for (int j = 0; j < TQ2K_CHUNK; j += 8) /* lanes past nw hold garbage and are not quantized */
                _mm256_storeu_ps(v + j, tq2k_activation8(g->act_fn, _mm256_loadu_ps(v + j)));
            const int width = a->kpad - n0 < TQ2K_GROUP ? a->kpad - n0 : TQ2K_GROUP;
            const size_t gi = (size_t)m * a->groups + n0 / TQ2K_GROUP;
            tq2k_quantize_group_avx2(v, nw, width, a->q + (size_t)m * a->kpad + n0, a->sx + gi, a->qsum + gi);
            continue;
        }
        float *y = g->y + (size_t)m * g->ldy + n0;
        int j = 0;
        if (g->epilogue == TQ2K_EPI_ADD) {
            for (; j < nv; j += 8) _mm256_storeu_ps(y + j, _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(v + j)));
            for (; j < nw; j++) y[j] += v[j];
        } else {
            for (; j < nv; j += 8) _mm256_storeu_ps(y + j, _mm256_loadu_ps(v + j));
            for (; j < nw; j++) y[j] = v[j];
        }
    }
}

#ifndef HYB_EPI
#define HYB_EPI tq2k_epilogue_avx2
#endif
#ifndef HYB_EMB
#define HYB_EMB tq2k_embed_avx2
#endif
#ifndef HYB_LN
#define HYB_LN tq2k_layernorm_avx2
#endif
#ifndef HYB_ATT
#define HYB_ATT tq2k_attention_avx2
#endif
const tq2k_ops tq2k_ops_avx2 = {tq2k_quantize_avx2, block_avx2, HYB_EPI, HYB_EMB,
                                HYB_LN, HYB_ATT, tq2k_pool_avx2};

#pragma GCC pop_options

#else /* not x86-64: never selected (tq2k_module.c reports the path unavailable) */
const tq2k_ops tq2k_ops_avx2 = {0};
#endif
