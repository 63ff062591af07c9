// kernels.h: the machine's part of mixtral.c, behind a contract.
//
// mixtral.c holds the model's math in plain C and calls these kernels by name;
// kernels.c holds every instruction-set-specific line (AVX2, AVX-512, NEON).
//
// WHAT EACH KERNEL COMPUTES (x, w: vectors of n or K values; K is always the
// inner dimension, as in BLAS)
//   dot_f32(a, b, n)            = sum_i a[i] b[i]
//   dot_bf16(w, x, n)           = sum_i bf16(w[i]) x[i]
//   dot_q8(w, ws, x, K)         = sum_b ws[b] xs[b] sum_{i in block b} w[i] xq[i]
//   dot_q4(w, ws, x, K)         = sum_b ws[b] xs[b] sum_{i in block b} (u[i] - 8) xq[i]
//   gemm_quant(type, W, N, x, M, K, out, ldo):
//                                 out[m ldo + n] = dot_q8/q4(row n of W, token m of x), a small GEMM
//                                 out (M,N) = x (M,K) @ W (N,K)^T
//   quantize_blocks(qx, x, b0, b1): blocks b0..b1-1 of x to int8:
//                                 xq = round(x * 127 / max|x|) (nearest, ties to even, as lrintf),
//                                 xs = max|x| / 127, xsum = xs * sum(xq), per block
//   swiglu(h, h2, n)            : h[i] = silu(h[i]) * h2[i], silu(g) = g / (1 + e^-g)
//   dequant_row(type, row, K, out): one stored row back to f32 (the embedding lookup)
//
// THE LAYOUT THEY READ (a matrix W (N,K) is N rows of weight_row_bytes(type, K))
//   f32, bf16: K values. bf16 is the top half of an f32.
//   q8: K int8 weights q, then K/QBLOCK f32 scales: w = q * scale[block]
//   q4: K/2 bytes, then K/QBLOCK f32 scales. Block b of QBLOCK = 64 weights is
//       32 bytes; byte i holds weight i in its low nibble and weight i+32 in its
//       high one, each as u = q + 8 in 0..15: w = (u - 8) * scale[block]
//   Rows follow each other; a row's scales sit right after its weights.
//   Activations for q8/q4 weights: QuantX, blocks of QBLOCK int8 values with an
//   f32 scale (and scaled sum) per block; the M tokens of a batch one after another.
//
// THE PROMISES
//   - Integer sums are exact: within a block, the int8 products are summed in
//     integers (no rounding); only the per-block scaling is float.
//   - Every kernel is deterministic and works on its own rows/tokens only, so
//     results never depend on the thread count or on which thread ran them.
//   - ref_* are the portable C kernels: compiled in every build, the reference
//     the SIMD kernels are tested against directly (tests/kernels_test.c, on
//     random data with odd sizes), and what a build without SIMD runs.
//   - quantize_blocks equals ref_quantize_blocks bit for bit on every build.
//   - AVX2 and AVX-512 (BW, VNNI) builds give identical results bit for bit:
//     the AVX-512 code forms the same integer sums and adds them in the same
//     order. On the portable and NEON builds the float sums are added in other
//     orders: equal to rounding (about 1e-6 relative), not bit for bit.
//   - With scales that are powers of two and sums below 2^24 every kernel's
//     float arithmetic is exact, so there all builds agree bit for bit (tested).
//   - gemm_quant with M == 1 may round differently from dot_q8/dot_q4 (fewer
//     accumulators); mixtral.c uses the dot kernels for one token.
#ifndef KERNELS_H
#define KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define QBLOCK 64 // q8/q4: weights (and activations) per scale, the quantization block

// The weight types of the model file (export.py writes the same numbers).
enum { WEIGHT_F32 = 0, WEIGHT_BF16 = 1, WEIGHT_Q8 = 2, WEIGHT_Q4 = 3, WEIGHT_NTYPES };

// Bytes of one stored row of K weights: the weights, and for q8/q4 the row's scales after them.
static inline uint64_t weight_row_bytes(int type, uint64_t K) {
    switch (type) {
    case WEIGHT_F32: return K * 4;
    case WEIGHT_BF16: return K * 2;
    case WEIGHT_Q8: return K + K / QBLOCK * 4;
    default: return K / 2 + K / QBLOCK * 4;
    }
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

// Activations quantized to int8 in blocks of QBLOCK: x ~ q * scale[b].
typedef struct {
    int8_t *q;      // (M, K)
    float *scale;   // (M, K/QBLOCK)
    float *sum;     // (M, K/QBLOCK) scale * sum of the block's q (the q4 kernels' offset correction)
} QuantX;

// Token m of a quantized batch of M tokens of K values each.
static inline QuantX quantx_token(const QuantX *x, int m, int K) {
    size_t nb = (size_t)K / QBLOCK;
    return (QuantX){x->q + (size_t)m * K, x->scale + m * nb, x->sum + m * nb};
}

// The SIMD path this build compiled in ("avx2 + avx512-vnni", "neon", "portable C").
extern const char kernels_simd_name[];

// The kernels mixtral.c calls: the fastest this build has.
float dot_f32(const float *a, const float *b, int n);
float dot_bf16(const uint16_t *w, const float *x, int n);
float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K);
float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K);
void gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K, float *out,
                size_t ldo);
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1);
void swiglu(float *h, const float *h2, int64_t n);
void dequant_row(int type, const void *row, int K, float *out);

// The portable references, the same contracts.
float ref_dot_f32(const float *a, const float *b, int n);
float ref_dot_bf16(const uint16_t *w, const float *x, int n);
float ref_dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K);
float ref_dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K);
void ref_gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K, float *out,
                    size_t ldo);
void ref_quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1);
void ref_swiglu(float *h, const float *h2, int64_t n);

#endif
