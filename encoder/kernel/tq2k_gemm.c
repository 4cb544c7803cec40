/* Drives one GEMM with its epilogue on the thread pool, for any path's block and epilogue functions.
 *
 * Work items are (row block, TQ2K_CHUNK outputs), row-block-major: consecutive items share a row block's
 * activations (L1/L2) while the layer's packed weights (at most 147 KB for MiniLM) stay in L2. A chunk is one
 * activation group of the next GEMM, so an epilogue that quantizes its outputs sees whole groups. */
#include "tq2k.h"

#define QUANT_ROWS 16       /* rows per quantization work item */
#define MIN_PARALLEL_MACS (1 << 18) /* below this (~3 us on one core) a helper thread costs more than it saves */

typedef struct {
    const tq2k_ops *ops;
    const tq2k_gemm_job *g;
    int chunks;
} gemm_plan;

static void gemm_item(const void *ctx, int i) {
    const gemm_plan *p = (const gemm_plan *)ctx;
    const tq2k_gemm_job *g = p->g;
    const int rb = i / p->chunks, n0 = (i % p->chunks) * TQ2K_CHUNK;
    const int m0 = rb * TQ2K_ROW_BLOCK;
    const int R = g->rows - m0 < TQ2K_ROW_BLOCK ? g->rows - m0 : TQ2K_ROW_BLOCK;
    float out[TQ2K_ROW_BLOCK * TQ2K_CHUNK] __attribute__((aligned(64))); /* 16 KB */
    p->ops->block(g->lin, g->in, m0, R, n0, out);
    p->ops->epilogue(g, m0, R, n0, out);
}

void tq2k_gemm_run(const tq2k_ops *ops, const tq2k_gemm_job *g, int threads) {
    if (g->rows <= 0) return;
    const gemm_plan p = {ops, g, (g->lin->N + TQ2K_CHUNK - 1) / TQ2K_CHUNK};
    const double macs = (double)g->rows * g->lin->N * g->lin->kpad;
    tq2k_parallel((g->rows + TQ2K_ROW_BLOCK - 1) / TQ2K_ROW_BLOCK * p.chunks, macs < MIN_PARALLEL_MACS ? 1 : threads,
                  gemm_item, &p);
}

typedef struct {
    const tq2k_ops *ops;
    const float *x;
    int K, rows;
    tq2k_act *a;
} quant_plan;

static void quant_item(const void *ctx, int i) {
    const quant_plan *p = (const quant_plan *)ctx;
    const int r0 = i * QUANT_ROWS, r1 = r0 + QUANT_ROWS < p->rows ? r0 + QUANT_ROWS : p->rows;
    p->ops->quantize(p->x, p->K, p->K, p->a, r0, r1);
}

void tq2k_quantize_run(const tq2k_ops *ops, const float *x, int K, tq2k_act *a, int rows, int threads) {
    const quant_plan p = {ops, x, K, rows, a};
    tq2k_parallel((rows + QUANT_ROWS - 1) / QUANT_ROWS, (double)rows * K < 65536 ? 1 : threads, quant_item, &p);
}
