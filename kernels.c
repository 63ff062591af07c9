// kernels.c: every instruction-set-specific line of mixtral.c, and the
// portable C kernels they are tested against. kernels.h is the contract: what
// each kernel computes, the layout it reads, and what stays bit-identical.
//
//   1. the portable reference kernels (every build)
//   2. x86-64: AVX2 + FMA + F16C, and AVX-512 with VNNI where built for it
//   3. ARM: NEON (with the dot-product instructions where present)
//   4. the kernels mixtral.c calls: this build's best
//
// The instruction set is chosen at build time by the compiler's target macros
// (-march=native by default; make ARCH= builds the portable kernels alone).

#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KERNELS_AVX2
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define KERNELS_AVX512
#include <pthread.h> // (a per-thread buffer, freed when its thread ends)
#if defined(__AVX512VBMI__)
#define KERNELS_AVX512_VBMI // vpermb, vpermi2b: the q3 and q2 kernels (else their portable reference)
#endif
#if defined(__AVX512BF16__)
#define KERNELS_AVX512_BF16 // vdpbf16ps: bf16 products with bf16 activations (else their reference)
#endif
#endif
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define KERNELS_NEON
#endif

// ----------------------------------------------------------------------------
// 1. the portable reference kernels

// silu(g) * u: one element of swiglu.
static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// Four partial sums break the dependency chain.
float ref_dot_f32(const float *a, const float *b, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i]; s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2]; s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

float ref_dot_bf16(const uint16_t *w, const float *x, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += bf16_to_f32(w[i]) * x[i]; s1 += bf16_to_f32(w[i + 1]) * x[i + 1];
        s2 += bf16_to_f32(w[i + 2]) * x[i + 2]; s3 += bf16_to_f32(w[i + 3]) * x[i + 3];
    }
    for (; i < n; i++) s0 += bf16_to_f32(w[i]) * x[i];
    return (s0 + s1) + (s2 + s3);
}

// out[m ldo + n] = dot(row n, token m), one dot product at a time.
void ref_gemm_bf16_with(float (*dot)(const uint16_t *, const float *, int), const uint16_t *w, int K, int N,
                        const float *x, int M, float *out, size_t ldo) {
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++) out[(size_t)m * ldo + n] = dot(w + (size_t)n * K, x + (size_t)m * K, K);
}

void ref_gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16_with(ref_dot_bf16, w, K, N, x, M, out, ldo);
}

// bf16 weights times bf16 activations, summed in f32: the products are exact
// (8-bit by 8-bit significands), the sums in pairs as vdpbf16ps takes them.
float ref_dot_bf16x(const uint16_t *w, const uint16_t *x, int n) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += bf16_to_f32(w[i]) * bf16_to_f32(x[i]); s1 += bf16_to_f32(w[i + 1]) * bf16_to_f32(x[i + 1]);
        s2 += bf16_to_f32(w[i + 2]) * bf16_to_f32(x[i + 2]); s3 += bf16_to_f32(w[i + 3]) * bf16_to_f32(x[i + 3]);
    }
    for (; i < n; i++) s0 += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    return (s0 + s1) + (s2 + s3);
}

void ref_gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo) {
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++) out[(size_t)m * ldo + n] = ref_dot_bf16x(w + (size_t)n * K, x + (size_t)m * K, K);
}

void to_bf16(const float *x, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_bf16(x[i]);
}

const int8_t q2_levels[16][4] = {
    {-26, -8, 8, 26},     {-29, -9, 9, 29},     {-32, -10, 10, 32},   {-36, -11, 11, 36},
    {-40, -12, 12, 40},   {-44, -13, 13, 44},   {-49, -15, 15, 49},   {-55, -16, 16, 55},
    {-61, -18, 18, 61},   {-67, -20, 20, 67},   {-75, -22, 22, 75},   {-83, -25, 25, 83},
    {-93, -28, 28, 93},   {-103, -31, 31, 103}, {-114, -34, 34, 114}, {-127, -38, 38, 127},
};
const int8_t q3_levels[16][8] = {
    {-26, -16, -9, -3, 3, 9, 16, 26},         {-29, -18, -10, -3, 3, 10, 18, 29},
    {-32, -20, -11, -4, 4, 11, 20, 32},       {-36, -22, -13, -4, 4, 13, 22, 36},
    {-40, -25, -14, -5, 5, 14, 25, 40},       {-44, -28, -16, -5, 5, 16, 28, 44},
    {-49, -31, -17, -6, 6, 17, 31, 49},       {-55, -34, -19, -6, 6, 19, 34, 55},
    {-61, -38, -21, -7, 7, 21, 38, 61},       {-67, -42, -24, -8, 8, 24, 42, 67},
    {-75, -47, -26, -9, 9, 26, 47, 75},       {-83, -52, -29, -9, 9, 29, 52, 83},
    {-93, -58, -33, -11, 11, 33, 58, 93},     {-103, -64, -36, -12, 12, 36, 64, 103},
    {-114, -71, -40, -13, 13, 40, 71, 114},   {-127, -79, -45, -14, 14, 45, 79, 127},
};

// Weight j (0..31) of row l (0..15) in block blk of a q3 or q2 group: its level.
static inline int coded_weight(int type, const uint8_t *blk, int l, int j) {
    int lo = blk[(type == WEIGHT_Q3 ? 8 : 16) + j / 16 * 64 + l * 4 + j % 4] >> (2 * (j % 16 / 4)) & 3;
    if (type == WEIGHT_Q2) return q2_levels[blk[l] >> (4 * (j / 16)) & 15][lo];
    int hi = blk[8 + 128 + l * 4 + j % 4] >> (j / 4) & 1;
    return q3_levels[blk[l / 2] >> (4 * (l % 2)) & 15][lo | hi << 2];
}

// Weight j (0..31) of block b of row l (0..15) of a group whose weights start at wq.
static inline int quant_weight(int type, const uint8_t *wq, int b, int l, int j) {
    if (type == WEIGHT_Q8) return wq[(size_t)b * 512 + j / 4 * 64 + l * 4 + j % 4] - 128;
    if (type == WEIGHT_Q6) {
        const uint8_t *blk = wq + (size_t)b * 384;
        uint8_t lo = blk[j / 8 * 64 + l * 4 + j % 4], hi = blk[256 + j / 16 * 64 + l * 4 + j % 4];
        return ((j % 8 < 4 ? lo & 15 : lo >> 4) | (hi >> (2 * (j % 16 / 4)) & 3) << 4) - 32;
    }
    uint8_t v = wq[(size_t)b * 256 + j / 8 * 64 + l * 4 + j % 4];
    return (j % 8 < 4 ? v & 15 : v >> 4) - 8;
}

// The q3 and q2 products: per block, the integer sum of levels times activations.
static void ref_gemm_coded(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    int nb = K / QBLOCK;
    for (int g = 0; g * QROWS < N; g++) {
        const uint8_t *grp = w + (size_t)g * quant_group_bytes(type, K);
        const uint16_t *d = (const uint16_t *)grp; // (16,)
        for (int l = 0; l < QROWS && g * QROWS + l < N; l++)
            for (int m = 0; m < M; m++) {
                QuantX xm = quantx_token(x, m, K);
                float acc = 0.0f, dl = f16_to_f32(d[l]);
                for (int b = 0; b < nb; b++) {
                    const uint8_t *blk = grp + 32 + (size_t)b * coded_block_bytes(type);
                    int32_t isum = 0;
                    for (int j = 0; j < QBLOCK; j++) isum += coded_weight(type, blk, l, j) * xm.q[b * QBLOCK + j];
                    acc += (float)isum * (dl * xm.scale[b]);
                }
                out[(size_t)m * ldo + g * QROWS + l] = acc;
            }
    }
}

void ref_gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    if (weight_is_coded(type)) { ref_gemm_coded(type, w, K, N, x, M, out, ldo); return; }
    int nb = K / QBLOCK;
    for (int g = 0; g * QROWS < N; g++) {
        const uint8_t *grp = w + (size_t)g * quant_group_bytes(type, K), *wq = grp + (size_t)nb * 32;
        const uint16_t *scale = (const uint16_t *)grp; // (nb, 16)
        for (int l = 0; l < QROWS && g * QROWS + l < N; l++)
            for (int m = 0; m < M; m++) {
                QuantX xm = quantx_token(x, m, K);
                float acc = 0.0f;
                for (int b = 0; b < nb; b++) {
                    int32_t isum = 0;
                    for (int j = 0; j < QBLOCK; j++) isum += quant_weight(type, wq, b, l, j) * xm.q[b * QBLOCK + j];
                    acc += (float)isum * (f16_to_f32(scale[b * QROWS + l]) * xm.scale[b]);
                }
                out[(size_t)m * ldo + g * QROWS + l] = acc;
            }
    }
}

void ref_quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + (size_t)b * QBLOCK;
        int8_t *q = qx->q + (size_t)b * QBLOCK;
        float amax = 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < QBLOCK; i++) amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax; // (fmaxf: a libm call)
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        for (int i = 0; i < QBLOCK; i++) {
            q[i] = (int8_t)lrintf(xb[i] * inv);
            sum += q[i];
        }
        qx->scale[b] = amax / 127.0f;
        qx->qoff[2 * b] = -8 * sum;
        qx->qoff[2 * b + 1] = -128 * sum;
    }
}

void ref_swiglu(float *h, const float *h2, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = silu_mul(h[i], h2[i]);
}

void dequant_row(int type, const void *w, int K, int n, float *out) {
    if (type == WEIGHT_F32) { memcpy(out, (const float *)w + (size_t)n * K, K * sizeof(float)); return; }
    if (type == WEIGHT_BF16) {
        const uint16_t *r = (const uint16_t *)w + (size_t)n * K;
        for (int j = 0; j < K; j++) out[j] = bf16_to_f32(r[j]);
        return;
    }
    int nb = K / QBLOCK, l = n % QROWS;
    const uint8_t *grp = (const uint8_t *)w + (size_t)(n / QROWS) * quant_group_bytes(type, K);
    const uint16_t *scale = (const uint16_t *)grp;
    if (weight_is_coded(type)) {
        float dl = f16_to_f32(scale[l]);
        for (int b = 0; b < nb; b++)
            for (int j = 0; j < QBLOCK; j++)
                out[b * QBLOCK + j] = (float)coded_weight(type, grp + 32 + (size_t)b * coded_block_bytes(type), l, j) * dl;
        return;
    }
    for (int b = 0; b < nb; b++)
        for (int j = 0; j < QBLOCK; j++)
            out[b * QBLOCK + j] = (float)quant_weight(type, grp + (size_t)nb * 32, b, l, j) * f16_to_f32(scale[b * QROWS + l]);
}

// --- the KV cache's rows -------------------------------------------------------

// f32 to IEEE half, rounded to nearest even (normal and subnormal results; the
// scales stored here are never above 65504: values of a row are finite floats).
static uint16_t f32_to_f16(float f) {
    union { float f; uint32_t u; } v = {f};
    uint32_t sign = v.u >> 16 & 0x8000, a = v.u & 0x7FFFFFFF;
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7BFF); // (clamped: 65504)
    if (a < 0x38800000u) { // below the smallest normal half: a multiple of 2^-24
        float m = (float)(a ? ((union { uint32_t u; float f; }){a}).f : 0.0f) * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)lrintf(m));
    }
    uint32_t r = a + 0xFFF + (a >> 13 & 1); // to nearest even at bit 13
    return (uint16_t)(sign | (r - 0x38000000u) >> 13);
}

void kv_store(int type, const float *x, void *row, int n) {
    if (type == KV_F32) { memcpy(row, x, (size_t)n * 4); return; }
    uint8_t *r = row;
    if (type == KV_BF16) {
        for (int i = 0; i < n; i++) {
            union { float f; uint32_t u; } v = {x[i]};
            uint16_t h = (uint16_t)((v.u + 0x7FFF + (v.u >> 16 & 1)) >> 16); // to nearest even
            memcpy(r + 2 * i, &h, 2);
        }
        return;
    }
    if (type == KV_Q8) {
        float amax = 0.0f;
        for (int i = 0; i < n; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
        uint16_t h = f32_to_f16(amax / 127.0f);
        float d = f16_to_f32(h), inv = d > 0 ? 1.0f / d : 0.0f;
        memcpy(r, &h, 2);
        for (int i = 0; i < n; i++) {
            long q = lrintf(x[i] * inv);
            r[2 + i] = (uint8_t)(int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
        }
        return;
    }
    for (int b = 0; b < n / 32; b++, x += 32, r += 18) { // q4: of a few scales, the least squared error
        float big = 0.0f;
        for (int i = 0; i < 32; i++) big = fabsf(x[i]) > fabsf(big) ? x[i] : big;
        static const float divs[] = {1.0f, 0.96875f, 0.9375f, 0.90625f, 0.875f, 0.8125f};
        uint16_t h = f32_to_f16(big / -8.0f);
        float best = INFINITY;
        for (int c = 0; c < 6; c++) {
            uint16_t hc = f32_to_f16(big / (-8.0f * divs[c]));
            float dc = f16_to_f32(hc), ic = dc != 0 ? 1.0f / dc : 0.0f, err = 0.0f;
            for (int i = 0; i < 32; i++) {
                long q = lrintf(x[i] * ic);
                q = q > 7 ? 7 : q < -8 ? -8 : q;
                float e = x[i] - dc * (float)q;
                err += e * e;
            }
            if (err < best) { best = err; h = hc; }
        }
        float d = f16_to_f32(h), inv = d != 0 ? 1.0f / d : 0.0f;
        memcpy(r, &h, 2);
        for (int i = 0; i < 16; i++) {
            long a = lrintf(x[2 * i] * inv), c = lrintf(x[2 * i + 1] * inv);
            a = a > 7 ? 7 : a < -8 ? -8 : a;
            c = c > 7 ? 7 : c < -8 ? -8 : c;
            r[2 + i] = (uint8_t)((a + 8) | (c + 8) << 4);
        }
    }
}

// Value i of a row.
static inline float kv_value(int type, const uint8_t *row, int i) {
    switch (type) {
    case KV_F32: { float v; memcpy(&v, row + 4 * (size_t)i, 4); return v; }
    case KV_BF16: { uint16_t h; memcpy(&h, row + 2 * (size_t)i, 2); return bf16_to_f32(h); }
    case KV_Q8: { uint16_t h; memcpy(&h, row, 2); return f16_to_f32(h) * (float)(int8_t)row[2 + i]; }
    default: {
        const uint8_t *blk = row + (size_t)(i / 32) * 18;
        uint16_t h;
        memcpy(&h, blk, 2);
        uint8_t b = blk[2 + i % 32 / 2];
        return f16_to_f32(h) * (float)((i % 2 ? b >> 4 : b & 15) - 8);
    }
    }
}

float ref_kv_dot(int type, const float *q, const void *row, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += q[i] * kv_value(type, row, i);
    return s;
}

void ref_kv_axpy(int type, float a, const void *row, float *out, int n) {
    for (int i = 0; i < n; i++) out[i] += a * kv_value(type, row, i);
}

// A query against q8 keys is first rounded to int8 at its own scale, as the
// activations of the quantized products are: qi = round(q 127 / max|q|), with
// dq = max|q| / 127. Returns dq; qi gets hd values in -127..127.
float kv_query_q8(const float *q, int hd, int8_t *qi) {
    float amax = 0.0f;
    for (int i = 0; i < hd; i++) amax = fabsf(q[i]) > amax ? fabsf(q[i]) : amax;
    float inv = amax > 0 ? 127.0f / amax : 0.0f;
    for (int i = 0; i < hd; i++) {
        long v = lrintf(q[i] * inv);
        qi[i] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
    return amax / 127.0f;
}

// The SIMD kernels' q8 scores take head sizes up to KV_Q8_HD (the rounded queries
// on the stack); larger ones go to the reference, which gives the same numbers.
enum { KV_Q8_HD = 256 };

// The score of one q8 key: its exact integer sum against qi, scaled once.
static inline float kv_score_q8(int32_t isum, const uint8_t *row, float dqs) {
    uint16_t h;
    memcpy(&h, row, 2);
    return (float)isum * (f16_to_f32(h) * dqs);
}

void ref_kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale,
                   float *att, size_t ld) {
    if (type == KV_Q8) {
        // (qi widened to 32 bits first: gcc 12 at -O3 with AVX512-VNNI vectorizes a product of two
        // int8 arrays summed in 32 bits with vpdpbusd, which takes one of them as unsigned: wrong sums)
        int8_t qi[KV_HD_MAX];
        int32_t qw[KV_HD_MAX];
        for (int r = 0; r < g; r++) {
            float dqs = kv_query_q8(q + (size_t)r * hd, hd, qi) * scale;
            for (int i = 0; i < hd; i++) qw[i] = qi[i];
            for (int t = 0; t < n; t++) {
                const uint8_t *row = (const uint8_t *)rows + (size_t)t * stride;
                int32_t isum = 0;
                for (int i = 0; i < hd; i++) isum += qw[i] * (int8_t)row[2 + i];
                att[(size_t)r * ld + t] = kv_score_q8(isum, row, dqs);
            }
        }
        return;
    }
    for (int t = 0; t < n; t++)
        for (int r = 0; r < g; r++)
            att[(size_t)r * ld + t] = ref_kv_dot(type, q + (size_t)r * hd, (const uint8_t *)rows + (size_t)t * stride, hd) * scale;
}

void ref_kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out) {
    for (int t = 0; t < n; t++)
        for (int r = 0; r < g; r++)
            ref_kv_axpy(type, att[(size_t)r * ld + t], (const uint8_t *)rows + (size_t)t * stride, out + (size_t)r * hd, hd);
}

void kv_rotate(float *x, int n) {
    int m = n & -n; // the largest power of two dividing n
    if (m < 2) return;
    float norm = 1.0f / sqrtf((float)m);
    for (float *blk = x; blk < x + n; blk += m) {
        for (int h = 1; h < m; h *= 2)
            for (int i = 0; i < m; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    float a = blk[j], b = blk[j + h];
                    blk[j] = a + b;
                    blk[j + h] = a - b;
                }
        for (int i = 0; i < m; i++) blk[i] *= norm;
    }
}

// ----------------------------------------------------------------------------
// 2. x86-64: AVX2 + FMA + F16C, with AVX-512 VNNI where the build has it
#ifdef KERNELS_AVX2

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float avx2_dot_f32(const float *w, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

// The KV cache's attention kernels (kv_scores, kv_mix) for a group of queries
// that share a kv head (the heads of one position, or of a prompt's block of
// positions): each row is decoded to f32 once (kv16_ps with AVX-512, 16 values
// at a time; kv8_ps with AVX2) and used by a tile of queries while it is in
// registers. A tile of scores, 4 rows x 4 queries (AVX2: 2 x 4), is summed
// across lanes at once (sum16_ps, sum8_ps): no dot product pays for a
// horizontal sum of its own. q8 keys have kernels of their own, in integers
// (kv_scores_q8, with the quantized products below).
// kv_mix takes rows in blocks of KV_MIX_BLOCK (8 KB of q8 rows of 128 values,
// which stay in L1 while the passes over a head's dimensions, and with AVX-512
// the tiles of queries, read them again), 32 dimensions (AVX2: 16) of 8 queries
// (AVX2: 4) a pass: out += a v, a multiply-add a row, rows in order.
enum { KV_MIX_BLOCK = 64 };

#ifdef KERNELS_AVX512
// 16 values of a row from value i (a multiple of 16) on, as f32: exactly the
// values kv_value gives (d q is exact in f32: an f16 times a small integer).
static inline __m512 kv16_ps(int type, const uint8_t *row, int i) {
    if (type == KV_F32) return _mm512_loadu_ps((const float *)row + i);
    if (type == KV_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 2 * i))), 16));
    uint16_t h;
    __m128i q;
    if (type == KV_Q8) {
        memcpy(&h, row, 2);
        q = _mm_loadu_si128((const __m128i *)(row + 2 + i));
    } else { // q4: half a block, 8 bytes
        const uint8_t *b = row + (size_t)(i / 32) * 18;
        memcpy(&h, b, 2);
        __m128i r = _mm_loadl_epi64((const __m128i *)(b + 2 + i % 32 / 2)), low = _mm_set1_epi8(15);
        q = _mm_sub_epi8(_mm_unpacklo_epi8(_mm_and_si128(r, low), _mm_and_si128(_mm_srli_epi16(r, 4), low)), _mm_set1_epi8(8));
    }
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), _mm512_set1_ps(_cvtsh_ss(h)));
}

// Lane j of the result: the sum of v[j]'s 16 lanes, in the same order for every j.
static inline __m512 sum16_ps(const __m512 v[16]) {
    __m512 s[8], u[4];
    for (int j = 0; j < 8; j++) // in each 128-bit lane: v[2j] lanes 0+2, v[2j+1] 0+2, v[2j] 1+3, v[2j+1] 1+3
        s[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int j = 0; j < 4; j++) // in each 128-bit lane: v[4j .. 4j+3], each summed over that lane
        u[j] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(s[2 * j], s[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// A tile of scores: 4 queries (q[r]) x 4 rows (k[t]), lane 4 r + t, times scale
// (f32, bf16 and q4 rows; q8 rows have a kernel of their own, avx512_kv_scores_q8).
static inline __attribute__((always_inline)) __m512 avx512_scores_tile(int type, const float *const q[4], const uint8_t *const k[4],
                                                                       int hd, float scale) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < hd; i += 16) {
        __m512 kt[4];
        for (int t = 0; t < 4; t++) kt[t] = kv16_ps(type, k[t], i);
        for (int r = 0; r < 4; r++) {
            __m512 qr = _mm512_loadu_ps(q[r] + i);
            for (int t = 0; t < 4; t++) acc[4 * r + t] = _mm512_fmadd_ps(qr, kt[t], acc[4 * r + t]);
        }
    }
    return _mm512_mul_ps(sum16_ps(acc), _mm512_set1_ps(scale));
}

static inline __attribute__((always_inline)) void avx512_kv_scores_t(int type, const float *q, int g, const uint8_t *rows,
                                                                     size_t stride, int n, int hd, float scale, float *att, size_t ld) {
    for (int r0 = 0; r0 < g; r0 += 4) {
        int nq = g - r0 < 4 ? g - r0 : 4;
        const float *qs[4];
        for (int r = 0; r < 4; r++) qs[r] = q + (size_t)(r0 + (r < nq ? r : 0)) * hd;
        float *a = att + (size_t)r0 * ld;
        for (int t0 = 0; t0 < n; t0 += 4) {
            int nt = n - t0 < 4 ? n - t0 : 4;
            const uint8_t *ks[4];
            for (int t = 0; t < 4; t++) ks[t] = rows + (size_t)(t0 + (t < nt ? t : 0)) * stride;
            __m512 s = avx512_scores_tile(type, qs, ks, hd, scale);
            if (nq == 4 && nt == 4) { // each query's 4 scores straight into its row of att
                _mm_storeu_ps(a + t0, _mm512_castps512_ps128(s));
                _mm_storeu_ps(a + ld + t0, _mm512_extractf32x4_ps(s, 1));
                _mm_storeu_ps(a + 2 * ld + t0, _mm512_extractf32x4_ps(s, 2));
                _mm_storeu_ps(a + 3 * ld + t0, _mm512_extractf32x4_ps(s, 3));
                continue;
            }
            float v[16];
            _mm512_storeu_ps(v, s);
            for (int r = 0; r < nq; r++)
                for (int t = 0; t < nt; t++) a[(size_t)r * ld + t0 + t] = v[4 * r + t];
        }
    }
}

// Rows in blocks read once for all the queries; a tile of 8 queries (4 while
// there are fewer) and 32 dimensions adds each decoded row to 16 accumulators.
static inline __attribute__((always_inline)) void avx512_mix_tile(int type, const float *att, size_t ld, int g, int r0, int QT,
                                                                  const uint8_t *rows, size_t stride, int t0, int t1, int hd, float *out) {
    int nq = g - r0 < QT ? g - r0 : QT;
    const float *a[8];
    for (int r = 0; r < QT; r++) a[r] = att + (size_t)(r0 + (r < nq ? r : 0)) * ld;
    float *o = out + (size_t)r0 * hd;
    for (int i = 0; i < hd; i += 32) {
        __m512 acc[8][2];
        for (int r = 0; r < QT; r++)
            for (int c = 0; c < 2; c++) acc[r][c] = r < nq ? _mm512_loadu_ps(o + (size_t)r * hd + i + 16 * c) : _mm512_setzero_ps();
        for (int t = t0; t < t1; t++) {
            __m512 v0 = kv16_ps(type, rows + (size_t)t * stride, i), v1 = kv16_ps(type, rows + (size_t)t * stride, i + 16);
            for (int r = 0; r < QT; r++) {
                __m512 w = _mm512_set1_ps(a[r][t]);
                acc[r][0] = _mm512_fmadd_ps(w, v0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w, v1, acc[r][1]);
            }
        }
        for (int r = 0; r < nq; r++)
            for (int c = 0; c < 2; c++) _mm512_storeu_ps(o + (size_t)r * hd + i + 16 * c, acc[r][c]);
    }
}

static inline __attribute__((always_inline)) void avx512_kv_mix_t(int type, const float *att, size_t ld, int g, const uint8_t *rows,
                                                                  size_t stride, int n, int hd, float *out) {
    for (int t0 = 0; t0 < n; t0 += KV_MIX_BLOCK) {
        int t1 = n - t0 < KV_MIX_BLOCK ? n : t0 + KV_MIX_BLOCK;
        for (int r0 = 0; r0 < g;) {
            if (g - r0 > 4) { avx512_mix_tile(type, att, ld, g, r0, 8, rows, stride, t0, t1, hd, out); r0 += 8; }
            else { avx512_mix_tile(type, att, ld, g, r0, 4, rows, stride, t0, t1, hd, out); r0 += 4; }
        }
    }
}
#define X86_KV(name) avx512_##name
#else
// 8 values of a row from value i (a multiple of 8) on, as f32: exactly the
// values kv_value gives (d q is exact in f32: an f16 times a small integer).
static inline __m256 kv8_ps(int type, const uint8_t *row, int i) {
    if (type == KV_F32) return _mm256_loadu_ps((const float *)row + i);
    if (type == KV_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * i))), 16));
    uint16_t h;
    __m128i q;
    if (type == KV_Q8) {
        memcpy(&h, row, 2);
        q = _mm_loadl_epi64((const __m128i *)(row + 2 + i));
    } else { // q4: a quarter of a block, 4 bytes, values in the low then high nibble of each
        const uint8_t *b = row + (size_t)(i / 32) * 18;
        int32_t raw;
        memcpy(&h, b, 2);
        memcpy(&raw, b + 2 + i % 32 / 2, 4);
        __m128i r = _mm_cvtsi32_si128(raw), low = _mm_set1_epi8(15);
        q = _mm_sub_epi8(_mm_unpacklo_epi8(_mm_and_si128(r, low), _mm_and_si128(_mm_srli_epi16(r, 4), low)), _mm_set1_epi8(8));
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(_cvtsh_ss(h)));
}

// Lane j of the result: the sum of v[j]'s 8 lanes, added in the same order for every j.
static inline __m256 sum8_ps(const __m256 v[8]) {
    __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// Lane j of the result: the sum of v[j]'s lanes (integers: exact in any order).
static inline __m256i sum8_epi32(const __m256i v[8]) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// The 4 queries of a tile: as floats, and against q8 rows rounded to int8
// (kv_query_q8), widened to 16 bits, with their dq * scale.
typedef struct { const float *q[4]; int16_t qw[4][KV_Q8_HD]; float dqs[4]; } Avx2Queries;

// A tile of scores: 4 queries x 2 rows (k[t]), lane 2 r + t, times scale. q8
// rows (kernels.h: exact integer sums) widened to 16 bits, multiplied and added
// in pairs (vpmaddwd) into 32-bit sums, each scaled once: the sums the AVX-512
// kernel and the reference get.
static inline __attribute__((always_inline)) __m256 avx2_scores_tile(int type, const Avx2Queries *qs, const uint8_t *const k[2],
                                                                     int hd, float scale) {
    if (type == KV_Q8) {
        __m256i acc[8];
        for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_si256();
        for (int i = 0; i < hd; i += 16) {
            __m256i k0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(k[0] + 2 + i)));
            __m256i k1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(k[1] + 2 + i)));
            for (int r = 0; r < 4; r++) {
                __m256i qr = _mm256_loadu_si256((const __m256i *)(qs->qw[r] + i));
                acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(qr, k0));
                acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(qr, k1));
            }
        }
        uint16_t h0, h1;
        memcpy(&h0, k[0], 2);
        memcpy(&h1, k[1], 2);
        float d0 = _cvtsh_ss(h0), d1 = _cvtsh_ss(h1);
        const float *dq = qs->dqs;
        __m256 dk = _mm256_setr_ps(d0, d1, d0, d1, d0, d1, d0, d1);
        __m256 dqv = _mm256_setr_ps(dq[0], dq[0], dq[1], dq[1], dq[2], dq[2], dq[3], dq[3]);
        return _mm256_mul_ps(_mm256_cvtepi32_ps(sum8_epi32(acc)), _mm256_mul_ps(dk, dqv));
    }
    __m256 acc[8];
    for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
    for (int i = 0; i < hd; i += 8) {
        __m256 k0 = kv8_ps(type, k[0], i), k1 = kv8_ps(type, k[1], i);
        for (int r = 0; r < 4; r++) {
            __m256 qr = _mm256_loadu_ps(qs->q[r] + i);
            acc[2 * r] = _mm256_fmadd_ps(qr, k0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(qr, k1, acc[2 * r + 1]);
        }
    }
    return _mm256_mul_ps(sum8_ps(acc), _mm256_set1_ps(scale));
}

// The group's queries 4 at a time, its rows 2 at a time; a group or a run not
// a multiple of those repeats its first query or row in the spare lanes and
// keeps only the real ones. (q8: head sizes a multiple of 16 up to KV_Q8_HD.)
static inline __attribute__((always_inline)) void avx2_kv_scores_t(int type, const float *q, int g, const uint8_t *rows,
                                                                   size_t stride, int n, int hd, float scale, float *att, size_t ld) {
    if (type == KV_Q8 && (hd % 16 || hd > KV_Q8_HD)) { ref_kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld); return; }
    Avx2Queries qs;
    for (int r0 = 0; r0 < g; r0 += 4) {
        int nq = g - r0 < 4 ? g - r0 : 4;
        for (int r = 0; r < 4; r++) {
            qs.q[r] = q + (size_t)(r0 + (r < nq ? r : 0)) * hd;
            if (type == KV_Q8) {
                int8_t qi[KV_Q8_HD];
                qs.dqs[r] = kv_query_q8(qs.q[r], hd, qi) * scale;
                for (int i = 0; i < hd; i++) qs.qw[r][i] = qi[i];
            }
        }
        float *a = att + (size_t)r0 * ld;
        for (int t0 = 0; t0 < n; t0 += 2) {
            int nt = n - t0 < 2 ? n - t0 : 2;
            const uint8_t *ks[2] = {rows + (size_t)t0 * stride, rows + (size_t)(t0 + nt - 1) * stride};
            __m256 s = avx2_scores_tile(type, &qs, ks, hd, scale);
            if (nq == 4 && nt == 2) { // each query's 2 scores straight into its row of att
                __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
                _mm_storel_pi((__m64 *)(a + t0), lo);
                _mm_storeh_pi((__m64 *)(a + ld + t0), lo);
                _mm_storel_pi((__m64 *)(a + 2 * ld + t0), hi);
                _mm_storeh_pi((__m64 *)(a + 3 * ld + t0), hi);
                continue;
            }
            float v[8];
            _mm256_storeu_ps(v, s);
            for (int r = 0; r < nq; r++)
                for (int t = 0; t < nt; t++) a[(size_t)r * ld + t0 + t] = v[2 * r + t];
        }
    }
}

static inline __attribute__((always_inline)) void avx2_kv_mix_t(int type, const float *att, size_t ld, int g, const uint8_t *rows,
                                                                size_t stride, int n, int hd, float *out) {
    for (int r0 = 0; r0 < g; r0 += 4) {
        int nq = g - r0 < 4 ? g - r0 : 4;
        const float *a[4];
        for (int r = 0; r < 4; r++) a[r] = att + (size_t)(r0 + (r < nq ? r : 0)) * ld;
        float *o = out + (size_t)r0 * hd;
        for (int t0 = 0; t0 < n; t0 += KV_MIX_BLOCK) {
            int t1 = n - t0 < KV_MIX_BLOCK ? n : t0 + KV_MIX_BLOCK;
            for (int i = 0; i < hd; i += 16) {
                __m256 acc[4][2];
                for (int r = 0; r < 4; r++)
                    for (int c = 0; c < 2; c++) acc[r][c] = r < nq ? _mm256_loadu_ps(o + (size_t)r * hd + i + 8 * c) : _mm256_setzero_ps();
                for (int t = t0; t < t1; t++) {
                    const uint8_t *row = rows + (size_t)t * stride;
                    __m256 v0 = kv8_ps(type, row, i), v1 = kv8_ps(type, row, i + 8);
                    for (int r = 0; r < 4; r++) {
                        __m256 w = _mm256_broadcast_ss(a[r] + t);
                        acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
                    }
                }
                for (int r = 0; r < nq; r++)
                    for (int c = 0; c < 2; c++) _mm256_storeu_ps(o + (size_t)r * hd + i + 8 * c, acc[r][c]);
            }
        }
    }
}

#define X86_KV(name) avx2_##name
#endif

#ifdef KERNELS_AVX512
static void avx512_kv_scores_q8(const float *q, int g, const uint8_t *rows, size_t stride, int n, int hd, float scale,
                                float *att, size_t ld);
#endif

// One copy of each kernel per KV type, the type a constant in it. Head sizes
// that are not a multiple of 32 take the reference.
static void x86_kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale,
                          float *att, size_t ld) {
#ifdef KERNELS_AVX512
    if (type == KV_Q8) { avx512_kv_scores_q8(q, g, rows, stride, n, hd, scale, att, ld); return; }
#else
    if (type == KV_Q8) { avx2_kv_scores_t(KV_Q8, q, g, rows, stride, n, hd, scale, att, ld); return; }
#endif
    switch (hd % 32 ? -1 : type) {
    case KV_F32: X86_KV(kv_scores_t)(KV_F32, q, g, rows, stride, n, hd, scale, att, ld); break;
    case KV_BF16: X86_KV(kv_scores_t)(KV_BF16, q, g, rows, stride, n, hd, scale, att, ld); break;
    case KV_Q4: X86_KV(kv_scores_t)(KV_Q4, q, g, rows, stride, n, hd, scale, att, ld); break;
    default: ref_kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld);
    }
}

static void x86_kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out) {
    switch (hd % 32 ? -1 : type) {
    case KV_F32: X86_KV(kv_mix_t)(KV_F32, att, ld, g, rows, stride, n, hd, out); break;
    case KV_BF16: X86_KV(kv_mix_t)(KV_BF16, att, ld, g, rows, stride, n, hd, out); break;
    case KV_Q8: X86_KV(kv_mix_t)(KV_Q8, att, ld, g, rows, stride, n, hd, out); break;
    case KV_Q4: X86_KV(kv_mix_t)(KV_Q4, att, ld, g, rows, stride, n, hd, out); break;
    default: ref_kv_mix(type, att, ld, g, rows, stride, n, hd, out);
    }
}

// bf16 is the top half of an f32: widen to 32 bits and shift left by 16.
static inline __m256 bf16x8_to_ps(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Weights are read once per token from memory far larger than the caches.
// The hardware prefetcher alone keeps too few cache misses in flight for one
// core to reach its share of the bandwidth (measured: half), so the quantized
// kernels also prefetch along their weight stream, which runs on through the
// row's scales into the next row, at two distances: PREFETCH_FAR bytes ahead
// into L2, whose miss queue is deep enough to cover the memory latency under
// load from both cores, and PREFETCH_NEAR ahead from L2 into L1, whose queue
// is not (prefetching far into L1 alone measured 10-20% slower decoding).
// Tuned on Zen 3.
#ifndef PREFETCH_FAR
#define PREFETCH_FAR 8192
#endif
#ifndef PREFETCH_NEAR
#define PREFETCH_NEAR 768
#endif
// (A macro: as a static inline function, gcc 12 dropped these prefetches from
// the quantized kernels, which then decoded 15-20% slower.)
#define prefetch(p) (_mm_prefetch((const char *)(p) + PREFETCH_FAR, _MM_HINT_T1), \
                     _mm_prefetch((const char *)(p) + PREFETCH_NEAR, _MM_HINT_T0))

static float avx2_dot_bf16(const uint16_t *w, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        prefetch(w + i);
        __m256i h0 = _mm256_loadu_si256((const __m256i *)(w + i));
        __m256i h1 = _mm256_loadu_si256((const __m256i *)(w + i + 16));
        a0 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_castsi256_si128(h0)), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_extracti128_si256(h0, 1)), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_castsi256_si128(h1)), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(bf16x8_to_ps(_mm256_extracti128_si256(h1, 1)), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(bf16x8_to_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a0);
    float s = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

// e^x, 8 at a time, within 1 unit in the last place (measured over -87..88):
// x = n ln2 + r with |r| <= ln2/2, e^x = 2^n e^r, e^r by a polynomial
// (Cephes' expf, whose constants these are), 2^n put straight into the
// exponent bits.
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f)); // 2^n stays a normal float
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); // ln2 in two parts, so r is exact
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// h[i] = silu(h[i]) * h2[i], the gate of the experts' hidden layer.
static void avx2_swiglu(float *h, const float *h2, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(h + i);
        __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(silu, _mm256_loadu_ps(h2 + i)));
    }
    for (; i < n; i++) h[i] = silu_mul(h[i], h2[i]);
}


static void avx2_quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + (size_t)b * QBLOCK;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) m = _mm256_max_ps(m, _mm256_and_ps(v[k] = _mm256_loadu_ps(xb + 8 * k), abs_mask));
        m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
        float amax = _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1))));
        __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        // rounded to nearest, ties to even (the default mode), as lrintf does
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)); // lanes interleaved
        _mm256_storeu_si256((__m256i *)(qx->q + (size_t)b * QBLOCK),
                            _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
        qx->qoff[2 * b] = -8 * sum;
        qx->qoff[2 * b + 1] = -128 * sum;
        qx->scale[b] = amax / 127.0f;
    }
}

__attribute__((unused)) // (the AVX-512 kernel broadcasts inside vpdpbusd instead)
static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

// The quantized products work on one group (16 rows) against up to T_MAX
// tokens at a time: each 64 bytes of weights loaded serve every token, and
// each 4 bytes of a token's activations, broadcast, serve all 16 rows. The
// lanes are the rows, so a block's integer sums need no horizontal adds:
// per block and token, one conversion to float and one FMA with the product
// of the scales. For one token (decoding) the same code streams the weights.
//
// q8 weights are stored as u = q + 128 and q4 as u = q + 8: unsigned bytes,
// as vpdpbusd and vpmaddubsw take them, against the signed activations. The
// offset is taken out once per block: sum(u x) - off * sum(x), exactly, with
// -off * sum(x) read from the quantized activations (QuantX.qoff).

// A pass's 8 tokens regrouped (tile_activations, AVX-512): for each 4 bytes of
// K, those of its tokens side by side (32 bytes), and each block's offsets and
// scales by token, so that the pass reads all of them from one pointer each.
typedef struct { const int8_t *q; const int32_t *off; const float *scale; } Tile;

// Tile j of the buffer: its activations, then its offsets, then its scales.
static inline Tile tile_of(const int8_t *tiles, size_t j, int K) {
    const int8_t *q = tiles + j * quant_scratch_bytes(8, K);
    const int32_t *off = (const int32_t *)(q + 8 * (size_t)K);
    return (Tile){q, off, (const float *)(off + 8 * ((size_t)K / QBLOCK))};
}

#ifdef KERNELS_AVX512
#define T_MAX 8

// vpdpbusd with the 4 activation bytes broadcast by the instruction itself
// ({1to16}): a micro-op less than a separate broadcast, which compilers do not
// fold (measured: 6% faster prompt passes, with the tiled activations, and
// 10% faster decoding).
static inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t *p) {
#ifdef KERNELS_AVX512_EMULATED
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(load_i32(p)));
#else
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)p));
    return acc;
#endif
}

// kv_scores against q8 keys (kernels.h: int8 queries, exact integer sums):
// 16 rows at a time, transposed in registers so that each holds 4 values of
// every one of the 16 rows (a 16 x 16 transpose of 4-byte words per 64 values),
// made unsigned by flipping their sign bit (k + 128) for vpdpbusd, which
// broadcasts 4 bytes of the query itself. Each sum starts at -128 sum(qi), the
// offset's share, so the lanes end as the 16 rows' integer sums; no horizontal
// sums, and 64 multiply-adds an instruction. Head sizes that are not a multiple
// of 64 or above KV_Q8_HD take the reference, which gives the same numbers.

static void avx512_kv_scores_q8(const float *q, int g, const uint8_t *rows, size_t stride, int n, int hd, float scale,
                                float *att, size_t ld) {
    if (hd % 64 || hd > KV_Q8_HD) { ref_kv_scores(KV_Q8, q, g, rows, stride, n, hd, scale, att, ld); return; }
    enum { QB = 16 }; // queries rounded at a time (4 heads of 4 positions, as a prompt brings them)
    int8_t qi[QB][KV_Q8_HD];
    float dqs[QB];
    int32_t off[QB];
    __m512i kt[KV_Q8_HD / 4];
    const __m512i sign = _mm512_set1_epi8((char)0x80);
    for (int r0 = 0; r0 < g; r0 += QB) {
        int nq = g - r0 < QB ? g - r0 : QB;
        for (int r = 0; r < nq; r++) {
            dqs[r] = kv_query_q8(q + (size_t)(r0 + r) * hd, hd, qi[r]) * scale;
            int32_t sum = 0;
            for (int i = 0; i < hd; i++) sum += qi[r][i];
            off[r] = -128 * sum;
        }
        for (int t0 = 0; t0 < n; t0 += 16) {
            int nt = n - t0 < 16 ? n - t0 : 16;
            const uint8_t *row[16];
            uint16_t h[16];
            for (int t = 0; t < 16; t++) {
                row[t] = rows + (size_t)(t0 + (t < nt ? t : nt - 1)) * stride;
                memcpy(h + t, row[t], 2);
            }
            for (int c = 0; c < hd / 64; c++) { // values 64c .. 64c+63 of the 16 rows
                __m512i a[16], b[16], d[16];
                for (int t = 0; t < 16; t++) a[t] = _mm512_loadu_si512(row[t] + 2 + 64 * c);
                for (int p = 0; p < 8; p++) {
                    b[2 * p] = _mm512_unpacklo_epi32(a[2 * p], a[2 * p + 1]);
                    b[2 * p + 1] = _mm512_unpackhi_epi32(a[2 * p], a[2 * p + 1]);
                }
                for (int p = 0; p < 4; p++) { // d[4p+k], 128-bit lane L: word 4L+k of rows 4p..4p+3
                    d[4 * p] = _mm512_unpacklo_epi64(b[4 * p], b[4 * p + 2]);
                    d[4 * p + 1] = _mm512_unpackhi_epi64(b[4 * p], b[4 * p + 2]);
                    d[4 * p + 2] = _mm512_unpacklo_epi64(b[4 * p + 1], b[4 * p + 3]);
                    d[4 * p + 3] = _mm512_unpackhi_epi64(b[4 * p + 1], b[4 * p + 3]);
                }
                for (int k = 0; k < 4; k++) { // word 4L+k of all 16 rows: lanes L of d[k], d[4+k], d[8+k], d[12+k]
                    __m512i e0 = _mm512_shuffle_i32x4(d[k], d[4 + k], 0x44), e1 = _mm512_shuffle_i32x4(d[k], d[4 + k], 0xEE);
                    __m512i e2 = _mm512_shuffle_i32x4(d[8 + k], d[12 + k], 0x44), e3 = _mm512_shuffle_i32x4(d[8 + k], d[12 + k], 0xEE);
                    kt[16 * c + k] = _mm512_xor_si512(_mm512_shuffle_i32x4(e0, e2, 0x88), sign);
                    kt[16 * c + 4 + k] = _mm512_xor_si512(_mm512_shuffle_i32x4(e0, e2, 0xDD), sign);
                    kt[16 * c + 8 + k] = _mm512_xor_si512(_mm512_shuffle_i32x4(e1, e3, 0x88), sign);
                    kt[16 * c + 12 + k] = _mm512_xor_si512(_mm512_shuffle_i32x4(e1, e3, 0xDD), sign);
                }
            }
            __m512 dk = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
            __mmask16 live = (__mmask16)((1u << nt) - 1);
            for (int r = 0; r < nq; r += 2) { // two queries, two chains each (even and odd words)
                int r1 = r + 1 < nq ? r + 1 : r;
                __m512i s0 = _mm512_set1_epi32(off[r]), s1 = _mm512_setzero_si512();
                __m512i u0 = _mm512_set1_epi32(off[r1]), u1 = _mm512_setzero_si512();
                for (int j = 0; j < hd / 4; j += 2) {
                    s0 = dpbusd_bcast(s0, kt[j], (const int8_t *)qi[r] + 4 * j);
                    u0 = dpbusd_bcast(u0, kt[j], (const int8_t *)qi[r1] + 4 * j);
                    s1 = dpbusd_bcast(s1, kt[j + 1], (const int8_t *)qi[r] + 4 * j + 4);
                    u1 = dpbusd_bcast(u1, kt[j + 1], (const int8_t *)qi[r1] + 4 * j + 4);
                }
                __m512 f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(dk, _mm512_set1_ps(dqs[r])));
                _mm512_mask_storeu_ps(att + (size_t)(r0 + r) * ld + t0, live, f0);
                if (r1 != r) {
                    __m512 f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(u0, u1)), _mm512_mul_ps(dk, _mm512_set1_ps(dqs[r1])));
                    _mm512_mask_storeu_ps(att + (size_t)(r0 + r1) * ld + t0, live, f1);
                }
            }
        }
    }
}

// A block's integer sums is (and with two chains is2) of T tokens into their
// float sums: the weights' offset taken out (off: q8's -128 sums, q4's -8),
// then acc += float(sum) * (dw * dx).
static inline __attribute__((always_inline)) void block_done(int T, int two, __m512i *is, const __m512i *is2,
                                                             int tiled, const Tile *tile, const QuantX *xt, int off,
                                                             int b, __m512 dw, __m512 *acc) {
    for (int t = 0; t < T; t++) {
        int32_t o = tiled ? tile->off[b * 8 + t] : xt[t].qoff[2 * b + off];
        float dx = tiled ? tile->scale[b * 8 + t] : xt[t].scale[b];
        if (two) is[t] = _mm512_add_epi32(_mm512_add_epi32(is[t], is2[t]), _mm512_set1_epi32(o));
        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[t]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[t]);
    }
}

// One group against T tokens (T, q4 and tiled are constants where this is
// inlined): the tokens' activations from x, or with `tiled` from *tile.
static inline __attribute__((always_inline)) void quant_group(int q4, const uint8_t *grp, int K, const QuantX *x,
                                                              int tiled, const Tile *tile, int T, float *out, size_t ldo,
                                                              int nrows, int fetch, int b0, int b1) {
    int nb = K / QBLOCK;
    const uint16_t *scale = (const uint16_t *)grp;
    const uint8_t *wq = grp + (size_t)nb * 32;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __mmask16 rows = (__mmask16)((1u << nrows) - 1);
    __m512 acc[T_MAX];
    QuantX xt[T_MAX];
    for (int t = 0; t < T; t++) {
        acc[t] = b0 ? _mm512_maskz_loadu_ps(rows, out + t * ldo) : _mm512_setzero_ps(); // blocks b0.. go on from there
        if (!tiled) xt[t] = quantx_token(x, t, K);
    }
    // token t's 4 activations s of block b; its offset; its scale
#define ACT(t, b, s) (tiled ? tile->q + ((size_t)(b) * 8 + (s)) * 32 + 4 * (t) : xt[t].q + (b) * QBLOCK + 4 * (s))
#define OFF(t, b) (tiled ? tile->off[(b) * 8 + (t)] : xt[t].qoff[2 * (b) + !q4])
    // With 5 tokens or more their chains alone cover vpdpbusd's latency, and each
    // starts from -off * sum(x), broadcast from memory: the offset comes out at
    // no cost (computing it here cost 10% of the kernel's time); with
    // fewer, each token gets two chains (even and odd steps), added at the end.
    const int two = T < 5;
    for (int b = b0; b < b1; b++) {
        __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scale + b * QROWS)));
        __m512i is[T_MAX], is2[T_MAX];
        for (int t = 0; t < T; t++) {
            if (two) is[t] = is2[t] = _mm512_setzero_si512();
            else is[t] = _mm512_set1_epi32(OFF(t, b)); // a broadcast from memory: no ALU work
        }
        if (q4) {
            const uint8_t *wb = wq + (size_t)b * 256;
            for (int c = 0; c < 4; c++) {
                if (fetch) prefetch(wb + 64 * c);
                __m512i raw = _mm512_loadu_si512(wb + 64 * c);
                __m512i lo = _mm512_and_si512(raw, low), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                for (int t = 0; t < T; t++) {
                    is[t] = dpbusd_bcast(is[t], lo, ACT(t, b, 2 * c));
                    if (two) is2[t] = dpbusd_bcast(is2[t], hi, ACT(t, b, 2 * c + 1));
                    else is[t] = dpbusd_bcast(is[t], hi, ACT(t, b, 2 * c + 1));
                }
            }
        } else {
            const uint8_t *wb = wq + (size_t)b * 512;
            for (int s = 0; s < 8; s += 2) {
                if (fetch) { prefetch(wb + 64 * s); prefetch(wb + 64 * s + 64); }
                __m512i w0 = _mm512_loadu_si512(wb + 64 * s), w1 = _mm512_loadu_si512(wb + 64 * s + 64);
                for (int t = 0; t < T; t++) {
                    is[t] = dpbusd_bcast(is[t], w0, ACT(t, b, s));
                    if (two) is2[t] = dpbusd_bcast(is2[t], w1, ACT(t, b, s + 1));
                    else is[t] = dpbusd_bcast(is[t], w1, ACT(t, b, s + 1));
                }
            }
        }
        block_done(T, two, is, is2, tiled, tile, xt, !q4, b, dw, acc);
    }
#undef ACT
#undef OFF
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(out + t * ldo, rows, acc[t]);
}

#ifdef KERNELS_AVX512_VBMI
// q3 and q2 groups against T tokens, as quant_group does q8 and q4: per step of
// 4 weights of 16 rows, each byte's index into the codebooks (book << 2 | code
// for q2's 64 levels, book << 3 | code for q3's 128) picks its level, stored
// as u = level + 128, with vpermb (q2) or vpermi2b (q3); the offset comes out
// as q8's does.
static const uint8_t rows_of_lanes[64] = { // byte 4l+i: l (q2's books: byte l)
    0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7,
    8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11, 12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15};
static const uint8_t pairs_of_lanes[64] = { // byte 4l+i: l/2 (q3's books: byte l/2)
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7};
static const uint16_t odd_rows_shift[32] = { // 16-bit lane of bytes 4l+i: 4 for odd l (the high nibble)
    0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4, 0, 0, 4, 4};

static inline __attribute__((always_inline)) void coded_group(int q3, const uint8_t *grp, int K, const QuantX *x,
                                                              int tiled, const Tile *tile, int T, float *out, size_t ldo,
                                                              int nrows, int fetch, int b0, int b1) {
    const size_t bbytes = coded_block_bytes(q3 ? WEIGHT_Q3 : WEIGHT_Q2);
    const __mmask16 rows = (__mmask16)((1u << nrows) - 1);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)grp)); // the rows' scales
    const __m512i three = _mm512_set1_epi8(3), nib = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    const __m512i rep = _mm512_loadu_si512(q3 ? pairs_of_lanes : rows_of_lanes);
    const __m512i odd = _mm512_loadu_si512(odd_rows_shift);
    // the codebooks as u = level + 128: q2's 64 bytes, q3's 128 in two registers
    const __m512i lv0 = _mm512_xor_si512(_mm512_loadu_si512(q3 ? (const void *)q3_levels : (const void *)q2_levels), flip);
    const __m512i lv1 = _mm512_xor_si512(_mm512_loadu_si512((const int8_t *)q3_levels + 64), flip);
    __m512 acc[T_MAX];
    QuantX xt[T_MAX];
    for (int t = 0; t < T; t++) {
        acc[t] = b0 ? _mm512_maskz_loadu_ps(rows, out + t * ldo) : _mm512_setzero_ps();
        if (!tiled) xt[t] = quantx_token(x, t, K);
    }
#define ACT(t, b, s) (tiled ? tile->q + ((size_t)(b) * 8 + (s)) * 32 + 4 * (t) : xt[t].q + (b) * QBLOCK + 4 * (s))
#define OFF(t, b) (tiled ? tile->off[(b) * 8 + (t)] : xt[t].qoff[2 * (b) + 1])
    const int two = T < 5;
    for (int b = b0; b < b1; b++) {
        const uint8_t *blk = grp + 32 + (size_t)b * bbytes;
        if (fetch) { prefetch(blk); prefetch(blk + 64); prefetch(blk + 128); if (q3) prefetch(blk + 192); }
        __m512i is[T_MAX], is2[T_MAX];
        for (int t = 0; t < T; t++) {
            if (two) is[t] = is2[t] = _mm512_setzero_si512();
            else is[t] = _mm512_set1_epi32(OFF(t, b));
        }
        // each byte's book, in the bits above its code
        __m512i books = _mm512_permutexvar_epi8(rep, _mm512_loadu_si512(blk)), bk[2];
        if (q3) {
            bk[0] = bk[1] = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(books, odd), nib), 3);
        } else {
            bk[0] = _mm512_slli_epi16(_mm512_and_si512(books, nib), 2);
            bk[1] = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(books, 4), nib), 2);
        }
        const uint8_t *codes = blk + (q3 ? 8 : 16);
        __m512i top = q3 ? _mm512_loadu_si512(codes + 128) : _mm512_setzero_si512();
        for (int c = 0; c < 2; c++) {
            __m512i p = _mm512_loadu_si512(codes + 64 * c);
            for (int j = 0; j < 4; j++) {
                int s = 4 * c + j;
                __m512i low = _mm512_srli_epi16(p, 2 * j), idx, w;
                if (q3) { // bit s of top to bit 2, under the low code's 2 bits, then the book above
                    __m512i hi = s >= 2 ? _mm512_srli_epi16(top, s - 2) : _mm512_slli_epi16(top, 2 - s);
                    // (vpternlogd's table: a = 0xF0, b = 0xCC, c = 0xAA) m = 3 ? low : hi; bk | (m & 7)
                    __m512i m = _mm512_ternarylogic_epi32(three, low, hi, 0xCA);
                    idx = _mm512_ternarylogic_epi32(bk[c], m, _mm512_set1_epi8(7), 0xF8);
                    w = _mm512_permutex2var_epi8(lv0, idx, lv1);
                } else {
                    idx = _mm512_ternarylogic_epi32(bk[c], low, three, 0xF8); // bk | (low & 3)
                    w = _mm512_permutexvar_epi8(idx, lv0);
                }
                for (int t = 0; t < T; t++) {
                    if (two && (s & 1)) is2[t] = dpbusd_bcast(is2[t], w, ACT(t, b, s));
                    else is[t] = dpbusd_bcast(is[t], w, ACT(t, b, s));
                }
            }
        }
        block_done(T, two, is, is2, tiled, tile, xt, 1, b, d, acc);
    }
#undef ACT
#undef OFF
    for (int t = 0; t < T; t++) _mm512_mask_storeu_ps(out + t * ldo, rows, acc[t]);
}
#endif // KERNELS_AVX512_VBMI

// Each thread's buffer for them is freed when the thread ends.
static pthread_key_t tiles_key;
static pthread_once_t tiles_once = PTHREAD_ONCE_INIT;
static void tiles_key_create(void) { (void)pthread_key_create(&tiles_key, free); }

// The M tokens' activations as tiles of 8 (Tile), for the offset of weights
// stored with offset 8 (q4) or 128 (q8), in a buffer of this thread's that
// grows as needed. Returns the first tile, or NULL (no memory: the caller
// reads the activations where they are).
static int8_t *tile_activations(const QuantX *x, int M, int K, int q4) {
    static _Thread_local int8_t *buf;
    static _Thread_local size_t cap;
    size_t nb = (size_t)K / QBLOCK, need = quant_scratch_bytes(M, K);
    if (need > cap) {
        free(buf);
        cap = (need + 4095) / 4096 * 4096;
        buf = aligned_alloc(64, cap);
        pthread_once(&tiles_once, tiles_key_create);
        (void)pthread_setspecific(tiles_key, buf);
        if (!buf) { cap = 0; return NULL; }
    }
    for (int t0 = 0; t0 < M; t0 += 8) { // each 4 bytes of K: one gather of the tile's tokens
        int nt = M - t0 < 8 ? M - t0 : 8;
        const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(K / 4));
        const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(nt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const int *from = (const int *)(x->q + (size_t)t0 * K);
        int8_t *to = (int8_t *)tile_of(buf, t0 / 8, K).q;
        for (size_t g = 0; g < (size_t)K / 4; g++)
            _mm256_store_si256((__m256i *)(to + 32 * g),
                               _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), from + g, at, live, 4));
    }
    for (int m = 0; m < M; m++) {
        Tile tile = tile_of(buf, m / 8, K);
        int32_t *off = (int32_t *)tile.off + m % 8;
        float *sc = (float *)tile.scale + m % 8;
        QuantX xm = quantx_token(x, m, K);
        for (size_t b = 0; b < nb; b++) {
            off[8 * b] = xm.qoff[2 * b + !q4];
            sc[8 * b] = xm.scale[b];
        }
    }
    return buf;
}
#else
#define T_MAX 2

// A group's accumulators for T tokens (two halves of 8 rows each): zero, or
// with blocks b0.. going on from where the previous ones left the sums; and
// the tokens' activations.
static inline __attribute__((always_inline)) void avx2_group_start(__m256 acc[][2], QuantX *xt, const QuantX *x, int K,
                                                                   int T, const float *out, size_t ldo, int nrows, int b0) {
    for (int t = 0; t < T; t++) {
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();
        if (b0) {
            float tmp[QROWS] = {0};
            memcpy(tmp, out + t * ldo, nrows * sizeof(float));
            acc[t][0] = _mm256_loadu_ps(tmp);
            acc[t][1] = _mm256_loadu_ps(tmp + 8);
        }
        xt[t] = quantx_token(x, t, K);
    }
}

// The accumulators' first nrows rows to out, token by token.
static inline __attribute__((always_inline)) void avx2_group_end(__m256 acc[][2], int T, float *out, size_t ldo, int nrows) {
    for (int t = 0; t < T; t++) {
        if (nrows == QROWS) {
            _mm256_storeu_ps(out + t * ldo, acc[t][0]);
            _mm256_storeu_ps(out + t * ldo + 8, acc[t][1]);
        } else {
            float tmp[QROWS];
            _mm256_storeu_ps(tmp, acc[t][0]);
            _mm256_storeu_ps(tmp + 8, acc[t][1]);
            memcpy(out + t * ldo, tmp, nrows * sizeof(float));
        }
    }
}

// One group against T tokens, as two halves of 8 rows (AVX2 has 16 registers).
static inline __attribute__((always_inline)) void quant_group(int q4, const uint8_t *grp, int K, const QuantX *x,
                                                              int tiled, const Tile *tile, int T, float *out, size_t ldo,
                                                              int nrows, int fetch, int b0, int b1) {
    (void)tiled, (void)tile; // (AVX2 reads the activations where they are)
    int nb = K / QBLOCK;
    const uint16_t *scale = (const uint16_t *)grp;
    const uint8_t *wq = grp + (size_t)nb * 32;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    __m256 acc[T_MAX][2];
    QuantX xt[T_MAX];
    avx2_group_start(acc, xt, x, K, T, out, ldo, nrows, b0);
    for (int b = b0; b < b1; b++) {
        __m256 dw[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + b * QROWS))),
                        _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + b * QROWS + 8)))};
        __m256i is[T_MAX][2];
        if (q4) {
            // vpmaddubsw pairs are at most 2*15*127: the block's 8 steps add up in int16 (<= 30480)
            const uint8_t *wb = wq + (size_t)b * 256;
            __m256i s16[T_MAX][2];
            for (int t = 0; t < T; t++) s16[t][0] = s16[t][1] = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                if (fetch) prefetch(wb + 64 * c);
                for (int h = 0; h < 2; h++) {
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + 64 * c + 32 * h));
                    __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                    for (int t = 0; t < T; t++) {
                        const int8_t *xq = xt[t].q + b * QBLOCK + 8 * c;
                        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(xq))),
                                                     _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(xq + 4))));
                        s16[t][h] = _mm256_add_epi16(s16[t][h], p);
                    }
                }
            }
            for (int t = 0; t < T; t++) {
                __m256i o = _mm256_set1_epi32(xt[t].qoff[2 * b]);
                for (int h = 0; h < 2; h++) is[t][h] = _mm256_add_epi32(_mm256_madd_epi16(s16[t][h], ones), o);
            }
        } else {
            // q = u ^ 0x80 signed; vpmaddubsw multiplies unsigned by signed, so |x| by q with x's sign
            const uint8_t *wb = wq + (size_t)b * 512;
            for (int t = 0; t < T; t++) is[t][0] = is[t][1] = _mm256_setzero_si256();
            for (int s = 0; s < 8; s++) {
                if (fetch) prefetch(wb + 64 * s);
                __m256i w[2] = {_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + 64 * s)), flip),
                                _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(wb + 64 * s + 32)), flip)};
                for (int t = 0; t < T; t++) {
                    __m256i xv = _mm256_set1_epi32(load_i32(xt[t].q + b * QBLOCK + 4 * s)), ax = _mm256_abs_epi8(xv);
                    for (int h = 0; h < 2; h++)
                        is[t][h] = _mm256_add_epi32(is[t][h],
                                                    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w[h], xv)), ones));
                }
            }
        }
        for (int t = 0; t < T; t++)
            for (int h = 0; h < 2; h++)
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t][h]),
                                            _mm256_mul_ps(dw[h], _mm256_set1_ps(xt[t].scale[b])), acc[t][h]);
    }
    avx2_group_end(acc, T, out, ldo, nrows);
}

// q3 and q2 groups against T tokens, as two halves of 8 rows: each half's
// codebooks become vpshufb tables (a 128-bit lane holds 4 rows, 4 levels each:
// q3's 8 levels in two tables, picked by the code's top bit), and the signed
// levels multiply the activations as q8's do (|x| times the level with x's sign).
static inline __attribute__((always_inline)) void coded_group(int q3, const uint8_t *grp, int K, const QuantX *x,
                                                              int T, float *out, size_t ldo, int nrows, int fetch,
                                                              int b0, int b1) {
    const size_t bbytes = coded_block_bytes(q3 ? WEIGHT_Q3 : WEIGHT_Q2);
    const __m256i three = _mm256_set1_epi8(3), nib = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i rowoff = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                            0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    // each book's levels as one int32 (q3: levels 0..3, then 4..7), books 0..7 and 8..15
    int32_t packed[2][16];
    for (int c = 0; c < 16; c++)
        for (int part = 0; part < 2; part++) {
            const int8_t *lv = q3 ? q3_levels[c] + 4 * part : q2_levels[c];
            packed[part][c] = (int32_t)((uint32_t)(uint8_t)lv[0] | (uint32_t)(uint8_t)lv[1] << 8 |
                                        (uint32_t)(uint8_t)lv[2] << 16 | (uint32_t)(uint8_t)lv[3] << 24);
        }
    const __m256i cb[2][2] = {{_mm256_loadu_si256((const __m256i *)packed[0]), _mm256_loadu_si256((const __m256i *)(packed[0] + 8))},
                              {_mm256_loadu_si256((const __m256i *)packed[1]), _mm256_loadu_si256((const __m256i *)(packed[1] + 8))}};
    __m256 d[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)grp)),
                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 16)))};
    __m256 acc[T_MAX][2];
    QuantX xt[T_MAX];
    avx2_group_start(acc, xt, x, K, T, out, ldo, nrows, b0);
    for (int b = b0; b < b1; b++) {
        const uint8_t *blk = grp + 32 + (size_t)b * bbytes, *codes = blk + (q3 ? 8 : 16);
        if (fetch) { prefetch(blk); prefetch(blk + 64); prefetch(blk + 128); if (q3) prefetch(blk + 192); }
        __m256i is[T_MAX][2];
        for (int h = 0; h < 2; h++) {
            for (int t = 0; t < T; t++) is[t][h] = _mm256_setzero_si256();
            // the 8 rows' books, one a lane: q2 a byte each (two sub-blocks), q3 a nibble each
            __m256i bk;
            if (q3) {
                uint32_t four;
                memcpy(&four, blk + 4 * h, 4);
                __m128i pairs = _mm_shuffle_epi8(_mm_cvtsi32_si128((int)four), _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
                bk = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(pairs), _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)), nib);
            } else {
                bk = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 8 * h)));
            }
            const __m256i *top = (const __m256i *)(codes + 128 + 32 * h);
            for (int c = 0; c < 2; c++) {
                __m256i book = q3 ? bk : _mm256_and_si256(c ? _mm256_srli_epi32(bk, 4) : bk, nib);
                __m256i hi8 = _mm256_cmpgt_epi32(book, seven);
                __m256i tl = _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(cb[0][0], book), _mm256_permutevar8x32_epi32(cb[0][1], book), hi8);
                __m256i th = q3 ? _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(cb[1][0], book),
                                                     _mm256_permutevar8x32_epi32(cb[1][1], book), hi8) : tl;
                __m256i p = _mm256_loadu_si256((const __m256i *)(codes + 64 * c + 32 * h));
                for (int j = 0; j < 4; j++) {
                    int s = 4 * c + j;
                    __m256i idx = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(p, 2 * j), three), rowoff);
                    __m256i w = _mm256_shuffle_epi8(tl, idx);
                    if (q3) w = _mm256_blendv_epi8(w, _mm256_shuffle_epi8(th, idx), _mm256_slli_epi16(_mm256_loadu_si256(top), 7 - s));
                    for (int t = 0; t < T; t++) {
                        __m256i xv = _mm256_set1_epi32(load_i32(xt[t].q + b * QBLOCK + 4 * s));
                        __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(w, xv));
                        is[t][h] = _mm256_add_epi32(is[t][h], _mm256_madd_epi16(prod, ones));
                    }
                }
            }
        }
        for (int t = 0; t < T; t++)
            for (int h = 0; h < 2; h++)
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[t][h]), _mm256_mul_ps(d[h], _mm256_set1_ps(xt[t].scale[b])),
                                            acc[t][h]);
    }
    avx2_group_end(acc, T, out, ldo, nrows);
}
#endif

// Calls GROUP(T) with T a constant, so that each tile is compiled with its
// accumulators in registers.
#if T_MAX == 8
#define T_SHAPES(nt, GROUP)                                                                              \
    switch (nt) {                                                                                        \
    case 1: GROUP(1); break; case 2: GROUP(2); break; case 3: GROUP(3); break; case 4: GROUP(4); break;  \
    case 5: GROUP(5); break; case 6: GROUP(6); break; case 7: GROUP(7); break; default: GROUP(8); break; \
    }
#else
#define T_SHAPES(nt, GROUP) switch (nt) { case 1: GROUP(1); break; default: GROUP(2); break; }
#endif

// With more tokens than one pass takes, a group's K is cut into spans of about
// SPAN_BYTES of weights, and every pass runs over one span before the next
// span begins: the passes after the first find the span in L1, not L2. (The
// sums go on from span to span in the same order: the results do not change.)
#ifndef SPAN_BYTES
#define SPAN_BYTES 8192
#endif

#ifdef KERNELS_AVX512
// Whether a tiled pass (a prompt's) prefetches along the weights as decoding
// does. The CPUs differ: on an Intel Xeon (Sapphire Rapids) the hardware
// prefetcher alone did better (a q8 prompt 7% faster without), on an AMD EPYC
// of the Zen 5 kind the kernel streamed at 60% of its in-cache speed without
// and 95% with (make bench-kernel: q8 150 and 240 G multiply-adds/s).
static int tiled_fetch_choice;
static pthread_once_t tiled_fetch_once = PTHREAD_ONCE_INIT;
static void tiled_fetch_choose(void) {
    const char *force = getenv("MIXTRAL_TILED_FETCH"); // 0 or 1: either on any CPU, to measure them
    tiled_fetch_choice = force && (!strcmp(force, "0") || !strcmp(force, "1")) ? force[0] == '1'
                                                                               : !__builtin_cpu_is("intel");
}
static int tiled_fetch(void) {
    pthread_once(&tiled_fetch_once, tiled_fetch_choose);
    return tiled_fetch_choice;
}
#endif

static void x86_gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    if (type == WEIGHT_Q6) { ref_gemm_quant(type, w, K, N, x, M, out, ldo); return; } // the embedding's type
#if defined(KERNELS_AVX512) && !defined(KERNELS_AVX512_VBMI)
    if (weight_is_coded(type)) { ref_gemm_quant(type, w, K, N, x, M, out, ldo); return; }
#endif
    size_t gbytes = quant_group_bytes(type, K);
    size_t block_bytes = weight_is_coded(type) ? coded_block_bytes(type) : (gbytes - (size_t)K) / (K / QBLOCK); // weights
    int nb = K / QBLOCK, span = M <= T_MAX ? nb : (int)(SPAN_BYTES / block_bytes);
    if (span < 1) span = 1;
    const int8_t *tiles = NULL; // (AVX-512, 5 tokens or more: the activations regrouped by pass)
#ifdef KERNELS_AVX512
    if (M >= 5) tiles = tile_activations(x, M, K, type == WEIGHT_Q4);
    const int fetch_tiled = tiled_fetch();
#else
    const int fetch_tiled = 0; // (no tiled passes)
#endif
    for (int g = 0; g * QROWS < N; g++) {
        const uint8_t *grp = w + (size_t)g * gbytes;
        int nrows = N - g * QROWS < QROWS ? N - g * QROWS : QROWS;
        for (int b0 = 0; b0 < nb; b0 += span) {
            int b1 = b0 + span < nb ? b0 + span : nb;
            // The first pass prefetches along the stream; a tiled one only where tiled_fetch says
            for (int t = 0; t < M; t += T_MAX) {
                int nt = M - t < T_MAX ? M - t : T_MAX;
                QuantX xt = quantx_token(x, t, K);
                float *o = out + (size_t)t * ldo + g * QROWS;
                const Tile tile = tiles ? tile_of(tiles, t / 8, K) : (Tile){NULL, NULL, NULL};
#define Q3_GROUP(T) coded_group(1, grp, K, &xt, 0, &tile, T, o, ldo, nrows, t == 0, b0, b1)
#define Q2_GROUP(T) coded_group(0, grp, K, &xt, 0, &tile, T, o, ldo, nrows, t == 0, b0, b1)
#define Q3_TILED(T) coded_group(1, grp, K, &xt, 1, &tile, T, o, ldo, nrows, fetch_tiled && t == 0, b0, b1)
#define Q2_TILED(T) coded_group(0, grp, K, &xt, 1, &tile, T, o, ldo, nrows, fetch_tiled && t == 0, b0, b1)
#define Q8_GROUP(T) quant_group(0, grp, K, &xt, 0, &tile, T, o, ldo, nrows, t == 0, b0, b1)
#define Q4_GROUP(T) quant_group(1, grp, K, &xt, 0, &tile, T, o, ldo, nrows, t == 0, b0, b1)
#define Q8_TILED(T) quant_group(0, grp, K, &xt, 1, &tile, T, o, ldo, nrows, fetch_tiled && t == 0, b0, b1)
#define Q4_TILED(T) quant_group(1, grp, K, &xt, 1, &tile, T, o, ldo, nrows, fetch_tiled && t == 0, b0, b1)
#ifdef KERNELS_AVX512_VBMI
                if (type == WEIGHT_Q3 || type == WEIGHT_Q2) {
                    if (tiles && nt >= 5) {
                        if (type == WEIGHT_Q3) T_SHAPES(nt, Q3_TILED)
                        else T_SHAPES(nt, Q2_TILED)
                    } else if (type == WEIGHT_Q3) T_SHAPES(nt, Q3_GROUP)
                    else T_SHAPES(nt, Q2_GROUP)
                    continue;
                }
#elif !defined(KERNELS_AVX512)
#define Q3_AVX2(T) coded_group(1, grp, K, &xt, T, o, ldo, nrows, t == 0, b0, b1)
#define Q2_AVX2(T) coded_group(0, grp, K, &xt, T, o, ldo, nrows, t == 0, b0, b1)
                if (type == WEIGHT_Q3) { T_SHAPES(nt, Q3_AVX2) continue; }
                if (type == WEIGHT_Q2) { T_SHAPES(nt, Q2_AVX2) continue; }
#undef Q3_AVX2
#undef Q2_AVX2
#endif
                if (tiles && nt >= 5) {
                    if (type == WEIGHT_Q8) T_SHAPES(nt, Q8_TILED)
                    else T_SHAPES(nt, Q4_TILED)
                } else if (type == WEIGHT_Q8) T_SHAPES(nt, Q8_GROUP)
                else T_SHAPES(nt, Q4_GROUP)
#undef Q3_GROUP
#undef Q2_GROUP
#undef Q3_TILED
#undef Q2_TILED
#undef Q8_GROUP
#undef Q4_GROUP
#undef Q8_TILED
#undef Q4_TILED
            }
        }
    }
}
#ifdef KERNELS_AVX512
// bf16 products on AVX-512: a tile of up to 4 rows x 4 tokens, each output in
// one 16-lane accumulator, 16 weights at a time (bf16 to f32: zero-extend and
// shift), then the lanes summed and the last K % 16 terms added in order. The
// same arithmetic for every output whatever the tile, so M = 1 (decoding) and
// a prompt agree bit for bit. With several passes of tokens, K is cut into
// spans whose rows stay in L1 across the passes; the accumulators wait in acc
// between spans (stored and reloaded as they are: the results do not change).
#define BF16_SPAN 1024

static inline __m512 bf16x16_ps(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __attribute__((always_inline)) void bf16_tile(const uint16_t *w, int K, int R, const float *x, int T,
                                                            int k0, int k1, __m512 *acc, int first, int fetch) {
    __m512 a[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) a[r][t] = first ? _mm512_setzero_ps() : acc[r * 4 + t];
    for (int k = k0; k < k1; k += 16) {
        __m512 wv[4];
        for (int r = 0; r < R; r++) {
            if (fetch && k % 32 == 0) prefetch(w + (size_t)r * K + k);
            wv[r] = bf16x16_ps(w + (size_t)r * K + k);
        }
        for (int t = 0; t < T; t++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)t * K + k);
            for (int r = 0; r < R; r++) a[r][t] = _mm512_fmadd_ps(wv[r], xv, a[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r * 4 + t] = a[r][t];
}

#define BF16_TILES(R, T, CALL)                                                            \
    switch ((R) * 4 + (T)) {                                                              \
    case 5: CALL(1, 1); break; case 6: CALL(1, 2); break; case 7: CALL(1, 3); break;      \
    case 8: CALL(1, 4); break; case 9: CALL(2, 1); break; case 10: CALL(2, 2); break;     \
    case 11: CALL(2, 3); break; case 12: CALL(2, 4); break; case 13: CALL(3, 1); break;   \
    case 14: CALL(3, 2); break; case 15: CALL(3, 3); break; case 16: CALL(3, 4); break;   \
    case 17: CALL(4, 1); break; case 18: CALL(4, 2); break; case 19: CALL(4, 3); break;   \
    default: CALL(4, 4); break;                                                           \
    }

// Output (r, t) of a tile: the lanes of its accumulator summed, then the last K % 16 terms.
static inline float bf16_finish(__m512 acc, const uint16_t *w, const float *x, int K16, int K) {
    float sum = K16 ? _mm512_reduce_add_ps(acc) : 0.0f;
    for (int k = K16; k < K; k++) sum += bf16_to_f32(w[k]) * x[k];
    return sum;
}

static void avx512_gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo) {
    int K16 = K / 16 * 16;
    if (M <= 4) { // one pass: whole rows, streaming from memory (decoding)
        __m512 acc[16];
        for (int r0 = 0; r0 < N; r0 += 4) {
            int R = N - r0 < 4 ? N - r0 : 4, T = M;
            const uint16_t *wr = w + (size_t)r0 * K;
#define RUN(R_, T_) bf16_tile(wr, K, R_, x, T_, 0, K16, acc, 1, 1)
            BF16_TILES(R, T, RUN)
#undef RUN
            for (int r = 0; r < R; r++)
                for (int t = 0; t < T; t++)
                    out[(size_t)t * ldo + r0 + r] = bf16_finish(acc[r * 4 + t], wr + (size_t)r * K, x + (size_t)t * K, K16, K);
        }
        return;
    }
    __m512 *accs = aligned_alloc(64, sizeof(__m512) * 16 * ((M + 3) / 4)); // 16 per 4 tokens
    for (int r0 = 0; r0 < N; r0 += 4) {
        int R = N - r0 < 4 ? N - r0 : 4;
        const uint16_t *wr = w + (size_t)r0 * K;
        for (int k0 = 0; k0 < K16; k0 += BF16_SPAN) {
            int k1 = k0 + BF16_SPAN < K16 ? k0 + BF16_SPAN : K16;
            for (int t0 = 0; t0 < M; t0 += 4) {
                int T = M - t0 < 4 ? M - t0 : 4;
// (no software prefetch here: measured 15% slower prompts with it)
#define RUN(R_, T_) bf16_tile(wr, K, R_, x + (size_t)t0 * K, T_, k0, k1, accs + 16 * (t0 / 4), k0 == 0, 0)
                BF16_TILES(R, T, RUN)
#undef RUN
            }
        }
        for (int t = 0; t < M; t++)
            for (int r = 0; r < R; r++)
                out[(size_t)t * ldo + r0 + r] = bf16_finish(K16 ? accs[16 * (t / 4) + r * 4 + t % 4] : _mm512_setzero_ps(),
                                                            wr + (size_t)r * K, x + (size_t)t * K, K16, K);
    }
    free(accs);
}
#endif

#ifdef KERNELS_AVX512_BF16
// bf16 products with bf16 activations (--bf16-activations): vdpbf16ps, 32
// weights of a row and 32 activations of a token a step (pairs of neighbours
// in each f32 lane, which row-major rows give as they are: no conversion, no
// regrouping), in tiles of up to 4 rows x 4 tokens as avx512_gemm_bf16's, and
// with its spans of K for prompts. The last K % 32 terms are added in order.
static inline __attribute__((always_inline)) void bf16x_tile(const uint16_t *w, int K, int R, const uint16_t *x, int T,
                                                             int k0, int k1, __m512 *acc, int first) {
    __m512 a[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) a[r][t] = first ? _mm512_setzero_ps() : acc[r * 4 + t];
    for (int k = k0; k < k1; k += 32) {
        __m512bh wv[4];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_loadu_si512(w + (size_t)r * K + k);
        for (int t = 0; t < T; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (size_t)t * K + k);
            for (int r = 0; r < R; r++) a[r][t] = _mm512_dpbf16_ps(a[r][t], wv[r], xv);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r * 4 + t] = a[r][t];
}

static inline float bf16x_finish(__m512 acc, const uint16_t *w, const uint16_t *x, int K32, int K) {
    float sum = K32 ? _mm512_reduce_add_ps(acc) : 0.0f;
    for (int k = K32; k < K; k++) sum += bf16_to_f32(w[k]) * bf16_to_f32(x[k]);
    return sum;
}

static void avx512_gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo) {
    int K32 = K / 32 * 32, one_pass = M <= 4;
    __m512 *accs = aligned_alloc(64, sizeof(__m512) * 16 * ((M + 3) / 4)); // 16 per 4 tokens
    for (int r0 = 0; r0 < N; r0 += 4) {
        int R = N - r0 < 4 ? N - r0 : 4;
        const uint16_t *wr = w + (size_t)r0 * K;
        for (int k0 = 0; k0 < K32; k0 += one_pass ? K32 : BF16_SPAN) {
            int k1 = one_pass || k0 + BF16_SPAN > K32 ? K32 : k0 + BF16_SPAN;
            for (int t0 = 0; t0 < M; t0 += 4) {
                int T = M - t0 < 4 ? M - t0 : 4;
#define RUN(R_, T_) bf16x_tile(wr, K, R_, x + (size_t)t0 * K, T_, k0, k1, accs + 16 * (t0 / 4), k0 == 0)
                BF16_TILES(R, T, RUN)
#undef RUN
            }
        }
        for (int t = 0; t < M; t++)
            for (int r = 0; r < R; r++)
                out[(size_t)t * ldo + r0 + r] = bf16x_finish(K32 ? accs[16 * (t / 4) + r * 4 + t % 4] : _mm512_setzero_ps(),
                                                             wr + (size_t)r * K, x + (size_t)t * K, K32, K);
    }
    free(accs);
}
#endif

#endif // KERNELS_AVX2

// ----------------------------------------------------------------------------
// 3. ARM: NEON
#ifdef KERNELS_NEON

static float neon_dot_f32(const float *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0), a2 = vdupq_n_f32(0), a3 = vdupq_n_f32(0);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(w + i + 8), vld1q_f32(x + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(w + i + 12), vld1q_f32(x + i + 12));
    }
    for (; i + 4 <= n; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static float neon_dot_bf16(const uint16_t *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(w + i);
        a0 = vfmaq_f32(a0, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16)), vld1q_f32(x + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

// 4 rows x 4 int8 products summed into the 4 int32 lanes (the rows).
static inline int32x4_t dot4_s8(int32x4_t acc, int8x16_t w, int8x16_t x) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, w, x);
#else
    int32x4_t a = vpaddlq_s16(vmull_s8(vget_low_s8(w), vget_low_s8(x)));  // rows 0, 1: pairs
    int32x4_t b = vpaddlq_s16(vmull_s8(vget_high_s8(w), vget_high_s8(x))); // rows 2, 3: pairs
    return vaddq_s32(acc, vpaddq_s32(a, b));
#endif
}

// One group against one token: the 16 rows as four vectors of 4 lanes.
static void neon_group(int q4, const uint8_t *grp, int K, const QuantX *x, float *out, int nrows) {
    int nb = K / QBLOCK;
    const uint16_t *scale = (const uint16_t *)grp;
    const uint8_t *wq = grp + (size_t)nb * 32;
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
    for (int b = 0; b < nb; b++) {
        int32x4_t is[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
        const int8_t *xq = x->q + b * QBLOCK;
        if (q4) {
            const uint8x16_t low = vdupq_n_u8(0x0F);
            const int8x16_t eight = vdupq_n_s8(8);
            for (int c = 0; c < 4; c++) {
                int32_t xa, xb;
                memcpy(&xa, xq + 8 * c, 4);
                memcpy(&xb, xq + 8 * c + 4, 4);
                for (int k = 0; k < 4; k++) {
                    uint8x16_t raw = vld1q_u8(wq + (size_t)b * 256 + 64 * c + 16 * k);
                    int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, low)), eight);
                    int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
                    is[k] = dot4_s8(is[k], lo, vreinterpretq_s8_s32(vdupq_n_s32(xa)));
                    is[k] = dot4_s8(is[k], hi, vreinterpretq_s8_s32(vdupq_n_s32(xb)));
                }
            }
        } else {
            const uint8x16_t flip = vdupq_n_u8(0x80);
            for (int s = 0; s < 8; s++) {
                int32_t xv;
                memcpy(&xv, xq + 4 * s, 4);
                for (int k = 0; k < 4; k++) {
                    int8x16_t w = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wq + (size_t)b * 512 + 64 * s + 16 * k), flip));
                    is[k] = dot4_s8(is[k], w, vreinterpretq_s8_s32(vdupq_n_s32(xv)));
                }
            }
        }
        for (int k = 0; k < 4; k++) {
            float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(scale + b * QROWS + 4 * k)));
            acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(is[k]), vmulq_n_f32(dw, x->scale[b]));
        }
    }
    float tmp[QROWS];
    for (int k = 0; k < 4; k++) vst1q_f32(tmp + 4 * k, acc[k]);
    memcpy(out, tmp, nrows * sizeof(float));
}

// A q3 or q2 group against one token: each 4 rows' bytes index the codebooks
// (book << 2 | code for q2's 64 levels, book << 3 | code for q3's 128) with
// tbl lookups of 64 bytes (q3: two, the second for indices 64..127), and the
// signed levels multiply the activations.
static void neon_coded_group(int q3, const uint8_t *grp, int K, const QuantX *x, float *out, int nrows) {
    int nb = K / QBLOCK;
    const size_t bbytes = coded_block_bytes(q3 ? WEIGHT_Q3 : WEIGHT_Q2);
    const int8_t *lv = q3 ? &q3_levels[0][0] : &q2_levels[0][0];
    const int8x16x4_t t0 = {{vld1q_s8(lv), vld1q_s8(lv + 16), vld1q_s8(lv + 32), vld1q_s8(lv + 48)}};
    const int8x16x4_t t1 = q3 ? (int8x16x4_t){{vld1q_s8(lv + 64), vld1q_s8(lv + 80), vld1q_s8(lv + 96), vld1q_s8(lv + 112)}} : t0;
    static const uint8_t rep_rows[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};  // byte 4r+i: row r's book
    static const uint8_t rep_pairs[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}; // q3: its pair's byte
    static const int8_t odd_shift[16] = {0, 0, 0, 0, -4, -4, -4, -4, 0, 0, 0, 0, -4, -4, -4, -4};
    const uint8x16_t three = vdupq_n_u8(3), fifteen = vdupq_n_u8(15), sixtyfour = vdupq_n_u8(64);
    float32x4_t d[4], acc[4];
    for (int k = 0; k < 4; k++) {
        d[k] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)grp + 4 * k)));
        acc[k] = vdupq_n_f32(0);
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = grp + 32 + (size_t)b * bbytes, *codes = blk + (q3 ? 8 : 16);
        const int8_t *xq = x->q + b * QBLOCK;
        int32x4_t is[4] = {vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0), vdupq_n_s32(0)};
        for (int k = 0; k < 4; k++) {
            uint8x16_t bk[2];
            if (q3) {
                uint16_t two;
                memcpy(&two, blk + 2 * k, 2);
                uint8x16_t v = vqtbl1q_u8(vreinterpretq_u8_u16(vdupq_n_u16(two)), vld1q_u8(rep_pairs));
                bk[0] = bk[1] = vshlq_n_u8(vandq_u8(vshlq_u8(v, vld1q_s8(odd_shift)), fifteen), 3);
            } else {
                uint32_t four;
                memcpy(&four, blk + 4 * k, 4);
                uint8x16_t v = vqtbl1q_u8(vreinterpretq_u8_u32(vdupq_n_u32(four)), vld1q_u8(rep_rows));
                bk[0] = vshlq_n_u8(vandq_u8(v, fifteen), 2);
                bk[1] = vshlq_n_u8(vshrq_n_u8(v, 4), 2);
            }
            uint8x16_t top = q3 ? vld1q_u8(codes + 128 + 16 * k) : vdupq_n_u8(0);
            for (int c = 0; c < 2; c++) {
                uint8x16_t p = vld1q_u8(codes + 64 * c + 16 * k);
                for (int j = 0; j < 4; j++) {
                    int s = 4 * c + j;
                    uint8x16_t code = vandq_u8(vshlq_u8(p, vdupq_n_s8((int8_t)(-2 * j))), three);
                    int8x16_t w;
                    if (q3) {
                        uint8x16_t hi = vshlq_n_u8(vandq_u8(vshlq_u8(top, vdupq_n_s8((int8_t)-s)), vdupq_n_u8(1)), 2);
                        uint8x16_t idx = vorrq_u8(vorrq_u8(bk[c], code), hi);
                        w = vqtbx4q_s8(vqtbl4q_s8(t0, idx), t1, vsubq_u8(idx, sixtyfour));
                    } else {
                        w = vqtbl4q_s8(t0, vorrq_u8(bk[c], code));
                    }
                    int32_t xv;
                    memcpy(&xv, xq + 4 * s, 4);
                    is[k] = dot4_s8(is[k], w, vreinterpretq_s8_s32(vdupq_n_s32(xv)));
                }
            }
        }
        for (int k = 0; k < 4; k++) acc[k] = vfmaq_f32(acc[k], vcvtq_f32_s32(is[k]), vmulq_n_f32(d[k], x->scale[b]));
    }
    float tmp[QROWS];
    for (int k = 0; k < 4; k++) vst1q_f32(tmp + 4 * k, acc[k]);
    memcpy(out, tmp, nrows * sizeof(float));
}

static void neon_gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    if (type == WEIGHT_Q6) { ref_gemm_quant(type, w, K, N, x, M, out, ldo); return; } // the embedding's type
    for (int g = 0; g * QROWS < N; g++) {
        int nrows = N - g * QROWS < QROWS ? N - g * QROWS : QROWS;
        const uint8_t *grp = w + (size_t)g * quant_group_bytes(type, K);
        for (int m = 0; m < M; m++) {
            QuantX xm = quantx_token(x, m, K);
            float *o = out + (size_t)m * ldo + g * QROWS;
            if (weight_is_coded(type)) neon_coded_group(type == WEIGHT_Q3, grp, K, &xm, o, nrows);
            else neon_group(type == WEIGHT_Q4, grp, K, &xm, o, nrows);
        }
    }
}

// The KV cache's attention kernels (see the x86 ones): each row decoded to f32
// once, 8 values at a time (kv8_f32), for the 4 queries of a tile; 4 rows x 4
// queries of scores summed across lanes by pairwise adds.
static inline float32x4_t i8x4_f32(int8x8_t v, int high) {
    int16x8_t w = vmovl_s8(v);
    return vcvtq_f32_s32(vmovl_s16(high ? vget_high_s16(w) : vget_low_s16(w)));
}

// 8 values of a row from value i (a multiple of 8) on, as f32, in v[0] and v[1].
static inline void kv8_f32(int type, const uint8_t *row, int i, float32x4_t v[2]) {
    if (type == KV_F32) {
        v[0] = vld1q_f32((const float *)row + i);
        v[1] = vld1q_f32((const float *)row + i + 4);
        return;
    }
    if (type == KV_BF16) {
        uint16x8_t h = vld1q_u16((const uint16_t *)row + i);
        v[0] = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16));
        v[1] = vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16));
        return;
    }
    uint16_t h;
    int8x8_t q;
    if (type == KV_Q8) {
        memcpy(&h, row, 2);
        q = vld1_s8((const int8_t *)row + 2 + i);
    } else { // q4: a quarter of a block, 4 bytes, values in the low then high nibble of each
        const uint8_t *b = row + (size_t)(i / 32) * 18;
        uint32_t raw;
        memcpy(&h, b, 2);
        memcpy(&raw, b + 2 + i % 32 / 2, 4);
        uint8x8_t r = vcreate_u8(raw);
        q = vsub_s8(vreinterpret_s8_u8(vzip1_u8(vand_u8(r, vdup_n_u8(15)), vshr_n_u8(r, 4))), vdup_n_s8(8));
    }
    float d = f16_to_f32(h);
    v[0] = vmulq_n_f32(i8x4_f32(q, 0), d);
    v[1] = vmulq_n_f32(i8x4_f32(q, 1), d);
}

static inline __attribute__((always_inline)) void neon_kv_scores_t(int type, const float *q, int g, const uint8_t *rows,
                                                                   size_t stride, int n, int hd, float scale, float *att, size_t ld) {
    for (int r0 = 0; r0 < g; r0 += 4) {
        int nq = g - r0 < 4 ? g - r0 : 4;
        const float *qs[4];
        for (int r = 0; r < 4; r++) qs[r] = q + (size_t)(r0 + (r < nq ? r : 0)) * hd;
        for (int t0 = 0; t0 < n; t0 += 4) {
            int nt = n - t0 < 4 ? n - t0 : 4;
            const uint8_t *ks[4];
            for (int t = 0; t < 4; t++) ks[t] = rows + (size_t)(t0 + (t < nt ? t : 0)) * stride;
            float32x4_t acc[4][4];
            for (int r = 0; r < 4; r++)
                for (int t = 0; t < 4; t++) acc[r][t] = vdupq_n_f32(0);
            for (int i = 0; i < hd; i += 8) {
                float32x4_t k[4][2];
                for (int t = 0; t < 4; t++) kv8_f32(type, ks[t], i, k[t]);
                for (int r = 0; r < 4; r++) {
                    float32x4_t q0 = vld1q_f32(qs[r] + i), q1 = vld1q_f32(qs[r] + i + 4);
                    for (int t = 0; t < 4; t++) acc[r][t] = vfmaq_f32(vfmaq_f32(acc[r][t], q0, k[t][0]), q1, k[t][1]);
                }
            }
            for (int r = 0; r < nq; r++) { // lane t: the sum of acc[r][t]
                float s[4];
                vst1q_f32(s, vmulq_n_f32(vpaddq_f32(vpaddq_f32(acc[r][0], acc[r][1]), vpaddq_f32(acc[r][2], acc[r][3])), scale));
                for (int t = 0; t < nt; t++) att[(size_t)(r0 + r) * ld + t0 + t] = s[t];
            }
        }
    }
}

// Rows in blocks of 64 (they stay in L1 for the passes), 16 dimensions of 4 queries a pass.
static inline __attribute__((always_inline)) void neon_kv_mix_t(int type, const float *att, size_t ld, int g, const uint8_t *rows,
                                                                size_t stride, int n, int hd, float *out) {
    enum { BLOCK = 64 };
    for (int r0 = 0; r0 < g; r0 += 4) {
        int nq = g - r0 < 4 ? g - r0 : 4;
        const float *a[4];
        for (int r = 0; r < 4; r++) a[r] = att + (size_t)(r0 + (r < nq ? r : 0)) * ld;
        float *o = out + (size_t)r0 * hd;
        for (int t0 = 0; t0 < n; t0 += BLOCK) {
            int t1 = n - t0 < BLOCK ? n : t0 + BLOCK;
            for (int i = 0; i < hd; i += 16) {
                float32x4_t acc[4][4];
                for (int r = 0; r < 4; r++)
                    for (int c = 0; c < 4; c++) acc[r][c] = r < nq ? vld1q_f32(o + (size_t)r * hd + i + 4 * c) : vdupq_n_f32(0);
                for (int t = t0; t < t1; t++) {
                    const uint8_t *row = rows + (size_t)t * stride;
                    float32x4_t v[4];
                    kv8_f32(type, row, i, v);
                    kv8_f32(type, row, i + 8, v + 2);
                    for (int r = 0; r < 4; r++)
                        for (int c = 0; c < 4; c++) acc[r][c] = vfmaq_n_f32(acc[r][c], v[c], a[r][t]);
                }
                for (int r = 0; r < nq; r++)
                    for (int c = 0; c < 4; c++) vst1q_f32(o + (size_t)r * hd + i + 4 * c, acc[r][c]);
            }
        }
    }
}

// kv_scores against q8 keys (kernels.h): a query's and a row's int8 values
// multiplied and added 16 at a time (dot4_s8) into exact 32-bit sums.
static void neon_kv_scores_q8(const float *q, int g, const uint8_t *rows, size_t stride, int n, int hd, float scale,
                              float *att, size_t ld) {
    if (hd % 16 || hd > KV_Q8_HD) { ref_kv_scores(KV_Q8, q, g, rows, stride, n, hd, scale, att, ld); return; }
    int8_t qi[KV_Q8_HD];
    for (int r = 0; r < g; r++) {
        float dqs = kv_query_q8(q + (size_t)r * hd, hd, qi) * scale;
        for (int t = 0; t < n; t++) {
            const uint8_t *row = rows + (size_t)t * stride;
            int32x4_t acc = vdupq_n_s32(0);
            for (int i = 0; i < hd; i += 16) acc = dot4_s8(acc, vld1q_s8((const int8_t *)row + 2 + i), vld1q_s8(qi + i));
            att[(size_t)r * ld + t] = kv_score_q8(vaddvq_s32(acc), row, dqs);
        }
    }
}

static void neon_kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale,
                           float *att, size_t ld) {
    if (type == KV_Q8) { neon_kv_scores_q8(q, g, rows, stride, n, hd, scale, att, ld); return; }
    switch (hd % 32 ? -1 : type) {
    case KV_F32: neon_kv_scores_t(KV_F32, q, g, rows, stride, n, hd, scale, att, ld); break;
    case KV_BF16: neon_kv_scores_t(KV_BF16, q, g, rows, stride, n, hd, scale, att, ld); break;
    case KV_Q4: neon_kv_scores_t(KV_Q4, q, g, rows, stride, n, hd, scale, att, ld); break;
    default: ref_kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld);
    }
}

static void neon_kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out) {
    switch (hd % 32 ? -1 : type) {
    case KV_F32: neon_kv_mix_t(KV_F32, att, ld, g, rows, stride, n, hd, out); break;
    case KV_BF16: neon_kv_mix_t(KV_BF16, att, ld, g, rows, stride, n, hd, out); break;
    case KV_Q8: neon_kv_mix_t(KV_Q8, att, ld, g, rows, stride, n, hd, out); break;
    case KV_Q4: neon_kv_mix_t(KV_Q4, att, ld, g, rows, stride, n, hd, out); break;
    default: ref_kv_mix(type, att, ld, g, rows, stride, n, hd, out);
    }
}
#endif // KERNELS_NEON

// ----------------------------------------------------------------------------
// 4. the kernels mixtral.c calls: this build's best

#if defined(KERNELS_AVX2)
#if defined(KERNELS_AVX512)
const char kernels_simd_name[] = "avx512-vnni";
#else
const char kernels_simd_name[] = "avx2";
#endif
float dot_f32(const float *a, const float *b, int n) { return avx2_dot_f32(a, b, n); }
float dot_bf16(const uint16_t *w, const float *x, int n) { return avx2_dot_bf16(w, x, n); }
void gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    x86_gemm_quant(type, w, K, N, x, M, out, ldo);
}
#if defined(KERNELS_AVX512)
void gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo) {
    avx512_gemm_bf16(w, K, N, x, M, out, ldo);
}
#else
void gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16_with(dot_bf16, w, K, N, x, M, out, ldo);
}
#endif
#if defined(KERNELS_AVX512_BF16)
void gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo) {
    avx512_gemm_bf16x(w, K, N, x, M, out, ldo);
}
#else
void gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16x(w, K, N, x, M, out, ldo);
}
#endif
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) { avx2_quantize_blocks(qx, x, b0, b1); }
void swiglu(float *h, const float *h2, int64_t n) { avx2_swiglu(h, h2, n); }
void kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale, float *att,
               size_t ld) {
    x86_kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld);
}
void kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out) {
    x86_kv_mix(type, att, ld, g, rows, stride, n, hd, out);
}

#elif defined(KERNELS_NEON)
const char kernels_simd_name[] = "neon";
float dot_f32(const float *a, const float *b, int n) { return neon_dot_f32(a, b, n); }
float dot_bf16(const uint16_t *w, const float *x, int n) { return neon_dot_bf16(w, x, n); }
void gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16_with(dot_bf16, w, K, N, x, M, out, ldo);
}
void gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    neon_gemm_quant(type, w, K, N, x, M, out, ldo);
}
void gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16x(w, K, N, x, M, out, ldo);
}
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) { ref_quantize_blocks(qx, x, b0, b1); }
void swiglu(float *h, const float *h2, int64_t n) { ref_swiglu(h, h2, n); }
void kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale, float *att,
               size_t ld) {
    neon_kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld);
}
void kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out) {
    neon_kv_mix(type, att, ld, g, rows, stride, n, hd, out);
}

#else
const char kernels_simd_name[] = "portable C";
float dot_f32(const float *a, const float *b, int n) { return ref_dot_f32(a, b, n); }
float dot_bf16(const uint16_t *w, const float *x, int n) { return ref_dot_bf16(w, x, n); }
void gemm_bf16(const uint16_t *w, int K, int N, const float *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16(w, K, N, x, M, out, ldo);
}
void gemm_quant(int type, const uint8_t *w, int K, int N, const QuantX *x, int M, float *out, size_t ldo) {
    ref_gemm_quant(type, w, K, N, x, M, out, ldo);
}
void gemm_bf16x(const uint16_t *w, int K, int N, const uint16_t *x, int M, float *out, size_t ldo) {
    ref_gemm_bf16x(w, K, N, x, M, out, ldo);
}
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) { ref_quantize_blocks(qx, x, b0, b1); }
void swiglu(float *h, const float *h2, int64_t n) { ref_swiglu(h, h2, n); }
void kv_scores(int type, const float *q, int g, const void *rows, size_t stride, int n, int hd, float scale, float *att,
               size_t ld) {
    ref_kv_scores(type, q, g, rows, stride, n, hd, scale, att, ld);
}
void kv_mix(int type, const float *att, size_t ld, int g, const void *rows, size_t stride, int n, int hd, float *out) {
    ref_kv_mix(type, att, ld, g, rows, stride, n, hd, out);
}
#endif
