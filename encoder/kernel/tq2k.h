/* tq2k: the packed 2-bit ternary GEMM and the native BERT encoder forward built on it.
 *
 * Weights: encoder/packing.py's layout (16x16 tiles of 64 bytes, 2-bit value = code + 1, see its docstring);
 * one float32 scale per output row beside them.
 *
 * Activations entering a GEMM are int8 per row and group of TQ2K_GROUP inputs (tq2k_act):
 *   sx[m][g] = absmax / 127, q = round_half_even(x * (127 / absmax)), zero padded to kpad,
 *   qsum[m][g] = sum of q over the group (the weights are stored as code + 1).
 * A GEMM then computes, for every output n,
 *   acc[m][g][n] = sum_{k in g} (code[n][k] + 1) * q[m][k]            (exact integers)
 *   y[m][n] = (sum_g sx[m][g] * (acc[m][g][n] - qsum[m][g])) * scale[n] + bias[n]
 * so each group contributes its exact ternary dot product times its own activation scale. A per-group weight
 * scale (one per output row and 64 inputs) would multiply that same per-group term: the block functions
 * apply the group step in one place, where such a scale drops in.
 * Why groups and not one scale per row: LayerNorm outputs have a few outlier channels (MiniLM: 62, 249, 223)
 * that set a row's absmax and crush the resolution of all other inputs; with groups of 64 only their own
 * group is coarse (measured on a randomly ternarized all-MiniLM-L6-v2: minimum embedding cosine to the same
 * model in float 0.9977 with per-row scales, 0.9995 with groups of 64).
 *
 * Organisation (ggml style): every operation has a plain C reference (tq2k_ref.c, tq2k_ops_ref.c) and SIMD
 * versions with the same signature (tq2k_avx2.c, tq2k_ops_avx2.c, tq2k_avx512*.c), collected per path in a
 * tq2k_ops table; tests compare each path with the reference on odd shapes. Quantization is bit-identical
 * across paths; the float steps (FMA, exp/erf approximations, summation order) differ within float rounding.
 * tq2k_gemm.c drives a GEMM with a fused epilogue on the thread pool (tq2k_pool.c); tq2k_forward.c runs the
 * whole encoder forward from it. */
#ifndef TQ2K_H
#define TQ2K_H

#include <stddef.h>
#include <stdint.h>

/* TQ2K_AVX512F32 keeps activations in float (y = (sum_k (code+1) x - sum x) * scale + bias): a GEMM-only path,
 * run only when forced, as the measured "float activations" alternative. */
enum tq2k_path { TQ2K_REF = 0, TQ2K_AVX2 = 1, TQ2K_AVX512VNNI = 2, TQ2K_AVX512F32 = 3, TQ2K_NPATHS = 4 };

#define TQ2K_GROUP 64  /* inputs per activation scale: 4 tiles of 16 */
#define TQ2K_CHUNK 64      /* outputs per GEMM work item: one activation group of the next GEMM */
#define TQ2K_ROW_BLOCK 64  /* most rows per GEMM work item */

static inline int tq2k_pad16(int n) { return (n + 15) / 16 * 16; }
static inline int tq2k_groups(int kpad) { return (kpad + TQ2K_GROUP - 1) / TQ2K_GROUP; }

typedef struct {    /* activations quantized as the input of one GEMM, (rows, K) */
    int8_t *q;      /* (rows, kpad), zero for k >= K */
    float *sx;      /* (rows, groups) */
    int32_t *qsum;  /* (rows, groups) */
    int kpad, groups;
} tq2k_act;

typedef struct {          /* one packed linear layer: y = x @ (scale[:, None] * codes)^T + bias */
    const uint8_t *w;     /* N_pad * kpad / 4 bytes */
    const float *scale;   /* (N,) */
    const float *bias;    /* (N,) or NULL */
    int N, K, kpad, groups;
} tq2k_linear;

enum tq2k_epilogue {
    TQ2K_EPI_STORE = 0,     /* y[m][n] = v */
    TQ2K_EPI_ADD = 1,       /* y[m][n] += v (the residual stream) */
    TQ2K_EPI_ACT_QUANT = 2  /* act(v) quantized straight into the next GEMM's input (never stored as float) */
};
enum tq2k_act_fn { TQ2K_GELU_ERF = 0, TQ2K_GELU_TANH = 1, TQ2K_RELU = 2 };
enum tq2k_pooling { TQ2K_POOL_MEAN = 0, TQ2K_POOL_CLS = 1 };

typedef struct {
    const tq2k_linear *lin;
    const tq2k_act *in;
    int rows;
    int epilogue;
    float *y;       /* STORE / ADD: (rows, ldy) */
    int ldy;
    tq2k_act *out;  /* ACT_QUANT: (rows, lin->N) */
    int act_fn;
} tq2k_gemm_job;

/* Token-embedding table storage (encoder/ternary_format.py documents the codecs). */
enum tq2k_emb_kind { TQ2K_EMB_F32 = 0, TQ2K_EMB_I8 = 1, TQ2K_EMB_I4 = 2, TQ2K_EMB_I4G = 3 };

typedef struct {
    tq2k_linear qkv, out, up, down;  /* qkv: query, key and value rows stacked, (3H, H) */
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
} tq2k_layer;

typedef struct {
    int layers, hidden, heads, inter, vocab, max_pos, act_fn, pooling;
    float eps;
    int emb_kind, emb_group;   /* emb_group: columns per float16 scale (TQ2K_EMB_I4G) */
    const void *emb_codes;     /* float32 / int8 / two 4-bit codes per byte (low nibble = even column, +8) */
    const void *emb_scale;     /* float32 per row (I8, I4) or float16 (vocab, ceil(hidden / emb_group)) (I4G) */
    const float *pos, *type0, *emb_ln_w, *emb_ln_b;
    tq2k_layer *layer;
} tq2k_model;

/* The operations of one path. Row ranges are [r0, r1). */
typedef struct {
    /* Quantize rows of float x (row stride ldx, K valid columns) into a. */
    void (*quantize)(const float *x, int ldx, int K, tq2k_act *a, int r0, int r1);
    /* Linear outputs (scale and bias applied) of rows [m0, m0 + R), R <= TQ2K_ROW_BLOCK, outputs
     * [n0, n0 + TQ2K_CHUNK) (n0 a multiple of TQ2K_CHUNK) into out[R][TQ2K_CHUNK]; columns >= N are left
     * undefined. */
    void (*block)(const tq2k_linear *L, const tq2k_act *A, int m0, int R, int n0, float *out);
    /* The job's epilogue on such a block (columns >= N are ignored). */
    void (*epilogue)(const tq2k_gemm_job *g, int m0, int R, int n0, float *out);
    /* x[t] = LayerNorm(token + position + token-type embedding), quantized into a (if not NULL). */
    void (*embed)(const tq2k_model *m, const int32_t *ids, const int32_t *pos, float *x, tq2k_act *a, int r0,
                  int r1);
    /* In place x[t] = LayerNorm(x[t]) over `hidden` columns, quantized into a (if not NULL). */
    void (*layernorm)(float *x, int hidden, const float *w, const float *b, float eps, tq2k_act *a, int r0, int r1);
    /* Self-attention of one sequence (rows [t0, t0 + L) of qkv, row stride 3 * hidden: query | key | value) for
     * heads [h0, h1): the context overwrites the query columns of those heads, then is quantized into a (if not
     * NULL; the heads' columns must cover whole activation groups, or end at `hidden`). */
    void (*attention)(float *qkv, int hidden, int heads, int t0, int L, int h0, int h1, tq2k_act *a);
    /* out = L2-normalized mean (or first row) of rows [t0, t0 + L) of x. */
    void (*pool)(const float *x, int hidden, int t0, int L, int pooling, float *out);
} tq2k_ops;

extern const tq2k_ops tq2k_ops_ref, tq2k_ops_avx2, tq2k_ops_avx512vnni;

/* The reference operations (also reused by other paths), then the AVX2 ones. */
void tq2k_quantize_group_ref(const float *v, int n, int width, int8_t *q, float *sx, int32_t *qsum);
void tq2k_epilogue_ref(const tq2k_gemm_job *g, int m0, int R, int n0, float *out);
void tq2k_embed_ref(const tq2k_model *m, const int32_t *ids, const int32_t *pos, float *x, tq2k_act *a, int r0,
                    int r1);
void tq2k_layernorm_ref(float *x, int hidden, const float *w, const float *b, float eps, tq2k_act *a, int r0,
                        int r1);
void tq2k_attention_ref(float *qkv, int hidden, int heads, int t0, int L, int h0, int h1, tq2k_act *a);
void tq2k_pool_ref(const float *x, int hidden, int t0, int L, int pooling, float *out);
float tq2k_f16_to_f32(uint16_t h);
void tq2k_epilogue_avx2(const tq2k_gemm_job *g, int m0, int R, int n0, float *out);
void tq2k_quantize_avx2(const float *x, int ldx, int K, tq2k_act *a, int r0, int r1);
void tq2k_embed_avx2(const tq2k_model *m, const int32_t *ids, const int32_t *pos, float *x, tq2k_act *a, int r0,
                     int r1);
void tq2k_layernorm_avx2(float *x, int hidden, const float *w, const float *b, float eps, tq2k_act *a, int r0,
                         int r1);
void tq2k_attention_avx2(float *qkv, int hidden, int heads, int t0, int L, int h0, int h1, tq2k_act *a);
void tq2k_pool_avx2(const float *x, int hidden, int t0, int L, int pooling, float *out);

/* Run fn(ctx, i) for i in [0, nitems) on the calling thread plus up to threads-1 helpers (tq2k_pool.c);
 * returns when all are done. Items must be independent. */
typedef void (*tq2k_item_fn)(const void *ctx, int item);
void tq2k_parallel(int nitems, int threads, tq2k_item_fn fn, const void *ctx);

/* The GEMM of `g` with its epilogue, split into row blocks x TQ2K_CHUNK outputs (tq2k_gemm.c). */
void tq2k_gemm_run(const tq2k_ops *ops, const tq2k_gemm_job *g, int threads);
/* Quantize rows [0, rows) of x on the pool. */
void tq2k_quantize_run(const tq2k_ops *ops, const float *x, int K, tq2k_act *a, int rows, int threads);

/* Float-activation GEMM (forced-only path): y (rows, N) = x (rows, K) @ W^T * scale + bias. */
void tq2k_gemm_avx512f32(const float *x, int rows, const tq2k_linear *L, float *y, int threads);

/* The whole forward: ids (tokens of nseq sequences, sequence s = [offsets[s], offsets[s+1])) -> out (nseq,
 * hidden), L2-normalized. Sequences run in chunks of at most max_tokens tokens (a longer sequence alone).
 * Returns 0, or -1 when memory runs out. */
int tq2k_encode(const tq2k_model *m, const tq2k_ops *ops, const int32_t *ids, const int32_t *offsets, int nseq,
                float *out, int threads, int max_tokens);

/* Measured int8 multiply-add peak of one thread's vpmaddubsw loop (tq2k_peak.c): MACs per second over
 * `iterations` loop trips on `threads` threads; 0 without AVX2. */
double tq2k_peak_avx2(long iterations, int threads);

#endif
