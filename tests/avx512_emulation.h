// avx512_emulation.h: the AVX-512 instructions kernels.c uses, emulated with
// AVX2 and plain C, so that its AVX-512 VNNI code can be run and tested on a
// machine without them (qemu does not emulate AVX-512).
//
// Include after <immintrin.h> and before kernels.c (tests/avx512_emulated.c
// does), in a build for AVX2, FMA and F16C. A 512-bit register is two 256-bit
// halves; float operations are the same IEEE operations on each half (so the
// results are those of the real instructions, bit for bit), vpdpbusd follows
// the operation described for it in Intel's Intrinsics Guide.
#include <stdint.h>
#include <string.h>

#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VNNI__ 1
#define __AVX512VBMI__ 1
#define KERNELS_AVX512_EMULATED 1 // kernels.c: no inline assembly of AVX-512 instructions

typedef struct { __m256 h[2]; } emu_m512;
typedef union { __m256i h[2]; int8_t i8[64]; uint8_t u8[64]; int32_t i32[16]; } emu_m512i;
#define __m512 emu_m512
#define __m512i emu_m512i
#define __mmask16 uint16_t

#define EMU_F2(name, op)                                                       \
    static inline emu_m512 name(emu_m512 a, emu_m512 b) {                     \
        return (emu_m512){{op(a.h[0], b.h[0]), op(a.h[1], b.h[1])}};           \
    }
#define EMU_I2(name, op)                                                       \
    static inline emu_m512i name(emu_m512i a, emu_m512i b) {                   \
        emu_m512i r;                                                           \
        r.h[0] = op(a.h[0], b.h[0]);                                           \
        r.h[1] = op(a.h[1], b.h[1]);                                           \
        return r;                                                              \
    }
#define EMU_SHIFT(name, op)                                                    \
    static inline emu_m512i name(emu_m512i a, int n) {                         \
        emu_m512i r;                                                           \
        r.h[0] = op(a.h[0], n);                                                \
        r.h[1] = op(a.h[1], n);                                                \
        return r;                                                              \
    }

#undef _mm512_mul_ps
#define _mm512_mul_ps emu_mul_ps
EMU_F2(emu_mul_ps, _mm256_mul_ps)
#undef _mm512_and_si512
#define _mm512_and_si512 emu_and_si512
EMU_I2(emu_and_si512, _mm256_and_si256)
#undef _mm512_add_epi32
#define _mm512_add_epi32 emu_add_epi32
EMU_I2(emu_add_epi32, _mm256_add_epi32)

#undef _mm512_setzero_ps
#define _mm512_setzero_ps emu_setzero_ps
static inline emu_m512 emu_setzero_ps(void) { return (emu_m512){{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }

#undef _mm512_set1_ps
#define _mm512_set1_ps emu_set1_ps
static inline emu_m512 emu_set1_ps(float v) { return (emu_m512){{_mm256_set1_ps(v), _mm256_set1_ps(v)}}; }

// the same 256-bit value in both halves: the broadcasts and zero
static inline emu_m512i emu_splat(__m256i h) {
    emu_m512i r;
    r.h[0] = r.h[1] = h;
    return r;
}
#undef _mm512_setzero_si512
#define _mm512_setzero_si512() emu_splat(_mm256_setzero_si256())
#undef _mm512_set1_epi8
#define _mm512_set1_epi8(v) emu_splat(_mm256_set1_epi8(v))
#undef _mm512_set1_epi32
#define _mm512_set1_epi32(v) emu_splat(_mm256_set1_epi32(v))

#undef _mm512_loadu_si512
#define _mm512_loadu_si512 emu_loadu_si512
static inline emu_m512i emu_loadu_si512(const void *p) {
    emu_m512i r;
    memcpy(r.u8, p, 64);
    return r;
}

#undef _mm512_srli_epi16
#define _mm512_srli_epi16 emu_srli_epi16
EMU_SHIFT(emu_srli_epi16, _mm256_srli_epi16)

#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps emu_cvtph_ps
static inline emu_m512 emu_cvtph_ps(__m256i h) {
    return (emu_m512){{_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))}};
}

#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps emu_cvtepi32_ps
static inline emu_m512 emu_cvtepi32_ps(emu_m512i a) {
    return (emu_m512){{_mm256_cvtepi32_ps(a.h[0]), _mm256_cvtepi32_ps(a.h[1])}};
}

#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps emu_fmadd_ps
static inline emu_m512 emu_fmadd_ps(emu_m512 a, emu_m512 b, emu_m512 c) {
    return (emu_m512){{_mm256_fmadd_ps(a.h[0], b.h[0], c.h[0]), _mm256_fmadd_ps(a.h[1], b.h[1], c.h[1])}};
}

// vpdpbusd: each 32-bit lane adds the four products of a's unsigned bytes with b's signed bytes
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 emu_dpbusd_epi32
static inline emu_m512i emu_dpbusd_epi32(emu_m512i src, emu_m512i a, emu_m512i b) {
    for (int i = 0; i < 16; i++) {
        int32_t s = 0;
        for (int k = 0; k < 4; k++) s += (int32_t)a.u8[4 * i + k] * b.i8[4 * i + k];
        src.i32[i] = (int32_t)((uint32_t)src.i32[i] + (uint32_t)s); // wraps, as the instruction does
    }
    return src;
}

#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps emu_mask_storeu_ps
static inline void emu_mask_storeu_ps(float *p, uint16_t mask, emu_m512 a) {
    float v[16];
    _mm256_storeu_ps(v, a.h[0]);
    _mm256_storeu_ps(v + 8, a.h[1]);
    for (int i = 0; i < 16; i++)
        if (mask >> i & 1) p[i] = v[i];
}

// for the bf16 tile and the spans of gemm_quant
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps emu_castsi512_ps
static inline emu_m512 emu_castsi512_ps(emu_m512i a) {
    return (emu_m512){{_mm256_castsi256_ps(a.h[0]), _mm256_castsi256_ps(a.h[1])}};
}

#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
static inline emu_m512i emu_cvtepu16_epi32(__m256i a) {
    emu_m512i r;
    r.h[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(a));
    r.h[1] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1));
    return r;
}

#undef _mm512_slli_epi32
#define _mm512_slli_epi32 emu_slli_epi32
EMU_SHIFT(emu_slli_epi32, _mm256_slli_epi32)

#undef _mm512_loadu_ps
#define _mm512_loadu_ps emu_loadu_ps
static inline emu_m512 emu_loadu_ps(const float *p) { return (emu_m512){{_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}}; }

#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps emu_maskz_loadu_ps
static inline emu_m512 emu_maskz_loadu_ps(uint16_t mask, const float *p) {
    float v[16];
    for (int i = 0; i < 16; i++) v[i] = mask >> i & 1 ? p[i] : 0.0f;
    return emu_loadu_ps(v);
}

// the sum of the 16 lanes, paired as GCC's _mm512_reduce_add_ps pairs them:
// halves of 8, then of 4, then of 2
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps emu_reduce_add_ps
static inline float emu_reduce_add_ps(emu_m512 a) {
    __m256 s8 = _mm256_add_ps(a.h[1], a.h[0]);
    __m128 s4 = _mm_add_ps(_mm256_extractf128_ps(s8, 1), _mm256_castps256_ps128(s8));
    __m128 s2 = _mm_add_ps(s4, _mm_shuffle_ps(s4, s4, 0x4e));
    __m128 s1 = _mm_add_ps(s2, _mm_shuffle_ps(s2, s2, 0xb1));
    return _mm_cvtss_f32(s1);
}

// for the q3 and q2 kernels (coded_group)
#undef _mm512_xor_si512
#define _mm512_xor_si512 emu_xor_si512
EMU_I2(emu_xor_si512, _mm256_xor_si256)

#undef _mm512_slli_epi16
#define _mm512_slli_epi16 emu_slli_epi16
EMU_SHIFT(emu_slli_epi16, _mm256_slli_epi16)

// vpsrlvw: each 16-bit lane shifted right by the count in the same lane of n (16 or more: 0)
#undef _mm512_srlv_epi16
#define _mm512_srlv_epi16 emu_srlv_epi16
static inline emu_m512i emu_srlv_epi16(emu_m512i a, emu_m512i n) {
    for (int i = 0; i < 32; i++) {
        uint16_t v, c;
        memcpy(&v, a.u8 + 2 * i, 2);
        memcpy(&c, n.u8 + 2 * i, 2);
        v = c > 15 ? 0 : (uint16_t)(v >> c);
        memcpy(a.u8 + 2 * i, &v, 2);
    }
    return a;
}

// vpermb: byte i of the result is byte idx[i] & 63 of a
#undef _mm512_permutexvar_epi8
#define _mm512_permutexvar_epi8 emu_permutexvar_epi8
static inline emu_m512i emu_permutexvar_epi8(emu_m512i idx, emu_m512i a) {
    emu_m512i r;
    for (int i = 0; i < 64; i++) r.u8[i] = a.u8[idx.u8[i] & 63];
    return r;
}

// vpermi2b: byte i of the result is byte idx[i] & 63 of a, or of b when bit 6 of idx[i] is set
#undef _mm512_permutex2var_epi8
#define _mm512_permutex2var_epi8 emu_permutex2var_epi8
static inline emu_m512i emu_permutex2var_epi8(emu_m512i a, emu_m512i idx, emu_m512i b) {
    emu_m512i r;
    for (int i = 0; i < 64; i++) r.u8[i] = (idx.u8[i] & 64 ? b : a).u8[idx.u8[i] & 63];
    return r;
}

// vpternlogd: each bit of the result is bit (a b c) of imm, a the most significant
#undef _mm512_ternarylogic_epi32
#define _mm512_ternarylogic_epi32 emu_ternarylogic_epi32
static inline emu_m512i emu_ternarylogic_epi32(emu_m512i a, emu_m512i b, emu_m512i c, int imm) {
    emu_m512i r;
    for (int i = 0; i < 64; i++) {
        uint8_t v = 0;
        for (int k = 0; k < 8; k++) {
            int at = (a.u8[i] >> k & 1) << 2 | (b.u8[i] >> k & 1) << 1 | (c.u8[i] >> k & 1);
            v |= (uint8_t)((imm >> at & 1) << k);
        }
        r.u8[i] = v;
    }
    return r;
}

// for the KV cache's attention kernels (kv16_ps, sum16_ps)
#undef _mm512_add_ps
#define _mm512_add_ps emu_add_ps
EMU_F2(emu_add_ps, _mm256_add_ps)

#undef _mm512_storeu_ps
#define _mm512_storeu_ps emu_storeu_ps
static inline void emu_storeu_ps(float *p, emu_m512 a) {
    _mm256_storeu_ps(p, a.h[0]);
    _mm256_storeu_ps(p + 8, a.h[1]);
}

#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 emu_cvtepi8_epi32
static inline emu_m512i emu_cvtepi8_epi32(__m128i a) {
    emu_m512i r;
    r.h[0] = _mm256_cvtepi8_epi32(a);
    r.h[1] = _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8));
    return r;
}

// unpacklo/hi and shuffle_ps work within each 128-bit lane, as their 256-bit forms do
#undef _mm512_unpacklo_ps
#define _mm512_unpacklo_ps emu_unpacklo_ps
EMU_F2(emu_unpacklo_ps, _mm256_unpacklo_ps)
#undef _mm512_unpackhi_ps
#define _mm512_unpackhi_ps emu_unpackhi_ps
EMU_F2(emu_unpackhi_ps, _mm256_unpackhi_ps)
#undef _mm512_shuffle_ps
#define _mm512_shuffle_ps(a, b, imm) \
    ((emu_m512){{_mm256_shuffle_ps((a).h[0], (b).h[0], imm), _mm256_shuffle_ps((a).h[1], (b).h[1], imm)}})

// vshuff32x4: 128-bit lanes 0, 1 of the result are a's lanes imm[1:0], imm[3:2]; lanes 2, 3 b's imm[5:4], imm[7:6]
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4 emu_shuffle_f32x4
static inline emu_m512 emu_shuffle_f32x4(emu_m512 a, emu_m512 b, int imm) {
    float x[16], y[16], r[16];
    emu_storeu_ps(x, a);
    emu_storeu_ps(y, b);
    for (int l = 0; l < 4; l++) memcpy(r + 4 * l, (l < 2 ? x : y) + 4 * (imm >> 2 * l & 3), 16);
    return emu_loadu_ps(r);
}

// the integer forms, for the q8 scores' transpose (avx512_kv_scores_q8)
#undef _mm512_unpacklo_epi32
#define _mm512_unpacklo_epi32 emu_unpacklo_epi32
EMU_I2(emu_unpacklo_epi32, _mm256_unpacklo_epi32)
#undef _mm512_unpackhi_epi32
#define _mm512_unpackhi_epi32 emu_unpackhi_epi32
EMU_I2(emu_unpackhi_epi32, _mm256_unpackhi_epi32)
#undef _mm512_unpacklo_epi64
#define _mm512_unpacklo_epi64 emu_unpacklo_epi64
EMU_I2(emu_unpacklo_epi64, _mm256_unpacklo_epi64)
#undef _mm512_unpackhi_epi64
#define _mm512_unpackhi_epi64 emu_unpackhi_epi64
EMU_I2(emu_unpackhi_epi64, _mm256_unpackhi_epi64)
#undef _mm512_shuffle_i32x4
#define _mm512_shuffle_i32x4 emu_shuffle_i32x4
static inline emu_m512i emu_shuffle_i32x4(emu_m512i a, emu_m512i b, int imm) {
    emu_m512i r;
    for (int l = 0; l < 4; l++) memcpy(r.i32 + 4 * l, (l < 2 ? a.i32 : b.i32) + 4 * (imm >> 2 * l & 3), 16);
    return r;
}

#undef _mm512_broadcast_f32x4
#define _mm512_broadcast_f32x4 emu_broadcast_f32x4
static inline emu_m512 emu_broadcast_f32x4(__m128 a) {
    __m256 h = _mm256_set_m128(a, a);
    return (emu_m512){{h, h}};
}

#undef _mm512_castps512_ps128
#define _mm512_castps512_ps128(a) _mm256_castps256_ps128((a).h[0])
#undef _mm512_extractf32x4_ps
#define _mm512_extractf32x4_ps(a, i) \
    ((i) & 2 ? ((i) & 1 ? _mm256_extractf128_ps((a).h[1], 1) : _mm256_castps256_ps128((a).h[1])) \
             : ((i) & 1 ? _mm256_extractf128_ps((a).h[0], 1) : _mm256_castps256_ps128((a).h[0])))
