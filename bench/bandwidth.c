// bandwidth: the machine's memory read bandwidth, the ceiling for decoding.
//
//   bandwidth [THREADS] [MIB]
//
// Each thread reads its share of a buffer far larger than the caches, again
// and again. Reported, in GB/s (1e9 bytes/s): the sustained rate over all
// passes but the first (the figure decoding is compared with, since decoding
// is timed over many tokens, not its best moment) and the best single pass;
// then one JSON line. Built with the same flags as mixtral.
//
// On a shared machine single passes vary a lot (measured here, 2 threads:
// passes of 25 to 36 GB/s within one run), so the best pass overstates what
// a program can sustain for seconds.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef struct { const uint8_t *p; size_t n; uint64_t sink; pthread_barrier_t *bar; int passes; double *times; } Arg;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Reads n bytes (a multiple of 128) with independent accumulators.
static uint64_t read_all(const uint8_t *p, size_t n) {
#if defined(__AVX2__)
    __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
    for (size_t i = 0; i < n; i += 128) {
        a = _mm256_xor_si256(a, _mm256_load_si256((const __m256i *)(p + i)));
        b = _mm256_xor_si256(b, _mm256_load_si256((const __m256i *)(p + i + 32)));
        c = _mm256_xor_si256(c, _mm256_load_si256((const __m256i *)(p + i + 64)));
        d = _mm256_xor_si256(d, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
    return (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
#else
    const uint64_t *q = (const uint64_t *)p;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i < n / 8; i += 4) { a ^= q[i]; b ^= q[i + 1]; c ^= q[i + 2]; d ^= q[i + 3]; }
    return a ^ b ^ c ^ d;
#endif
}

static void *worker(void *v) {
    Arg *a = v;
    for (int pass = 0; pass < a->passes; pass++) {
        pthread_barrier_wait(a->bar); // all threads start each pass together
        double t0 = now();
        a->sink ^= read_all(a->p, a->n);
        pthread_barrier_wait(a->bar);
        if (a->times) a->times[pass] = now() - t0; // thread 0 times the pass for all
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    size_t mib = argc > 2 ? (size_t)atol(argv[2]) : 1024;
    if (threads < 1 || threads > 1024 || mib < 64) { fprintf(stderr, "usage: bandwidth [THREADS] [MIB >= 64]\n"); return 1; }
    size_t bytes = mib << 20, share = bytes / threads / 128 * 128;
    uint8_t *buf = aligned_alloc(4096, bytes);
    if (!buf) { fprintf(stderr, "bandwidth: cannot allocate %zu MiB\n", mib); return 1; }
    memset(buf, 1, bytes); // touch every page
    enum { PASSES = 20 };
    int passes = PASSES;
    double times[PASSES];
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, threads);
    pthread_t tid[1024];
    Arg args[1024];
    for (int t = 0; t < threads; t++) {
        args[t] = (Arg){buf + t * share, share, 0, &bar, passes, t == 0 ? times : NULL};
        if (t > 0) pthread_create(&tid[t], NULL, worker, &args[t]);
    }
    worker(&args[0]);
    uint64_t sink = 0;
    for (int t = 1; t < threads; t++) { pthread_join(tid[t], NULL); sink ^= args[t].sink; }
    double fastest = 1e9, total = 0;
    for (int i = 1; i < passes; i++) { // pass 0 warms up
        total += times[i];
        if (times[i] < fastest) fastest = times[i];
    }
    double bytes_read = (double)share * threads, sustained = bytes_read * (passes - 1) / total / 1e9;
    double best = bytes_read / fastest / 1e9;
    printf("read bandwidth with %d thread%s (%zu MiB, %d passes): sustained %.1f GB/s, best pass %.1f GB/s%s\n", threads,
           threads > 1 ? "s" : "", mib, passes - 1, sustained, best, sink == 42 ? " " : "");
    printf("{\"threads\": %d, \"read_gb_per_s\": %.2f, \"best_pass_gb_per_s\": %.2f}\n", threads, sustained, best);
    free(buf);
    return 0;
}
