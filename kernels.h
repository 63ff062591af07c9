// kernels.h: the machine's part of mixtral.c, behind a contract.
//
// mixtral.c holds the model's math in plain C and calls these kernels by name;
// kernels.c holds every instruction-set-specific line (AVX2, AVX-512, NEON).
//
// WHAT EACH KERNEL COMPUTES (K is always the inner dimension, as in BLAS)
//   dot_f32(a, b, n)        = sum_i a[i] b[i]
//   dot_bf16(w, x, n)       = sum_i bf16(w[i]) x[i]
//   gemm_bf16(W, K, N, x, M, out, ldo): out (M,N) = x (M,K) @ W (N,K)^T for bf16 W and f32 x,
//       each output as dot_bf16 computes it, or (AVX-512) in a tile of 4 rows x 4 tokens
//   gemm_bf16x(W, K, N, xb, M, out, ldo): the same with bf16 activations too (--bf16-activations):
//       out[m ldo + n] = sum_k bf16(W[n][k]) bf16(xb[m][k]), the exact products summed in f32 in
//       an order of the kernel's (AVX512-BF16: vdpbf16ps, 32 at a time)
//   to_bf16(x, xb, n)       : xb[i] = x[i] rounded to the nearest bf16, ties to even (NaN stays NaN)
//   gemm_quant(type, W, K, N, x, M, out, ldo): a small GEMM, out (M,N) = x (M,K) @ W (N,K)^T:
//       out[m ldo + n] = sum_b dw[n][b] dx[m][b] sum_{j in block b} qw[n][j] qx[m][j]
//       for q8, q6 or q4 weights W and int8 activations x, blocks of QBLOCK = 32
//       (q6 has only the portable kernel: export.py gives it to the embedding, which
//       is looked up a row at a time, never multiplied); for q3 and q2 weights,
//       out[m ldo + n] = sum_b d[n] dx[m][b] sum_{j in block b} level[n][j] qx[m][j]
//   quantize_blocks(qx, x, b0, b1): blocks b0..b1-1 of x (f32) to int8:
//       qx = round(x * 127 / max|x|) (to nearest, ties to even, as lrintf),
//       dx = max|x| / 127, qoff = -8 and -128 times the sum of the block's qx
//   swiglu(h, h2, n)        : h[i] = silu(h[i]) * h2[i], silu(g) = g / (1 + e^-g)
//   dequant_row(type, W, K, n, out): row n of W as f32 (the embedding lookup)
//   the KV cache's rows (a key or a value of one head, n = head_dim values) in a KV_* type:
//   kv_store(type, x, row, n): x (n,) f32 into the row (the same function on every build)
//   kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld): attention scores of the g queries
//       q (g, hd) of one kv head against the n rows at rows + t stride (t = 0..n-1):
//       att[r ld + t] = scale sum_i q[r hd + i] kv(row t)[i]; against q8 rows, each query is
//       rounded to int8 first (kv_query_q8: qi, dq) and a score is an exact integer sum scaled
//       once, (float)(sum_i qi[i] k[i]) * (dk * (dq * scale)), k and dk the row's int8 values and
//       f16 scale: the same bits from every kernel
//   kv_mix(type, att, ld, g, rows, stride, n, hd, out): the values weighted by the attention,
//       out[r hd + i] += sum_t att[r ld + t] kv(row t)[i], the rows added in order
//   (the same numbers for a row whichever way a run of rows is split between calls: a prompt in
//   chunks attends as token by token)
//   kv_rotate(x, n): x = H x, H the normalised Walsh-Hadamard matrix of the largest power of two
//       dividing n, on each such block: orthonormal and its own inverse, so q.k = (Hq).(Hk)
//
// THE LAYOUT THEY READ
//   f32, bf16: row-major, K values a row. bf16 is the top half of an f32.
//   q8, q6, q4 (W (N,K), K a multiple of 32): rows in groups of QROWS = 16,
//   interleaved so that one 64-byte load holds 4 consecutive weights of each of
//   the 16 rows (the int32 lanes of a 512-bit register are the rows: no
//   horizontal sums, one load of an activation serves 16 rows). N is padded to
//   a multiple of 16 with zero rows. A group is
//       scales:  K/32 blocks x 16 rows, f16 (IEEE half): dw[row][block]
//       weights: K/32 blocks, each
//         q8: 8 steps s of 64 bytes; step s, bytes 4l..4l+3: row l's weights
//             32b+4s .. 32b+4s+3, stored as u = q + 128 (q in -127..127)
//         q4: 4 chunks c of 64 bytes; chunk c, byte 4l+i: row l's weight
//             32b+8c+i in the low nibble, 32b+8c+4+i in the high one, stored as
//             u = q + 8 (q in -8..7)
//         q6: the 4 chunks of q4 holding the low 4 bits of u = q + 32 (q in
//             -32..31), then 2 chunks h of 64 bytes; chunk h, byte 4l+i: the top
//             2 bits of row l's weights 32b+16h+4k+i, k = 0..3, at bits 2k, 2k+1
//   so a group is 17K (q8), 13K (q6) or 9K bytes (q4): 8.5, 6.5 and 4.5 bits a weight.
//   q2, q3 (the same groups of 16 interleaved rows): each weight a code into a
//   small codebook of int8 levels, one codebook per row and sub-block chosen
//   from 16 (q2_levels, q3_levels: the Lloyd-Max levels of a normal
//   distribution at 16 scales, each 0.9 times the next), and one scale per row:
//       w[row][k] = d[row] * levels[book(row, sub-block of k)][code(row, k)]
//   q2: 2-bit codes, sub-blocks of 16 weights; q3: 3-bit codes, sub-blocks of 32.
//   A group is
//       scales:  16 rows, f16: d[row]
//       then K/32 blocks, each
//         q2: 16 bytes, byte l: row l's books, weights 0..15 in the low nibble, 16..31 in the high;
//             2 chunks c of 64 bytes; chunk c, byte 4l+i: row l's codes of weights 16c+4j+i,
//             j = 0..3, at bits 2j, 2j+1
//         q3: 8 bytes, byte l/2: row l's book, in the low nibble for even l, the high for odd;
//             the codes' low 2 bits in 2 chunks as q2's; then 1 chunk of 64 bytes whose byte
//             4l+i holds the top bit of row l's code of weight 4s+i at bit s (s = 0..7)
//   so a group is 32 + 4.5K (q2) or 32 + 6.25K bytes (q3): 2.25 and 3.125 bits a weight,
//   and 16/K more for the row scales. Their activations are QuantX's, as q8's.
//   Activations for q8/q6/q4: QuantX, the M tokens one after another. (For 5
//   tokens or more, the AVX-512 gemm_quant first regroups them by 8 into a
//   buffer of the calling thread's, kept for its next calls and freed when the
//   thread ends: kernels.c, tile_activations.)
//
// THE PROMISES
//   - Integer sums are exact: within a block the products are summed in
//     integers; only the per-block scaling is float.
//   - Each output (row, token) is accumulated on its own, block by block in
//     order, acc = fma(float(isum), dw * dx, acc): so a result depends neither
//     on M, nor on which rows or tokens share a call, nor on the thread count.
//     A prompt in chunks gives the same logits as token by token.
//   - The AVX2, AVX-512 and NEON kernels give identical results, bit for bit.
//     ref_* are the portable C kernels: compiled in every build, the reference
//     every SIMD kernel is tested against directly (tests/kernels_test.c, random
//     data with odd sizes), and what a build without SIMD runs. They multiply
//     and add without fusing, so they agree with the SIMD kernels to rounding;
//     where every product and sum is exact in float they agree bit for bit.
//   - quantize_blocks equals ref_quantize_blocks bit for bit on every build.
#ifndef KERNELS_H
#define KERNELS_H

#include <stddef.h>
#include <stdint.h>

#define QBLOCK 32 // q8/q6/q4: weights (and activations) per scale, the quantization block
#define QROWS 16  // q8/q6/q4/q3/q2: rows interleaved in a group

// The weight types of the model file (export.py writes the same numbers).
enum { WEIGHT_F32 = 0, WEIGHT_BF16 = 1, WEIGHT_Q8 = 2, WEIGHT_Q4 = 3, WEIGHT_Q6 = 4, WEIGHT_Q3 = 5, WEIGHT_Q2 = 6,
       WEIGHT_NTYPES };

// The types whose products take int8 activations (QuantX): all but f32 and bf16.
static inline int weight_is_quant(int type) { return type >= WEIGHT_Q8 && type < WEIGHT_NTYPES; }

// q3 and q2: codes into codebooks, with a scale per row (the others: a scale per block).
static inline int weight_is_coded(int type) { return type == WEIGHT_Q3 || type == WEIGHT_Q2; }

// Bytes of one group of QROWS rows of K weights (q8/q6/q4/q3/q2).
static inline uint64_t quant_group_bytes(int type, uint64_t K) {
    switch (type) {
    case WEIGHT_Q8: return 17 * K;
    case WEIGHT_Q6: return 13 * K;
    case WEIGHT_Q4: return 9 * K;
    case WEIGHT_Q3: return 32 + K / QBLOCK * 200;
    default: return 32 + K / QBLOCK * 144; // q2
    }
}

// Bytes of one block of 32 weights of a group of q3 or q2 (the books and codes).
static inline uint64_t coded_block_bytes(int type) { return type == WEIGHT_Q3 ? 200 : 144; }

// The KV cache's types (--kv). A row is head_dim values:
//   f32, bf16: as the weights;
//   q8: an f16 scale d, then head_dim int8 q: v = d q, d = max|x| / 127 (rounded to f16)
//   q4: per 32 values an f16 scale d and 16 bytes, value 2i in the low nibble of byte i and 2i+1
//       in the high, as u = q + 8: v = d q, q in -8..7, d = -(the value of largest magnitude) / 8
//   (q8 and q4 rows hold H x: kv_rotate's rotation, which spreads outliers over the row)
enum { KV_F32, KV_BF16, KV_Q8, KV_Q4, KV_NTYPES };
enum { KV_HD_MAX = 1 << 14 }; // the largest head_dim a model file may give

static inline size_t kv_row_bytes(int type, int n) {
    switch (type) {
    case KV_F32: return (size_t)4 * n;
    case KV_BF16: return (size_t)2 * n;
    case KV_Q8: return (size_t)n + 2;
    default: return (size_t)n / 32 * 18; // q4
    }
}

// The codebooks of q2 and q3: levels[book][code], int8.
extern const int8_t q2_levels[16][4];
extern const int8_t q3_levels[16][8];

// Bytes of a whole matrix (N, K) of a weight type.
static inline uint64_t weight_matrix_bytes(int type, uint64_t N, uint64_t K) {
    switch (type) {
    case WEIGHT_F32: return N * K * 4;
    case WEIGHT_BF16: return N * K * 2;
    default: return (N + QROWS - 1) / QROWS * quant_group_bytes(type, K);
    }
}

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

// Float to bf16, rounded to nearest, ties to even; NaN stays a (quiet) NaN.
static inline uint16_t f32_to_bf16(float f) {
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(v.u >> 16 | 0x40);
    return (uint16_t)((v.u + 0x7FFFu + (v.u >> 16 & 1)) >> 16);
}

// IEEE half to float, exactly (normals, subnormals, zeros, infinities, NaN).
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = h >> 10 & 31, man = h & 1023;
    union { uint32_t u; float f; } v;
    if (exp == 31) v.u = sign | 0x7F800000u | man << 13;
    else if (exp) v.u = sign | (exp + 112) << 23 | man << 13;
    else { v.f = (float)man * (1.0f / 16777216.0f); v.u |= sign; } // man * 2^-24
    return v.f;
}

// Activations quantized to int8 in blocks of QBLOCK: x ~ q * scale[b].
typedef struct {
    int8_t *q;       // (M, K)
    float *scale;    // (M, K/QBLOCK) dx
    int32_t *qoff;   // (M, K/QBLOCK, 2) -8 and -128 times the sum of the block's q: what the
                     // kernels add to sum(u q) for weights stored unsigned (q4: u = w + 8, q8:
                     // u = w + 128) to get sum(w q), read straight from memory
} QuantX;

// Token m of a quantized batch of M tokens of K values each.
static inline QuantX quantx_token(const QuantX *x, int m, int K) {
    size_t nb = (size_t)K / QBLOCK;
    return (QuantX){x->q + (size_t)m * K, x->scale + m * nb, x->qoff + 2 * m * nb};
}

// Bytes of the buffer of its own that a thread's gemm_quant may keep for M tokens
// of K activations (AVX-512: the activations regrouped by 8 tokens, with their
// offsets and scales), for a caller that budgets memory.
static inline uint64_t quant_scratch_bytes(uint64_t M, uint64_t K) {
    return (M + 7) / 8 * (8 * K + 64 * (K / QBLOCK));
}

// The SIMD path this build compiled in ("avx512-vnni", "avx2", "neon", "portable C").
extern const char kernels_simd_name[];

// The kernels mixtral.c calls: the fastest this build has. gemm_quant reads
// the groups that hold rows 0..N-1 starting at w (a group boundary) and writes
// those N rows of out.
float dot_f32(const float *a, const float *b, int n);
float dot_bf16(const uint16_t *w, const float *x, int n);
void gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo);
void gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo);
void gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo);
void to_bf16(const float *x, uint16_t *out, int64_t n);
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1);
void swiglu(float *h, const float *h2, int64_t n);
void dequant_row(int type, const void *w, int K, int n, float *out);
void kv_store(int type, const float *x, void *row, int n);
void kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale, float *att,
               size_t ld);
void kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out);
void kv_rotate(float *x, int n);

// The portable references, the same contracts.
float ref_dot_f32(const float *a, const float *b, int n);
float ref_dot_bf16(const uint16_t *w, const float *x, int n);
void ref_gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo);
void ref_gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo);
void ref_gemm_bf16_with(float (*dot)(const uint16_t *, const float *, int), const uint16_t *w, int K, int N,
                        const float *x, int M, float *out, size_t ldo);
float ref_dot_bf16x(const uint16_t *w, const uint16_t *x, int n);
void ref_gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo);
void ref_quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1);
void ref_swiglu(float *h, const float *h2, int64_t n);
float ref_kv_dot(int type, const float *q, const void *row, int n);
float kv_query_q8(const float *q, int hd, int8_t *qi);
void ref_kv_axpy(int type, float a, const void *row, float *out, int n);
void ref_kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale,
                   float *att, size_t ld);
void ref_kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out);

#endif
