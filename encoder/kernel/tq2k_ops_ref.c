/* Plain C reference of the encoder's other operations: embedding lookup (dequantized on the fly),
 * LayerNorm, self-attention with softmax, pooling. Accumulates in double where that is free of cost
 * here, so that it stays the accurate side of every comparison. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tq2k.h"

float tq2k_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        const float f = ldexpf((float)man, -24); /* zero or subnormal */
        return sign ? -f : f;
    }
    bits = exp == 31 ? sign | 0x7F800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Groups [g0, g1) of row m of a from the row's floats (K valid columns). */
static void quantize_groups(const float *row, int K, tq2k_act *a, int m, int g0, int g1) {
    for (int g = g0; g < g1; g++) {
        const int k0 = g * TQ2K_GROUP;
        const int n = K - k0 < TQ2K_GROUP ? (K > k0 ? K - k0 : 0) : TQ2K_GROUP;
        const int width = a->kpad - k0 < TQ2K_GROUP ? a->kpad - k0 : TQ2K_GROUP;
        tq2k_quantize_group_ref(row + k0, n, width, a->q + (size_t)m * a->kpad + k0, a->sx + (size_t)m * a->groups + g,
                                a->qsum + (size_t)m * a->groups + g);
    }
}

void tq2k_layernorm_ref(float *x, int hidden, const float *w, const float *b, float eps, tq2k_act *a, int r0,
                        int r1) {
    for (int t = r0; t < r1; t++) {
        float *row = x + (size_t)t * hidden;
        double sum = 0.0, sq = 0.0;
        for (int c = 0; c < hidden; c++) sum += row[c];
        const float mean = (float)(sum / hidden);
        for (int c = 0; c < hidden; c++) sq += (double)(row[c] - mean) * (row[c] - mean);
        const float rstd = 1.0f / sqrtf((float)(sq / hidden) + eps);
        for (int c = 0; c < hidden; c++) row[c] = (row[c] - mean) * rstd * w[c] + b[c];
        if (a) quantize_groups(row, hidden, a, t, 0, a->groups);
    }
}

void tq2k_embed_ref(const tq2k_model *m, const int32_t *ids, const int32_t *pos, float *x, tq2k_act *a, int r0,
                    int r1) {
    const int H = m->hidden;
    for (int t = r0; t < r1; t++) {
        float *row = x + (size_t)t * H;
        const size_t id = (size_t)ids[t];
        const float *p = m->pos + (size_t)pos[t] * H;
        for (int c = 0; c < H; c++) {
            float e;
            if (m->emb_kind == TQ2K_EMB_F32) {
                e = ((const float *)m->emb_codes)[id * H + c];
            } else if (m->emb_kind == TQ2K_EMB_I8) {
                e = (float)((const int8_t *)m->emb_codes)[id * H + c] * ((const float *)m->emb_scale)[id];
            } else {
                const uint8_t byte = ((const uint8_t *)m->emb_codes)[id * ((H + 1) / 2) + c / 2];
                const float code = (float)((c & 1 ? byte >> 4 : byte & 15) - 8);
                if (m->emb_kind == TQ2K_EMB_I4) {
                    e = code * ((const float *)m->emb_scale)[id];
                } else {
                    const int ng = (H + m->emb_group - 1) / m->emb_group;
                    e = code * tq2k_f16_to_f32(((const uint16_t *)m->emb_scale)[id * ng + c / m->emb_group]);
                }
            }
            row[c] = e + p[c] + m->type0[c];
        }
        tq2k_layernorm_ref(x, H, m->emb_ln_w, m->emb_ln_b, m->eps, a, t, t + 1);
    }
}

void tq2k_attention_ref(float *qkv, int hidden, int heads, int t0, int L, int h0, int h1, tq2k_act *a) {
    const int hd = hidden / heads;
    const size_t ld = 3 * (size_t)hidden;
    const float scale = 1.0f / sqrtf((float)hd);
    double *p = (double *)malloc((size_t)L * sizeof(double));
    double *ctx = (double *)malloc((size_t)hd * sizeof(double));
    if (!p || !ctx) abort(); /* a few kilobytes */
    for (int h = h0; h < h1; h++) {
        for (int i = 0; i < L; i++) {
            float *qi = qkv + (size_t)(t0 + i) * ld + (size_t)h * hd;
            double mx = -INFINITY, sum = 0.0;
            for (int j = 0; j < L; j++) {
                const float *kj = qkv + (size_t)(t0 + j) * ld + hidden + (size_t)h * hd;
                double s = 0.0;
                for (int d = 0; d < hd; d++) s += (double)qi[d] * kj[d];
                p[j] = s * scale;
                mx = p[j] > mx ? p[j] : mx;
            }
            for (int j = 0; j < L; j++) {
                p[j] = exp(p[j] - mx);
                sum += p[j];
            }
            for (int d = 0; d < hd; d++) ctx[d] = 0.0;
            for (int j = 0; j < L; j++) {
                const float *vj = qkv + (size_t)(t0 + j) * ld + 2 * (size_t)hidden + (size_t)h * hd;
                for (int d = 0; d < hd; d++) ctx[d] += p[j] * vj[d];
            }
            for (int d = 0; d < hd; d++) qi[d] = (float)(ctx[d] / sum); /* row i's query is not needed again */
        }
    }
    free(p);
    free(ctx);
    if (!a) return;
    const int g0 = h0 * hd / TQ2K_GROUP, g1 = (h1 * hd + TQ2K_GROUP - 1) / TQ2K_GROUP;
    for (int i = 0; i < L; i++) quantize_groups(qkv + (size_t)(t0 + i) * ld, hidden, a, t0 + i, g0, g1);
}

void tq2k_pool_ref(const float *x, int hidden, int t0, int L, int pooling, float *out) {
    double norm = 0.0;
    for (int c = 0; c < hidden; c++) {
        double v = 0.0;
        if (pooling == TQ2K_POOL_CLS) {
            v = x[(size_t)t0 * hidden + c];
        } else {
            for (int i = 0; i < L; i++) v += x[(size_t)(t0 + i) * hidden + c];
            v /= L;
        }
        out[c] = (float)v;
        norm += v * v;
    }
    const float inv = (float)(1.0 / fmax(sqrt(norm), 1e-12)); /* as torch.nn.functional.normalize */
    for (int c = 0; c < hidden; c++) out[c] *= inv;
}
