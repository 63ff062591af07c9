// bench/kernel.c: how close the quantized product kernel comes to the core's
// instruction peak, on one core (make bench-kernel).
//
//   peak       vpdpbusd alone, 12 independent chains, register operands: the
//              most multiply-adds a core does (AVX-512 VNNI builds only)
//   in cache   gemm_quant, 32 tokens, 256 rows of K = 4096: weights in L2
//   streaming  gemm_quant, 32 tokens, a 14336 x 4096 matrix (62 MB in q8):
//              the weights come from memory, as in a prompt's expert products
//   bf16       the same two for bf16 weights: gemm_bf16 (f32 activations) and
//              gemm_bf16x (bf16 activations, --bf16-activations), beside
//              vdpbf16ps alone (AVX512-BF16 builds only)
//
// G multiply-adds per second, best of several repetitions.
#include "../kernels.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double peak(void) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    __m512i acc[12], w = _mm512_set1_epi8(3), x = _mm512_set1_epi8(5);
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_epi32(i);
    long n = 50000000;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], w, x);
        __asm__ volatile("" : "+v"(w), "+v"(x)); // (the loop is not folded away)
    }
    double t = now() - t0;
    int sink = 0;
    for (int j = 0; j < 12; j++) sink += _mm512_reduce_add_epi32(acc[j]);
    if (sink == 42) puts("");
    return n * 12.0 * 64 / t / 1e9;
#else
    return 0;
#endif
}

static double peak_bf16(void) {
#if defined(__AVX512BF16__)
    __m512 acc[12];
    __m512bh w = (__m512bh)_mm512_set1_epi16(0x3f80), x = (__m512bh)_mm512_set1_epi16(0x3f00);
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps((float)i);
    long n = 50000000;
    double t0 = now();
    for (long i = 0; i < n; i++) {
        for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbf16_ps(acc[j], w, x);
        __asm__ volatile("" : "+v"(w), "+v"(x));
    }
    double t = now() - t0;
    float sink = 0;
    for (int j = 0; j < 12; j++) sink += _mm512_reduce_add_ps(acc[j]);
    if (sink == 42) puts("");
    return n * 12.0 * 32 / t / 1e9;
#else
    return 0;
#endif
}

// bf16 weights, f32 activations (bf16_activations 0) or bf16 ones (1).
static double product_bf16(int bf16_activations, int M, int N, int K, int reps) {
    uint16_t *w = malloc(sizeof(uint16_t) * N * K), *xb = malloc(sizeof(uint16_t) * M * K);
    float *x = malloc(sizeof(float) * M * K), *out = malloc(sizeof(float) * M * N);
    if (!w || !xb || !x || !out) { fprintf(stderr, "bench/kernel: out of memory\n"); exit(1); }
    srand(1);
    for (size_t i = 0; i < (size_t)N * K; i++) w[i] = f32_to_bf16((float)rand() / RAND_MAX - 0.5f);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    to_bf16(x, xb, (int64_t)M * K);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        if (bf16_activations) gemm_bf16x(w, K, N, xb, M, out, N);
        else gemm_bf16(w, K, N, x, M, out, N);
        double t = now() - t0;
        if (t < best) best = t;
    }
    free(w), free(xb), free(x), free(out);
    return (double)M * N * K / best / 1e9;
}

static double product(int type, int M, int N, int K, int reps) {
    size_t gbytes = quant_group_bytes(type, K), groups = (size_t)(N + QROWS - 1) / QROWS;
    uint8_t *w = malloc(gbytes * groups);
    QuantX x = {malloc((size_t)M * K), malloc(sizeof(float) * M * (K / QBLOCK)),
                malloc(sizeof(int32_t) * 2 * M * (K / QBLOCK))};
    float *xf = malloc(sizeof(float) * M * K), *out = malloc(sizeof(float) * M * N);
    if (!w || !x.q || !x.scale || !x.qoff || !xf || !out) { fprintf(stderr, "bench/kernel: out of memory\n"); exit(1); }
    srand(1);
    for (size_t i = 0; i < gbytes * groups; i++) w[i] = (uint8_t)rand();
    for (size_t g = 0; g < groups; g++) // sane f16 scales (1/1024)
        for (int i = 0; i < K / QBLOCK * QROWS; i++) ((uint16_t *)(w + g * gbytes))[i] = 0x1400;
    for (size_t i = 0; i < (size_t)M * K; i++) xf[i] = (float)rand() / RAND_MAX - 0.5f;
    quantize_blocks(&x, xf, 0, (int64_t)M * K / QBLOCK);
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        gemm_quant(type, w, K, N, &x, M, out, N);
        double t = now() - t0;
        if (t < best) best = t;
    }
    free(w), free(x.q), free(x.scale), free(x.qoff), free(xf), free(out);
    return (double)M * N * K / best / 1e9;
}

int main(void) {
    printf("kernels %s, one core, G multiply-adds/s\n", kernels_simd_name);
    double p = peak();
    if (p > 0) printf("  peak (vpdpbusd alone)     %7.1f\n", p);
    for (int type = WEIGHT_Q8; type <= WEIGHT_Q4; type++) {
        double c = product(type, 32, 256, 4096, 200), s = product(type, 32, 14336, 4096, 5);
        printf("  %s, 32 tokens: in cache %7.1f", type == WEIGHT_Q8 ? "q8" : "q4", c);
        if (p > 0) printf(" (%3.0f%% of peak)", 100 * c / p);
        printf(", streaming %7.1f", s);
        if (p > 0) printf(" (%3.0f%%)", 100 * s / p);
        printf("\n");
    }
    double pb = peak_bf16();
    if (pb > 0) printf("  peak (vdpbf16ps alone)    %7.1f\n", pb);
    for (int act = 0; act < 2; act++) {
        double c = product_bf16(act, 32, 256, 4096, 100), s = product_bf16(act, 32, 14336, 4096, 3);
        printf("  bf16, %s activations, 32 tokens: in cache %7.1f", act ? "bf16" : "f32", c);
        if (pb > 0) printf(" (%3.0f%% of vdpbf16ps)", 100 * c / pb);
        printf(", streaming %7.1f", s);
        if (pb > 0) printf(" (%3.0f%%)", 100 * s / pb);
        printf("\n");
    }
    return 0;
}
