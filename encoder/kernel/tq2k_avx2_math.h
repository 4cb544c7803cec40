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

/* exp(x) for x in about [-87, 88] (smaller gives 0): x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for
 * e^r (Cephes expf coefficients), times 2^n through the exponent bits; relative error ~2e-7. */
TQ2K_INLINE __m256 tq2k_exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 split in two for exactness */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* n in [-126, 128]: split 2^n = 2^(n/2) * 2^(n - n/2) so neither factor overflows the exponent field */
    const __m256i ni = _mm256_cvtps_epi32(n);
    const __m256i half = _mm256_srai_epi32(ni, 1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* erf(x): Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7 (the int8 quantization that follows GELU is ~1e-2). */
TQ2K_INLINE __m256 tq2k_erf8(__m256 x) {
    const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
    const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a,
                                                                          _mm256_set1_ps(1.0f)));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    const __m256 e = tq2k_exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    const __m256 y = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
    return _mm256_or_ps(y, sign);
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
