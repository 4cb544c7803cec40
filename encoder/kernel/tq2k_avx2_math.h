/* AVX2 helpers shared by tq2k_avx2.c and tq2k_ops_avx2.c: horizontal reductions, exp, erf, and the
 * quantization of one activation group. Include after `#pragma GCC target("avx2,fma")`. */
#ifndef TQ2K_AVX2_MATH_H
#define TQ2K_AVX2_MATH_H

#include <immintrin.h>
#include <string.h>

#include "tq2k.h"

#define TQ2K_INLINE static inline __attribute__((always_inline))

TQ2K_INLINE float tq2k_hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

TQ2K_INLINE float tq2k_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

TQ2K_INLINE int32_t tq2k_hsum8i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* 2^x for x <= 128 (below -126 gives about 2^-126): x = n + f, |f| <= 1/2, Taylor polynomial of degree 7 for
 * 2^f (relative error ~5e-9 before float rounding), 2^n through the exponent bits. */
TQ2K_INLINE __m256 tq2k_exp2_8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(127.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5252733804e-5f);                    /* ln2^7 / 7! */
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.5403530394e-4f));   /* ln2^6 / 6! */
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108665e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650696e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718056e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* exp(x) = 2^(x log2 e) */
TQ2K_INLINE __m256 tq2k_exp8(__m256 x) { return tq2k_exp2_8(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f))); }

/* erf(x) as x * P(x^2) / Q(x^2) on [-4, 4] (the rational approximation of Eigen / XLA; erf(4) is 1 in float),
 * |error| <= 4.2e-7: no exp, one division (the int8 quantization that follows GELU has steps of ~1e-2). */
TQ2K_INLINE __m256 tq2k_erf8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-4.0f)), _mm256_set1_ps(4.0f));
    const __m256 x2 = _mm256_mul_ps(x, x);
    __m256 p = _mm256_fmadd_ps(x2, _mm256_set1_ps(-2.72614225801306e-10f), _mm256_set1_ps(2.77068142495902e-08f));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.10102402082508e-06f));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-5.69250639462346e-05f));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-7.34990630326855e-04f));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-2.95459980854025e-03f));
    p = _mm256_fmadd_ps(x2, p, _mm256_set1_ps(-1.60960333262415e-02f));
    __m256 q = _mm256_fmadd_ps(x2, _mm256_set1_ps(-1.45660718464996e-05f), _mm256_set1_ps(-2.13374055278905e-04f));
    q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.68282697438203e-03f));
    q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-7.37332916720468e-03f));
    q = _mm256_fmadd_ps(x2, q, _mm256_set1_ps(-1.42647390514189e-02f));
    return _mm256_div_ps(_mm256_mul_ps(x, p), q);
}

TQ2K_INLINE __m256 tq2k_activation8(int fn, __m256 v) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    if (fn == TQ2K_GELU_ERF)
        return _mm256_mul_ps(_mm256_mul_ps(half, v),
                             _mm256_add_ps(one, tq2k_erf8(_mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f)))));
    if (fn == TQ2K_GELU_TANH) { /* 0.5 v (1 + tanh(u)) = v * (1 - 1 / (exp(2u) + 1)) */
        const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v),
                                                       _mm256_mul_ps(v, v), v));
        const __m256 e = tq2k_exp8(_mm256_add_ps(u, u));
        return _mm256_mul_ps(v, _mm256_sub_ps(one, _mm256_div_ps(one, _mm256_add_ps(e, one))));
    }
    return _mm256_max_ps(v, _mm256_setzero_ps());
}

/* tq2k_quantize_group_ref, vectorized; bit-identical (same float operations, round half to even). */
TQ2K_INLINE void tq2k_quantize_group_avx2(const float *v, int n, int width, int8_t *q, float *sx, int32_t *qsum) {
    float padded[TQ2K_GROUP] __attribute__((aligned(32)));
    if (n < TQ2K_GROUP) {
        memset(padded, 0, sizeof padded);
        if (n > 0) memcpy(padded, v, (size_t)n * sizeof(float));
        v = padded;
    }
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (int k = 0; k < TQ2K_GROUP; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)));
    const float amax = tq2k_hmax8(vmax);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    __m256i vsum = _mm256_setzero_si256();
    for (int k = 0; k < width; k += 16) { /* width is a multiple of 16 (kpad is) */
        __m256i v0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k), inv));
        __m256i v1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + k + 8), inv));
        v0 = _mm256_max_epi32(_mm256_min_epi32(v0, hi), lo);
        v1 = _mm256_max_epi32(_mm256_min_epi32(v1, hi), lo);
        vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(v0, v1));
        const __m256i w16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(v0, v1), 0xD8);
        _mm_storeu_si128((__m128i *)(q + k),
                         _mm_packs_epi16(_mm256_castsi256_si128(w16), _mm256_extracti128_si256(w16, 1)));
    }
    *sx = amax / 127.0f;
    *qsum = tq2k_hsum8i(vsum);
}

#endif
