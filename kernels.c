// kernels.c: every instruction-set-specific line of mixtral.c, and the
// portable C kernels they are tested against. kernels.h is the contract: what
// each kernel computes, the layout it reads, and what stays bit-identical.
//
//   1. the portable reference kernels (every build)
//   2. x86-64: AVX2 + FMA, and AVX-512 (BW, VNNI) inside them where built for it
//   3. ARM: NEON (with the dot-product instructions where present)
//   4. the kernels mixtral.c calls: this build's best
//
// The instruction set is chosen at build time by the compiler's target macros
// (-march=native by default; make ARCH= builds the portable kernels alone).

#include "kernels.h"

#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KERNELS_AVX2
#elif defined(__ARM_NEON)
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

float ref_dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K) {
    float s = 0.0f;
    for (int b = 0; b < K / QBLOCK; b++) {
        int32_t isum = 0;
        for (int i = b * QBLOCK; i < (b + 1) * QBLOCK; i++) isum += (int32_t)w[i] * x->q[i];
        s += (float)isum * (ws[b] * x->scale[b]);
    }
    return s;
}

float ref_dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K) {
    float s = 0.0f;
    for (int b = 0; b < K / QBLOCK; b++) {
        int32_t isum = 0;
        int i = b * QBLOCK;
        for (int j = 0; j < 32; j++) {
            uint8_t v = w[i / 2 + j];
            isum += ((v & 15) - 8) * x->q[i + j] + ((v >> 4) - 8) * x->q[i + 32 + j];
        }
        s += (float)isum * (ws[b] * x->scale[b]);
    }
    return s;
}

// A small GEMM as its dot products, one per (row, token), with the given kernels.
typedef float (*DotQ8)(const int8_t *, const float *, const QuantX *, int);
typedef float (*DotQ4)(const uint8_t *, const float *, const QuantX *, int);
static void gemm_by_dots(DotQ8 dq8, DotQ4 dq4, int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x,
                         int M, int K, float *out, size_t ldo) {
    for (int r = 0; r < N; r++)
        for (int t = 0; t < M; t++) {
            QuantX xt = quantx_token(x, t, K);
            const uint8_t *row = w + r * row_bytes;
            out[t * ldo + r] = type == WEIGHT_Q8 ? dq8((const int8_t *)row, (const float *)(row + K), &xt, K)
                                                 : dq4(row, (const float *)(row + K / 2), &xt, K);
        }
}

void ref_gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K, float *out,
                    size_t ldo) {
    gemm_by_dots(ref_dot_q8, ref_dot_q4, type, w, row_bytes, N, x, M, K, out, ldo);
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
        float scale = amax / 127.0f;
        qx->scale[b] = scale;
        qx->sum[b] = (float)sum * scale;
    }
}

void ref_swiglu(float *h, const float *h2, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = silu_mul(h[i], h2[i]);
}

void dequant_row(int type, const void *row, int K, float *out) {
    const uint8_t *r = row;
    const float *scale = (const float *)(r + (type == WEIGHT_Q8 ? K : K / 2)); // q8/q4 only
    for (int j = 0; j < K; j++) {
        switch (type) {
        case WEIGHT_F32: out[j] = ((const float *)r)[j]; break;
        case WEIGHT_BF16: out[j] = bf16_to_f32(((const uint16_t *)r)[j]); break;
        case WEIGHT_Q8: out[j] = ((const int8_t *)r)[j] * scale[j / QBLOCK]; break;
        case WEIGHT_Q4: { // byte i of a 64-weight block: weight i low, weight i+32 high
            uint8_t v = r[(j - j % 64) / 2 + j % 32];
            out[j] = ((j % 64 < 32 ? v & 15 : v >> 4) - 8) * scale[j / QBLOCK];
        }
        }
    }
}

// ----------------------------------------------------------------------------
// 2. x86-64: AVX2 + FMA, with AVX-512 inside where the build has it
#ifdef KERNELS_AVX2

// Products of several tokens (a chunk of prompt) work on tiles of up to
// TILE_R weight rows by TILE_T tokens: each weight vector loaded serves every
// token of the tile and each input vector every row, which is what makes a
// chunk of prompt cheaper than its tokens one by one. Decoding (one token)
// uses the dot kernels instead, which keep several accumulators per row for
// speed; the tile, short of registers, keeps one, so the two round differently
// (by about 1e-7 of the logits' range, tested). Within each kernel every sum
// is added in one fixed order, the same on any number of threads.
#define TILE_R 2
#define TILE_T 4
#define TILE_B 32 // blocks whose scale products are made ahead at a time

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void avx2_quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + (size_t)b * QBLOCK;
        int8_t *q = qx->q + (size_t)b * QBLOCK;
        __m256 v[QBLOCK / 8], m = _mm256_setzero_ps();
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (int k = 0; k < QBLOCK / 8; k++) m = _mm256_max_ps(m, _mm256_and_ps(v[k] = _mm256_loadu_ps(xb + 8 * k), abs_mask));
        m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
        m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0x4E));
        float amax = _mm_cvtss_f32(_mm256_castps256_ps128(_mm256_max_ps(m, _mm256_shuffle_ps(m, m, 0xB1))));
        __m256 inv = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        __m256i total = _mm256_setzero_si256();
        for (int k = 0; k < QBLOCK / 32; k++) { // 32 values: four vectors of int32 packed into 32 bytes
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k], inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k + 1], inv));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k + 2], inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[4 * k + 3], inv));
            total = _mm256_add_epi32(total, _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)); // lanes interleaved
            _mm256_storeu_si256((__m256i *)(q + 32 * k), _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        }
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
        float scale = amax / 127.0f;
        qx->scale[b] = scale;
        qx->sum[b] = (float)sum * scale;
    }
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
static inline void prefetch(const void *p) {
    _mm_prefetch((const char *)p + PREFETCH_FAR, _MM_HINT_T1);
    _mm_prefetch((const char *)p + PREFETCH_NEAR, _MM_HINT_T0);
}

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

// S[b] = ws[b] * xs[b]: the products of a weight row's and a token's block
// scales, made ahead so that the inner loops broadcast them from memory. For
// q4 (xsum given) the same pass adds sum(ws[b] * xsum[b]) into corr, for the
// offset correction below.
static inline __m256 scale_products(float *S, const float *ws, const float *xs, const float *xsum, int n, __m256 corr) {
    int b = 0;
    for (; b + 8 <= n; b += 8) {
        __m256 w = _mm256_loadu_ps(ws + b);
        _mm256_storeu_ps(S + b, _mm256_mul_ps(w, _mm256_loadu_ps(xs + b)));
        if (xsum) corr = _mm256_fmadd_ps(w, _mm256_loadu_ps(xsum + b), corr);
    }
    if (b < n) {
        float c = 0.0f;
        for (; b < n; b++) {
            S[b] = ws[b] * xs[b];
            if (xsum) c += ws[b] * xsum[b];
        }
        corr = _mm256_add_ps(corr, _mm256_setr_ps(c, 0, 0, 0, 0, 0, 0, 0));
    }
    return corr;
}

// A block's 64 int8 products (weights w0: 0..31, w1: 32..63, against x) are
// summed into 8 int32 partial sums, lane k holding products 4k..4k+3 and
// 32+4k..32+4k+3, converted to float; the caller multiplies in the weight's
// and the input's scales.
//
// q8: maddubs multiplies unsigned by signed bytes, so multiply |x| by w with
// x's sign moved onto w; pairs of products fit in int16 (2*127*127 < 32768).
//
// With AVX-512 (BW) the whole block fits one register, and with VNNI one
// vpdpbusd multiplies and sums each four products into int32. The two
// halves' lanes are then added, so the sums are the same integers as with
// AVX2 and so are the results, bit for bit (tested through an emulation of
// these instructions: tests/avx512_emulation.h).
#if defined(__AVX512BW__)
static inline __m256 block_sums(__m512i u, __m512i s) { // u unsigned, s signed bytes
#if defined(__AVX512VNNI__)
    __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
    __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm512_castsi512_si256(p), _mm512_extracti64x4_epi64(p, 1)));
}

static inline __m256 q8_block(__m256i w0, __m256i w1, const int8_t *x) {
    __m512i xv = _mm512_loadu_si512(x), w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
    w = _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(xv), _mm512_setzero_si512(), w); // -w where x < 0
    return block_sums(_mm512_abs_epi8(xv), w);
}
#else
static inline __m256 q8_block(__m256i w0, __m256i w1, const int8_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i x0 = _mm256_loadu_si256((const __m256i *)x), x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
    __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x0), _mm256_sign_epi8(w0, x0)), ones);
    __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(x1), _mm256_sign_epi8(w1, x1)), ones);
    return _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
}
#endif

// One row by one token (decoding): several accumulators, taking the blocks in
// turn, keep the FMA latency out of the way of the weight stream: four blocks
// (four cache lines) a step for q8, two (one line) for q4, each the faster in
// interleaved --bench runs (q8 with four: +3% median over 12 pairs; q4 with
// four: 7% slower). One row at a time on purpose: reading two rows together
// (two streams per core, sharing the loads of x) measured a third slower.
static float avx2_dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = acc0, acc3 = acc0;
    int NB = K / QBLOCK;
    for (int b0 = 0; b0 < NB; b0 += TILE_B) {
        int bn = NB - b0 < TILE_B ? NB - b0 : TILE_B, b = 0;
        float S[TILE_B];
        scale_products(S, ws + b0, x->scale + b0, NULL, bn, _mm256_setzero_ps());
        const int8_t *wb = w + b0 * QBLOCK, *xb = x->q + b0 * QBLOCK;
#define Q8G(k) q8_block(_mm256_loadu_si256((const __m256i *)(wg + 64 * (k))), _mm256_loadu_si256((const __m256i *)(wg + 64 * (k) + 32)), xb + (b + (k)) * QBLOCK)
        for (; b + 4 <= bn; b += 4) {
            const int8_t *wg = wb + b * QBLOCK;
            prefetch(wg);
            prefetch(wg + 64);
            prefetch(wg + 128);
            prefetch(wg + 192);
            acc0 = _mm256_fmadd_ps(Q8G(0), _mm256_broadcast_ss(&S[b]), acc0);
            acc1 = _mm256_fmadd_ps(Q8G(1), _mm256_broadcast_ss(&S[b + 1]), acc1);
            acc2 = _mm256_fmadd_ps(Q8G(2), _mm256_broadcast_ss(&S[b + 2]), acc2);
            acc3 = _mm256_fmadd_ps(Q8G(3), _mm256_broadcast_ss(&S[b + 3]), acc3);
        }
        for (; b < bn; b++) {
            const int8_t *wg = wb + b * QBLOCK;
            acc0 = _mm256_fmadd_ps(Q8G(0), _mm256_broadcast_ss(&S[b]), acc0);
        }
#undef Q8G
    }
    return hsum_ps(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

// q4: the stored u = q + 8 is unsigned already, so maddubs takes it as is
// (15*127*2 fits in int16 with room to add the two halves), and
// sum((u - 8) x) = sum(u x) - 8 sum(x): the second term, over all blocks, is
// a short dot product of the row's scales with the blocks' sums of x, which
// scale_products accumulates as it goes.
static inline __m256 q4_block(__m256i lo, __m256i hi, const int8_t *x) {
#if defined(__AVX512BW__)
    return block_sums(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_loadu_si512(x));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
#endif
}

static inline void q4_unpack(const uint8_t *w, __m256i *lo, __m256i *hi) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i raw = _mm256_loadu_si256((const __m256i *)w);
    *lo = _mm256_and_si256(raw, low);                        // weights 0..31 of the block
    *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);  // weights 32..63
}

static float avx2_dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
    __m256i lo, hi;
    int NB = K / QBLOCK;
    for (int b0 = 0; b0 < NB; b0 += TILE_B) {
        int bn = NB - b0 < TILE_B ? NB - b0 : TILE_B, b = 0;
        float S[TILE_B];
        corr = scale_products(S, ws + b0, x->scale + b0, x->sum + b0, bn, corr);
        const uint8_t *wb = w + b0 * QBLOCK / 2;
        const int8_t *xb = x->q + b0 * QBLOCK;
        for (; b + 2 <= bn; b += 2) { // two blocks: one cache line of weights
            prefetch(wb + b * QBLOCK / 2);
            q4_unpack(wb + b * QBLOCK / 2, &lo, &hi);
            acc0 = _mm256_fmadd_ps(q4_block(lo, hi, xb + b * QBLOCK), _mm256_broadcast_ss(&S[b]), acc0);
            q4_unpack(wb + (b + 1) * QBLOCK / 2, &lo, &hi);
            acc1 = _mm256_fmadd_ps(q4_block(lo, hi, xb + (b + 1) * QBLOCK), _mm256_broadcast_ss(&S[b + 1]), acc1);
        }
        if (b < bn) {
            q4_unpack(wb + b * QBLOCK / 2, &lo, &hi);
            acc0 = _mm256_fmadd_ps(q4_block(lo, hi, xb + b * QBLOCK), _mm256_broadcast_ss(&S[b]), acc0);
        }
    }
    return hsum_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), corr, _mm256_add_ps(acc0, acc1)));
}

// A tile: rows r < nr (at w + r * row_bytes, each followed by its scales)
// against tokens t < nt of x; out[t * ldo + r] = row r . token t, for q8 or q4
// weights (`type`). type, nr and nt are constants where this is inlined (nr,
// nt at most TILE_R, TILE_T), so the accumulators live in registers. The
// weights of a block are loaded once for all tokens, each token's inputs once
// for all rows, and the products of the scales come from a small table made
// ahead (loads, not multiplies, in the inner loop). `fetch`: the first tile of
// these rows prefetches their weights.
static inline __attribute__((always_inline)) void quant_tile(int type, const uint8_t *w, size_t row_bytes, int nr,
                                                             const QuantX *x, int nt, int K, float *out, size_t ldo,
                                                             int fetch) {
    int NB = K / QBLOCK, q4 = type == WEIGHT_Q4;
    size_t block_bytes = q4 ? QBLOCK / 2 : QBLOCK, scales_at = (size_t)NB * block_bytes;
    __m256 acc[TILE_R][TILE_T], corr[TILE_R][TILE_T]; // corr: q4's offset correction
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) acc[r][t] = corr[r][t] = _mm256_setzero_ps();
    for (int b0 = 0; b0 < NB; b0 += TILE_B) {
        int bn = NB - b0 < TILE_B ? NB - b0 : TILE_B;
        float S[TILE_R][TILE_T][TILE_B]; // the scales' products, per (row, token, block)
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < nt; t++)
                corr[r][t] = scale_products(S[r][t], (const float *)(w + r * row_bytes + scales_at) + b0,
                                            x->scale + (size_t)t * NB + b0, q4 ? x->sum + (size_t)t * NB + b0 : NULL, bn,
                                            corr[r][t]);
        for (int b = 0; b < bn; b++) {
            __m256i w0[TILE_R], w1[TILE_R]; // the block's weights: q8 as two halves, q4 unpacked (low, high)
            for (int r = 0; r < nr; r++) {
                const uint8_t *row = w + r * row_bytes + (b0 + b) * block_bytes;
                if (fetch && (!q4 || b % 2 == 0)) prefetch(row);
                if (q4) q4_unpack(row, &w0[r], &w1[r]);
                else {
                    w0[r] = _mm256_loadu_si256((const __m256i *)row);
                    w1[r] = _mm256_loadu_si256((const __m256i *)(row + 32));
                }
            }
            for (int t = 0; t < nt; t++) {
                const int8_t *xq = x->q + (size_t)t * K + (b0 + b) * QBLOCK;
                for (int r = 0; r < nr; r++) {
                    __m256 f = q4 ? q4_block(w0[r], w1[r], xq) : q8_block(w0[r], w1[r], xq);
                    acc[r][t] = _mm256_fmadd_ps(f, _mm256_broadcast_ss(&S[r][t][b]), acc[r][t]);
                }
            }
        }
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++)
            out[t * ldo + r] = hsum_ps(q4 ? _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), corr[r][t], acc[r][t]) : acc[r][t]);
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

// All rows [0, N) against all tokens [0, M), tile by tile.
// Calls TILE(nr, nt) with the tile's shape as constants, so that each shape
// is compiled with its accumulators in registers.
#define TILE_SHAPES(nr, nt, TILE)                                                           \
    switch ((nr) * 10 + (nt)) {                                                             \
    case 11: TILE(1, 1); break; case 12: TILE(1, 2); break; case 13: TILE(1, 3); break;     \
    case 14: TILE(1, 4); break; case 21: TILE(2, 1); break; case 22: TILE(2, 2); break;     \
    case 23: TILE(2, 3); break; case 24: TILE(2, 4); break;                                 \
    }

static void avx2_gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K,
                            float *out, size_t ldo) {
    for (int r = 0; r < N; r += TILE_R) {
        const uint8_t *wr = w + (size_t)r * row_bytes;
        int nr = N - r < TILE_R ? N - r : TILE_R;
        for (int t = 0; t < M; t += TILE_T) {
            int nt = M - t < TILE_T ? M - t : TILE_T;
            QuantX xt = quantx_token(x, t, K);
            float *o = out + (size_t)t * ldo + r;
#define Q8_TILE(R, T) quant_tile(WEIGHT_Q8, wr, row_bytes, R, &xt, T, K, o, ldo, t == 0)
#define Q4_TILE(R, T) quant_tile(WEIGHT_Q4, wr, row_bytes, R, &xt, T, K, o, ldo, t == 0)
            if (type == WEIGHT_Q8) TILE_SHAPES(nr, nt, Q8_TILE)
            else TILE_SHAPES(nr, nt, Q4_TILE)
#undef Q8_TILE
#undef Q4_TILE
        }
    }
}
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

// 16 int8 products summed into 4 int32 lanes.
static inline int32x4_t dot16_s8(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    int16x8_t p = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    p = vmlal_s8(p, vget_high_s8(a), vget_high_s8(b)); // |sum of 2| <= 2*127*127: fits
    return vpadalq_s16(acc, p);
#endif
}

static float neon_dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K) {
    float32x4_t acc = vdupq_n_f32(0);
    for (int b = 0; b < K / QBLOCK; b++) {
        int32x4_t isum = vdupq_n_s32(0);
        for (int i = b * QBLOCK; i < (b + 1) * QBLOCK; i += 16) isum = dot16_s8(isum, vld1q_s8(w + i), vld1q_s8(x->q + i));
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), ws[b] * x->scale[b]);
    }
    return vaddvq_f32(acc);
}

static float neon_dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K) {
    float32x4_t acc = vdupq_n_f32(0);
    const uint8x16_t low = vdupq_n_u8(0x0F);
    const int8x16_t eight = vdupq_n_s8(8);
    for (int b = 0; b < K / QBLOCK; b++) {
        int32x4_t isum = vdupq_n_s32(0);
        int i = b * QBLOCK;
        for (int h = 0; h < 2; h++) { // bytes i/2 + 16h .. +15: weights i+16h.. (low) and i+32+16h.. (high)
            uint8x16_t raw = vld1q_u8(w + i / 2 + 16 * h);
            int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, low)), eight);
            int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
            isum = dot16_s8(isum, lo, vld1q_s8(x->q + i + 16 * h));
            isum = dot16_s8(isum, hi, vld1q_s8(x->q + i + 32 + 16 * h));
        }
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), ws[b] * x->scale[b]);
    }
    return vaddvq_f32(acc);
}
#endif // KERNELS_NEON

// ----------------------------------------------------------------------------
// 4. the kernels mixtral.c calls: this build's best

#if defined(KERNELS_AVX2)
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
const char kernels_simd_name[] = "avx2 + avx512-vnni"; // the blocks' integer products, see q8_block
#elif defined(__AVX512BW__)
const char kernels_simd_name[] = "avx2 + avx512bw";
#else
const char kernels_simd_name[] = "avx2";
#endif
float dot_f32(const float *a, const float *b, int n) { return avx2_dot_f32(a, b, n); }
float dot_bf16(const uint16_t *w, const float *x, int n) { return avx2_dot_bf16(w, x, n); }
float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K) { return avx2_dot_q8(w, ws, x, K); }
float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K) { return avx2_dot_q4(w, ws, x, K); }
void gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K, float *out,
                size_t ldo) {
    avx2_gemm_quant(type, w, row_bytes, N, x, M, K, out, ldo);
}
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) { avx2_quantize_blocks(qx, x, b0, b1); }
void swiglu(float *h, const float *h2, int64_t n) { avx2_swiglu(h, h2, n); }

#elif defined(KERNELS_NEON)
const char kernels_simd_name[] = "neon";
float dot_f32(const float *a, const float *b, int n) { return neon_dot_f32(a, b, n); }
float dot_bf16(const uint16_t *w, const float *x, int n) { return neon_dot_bf16(w, x, n); }
float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K) { return neon_dot_q8(w, ws, x, K); }
float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K) { return neon_dot_q4(w, ws, x, K); }
void gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K, float *out,
                size_t ldo) {
    gemm_by_dots(neon_dot_q8, neon_dot_q4, type, w, row_bytes, N, x, M, K, out, ldo);
}
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) { ref_quantize_blocks(qx, x, b0, b1); }
void swiglu(float *h, const float *h2, int64_t n) { ref_swiglu(h, h2, n); }

#else
const char kernels_simd_name[] = "portable C";
float dot_f32(const float *a, const float *b, int n) { return ref_dot_f32(a, b, n); }
float dot_bf16(const uint16_t *w, const float *x, int n) { return ref_dot_bf16(w, x, n); }
float dot_q8(const int8_t *w, const float *ws, const QuantX *x, int K) { return ref_dot_q8(w, ws, x, K); }
float dot_q4(const uint8_t *w, const float *ws, const QuantX *x, int K) { return ref_dot_q4(w, ws, x, K); }
void gemm_quant(int type, const uint8_t *w, size_t row_bytes, int N, const QuantX *x, int M, int K, float *out,
                size_t ldo) {
    ref_gemm_quant(type, w, row_bytes, N, x, M, K, out, ldo);
}
void quantize_blocks(QuantX *qx, const float *x, int64_t b0, int64_t b1) { ref_quantize_blocks(qx, x, b0, b1); }
void swiglu(float *h, const float *h2, int64_t n) { ref_swiglu(h, h2, n); }
#endif
