/* Plain C reference path: reads the packed layout one weight at a time. The ground truth that the
 * SIMD paths are tested against; also the fallback on CPUs without AVX2. */
#include <math.h>

#include "tq2k.h"

void tq2k_quantize_ref(const tq2k_args *a, int r0, int r1) {
    for (int m = r0; m < r1; m++) {
        const float *x = a->x + (size_t)m * a->K;
        int8_t *q = a->q + (size_t)m * a->kpad;
        float corr = 0.0f;
        for (int g = 0; g < a->groups; g++) {
            const int k0 = g * TQ2K_GROUP;
            const int k1 = k0 + TQ2K_GROUP < a->K ? k0 + TQ2K_GROUP : a->K; /* k0 >= K: padding only */
            float amax = 0.0f;
            for (int k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(x[k]));
            int32_t sum = 0;
            if (amax > 0.0f) {
                const float inv = 127.0f / amax;
                for (int k = k0; k < k1; k++) {
                    /* nearbyintf rounds half to even, like cvtps2dq in the SIMD paths */
                    int v = (int)nearbyintf(x[k] * inv);
                    v = v > 127 ? 127 : (v < -127 ? -127 : v);
                    q[k] = (int8_t)v;
                    sum += v;
                }
            } else {
                for (int k = k0; k < k1; k++) q[k] = 0;
            }
            const float sx = amax / 127.0f;
            a->sx[(size_t)m * a->groups + g] = sx;
            corr += sx * (float)sum; /* same order and no FMA in every path: bit-identical */
        }
        for (int k = a->K; k < a->kpad; k++) q[k] = 0;
        a->corr[m] = corr;
    }
}

static inline int weight_plus_one(const uint8_t *w, int kpad, int n, int k) {
    size_t tile = (size_t)(n / 16) * (kpad / 16) + k / 16;
    uint8_t byte = w[tile * 64 + (n % 16) * 4 + k % 4];
    return (byte >> (2 * ((k % 16) / 4))) & 3;
}

static void gemm_item(const void *ctx, int i) { /* outputs [16 i, 16 i + 16) for every row */
    const tq2k_args *a = (const tq2k_args *)ctx;
    const int n1 = 16 * i + 16 < a->N ? 16 * i + 16 : a->N;
    for (int n = 16 * i; n < n1; n++) {
        for (int m = 0; m < a->rows; m++) {
            const int8_t *q = a->q + (size_t)m * a->kpad;
            float sum = 0.0f;
            for (int g = 0; g < a->groups; g++) {
                const int k1 = (g + 1) * TQ2K_GROUP < a->kpad ? (g + 1) * TQ2K_GROUP : a->kpad;
                int32_t acc = 0;
                for (int k = g * TQ2K_GROUP; k < k1; k++) acc += weight_plus_one(a->w, a->kpad, n, k) * q[k];
                sum += a->sx[(size_t)m * a->groups + g] * (float)acc;
            }
            float v = (sum - a->corr[m]) * a->scale[n];
            a->y[(size_t)m * a->N + n] = a->bias ? v + a->bias[n] : v;
        }
    }
}

void tq2k_gemm_ref(const tq2k_args *a) {
    tq2k_quantize_ref(a, 0, a->rows);
    tq2k_parallel((a->N + 15) / 16, a->threads, gemm_item, a);
}
