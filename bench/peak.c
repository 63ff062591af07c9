// peak: the machine's peak multiply-add rate, for judging the prefill GEMM.
//
//   peak [THREADS]
//
// Each thread runs independent chains of multiply-adds on registers only:
// int8 products summed in pairs (vpmaddubsw, the instruction the q8/q4
// kernels multiply with), f32 FMAs, the multiply instructions alone of a
// q8 and of a q4 product, and all the arithmetic of a block of the engine's
// prompt tile (run_block below). The multiplies alone:
//   q8: per 32 int8 products one vpmaddubsw and one vpmaddwd (which widens
//       the pairs' sums to int32; two of them cannot share one, they could
//       overflow int16);
//   q4: per 64 two vpmaddubsw, added in int16, and one vpmaddwd.
// How these compare with vpmaddubsw alone depends on how the core shares its
// multiply units (measured on this Zen 3: q8 about 2/3 of the int8 rate, q4
// about the same as it). The whole block adds q8's sign changes and, for
// both, the conversion and FMA of each block's scales. Reports G
// multiply-adds per second for each, then a JSON line.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define ITERS 20000000L

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static volatile float sink_f;
static volatile int sink_i;

// Each returns the multiply-adds done. 12 independent chains cover the
// latency, and the empty asm keeps the compiler from hoisting the products out
// of the loop. INT_CHAINS(STEP, MACS): c[i] = STEP, MACS products per step.
#if defined(__AVX2__)
#define INT_CHAINS(STEP, MACS)                                                      \
    __m256i b = _mm256_set1_epi8(-2), c[12];                                        \
    for (int i = 0; i < 12; i++) c[i] = _mm256_set1_epi8((char)(i + 1));            \
    for (long it = 0; it < ITERS; it++) {                                           \
        __asm__ volatile("" : "+x"(b));                                             \
        for (int i = 0; i < 12; i++) c[i] = STEP;                                   \
    }                                                                               \
    __m256i s = c[0];                                                               \
    for (int i = 1; i < 12; i++) s = _mm256_xor_si256(s, c[i]);                     \
    sink_i = _mm256_extract_epi32(s, 0);                                            \
    return (double)ITERS * 12 * (MACS);
#else
#define INT_CHAINS(STEP, MACS) return 0;
#endif

// int8 products summed in pairs: 32 per instruction.
static double run_int8(void) { INT_CHAINS(_mm256_maddubs_epi16(c[i], b), 32) }

// The q8 product's multiplies: 32 products per maddubs + madd pair.
static double run_q8(void) { INT_CHAINS(_mm256_madd_epi16(_mm256_maddubs_epi16(c[i], b), b), 32) }

// The q4 product's multiplies: 64 products per two maddubs and one madd.
static double run_q4(void) {
    INT_CHAINS(_mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c[i], b), _mm256_maddubs_epi16(b, c[i])), b), 64)
}

// All the arithmetic of one block of 64 weights in the engine's 2x4 tile
// (2 weight rows by 4 tokens), on registers: for q8 per (row, token) two
// vpsignb, two vpmaddubsw, two vpmaddwd, an add, then for each format the
// conversion to float and one FMA with the scales (q4: two vpmaddubsw, an add,
// one vpmaddwd, the conversion and the FMA). Nothing else: no weights or
// inputs streamed, no scales loaded (the compiler keeps what does not fit in
// the 16 registers on the stack, as the engine keeps the inputs in memory).
// So this is the most a kernel built from these instructions can do: the
// ceiling of a prompt.
#if defined(__AVX2__) && defined(__FMA__)
static double run_block(int q4) {
    __m256i w[2][2], x[4][2];
    __m256 acc[8], S = _mm256_set1_ps(1e-9f);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) w[i][j] = _mm256_set1_epi8((char)(i * 3 + j + 1));
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 2; j++) x[i][j] = _mm256_set1_epi8((char)-(i * 2 + j + 1));
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    long iters = ITERS / 4;
    for (long it = 0; it < iters; it++) {
        __asm__ volatile("" : "+x"(w[0][0]), "+x"(w[0][1]), "+x"(w[1][0]), "+x"(w[1][1]));
        for (int t = 0; t < 4; t++) {
            __m256i a0 = _mm256_abs_epi8(x[t][0]), a1 = _mm256_abs_epi8(x[t][1]);
            for (int r = 0; r < 2; r++) {
                __m256i p;
                if (q4) p = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w[r][0], x[t][0]),
                                                                _mm256_maddubs_epi16(w[r][1], x[t][1])), ones);
                else p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(w[r][0], x[t][0])), ones),
                                          _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(w[r][1], x[t][1])), ones));
                acc[r * 4 + t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), S, acc[r * 4 + t]);
            }
        }
    }
    __m256 s = acc[0];
    for (int i = 1; i < 8; i++) s = _mm256_add_ps(s, acc[i]);
    sink_f = _mm256_cvtss_f32(s);
    return (double)iters * 8 * 64;
}
#else
static double run_block(int q4) { (void)q4; return 0; }
#endif
static double run_q8_block(void) { return run_block(0); }
static double run_q4_block(void) { return run_block(1); }

static double run_f32(void) {
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a = _mm256_set1_ps(1.0001f), c[12];
    for (int i = 0; i < 12; i++) c[i] = _mm256_set1_ps((float)i);
    for (long it = 0; it < ITERS; it++) {
        __asm__ volatile("" : "+x"(a));
        for (int i = 0; i < 12; i++) c[i] = _mm256_fmadd_ps(c[i], a, a);
    }
    __m256 s = c[0];
    for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, c[i]);
    sink_f = _mm256_cvtss_f32(s);
    return (double)ITERS * 12 * 8;
#else
    return 0;
#endif
}

enum { KINDS = 6 };
typedef struct { int kind; double macs, secs; } Arg;

static void *worker(void *v) {
    Arg *a = v;
    double t0 = now();
    double (*run[KINDS])(void) = {run_int8, run_f32, run_q8, run_q4, run_q8_block, run_q4_block};
    a->macs = run[a->kind]();
    a->secs = now() - t0;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) { fprintf(stderr, "usage: peak [THREADS]\n"); return 1; }
    double rate[KINDS];
    for (int kind = 0; kind < KINDS; kind++) {
        pthread_t tid[256];
        Arg args[256];
        for (int t = 0; t < threads; t++) { args[t].kind = kind; pthread_create(&tid[t], NULL, worker, &args[t]); }
        double macs = 0, secs = 0;
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
            macs += args[t].macs;
            if (args[t].secs > secs) secs = args[t].secs;
        }
        rate[kind] = macs / secs / 1e9;
    }
    if (rate[0] == 0) { fprintf(stderr, "peak: built without AVX2/FMA, nothing measured\n"); return 1; }
    printf("peak multiply-add rate with %d thread%s: int8 %.0f G/s, f32 %.0f G/s; multiplies of a q8 product %.0f G/s, "
           "of a q4 product %.0f G/s; all the arithmetic of a 2x4 tile's block: q8 %.0f G/s, q4 %.0f G/s\n", threads,
           threads > 1 ? "s" : "", rate[0], rate[1], rate[2], rate[3], rate[4], rate[5]);
    printf("{\"threads\": %d, \"int8_gmac_per_s\": %.1f, \"f32_gmac_per_s\": %.1f, \"q8_gmac_per_s\": %.1f, "
           "\"q4_gmac_per_s\": %.1f, \"q8_block_gmac_per_s\": %.1f, \"q4_block_gmac_per_s\": %.1f}\n", threads, rate[0],
           rate[1], rate[2], rate[3], rate[4], rate[5]);
    return 0;
}
