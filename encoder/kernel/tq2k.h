/* tq2k: y = (x @ unpack(W)^T) * scale[n] + bias[n] on the packed 2-bit ternary layout of
 * encoder/packing.py (16x16 tiles of 64 bytes, 2-bit value = code + 1, see its docstring).
 *
 * Every path computes the same thing in the same two steps:
 *   1. activations -> int8 per row: sx = absmax(x_row) / 127, q = round_half_even(x * (127 / absmax)),
 *      zero padded to K_pad; qsum = sum(q) (needed because the weights are stored as code + 1);
 *   2. acc[m][n] = sum_k (code[n][k] + 1) * q[m][k]  (exact int32), then
 *      y[m][n] = (float)(acc - qsum[m]) * (sx[m] * scale[n]) + bias[n].
 * Step 1 is bit-identical across paths, and step 2's integer part is exact, so paths differ only by
 * the float rounding of the last line (FMA or not). */
#ifndef TQ2K_H
#define TQ2K_H

#include <stddef.h>
#include <stdint.h>

/* TQ2K_AVX512F32 keeps activations in float (no step 1; y = (sum_k (code+1) x - sum x) * scale + bias): it is
 * only run when forced, as the measured "float activations" alternative. */
enum tq2k_path { TQ2K_REF = 0, TQ2K_AVX2 = 1, TQ2K_AVX512VNNI = 2, TQ2K_AVX512F32 = 3, TQ2K_NPATHS = 4 };

typedef struct {
    const float *x;      /* (rows, K) row-major */
    int rows, K, N, kpad;
    const uint8_t *w;    /* packed, N_pad * K_pad / 4 bytes */
    const float *scale;  /* (N,) */
    const float *bias;   /* (N,) or NULL */
    float *y;            /* (rows, N) row-major */
    int8_t *q;           /* scratch (rows, kpad) */
    float *sx;           /* scratch (rows,) */
    int32_t *qsum;       /* scratch (rows,) */
    int threads;
} tq2k_args;

/* Quantize rows [r0, r1) of a->x into a->q / a->sx / a->qsum. */
void tq2k_quantize_ref(const tq2k_args *a, int r0, int r1);
void tq2k_quantize_avx2(const tq2k_args *a, int r0, int r1);
void tq2k_quantize_avx512(const tq2k_args *a, int r0, int r1);

/* Whole GEMM (quantize + matmul + epilogue) using up to a->threads OpenMP threads. */
void tq2k_gemm_ref(const tq2k_args *a);
void tq2k_gemm_avx2(const tq2k_args *a);
void tq2k_gemm_avx512vnni(const tq2k_args *a);
void tq2k_gemm_avx512f32(const tq2k_args *a);

#endif
