/* tq2k: y = (x @ unpack(W)^T) * scale[n] + bias[n] on the packed 2-bit ternary layout of
 * encoder/packing.py (16x16 tiles of 64 bytes, 2-bit value = code + 1, see its docstring).
 *
 * Every int8 path computes the same thing in the same two steps:
 *   1. activations -> int8 per row and group of TQ2K_GROUP inputs: sx[m][g] = absmax / 127,
 *      q = round_half_even(x * (127 / absmax)), zero padded to K_pad;
 *      corr[m] = sum_g sx[m][g] * sum(q over g)  (the weights are stored as code + 1, see step 2);
 *   2. acc[m][g][n] = sum_{k in g} (code[n][k] + 1) * q[m][k]  (exact int32), then
 *      y[m][n] = (sum_g sx[m][g] * acc[m][g][n] - corr[m]) * scale[n] + bias[n].
 * Why groups and not one scale per row: LayerNorm outputs have a few outlier channels (MiniLM: 62, 249,
 * 223) that set a row's absmax and crush the resolution of all other inputs; with groups of 64 only
 * their own group is coarse (measured on a randomly ternarized all-MiniLM-L6-v2: minimum embedding
 * cosine to the same model in float 0.9977 with per-row scales, 0.9995 with groups of 64).
 * Step 1 and the integer part of step 2 are bit-identical across paths, so paths differ only by the
 * float rounding of the last line (FMA or not). */
#ifndef TQ2K_H
#define TQ2K_H

#include <stddef.h>
#include <stdint.h>

/* TQ2K_AVX512F32 keeps activations in float (no step 1; y = (sum_k (code+1) x - sum x) * scale + bias): it is
 * only run when forced, as the measured "float activations" alternative. */
enum tq2k_path { TQ2K_REF = 0, TQ2K_AVX2 = 1, TQ2K_AVX512VNNI = 2, TQ2K_AVX512F32 = 3, TQ2K_NPATHS = 4 };

#define TQ2K_GROUP 64 /* inputs per activation scale: 4 tiles of 16 */

typedef struct {
    const float *x;      /* (rows, K) row-major */
    int rows, K, N, kpad;
    const uint8_t *w;    /* packed, N_pad * K_pad / 4 bytes */
    const float *scale;  /* (N,) */
    const float *bias;   /* (N,) or NULL */
    float *y;            /* (rows, N) row-major */
    int8_t *q;           /* scratch (rows, kpad) */
    int groups;          /* ceil(kpad / TQ2K_GROUP) */
    float *sx;           /* scratch (rows, groups) */
    float *corr;         /* scratch (rows,) */
    int threads;
} tq2k_args;

/* Run fn(ctx, i) for i in [0, nitems) on the calling thread plus up to threads-1 helpers (tq2k_pool.c);
 * returns when all are done. Items must be independent. */
typedef void (*tq2k_item_fn)(const void *ctx, int item);
void tq2k_parallel(int nitems, int threads, tq2k_item_fn fn, const void *ctx);

#define TQ2K_QUANT_ROWS 16 /* rows per quantization work item */

/* Quantize rows [r0, r1) of a->x into a->q / a->sx / a->corr. */
void tq2k_quantize_ref(const tq2k_args *a, int r0, int r1);
void tq2k_quantize_avx2(const tq2k_args *a, int r0, int r1);
void tq2k_quantize_avx512(const tq2k_args *a, int r0, int r1);

/* Whole GEMM (quantize + matmul + epilogue) using up to a->threads threads. */
void tq2k_gemm_ref(const tq2k_args *a);
void tq2k_gemm_avx2(const tq2k_args *a);
void tq2k_gemm_avx512vnni(const tq2k_args *a);
void tq2k_gemm_avx512f32(const tq2k_args *a);

#endif
