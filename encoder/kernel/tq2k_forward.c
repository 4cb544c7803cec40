/* The whole BERT encoder forward on one path's operations, every stage on the thread pool.
 *
 * The batch's tokens are packed back to back (no padding): sequence s is rows [offsets[s], offsets[s+1]).
 * Per layer, 7 stages (each a tq2k_parallel job, so the only synchronisation is the end of a stage):
 *   1. fused QKV GEMM on the quantized LayerNorm output         -> qkv (float, query | key | value)
 *   2. attention per (sequence, group of heads), each sequence with its own length; the context replaces the
 *      query columns and is quantized per 64 columns for the next GEMM, in the same work item
 *   3. output projection, + residual (epilogue)                 -> x
 *   4. LayerNorm of x in place, quantized for the next GEMM
 *   5. FFN up, + bias, GELU, quantized (epilogue)               -> the FFN input, never stored as float
 *   6. FFN down, + residual (epilogue)                          -> x
 *   7. LayerNorm of x, quantized for the next layer's QKV
 * then mean pooling + L2 normalisation per sequence. Long batches run in chunks of whole sequences (at most
 * max_tokens tokens) so the activations stay bounded (a 32 x 256-token batch would need ~70 MB at once). */
#include <stdlib.h>

#include "tq2k.h"

#define ROWS_PER_ITEM 16            /* rows per embedding / LayerNorm work item */
#define MIN_PARALLEL_ELEMENTS 65536 /* row-wise stages smaller than this run on the caller alone */

typedef struct {
    const tq2k_model *m;
    const tq2k_ops *ops;
    const int32_t *ids, *pos, *offsets; /* chunk-local */
    int tokens, nseq, heads_per_item, items_per_seq;
    float *x, *qkv, *out;
    tq2k_act *act_h, *act_i; /* inputs of QKV and the output projection; of FFN down */
    const float *ln_w, *ln_b;
    int quantize;
} forward;

static void embed_item(const void *ctx, int i) {
    const forward *f = (const forward *)ctx;
    const int r0 = i * ROWS_PER_ITEM, r1 = r0 + ROWS_PER_ITEM < f->tokens ? r0 + ROWS_PER_ITEM : f->tokens;
    f->ops->embed(f->m, f->ids, f->pos, f->x, f->act_h, r0, r1);
}

static void layernorm_item(const void *ctx, int i) {
    const forward *f = (const forward *)ctx;
    const int r0 = i * ROWS_PER_ITEM, r1 = r0 + ROWS_PER_ITEM < f->tokens ? r0 + ROWS_PER_ITEM : f->tokens;
    f->ops->layernorm(f->x, f->m->hidden, f->ln_w, f->ln_b, f->m->eps, f->quantize ? f->act_h : NULL, r0, r1);
}

static void attention_item(const void *ctx, int i) {
    const forward *f = (const forward *)ctx;
    const int s = i / f->items_per_seq, h0 = (i % f->items_per_seq) * f->heads_per_item;
    const int h1 = h0 + f->heads_per_item < f->m->heads ? h0 + f->heads_per_item : f->m->heads;
    const int t0 = f->offsets[s];
    f->ops->attention(f->qkv, f->m->hidden, f->m->heads, t0, f->offsets[s + 1] - t0, h0, h1, f->act_h);
}

static void pool_item(const void *ctx, int s) {
    const forward *f = (const forward *)ctx;
    const int t0 = f->offsets[s];
    f->ops->pool(f->x, f->m->hidden, t0, f->offsets[s + 1] - t0, f->m->pooling, f->out + (size_t)s * f->m->hidden);
}

static void rowwise(forward *f, tq2k_item_fn fn, int threads) {
    const int items = (f->tokens + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
    tq2k_parallel(items, (double)f->tokens * f->m->hidden < MIN_PARALLEL_ELEMENTS ? 1 : threads, fn, f);
}

/* Heads per attention item: the fewest whose columns fill whole activation groups (all heads if none do). */
static int heads_per_item(const tq2k_model *m) {
    const int hd = m->hidden / m->heads;
    for (int c = 1; c < m->heads; c++)
        if (c * hd % TQ2K_GROUP == 0) return c;
    return m->heads;
}

static void run_chunk(forward *f, int threads) {
    const tq2k_model *m = f->m;
    const int T = f->tokens, H = m->hidden;
    tq2k_act *act_h = f->act_h, *act_i = f->act_i;
    rowwise(f, embed_item, threads);
    double attention_macs = 0.0;
    for (int s = 0; s < f->nseq; s++) {
        const double L = f->offsets[s + 1] - f->offsets[s];
        attention_macs += 2.0 * L * L * H;
    }
    for (int l = 0; l < m->layers; l++) {
        const tq2k_layer *ly = &m->layer[l];
        const tq2k_gemm_job qkv = {&ly->qkv, act_h, T, TQ2K_EPI_STORE, f->qkv, 3 * H, NULL, 0};
        tq2k_gemm_run(f->ops, &qkv, threads);
        tq2k_parallel(f->nseq * f->items_per_seq, attention_macs < (1 << 18) ? 1 : threads, attention_item, f);
        const tq2k_gemm_job out = {&ly->out, act_h, T, TQ2K_EPI_ADD, f->x, H, NULL, 0};
        tq2k_gemm_run(f->ops, &out, threads);
        f->ln_w = ly->ln1_w, f->ln_b = ly->ln1_b, f->quantize = 1;
        rowwise(f, layernorm_item, threads);
        const tq2k_gemm_job up = {&ly->up, act_h, T, TQ2K_EPI_ACT_QUANT, NULL, 0, act_i, m->act_fn};
        tq2k_gemm_run(f->ops, &up, threads);
        const tq2k_gemm_job down = {&ly->down, act_i, T, TQ2K_EPI_ADD, f->x, H, NULL, 0};
        tq2k_gemm_run(f->ops, &down, threads);
        f->ln_w = ly->ln2_w, f->ln_b = ly->ln2_b, f->quantize = l + 1 < m->layers;
        rowwise(f, layernorm_item, threads);
    }
    tq2k_parallel(f->nseq, (double)T * H < MIN_PARALLEL_ELEMENTS ? 1 : threads, pool_item, f);
}

static int alloc_act(tq2k_act *a, int rows, int K) {
    a->kpad = tq2k_pad16(K);
    a->groups = tq2k_groups(a->kpad);
    a->q = (int8_t *)malloc((size_t)rows * a->kpad + 64);
    a->sx = (float *)malloc((size_t)rows * a->groups * sizeof(float));
    a->qsum = (int32_t *)malloc((size_t)rows * a->groups * sizeof(int32_t));
    return a->q && a->sx && a->qsum ? 0 : -1;
}

static void free_act(tq2k_act *a) {
    free(a->q);
    free(a->sx);
    free(a->qsum);
}

int tq2k_encode(const tq2k_model *m, const tq2k_ops *ops, const int32_t *ids, const int32_t *offsets, int nseq,
                float *out, int threads, int max_tokens) {
    if (nseq <= 0) return 0;
    int most = 0; /* tokens of the largest chunk */
    for (int s0 = 0, s1; s0 < nseq; s0 = s1) {
        for (s1 = s0 + 1; s1 < nseq && offsets[s1 + 1] - offsets[s0] <= max_tokens; s1++) {}
        most = offsets[s1] - offsets[s0] > most ? offsets[s1] - offsets[s0] : most;
    }
    const int H = m->hidden;
    tq2k_act act_h = {0}, act_i = {0};
    float *x = (float *)malloc((size_t)most * H * sizeof(float));
    float *qkv = (float *)malloc((size_t)most * 3 * H * sizeof(float));
    int32_t *pos = (int32_t *)malloc((size_t)most * sizeof(int32_t));
    int32_t *local = (int32_t *)malloc(((size_t)nseq + 1) * sizeof(int32_t));
    int rc = alloc_act(&act_h, most, H) | alloc_act(&act_i, most, m->inter);
    if (!x || !qkv || !pos || !local) rc = -1;
    if (rc == 0) {
        for (int s0 = 0, s1; s0 < nseq; s0 = s1) {
            for (s1 = s0 + 1; s1 < nseq && offsets[s1 + 1] - offsets[s0] <= max_tokens; s1++) {}
            for (int s = s0; s <= s1; s++) local[s - s0] = offsets[s] - offsets[s0];
            for (int s = 0; s < s1 - s0; s++)
                for (int t = local[s]; t < local[s + 1]; t++) pos[t] = t - local[s];
            forward f = {m, ops, ids + offsets[s0], pos, local, offsets[s1] - offsets[s0], s1 - s0,
                         heads_per_item(m), 0, x, qkv, out + (size_t)s0 * H, &act_h, &act_i, NULL, NULL, 0};
            f.items_per_seq = (m->heads + f.heads_per_item - 1) / f.heads_per_item;
            run_chunk(&f, threads);
        }
    }
    free(x);
    free(qkv);
    free(pos);
    free(local);
    free_act(&act_h);
    free_act(&act_i);
    return rc;
}
