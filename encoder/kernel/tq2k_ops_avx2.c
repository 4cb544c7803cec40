/* AVX2 versions of the encoder's other operations (tq2k_ops_ref.c is the reference): embedding lookup with
 * on-the-fly dequantization, LayerNorm (+ quantization of its output for the next GEMM), self-attention,
 * pooling. Shapes the vector code does not cover (head size not a multiple of 8) use the reference. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tq2k.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#include "tq2k_avx2_math.h"

#define QB 4 /* query rows per attention block: 4 rows x 16 keys of scores in 8 registers */

static void quantize_row_groups(const float *row, int K, tq2k_act *a, int m, int g0, int g1) {
    for (int g = g0; g < g1; g++) {
        const int k0 = g * TQ2K_GROUP;
        const int n = K - k0 < TQ2K_GROUP ? (K > k0 ? K - k0 : 0) : TQ2K_GROUP;
        const int width = a->kpad - k0 < TQ2K_GROUP ? a->kpad - k0 : TQ2K_GROUP;
        tq2k_quantize_group_avx2(row + k0, n, width, a->q + (size_t)m * a->kpad + k0,
                                 a->sx + (size_t)m * a->groups + g, a->qsum + (size_t)m * a->groups + g);
    }
}

void tq2k_layernorm_avx2(float *x, int hidden, const float *w, const float *b, float eps, tq2k_act *a, int r0,
                         int r1) {
    const int hv = hidden / 8 * 8;
    for (int t = r0; t < r1; t++) {
        float *row = x + (size_t)t * hidden;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int c = 0;
        for (; c + 16 <= hv; c += 16) {
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(row + c));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(row + c + 8));
        }
        for (; c < hv; c += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(row + c));
        float sum = tq2k_hsum8(_mm256_add_ps(s0, s1));
        for (; c < hidden; c++) sum += row[c];
        const float mean = sum / (float)hidden;
        const __m256 vm = _mm256_set1_ps(mean);
        s0 = s1 = _mm256_setzero_ps();
        for (c = 0; c + 16 <= hv; c += 16) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(row + c), vm);
            const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(row + c + 8), vm);
            s0 = _mm256_fmadd_ps(d0, d0, s0);
            s1 = _mm256_fmadd_ps(d1, d1, s1);
        }
        for (; c < hv; c += 8) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(row + c), vm);
            s0 = _mm256_fmadd_ps(d0, d0, s0);
        }
        float sq = tq2k_hsum8(_mm256_add_ps(s0, s1));
        for (; c < hidden; c++) sq += (row[c] - mean) * (row[c] - mean);
        const float rstd = 1.0f / sqrtf(sq / (float)hidden + eps);
        const __m256 vr = _mm256_set1_ps(rstd);
        for (c = 0; c < hv; c += 8)
            _mm256_storeu_ps(row + c, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + c), vm), vr),
                                                      _mm256_loadu_ps(w + c), _mm256_loadu_ps(b + c)));
        for (; c < hidden; c++) row[c] = (row[c] - mean) * rstd * w[c] + b[c];
        if (a) quantize_row_groups(row, hidden, a, t, 0, a->groups);
    }
}

/* 16 signed 4-bit codes (two per byte, low nibble first, stored + 8) -> two vectors of 8 floats */
TQ2K_INLINE void nibbles16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    const __m128i v = _mm_loadl_epi64((const __m128i *)p);
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i codes = _mm_sub_epi8(_mm_unpacklo_epi8(_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask)),
                                       _mm_set1_epi8(8));
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(codes, 8)));
}

void tq2k_embed_avx2(const tq2k_model *m, const int32_t *ids, const int32_t *pos, float *x, tq2k_act *a, int r0,
                     int r1) {
    const int H = m->hidden;
    /* vector code: 16 columns at a time, scale groups of a multiple of 8 columns; else the reference */
    const int vec = H % 16 == 0 && (m->emb_kind != TQ2K_EMB_I4G || m->emb_group % 8 == 0);
    if (!vec) {
        tq2k_embed_ref(m, ids, pos, x, a, r0, r1);
        return;
    }
    for (int t = r0; t < r1; t++) {
        float *row = x + (size_t)t * H;
        const size_t id = (size_t)ids[t];
        const float *p = m->pos + (size_t)pos[t] * H;
        for (int c = 0; c < H; c += 16) {
            __m256 e0, e1;
            if (m->emb_kind == TQ2K_EMB_F32) {
                e0 = _mm256_loadu_ps((const float *)m->emb_codes + id * H + c);
                e1 = _mm256_loadu_ps((const float *)m->emb_codes + id * H + c + 8);
            } else if (m->emb_kind == TQ2K_EMB_I8) {
                const __m128i b = _mm_loadu_si128((const __m128i *)((const int8_t *)m->emb_codes + id * H + c));
                const __m256 s = _mm256_set1_ps(((const float *)m->emb_scale)[id]);
                e0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), s);
                e1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), s);
            } else {
                nibbles16((const uint8_t *)m->emb_codes + id * (H / 2) + c / 2, &e0, &e1);
                if (m->emb_kind == TQ2K_EMB_I4) {
                    const __m256 s = _mm256_set1_ps(((const float *)m->emb_scale)[id]);
                    e0 = _mm256_mul_ps(e0, s);
                    e1 = _mm256_mul_ps(e1, s);
                } else {
                    const uint16_t *sc = (const uint16_t *)m->emb_scale + id * ((H + m->emb_group - 1) / m->emb_group);
                    e0 = _mm256_mul_ps(e0, _mm256_set1_ps(tq2k_f16_to_f32(sc[c / m->emb_group])));
                    e1 = _mm256_mul_ps(e1, _mm256_set1_ps(tq2k_f16_to_f32(sc[(c + 8) / m->emb_group])));
                }
            }
            _mm256_storeu_ps(row + c, _mm256_add_ps(_mm256_add_ps(e0, _mm256_loadu_ps(p + c)),
                                                    _mm256_loadu_ps(m->type0 + c)));
            _mm256_storeu_ps(row + c + 8, _mm256_add_ps(_mm256_add_ps(e1, _mm256_loadu_ps(p + c + 8)),
                                                        _mm256_loadu_ps(m->type0 + c + 8)));
        }
        tq2k_layernorm_avx2(x, H, m->emb_ln_w, m->emb_ln_b, m->eps, a, t, t + 1);
    }
}

/* scores[r][j] = scale * q_r . k_j for R query rows and keys [0, Lp) (kt: (hd, ldk), keys zero padded) */
TQ2K_INLINE void scores_block(const float *qrow, size_t ld, const int R, const float *kt, int hd, int Lp, int ldk,
                              float scale, float *sc) {
    for (int j = 0; j < Lp; j += 16) {
        __m256 acc[QB][2];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int d = 0; d < hd; d++) {
            const __m256 k0 = _mm256_loadu_ps(kt + (size_t)d * ldk + j), k1 = _mm256_loadu_ps(kt + (size_t)d * ldk + j + 8);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256 qb = _mm256_set1_ps(qrow[r * ld + d]);
                acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
            }
        }
        const __m256 s = _mm256_set1_ps(scale);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(sc + (size_t)r * Lp + j, _mm256_mul_ps(acc[r][0], s));
            _mm256_storeu_ps(sc + (size_t)r * Lp + j + 8, _mm256_mul_ps(acc[r][1], s));
        }
    }
}

/* In place softmax numerator 2^(p - max) of base-2 scores p[0, L) (entries [L, Lp) set to 0); returns the sum. */
static float softmax_row(float *p, int L, int Lp) {
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    int j = 0;
    for (; j + 8 <= L; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p + j));
    float mx = tq2k_hmax8(vmax);
    for (; j < L; j++) mx = p[j] > mx ? p[j] : mx;
    const __m256 vm = _mm256_set1_ps(mx);
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 vsum = _mm256_setzero_ps();
    for (j = 0; j < Lp; j += 8) {
        const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(L - j), idx));
        const __m256 e = _mm256_and_ps(tq2k_exp2_8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm)), valid);
        _mm256_storeu_ps(p + j, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    return tq2k_hsum8(vsum);
}

/* ctx[r] = sum_j p[r][j] v_j / sum[r] for R <= 2 rows, NV = head size / 8 vectors (compile-time, so the
 * 2 x NV accumulators stay in registers) */
TQ2K_INLINE void weighted_values(const float *p, int Lp, const int R, const float *v, size_t ld, int L, const int NV,
                                 const float *sum, float *ctx, size_t ldc) {
    __m256 acc[2][8];
    for (int r = 0; r < 2; r++)
        for (int c = 0; c < NV; c++) acc[r][c] = _mm256_setzero_ps();
    for (int j = 0; j < L; j++) {
        const float *vj = v + (size_t)j * ld;
        const __m256 p0 = _mm256_set1_ps(p[j]);
        const __m256 p1 = _mm256_set1_ps(R > 1 ? p[Lp + j] : 0.0f);
        for (int c = 0; c < NV; c++) {
            const __m256 vv = _mm256_loadu_ps(vj + 8 * c);
            acc[0][c] = _mm256_fmadd_ps(p0, vv, acc[0][c]);
            if (R > 1) acc[1][c] = _mm256_fmadd_ps(p1, vv, acc[1][c]);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m256 inv = _mm256_set1_ps(1.0f / sum[r]);
        for (int c = 0; c < NV; c++) _mm256_storeu_ps(ctx + r * ldc + 8 * c, _mm256_mul_ps(acc[r][c], inv));
    }
}

static void weighted_values_any(const float *p, int Lp, int R, const float *v, size_t ld, int L, int hd,
                                const float *sum, float *ctx, size_t ldc) {
#define TQ2K_WV(NV)                                                                                              \
    case NV:                                                                                                     \
        if (R > 1) weighted_values(p, Lp, 2, v, ld, L, NV, sum, ctx, ldc);                                       \
        else weighted_values(p, Lp, 1, v, ld, L, NV, sum, ctx, ldc);                                             \
        break;
    switch (hd / 8) {
        TQ2K_WV(1) TQ2K_WV(2) TQ2K_WV(3) TQ2K_WV(4) TQ2K_WV(5) TQ2K_WV(6) TQ2K_WV(7) default: TQ2K_WV(8)
    }
#undef TQ2K_WV
}

void tq2k_attention_avx2(float *qkv, int hidden, int heads, int t0, int L, int h0, int h1, tq2k_act *a) {
    const int hd = hidden / heads;
    if (hd % 8 != 0 || hd > 64) {
        tq2k_attention_ref(qkv, hidden, heads, t0, L, h0, h1, a);
        return;
    }
    const size_t ld = 3 * (size_t)hidden;
    /* keys padded to 16; +16 on the row stride of the transposed keys: a power-of-two stride would map all
     * hd rows of a key block to the same few L1 sets */
    const int Lp = (L + 15) / 16 * 16, ldk = Lp + 16, nh = h1 - h0;
    const float scale = 1.44269504088896341f / sqrtf((float)hd); /* base-2 scores: softmax through 2^x */
    float *kt = (float *)malloc(((size_t)nh * hd * ldk + (size_t)nh * L * hd + (size_t)QB * Lp) * sizeof(float));
    if (!kt) abort(); /* under 300 KB even for 512 tokens */
    float *vc = kt + (size_t)nh * hd * ldk, *sc = vc + (size_t)nh * L * hd;
    for (int hh = 0; hh < nh; hh++) { /* per head: keys transposed, kt[d][j] (zero past L); values contiguous */
        float *k = kt + (size_t)hh * hd * ldk, *v = vc + (size_t)hh * L * hd;
        for (int j = 0; j < L; j++) {
            const float *src = qkv + (size_t)(t0 + j) * ld + hidden + (size_t)(h0 + hh) * hd;
            for (int d = 0; d < hd; d++) k[(size_t)d * ldk + j] = src[d];
            memcpy(v + (size_t)j * hd, src + hidden, (size_t)hd * sizeof(float));
        }
        for (int d = 0; d < hd; d++)
            for (int j = L; j < Lp; j++) k[(size_t)d * ldk + j] = 0.0f;
    }
    const int g0 = h0 * hd / TQ2K_GROUP, g1 = (h1 * hd + TQ2K_GROUP - 1) / TQ2K_GROUP;
    for (int i0 = 0; i0 < L; i0 += QB) {
        const int R = L - i0 < QB ? L - i0 : QB;
        for (int hh = 0; hh < nh; hh++) {
            float *q = qkv + (size_t)(t0 + i0) * ld + (size_t)(h0 + hh) * hd;
            const float *k = kt + (size_t)hh * hd * ldk;
            switch (R) {
                case 1: scores_block(q, ld, 1, k, hd, Lp, ldk, scale, sc); break;
                case 2: scores_block(q, ld, 2, k, hd, Lp, ldk, scale, sc); break;
                case 3: scores_block(q, ld, 3, k, hd, Lp, ldk, scale, sc); break;
                default: scores_block(q, ld, 4, k, hd, Lp, ldk, scale, sc); break;
            }
            float sum[QB];
            for (int r = 0; r < R; r++) sum[r] = softmax_row(sc + (size_t)r * Lp, L, Lp);
            const float *v = vc + (size_t)hh * L * hd;
            for (int r = 0; r < R; r += 2) /* the queries of these rows are not needed again: overwrite them */
                weighted_values_any(sc + (size_t)r * Lp, Lp, R - r, v, (size_t)hd, L, hd, sum + r, q + r * ld, ld);
        }
        if (a)
            for (int r = 0; r < R; r++) quantize_row_groups(qkv + (size_t)(t0 + i0 + r) * ld, hidden, a, t0 + i0 + r, g0, g1);
    }
    free(kt);
}

void tq2k_pool_avx2(const float *x, int hidden, int t0, int L, int pooling, float *out) {
    const float *first = x + (size_t)t0 * hidden;
    const int hv = hidden / 8 * 8;
    const __m256 invl = _mm256_set1_ps(1.0f / (float)L);
    int c = 0;
    for (; c < hv; c += 8) {
        __m256 acc = _mm256_loadu_ps(first + c);
        if (pooling == TQ2K_POOL_MEAN) {
            for (int i = 1; i < L; i++) acc = _mm256_add_ps(acc, _mm256_loadu_ps(first + (size_t)i * hidden + c));
            acc = _mm256_mul_ps(acc, invl);
        }
        _mm256_storeu_ps(out + c, acc);
    }
    for (; c < hidden; c++) {
        float v = first[c];
        if (pooling == TQ2K_POOL_MEAN) {
            for (int i = 1; i < L; i++) v += first[(size_t)i * hidden + c];
            v /= (float)L;
        }
        out[c] = v;
    }
    __m256 sq = _mm256_setzero_ps();
    for (c = 0; c < hv; c += 8) sq = _mm256_fmadd_ps(_mm256_loadu_ps(out + c), _mm256_loadu_ps(out + c), sq);
    float norm = tq2k_hsum8(sq);
    for (; c < hidden; c++) norm += out[c] * out[c];
    const float inv = 1.0f / fmaxf(sqrtf(norm), 1e-12f);
    for (c = 0; c < hidden; c++) out[c] *= inv;
}

#pragma GCC pop_options
#endif
