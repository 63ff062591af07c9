// peak: the machine's peak multiply-add rate, for judging the prefill GEMM.
//
//   peak [THREADS]
//
// Each thread runs independent chains of multiply-adds on registers only:
// int8 products summed in pairs (vpmaddubsw, the instruction the q8/q4
// kernels multiply with) and f32 FMAs. Reports G multiply-adds per second for both, then a JSON line.
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

// Returns multiply-adds done. 12 independent chains cover the latency, and
// the empty asm keeps the compiler from hoisting the products out of the loop.
static double run_int8(void) {
#if defined(__AVX2__)
    __m256i b = _mm256_set1_epi8(-2), c[12];
    for (int i = 0; i < 12; i++) c[i] = _mm256_set1_epi8((char)(i + 1));
    for (long it = 0; it < ITERS; it++) {
        __asm__ volatile("" : "+x"(b));
        for (int i = 0; i < 12; i++) c[i] = _mm256_maddubs_epi16(c[i], b);
    }
    __m256i s = c[0];
    for (int i = 1; i < 12; i++) s = _mm256_xor_si256(s, c[i]);
    sink_i = _mm256_extract_epi32(s, 0);
    return (double)ITERS * 12 * 32; // 32 int8 products per instruction
#else
    return 0;
#endif
}

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

typedef struct { int kind; double macs, secs; } Arg;

static void *worker(void *v) {
    Arg *a = v;
    double t0 = now();
    a->macs = a->kind ? run_f32() : run_int8();
    a->secs = now() - t0;
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) { fprintf(stderr, "usage: peak [THREADS]\n"); return 1; }
    double rate[2];
    for (int kind = 0; kind < 2; kind++) {
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
    printf("peak multiply-add rate with %d thread%s: int8 %.0f G/s, f32 %.0f G/s\n", threads, threads > 1 ? "s" : "",
           rate[0], rate[1]);
    printf("{\"threads\": %d, \"int8_gmac_per_s\": %.1f, \"f32_gmac_per_s\": %.1f}\n", threads, rate[0], rate[1]);
    return 0;
}
