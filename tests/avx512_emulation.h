// avx512_emulation.h: the few AVX-512 instructions kernels.c uses, as plain C,
// so that its AVX-512 code can be run and tested on a machine without them
// (qemu does not emulate AVX-512).
//
// Include after <immintrin.h> and before kernels.c (tests/avx512_emulated.c
// does); define EMULATE_VNNI for the AVX512-VNNI path. Each function follows
// the operation described for its instruction in Intel's Intrinsics Guide.
#include <stdint.h>
#include <string.h>

#define __AVX512BW__ 1
#ifdef EMULATE_VNNI
#define __AVX512VNNI__ 1
#endif

typedef union {
    int8_t i8[64];
    uint8_t u8[64];
    int16_t i16[32];
    int32_t i32[16];
    __m256i half[2];
} emu_m512i;
#define __m512i emu_m512i
#define __mmask64 uint64_t

#undef _mm512_setzero_si512
#define _mm512_setzero_si512 emu_setzero_si512
static inline emu_m512i emu_setzero_si512(void) {
    emu_m512i r;
    memset(&r, 0, sizeof(r));
    return r;
}

#undef _mm512_set1_epi16
#define _mm512_set1_epi16 emu_set1_epi16
static inline emu_m512i emu_set1_epi16(short v) {
    emu_m512i r;
    for (int i = 0; i < 32; i++) r.i16[i] = v;
    return r;
}

#undef _mm512_loadu_si512
#define _mm512_loadu_si512 emu_loadu_si512
static inline emu_m512i emu_loadu_si512(const void *p) {
    emu_m512i r;
    memcpy(&r, p, sizeof(r));
    return r;
}

#undef _mm512_castsi256_si512
#define _mm512_castsi256_si512 emu_castsi256_si512
static inline emu_m512i emu_castsi256_si512(__m256i a) { // the upper half is undefined: zero here
    emu_m512i r = emu_setzero_si512();
    r.half[0] = a;
    return r;
}

#undef _mm512_castsi512_si256
#define _mm512_castsi512_si256 emu_castsi512_si256
static inline __m256i emu_castsi512_si256(emu_m512i a) { return a.half[0]; }

#undef _mm512_inserti64x4
#define _mm512_inserti64x4 emu_inserti64x4
static inline emu_m512i emu_inserti64x4(emu_m512i a, __m256i b, int imm) {
    a.half[imm & 1] = b;
    return a;
}

#undef _mm512_extracti64x4_epi64
#define _mm512_extracti64x4_epi64 emu_extracti64x4_epi64
static inline __m256i emu_extracti64x4_epi64(emu_m512i a, int imm) { return a.half[imm & 1]; }

// bit i: the sign bit of byte i
#undef _mm512_movepi8_mask
#define _mm512_movepi8_mask emu_movepi8_mask
static inline uint64_t emu_movepi8_mask(emu_m512i a) {
    uint64_t k = 0;
    for (int i = 0; i < 64; i++) k |= (uint64_t)(a.u8[i] >> 7) << i;
    return k;
}

// byte i: a - b (wrapping) where bit i of k is set, else src
#undef _mm512_mask_sub_epi8
#define _mm512_mask_sub_epi8 emu_mask_sub_epi8
static inline emu_m512i emu_mask_sub_epi8(emu_m512i src, uint64_t k, emu_m512i a, emu_m512i b) {
    for (int i = 0; i < 64; i++)
        if (k >> i & 1) src.u8[i] = (uint8_t)(a.u8[i] - b.u8[i]);
    return src;
}

// |a| of signed bytes, as unsigned bytes (|-128| = 128)
#undef _mm512_abs_epi8
#define _mm512_abs_epi8 emu_abs_epi8
static inline emu_m512i emu_abs_epi8(emu_m512i a) {
    emu_m512i r;
    for (int i = 0; i < 64; i++) r.u8[i] = (uint8_t)(a.i8[i] < 0 ? -a.i8[i] : a.i8[i]);
    return r;
}

// int32 lane j: src + the four products of unsigned a and signed b bytes 4j..4j+3 (no saturation)
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 emu_dpbusd_epi32
static inline emu_m512i emu_dpbusd_epi32(emu_m512i src, emu_m512i a, emu_m512i b) {
    for (int j = 0; j < 16; j++) {
        int64_t s = src.i32[j];
        for (int k = 0; k < 4; k++) s += (int32_t)a.u8[4 * j + k] * b.i8[4 * j + k];
        src.i32[j] = (int32_t)(uint32_t)s;
    }
    return src;
}

// int16 lane j: the two products of unsigned a and signed b bytes 2j, 2j+1, summed with saturation
#undef _mm512_maddubs_epi16
#define _mm512_maddubs_epi16 emu_maddubs_epi16
static inline emu_m512i emu_maddubs_epi16(emu_m512i a, emu_m512i b) {
    emu_m512i r;
    for (int j = 0; j < 32; j++) {
        int32_t s = (int32_t)a.u8[2 * j] * b.i8[2 * j] + (int32_t)a.u8[2 * j + 1] * b.i8[2 * j + 1];
        r.i16[j] = (int16_t)(s > 32767 ? 32767 : s < -32768 ? -32768 : s);
    }
    return r;
}

// int32 lane j: the two products of int16 lanes 2j, 2j+1 of a and b, summed (wrapping)
#undef _mm512_madd_epi16
#define _mm512_madd_epi16 emu_madd_epi16
static inline emu_m512i emu_madd_epi16(emu_m512i a, emu_m512i b) {
    emu_m512i r;
    for (int j = 0; j < 16; j++)
        r.i32[j] = (int32_t)(uint32_t)((int64_t)a.i16[2 * j] * b.i16[2 * j] + (int64_t)a.i16[2 * j + 1] * b.i16[2 * j + 1]);
    return r;
}
