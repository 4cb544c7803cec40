/* Plain C reference of the GEMM pieces: activation quantization, the block (reads the packed layout one
 * weight at a time) and the epilogues. The ground truth the SIMD paths are tested against; also the path
 * of CPUs without AVX2. */
#include <math.h>

#include "tq2k.h"

/* One activation group: v[0, n) -> q[0, width) (zero beyond n), its scale and code sum. */
void tq2k_quantize_group_ref(const float *v, int n, int width, int8_t *q, float *sx, int32_t *qsum) {
    float amax = 0.0f;
    for (int k = 0; k < n; k++) amax = fmaxf(amax, fabsf(v[k]));
    int32_t sum = 0;
    int k = 0;
    if (amax > 0.0f) {
        const float inv = 127.0f / amax;
        for (; k < n; k++) {
            /* nearbyintf rounds half to even, like cvtps2dq in the SIMD paths */
            int c = (int)nearbyintf(v[k] * inv);
            c = c > 127 ? 127 : (c < -127 ? -127 : c);
            q[k] = (int8_t)c;
            sum += c;
        }
    }
    for (; k < width; k++) q[k] = 0;
    *sx = amax / 127.0f;
    *qsum = sum;
}

static void quantize_ref(const float *x, int ldx, int K, tq2k_act *a, int r0, int r1) {
    for (int m = r0; m < r1; m++) {
        for (int g = 0; g < a->groups; g++) {
            const int k0 = g * TQ2K_GROUP;
            const int n = K - k0 < TQ2K_GROUP ? (K > k0 ? K - k0 : 0) : TQ2K_GROUP;
            const int width = a->kpad - k0 < TQ2K_GROUP ? a->kpad - k0 : TQ2K_GROUP;
            tq2k_quantize_group_ref(x + (size_t)m * ldx + k0, n, width, a->q + (size_t)m * a->kpad + k0,
                                    a->sx + (size_t)m * a->groups + g, a->qsum + (size_t)m * a->groups + g);
        }
    }
}

static inline int weight_plus_one(const uint8_t *w, int kpad, int n, int k) {
    const size_t tile = (size_t)(n / 16) * (kpad / 16) + k / 16;
    const uint8_t byte = w[tile * 64 + (n % 16) * 4 + k % 4];
    return (byte >> (2 * ((k % 16) / 4))) & 3;
}

static void block_ref(const tq2k_linear *L, const tq2k_act *A, int m0, int R, int n0, float *out) {
    const int n1 = n0 + TQ2K_CHUNK < L->N ? n0 + TQ2K_CHUNK : L->N;
    for (int r = 0; r < R; r++) {
        const int8_t *q = A->q + (size_t)(m0 + r) * A->kpad;
        const float *sx = A->sx + (size_t)(m0 + r) * A->groups;
        const int32_t *qsum = A->qsum + (size_t)(m0 + r) * A->groups;
        for (int n = n0; n < n1; n++) {
            float sum = 0.0f;
            for (int g = 0; g < L->groups; g++) {
                const int k1 = (g + 1) * TQ2K_GROUP < L->kpad ? (g + 1) * TQ2K_GROUP : L->kpad;
                int32_t acc = 0;
                for (int k = g * TQ2K_GROUP; k < k1; k++) acc += weight_plus_one(L->w, L->kpad, n, k) * q[k];
                sum += sx[g] * (float)(acc - qsum[g]); /* the group step (a per-group weight scale goes here) */
            }
            const float v = sum * L->scale[n];
            out[r * TQ2K_CHUNK + (n - n0)] = L->bias ? v + L->bias[n] : v;
        }
    }
}

static float activation_ref(int fn, float v) {
    switch (fn) {
        case TQ2K_GELU_ERF: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        case TQ2K_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        default: return v > 0.0f ? v : 0.0f;
    }
}

void tq2k_epilogue_ref(const tq2k_gemm_job *g, int m0, int R, int n0, float *out) {
    const int nw = g->lin->N - n0 < TQ2K_CHUNK ? g->lin->N - n0 : TQ2K_CHUNK;
    for (int r = 0; r < R; r++) {
        float *v = out + r * TQ2K_CHUNK;
        const int m = m0 + r;
        if (g->epilogue == TQ2K_EPI_ACT_QUANT) {
            tq2k_act *a = g->out;
            for (int j = 0; j < nw; j++) v[j] = activation_ref(g->act_fn, v[j]);
            const int width = a->kpad - n0 < TQ2K_GROUP ? a->kpad - n0 : TQ2K_GROUP;
            const size_t gi = (size_t)m * a->groups + n0 / TQ2K_GROUP;
            tq2k_quantize_group_ref(v, nw, width, a->q + (size_t)m * a->kpad + n0, a->sx + gi, a->qsum + gi);
        } else {
            float *y = g->y + (size_t)m * g->ldy + n0;
            if (g->epilogue == TQ2K_EPI_ADD)
                for (int j = 0; j < nw; j++) y[j] += v[j];
            else
                for (int j = 0; j < nw; j++) y[j] = v[j];
        }
    }
}

const tq2k_ops tq2k_ops_ref = {quantize_ref, block_ref, tq2k_epilogue_ref, tq2k_embed_ref, tq2k_layernorm_ref,
                               tq2k_attention_ref, tq2k_pool_ref};
