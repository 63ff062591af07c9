// pool.c: the thread pool of pool.h.
//
// Jobs come in quick succession while a token is computed (a few per layer),
// so a waiting thread first spins briefly on an atomic counter, then sleeps on
// a condition variable: between tokens and while the user types, idle
// workers hold no core. With more threads than CPUs, spinning would only take
// the CPU from the thread being waited for, so then nobody spins.

#include "pool.h"
#include "util.h"

#include <sched.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define POOL_SPIN 20000 // polls before sleeping, roughly 50-100 microseconds


typedef struct { ThreadPool *pool; int tid; } WorkerArg;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *pool_worker(void *p) {
    WorkerArg *wa = p;
    ThreadPool *pool = wa->pool;
    uint64_t seen = 0;
    for (;;) {
        uint64_t r = atomic_load_explicit(&pool->round, memory_order_acquire);
        for (int spin = 0; r == seen && spin < pool->spin; spin++) {
            cpu_relax();
            r = atomic_load_explicit(&pool->round, memory_order_acquire);
        }
        if (r == seen) { // nothing came: sleep until the caller bumps round
            pthread_mutex_lock(&pool->mu);
            pool->sleepers++;
            while ((r = atomic_load(&pool->round)) == seen) pthread_cond_wait(&pool->wake, &pool->mu);
            pool->sleepers--;
            pthread_mutex_unlock(&pool->mu);
        }
        if (atomic_load(&pool->quit)) break;
        seen = r;
        pool->fn(pool->arg, wa->tid, pool->n);
        if (atomic_fetch_sub_explicit(&pool->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool->mu); // the last one out wakes the caller if it sleeps
            if (pool->caller_asleep) pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->mu);
        }
    }
    free(wa);
    return NULL;
}

#ifndef MIXTRAL_SYSFS
#define MIXTRAL_SYSFS "/sys" // (a test build points it at a fake tree)
#endif

int pool_default_threads(void) {
#ifdef __linux__
    // Hybrid x86 CPUs (performance and efficiency cores): Linux lists the
    // performance cores' CPUs in cpu_core/cpus, e.g. "0-15". Mixtral on the
    // efficiency cores only slows the performance cores' work down: each round
    // of the pool waits for its slowest thread.
    cpu_set_t set;
    FILE *f = fopen(MIXTRAL_SYSFS "/devices/cpu_core/cpus", "r");
    if (f && sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = 0, a, b;
        char sep;
        while (fscanf(f, "%d", &a) == 1) {
            b = a;
            if (fscanf(f, "%c", &sep) == 1 && sep == '-') { if (fscanf(f, "%d", &b) != 1) break; if (fscanf(f, "%c", &sep) != 1) sep = 0; }
            for (int c = a; c <= b && c < CPU_SETSIZE; c++) n += c >= 0 && CPU_ISSET(c, &set);
            if (sep != ',') break;
        }
        fclose(f);
        if (n > 0) return n;
    } else if (f) {
        fclose(f);
    }
#elif defined(__APPLE__)
    int perf = performance_cores();
    if (perf > 0 && perf < pool_usable_cpus()) return perf;
#endif
    return pool_usable_cpus();
}

int pool_usable_cpus(void) {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int pool_init(ThreadPool *pool, int n) {
    memset(pool, 0, sizeof(*pool));
    pool->n = n;
    pool->spin = n <= pool_usable_cpus() ? POOL_SPIN : 0;
    atomic_init(&pool->round, 0);
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->quit, 0);
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    pool->threads = calloc(n, sizeof(pthread_t));
    pool->shares = aligned_alloc(64, n * sizeof(struct Share));
    if (!pool->threads || !pool->shares) return -1;
    sigset_t all, old;
    sigfillset(&all);
    // workers inherit the mask: signals go to the caller; but not the signals of a
    // fault, which go to the thread that faulted (a blocked one would kill the process)
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = 0;
    for (int i = 1; i < n && !err; i++) {
        WorkerArg *wa = calloc(1, sizeof(WorkerArg));
        if (!wa) { err = -1; break; }
        wa->pool = pool;
        wa->tid = i;
        if (pthread_create(&pool->threads[i - 1], NULL, pool_worker, wa) != 0) { free(wa); err = -1; }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return err;
}

void pool_run(ThreadPool *pool, PoolFn fn, void *arg) {
    if (pool->n == 1) { fn(arg, 0, 1); return; }
    pool->fn = fn;
    pool->arg = arg;
    atomic_store_explicit(&pool->pending, pool->n - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool->round, 1, memory_order_release);
    pthread_mutex_lock(&pool->mu);
    if (pool->sleepers) pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    fn(arg, 0, pool->n);
    for (int spin = 0; atomic_load_explicit(&pool->pending, memory_order_acquire) > 0 && spin < pool->spin; spin++)
        cpu_relax();
    if (atomic_load_explicit(&pool->pending, memory_order_acquire) > 0) {
        pthread_mutex_lock(&pool->mu);
        pool->caller_asleep = 1;
        while (atomic_load(&pool->pending) > 0) pthread_cond_wait(&pool->done, &pool->mu);
        pool->caller_asleep = 0;
        pthread_mutex_unlock(&pool->mu);
    }
}

void pool_free(ThreadPool *pool) {
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->quit, 1);
    atomic_fetch_add(&pool->round, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i - 1], NULL);
    free(pool->threads);
    free(pool->shares);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
}

void split_range(int total, int tid, int n, int *start, int *end) {
    *start = (int)((int64_t)total * tid / n);
    *end = (int)((int64_t)total * (tid + 1) / n);
}

// Shares with stealing: `blocks` items are dealt out as n contiguous shares,
// one per worker, which each worker takes from the front, one block at a
// time, in order. A worker whose share is done takes blocks from the back of
// the others'. So each worker reads memory in one sequential stream, as with
// fixed shares, yet a worker slowed down (another process on its core) does
// not leave the others waiting for it. A share's [front, back) is one atomic
// word, so that each block is taken by exactly one worker.

// Called before the job is run (pool_run publishes the shares to the workers).
void pool_share(ThreadPool *pool, int64_t blocks) {
    for (int t = 0; t < pool->n; t++) {
        uint64_t front = (uint64_t)(blocks * t / pool->n), back = (uint64_t)(blocks * (t + 1) / pool->n);
        atomic_store_explicit(&pool->shares[t].span, front << 32 | back, memory_order_relaxed);
    }
}

static int64_t share_take(struct Share *sh, int from_back) {
    uint64_t v = atomic_load_explicit(&sh->span, memory_order_relaxed);
    for (;;) {
        uint64_t front = v >> 32, back = v & 0xFFFFFFFFu;
        if (front >= back) return -1;
        uint64_t next = from_back ? v - 1 : v + (1ull << 32);
        if (atomic_compare_exchange_weak_explicit(&sh->span, &v, next, memory_order_relaxed, memory_order_relaxed))
            return (int64_t)(from_back ? back - 1 : front);
    }
}

int64_t pool_next_block(ThreadPool *pool, int tid) {
    int64_t b = share_take(&pool->shares[tid], 0);
    for (int k = 1; b < 0 && k < pool->n; k++) b = share_take(&pool->shares[(tid + k) % pool->n], 1);
    return b;
}

