// expert_cache.h: the experts of a model larger than memory, in a cache of slots.
//
// For a model larger than the memory it may use, everything but the experts is
// kept in memory by the caller, and the experts live in a fixed number of slots,
// each holding one expert's bytes (its w1, w3 and w2, one span of the file)
// exactly as they lie in the file: the kernels read the same bytes from a slot
// as from the file, so the output is identical. A layer's chosen experts are
// acquired (read into a free slot on a miss, in large reads on I/O threads of
// the cache's own) and released when the layer is done. While a layer
// computes, the experts that the next layer's router is guessed to pick are
// read ahead (after Eliseev and Mazur, "Fast Inference of Mixture-of-Experts
// Language Models with Offloading", 2023: the residual stream changes slowly,
// so the guess is often right, and a wrong one costs only a read). Which slot
// a miss takes: the least recently used (EXPERT_CACHE_LRU) or the expert used
// least often lately (EXPERT_CACHE_USAGE). Reads bypass the page cache where
// the system allows (O_DIRECT), so that memory holds one copy of an expert.
#ifndef EXPERT_CACHE_H
#define EXPERT_CACHE_H

#include <stdint.h>
#include <stdio.h>

typedef struct ExpertCache ExpertCache;

enum { EXPERT_CACHE_LRU, EXPERT_CACHE_USAGE };

// Where the experts lie in the model file: expert e of layer l is the span of
// span_bytes bytes at file offset span[l * n_experts + e].
typedef struct {
    int n_layers, n_experts;
    const uint64_t *span;  // (n_layers * n_experts,)
    uint64_t span_bytes;
} ExpertLayout;

// What the cache did, for --expert-stats, the run's summary and --bench.
typedef struct {
    int n_slots;
    uint64_t slot_bytes;      // memory of one slot
    uint64_t memory;          // what the caller gave the cache (its slots fill it)
    uint64_t hits, misses;    // lookups of an expert that was, or was not, in a slot
    uint64_t prefetched, prefetch_used; // experts read ahead, and of those the ones then used
    uint64_t file_bytes;      // bytes read from the model file
    double read_seconds;      // wall time with reads in flight
    double wait_seconds;      // time acquire waited for reads
} ExpertCacheReport;

// The memory one slot takes for experts laid out so (the span and the ends of
// the file blocks it starts and ends in).
uint64_t expert_cache_slot_bytes(const ExpertLayout *layout);
// Opens the cache for the model file at path (fd: open for reading; the cache
// owns it from here and closes it), with as many slots as `memory` bytes hold
// (at most one per expert); policy: EXPERT_CACHE_*. NULL when `memory` holds no
// slot (the caller says how much more it needs: expert_cache_slot_bytes).
// The layout is copied.
ExpertCache *expert_cache_open(const char *path, int fd, uint64_t file_size, const ExpertLayout *layout,
                               uint64_t memory, int policy);
// Makes experts es[0..n) of layer l ready, as many as there are slots for (a
// prefix of es: fewer than n only when a layer needs more experts at once than
// the cache holds), and holds them until released; at[i] gets the memory
// where expert es[i]'s span now lies. Queues reads ahead of experts
// ahead[0..n_ahead) of layer l+1 behind its own. Returns how many are ready.
// A failed read dies, naming the error.
int expert_cache_acquire(ExpertCache *c, int l, const int *es, int n, const uint8_t **at, const int *ahead, int n_ahead);
void expert_cache_release(ExpertCache *c, int l, const int *es, int n);
// Reads `bytes` at file offset `offset` into buf (an embedding row: the cache
// keeps no copy), or dies naming the error.
void expert_cache_read(ExpertCache *c, uint64_t offset, uint64_t bytes, void *buf);
// The statistics so far, after the reads in flight have settled.
ExpertCacheReport expert_cache_report(ExpertCache *c);
// One line on them, for people.
void expert_cache_print(const ExpertCacheReport *r, FILE *out);
void expert_cache_close(ExpertCache *c);

#endif
